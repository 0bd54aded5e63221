"""Reference (shadow) models for LiRA / RMIA: many models on random halves of a data pool.

Small MLPs are trained all at once: their parameters are stacked along a leading model axis
(``torch.func.stack_module_state``) and one ``vmap``-ed ``functional_call`` runs every model's
forward pass in a single batched kernel. The optimiser sees the stacked tensors; because Adam, AdamW
and SGD (with momentum / weight decay) are element-wise, one optimiser over the stack performs
exactly the updates of R separate optimisers, and summing the R mean losses keeps each model's
gradient its own. Each step gathers every model's mini-batch from the shared pool with one
``index_select`` (the pool itself is never copied per model).

``batched=False`` trains the same models one after another the suite's normal way (``PlainStep`` +
``ClassificationObjective``, one model at a time): the benchmark's baseline and the equivalence test.

Under ``torchrun`` the models are dealt out round-robin (rank r trains models r, r + size, ...) and
``ReferenceMLPs.logits`` gathers every rank's outputs back in model order. A model's init and batch
order depend only on its index and the seed, and on CPU its updates do not depend on where it sits
in the stack (unfused optimiser, see ``fused``), so the result is bit-identical to one process.
Two exceptions: with ``model.dropout > 0`` vmap draws one dropout tensor for a rank's whole stack,
and on GPU the fused optimiser and cuBLAS may round differently for another stack size; the models
then agree in distribution (up to float rounding), not bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from trustml.config import Config, ConfigError
from trustml.models.mlp import MLP
from trustml.progress import bar as progress_bar
from trustml.training.distributed import World, current
from trustml.training.objectives import ClassificationObjective
from trustml.runner import make_optimizer
from trustml.training.step import PlainStep


def half_masks(n_models: int, n_examples: int, seed: int) -> np.ndarray:
    """(R, N) IN mask: every model trains on a uniformly random half of the pool, so each example
    is IN for about half of the models (and every model's training set has the same size, which is
    what lets them share batch shapes)."""
    if n_models < 1 or n_examples < 2:
        raise ValueError(f"need >= 1 model and >= 2 examples, got {n_models} and {n_examples}")
    rng = np.random.default_rng(seed)
    keys = rng.random((n_models, n_examples))
    ranks = keys.argsort(1).argsort(1)
    return ranks < n_examples // 2


@dataclass
class ReferenceMLPs:
    """R trained MLPs as stacked parameters (this rank's share of them), and which pool examples
    each of the R was trained on."""

    base: nn.Module  # architecture template (its own weights are not used)
    params: dict[str, torch.Tensor]  # each (R_rank, ...): models rank, rank + size, ...
    buffers: dict[str, torch.Tensor]
    in_mask: np.ndarray  # (R, N) over the pool, all R models
    world: World = World()

    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(R, N, C) logits of every reference model on ``x``, in eval mode (a collective under
        torchrun: every rank must call it with the same ``x``)."""
        self.base.eval()
        device = next(iter(self.params.values())).device
        out = [_stacked_forward(self.base, self.params, self.buffers, part.to(device), shared=True)
               for part in x.split(chunk)]
        return _gather_models(torch.cat(out, dim=1).cpu(), self.world)


def _gather_models(local: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's (R_rank, ...) share, back in model order on every rank."""
    if not world.distributed:
        return local
    shares: list[torch.Tensor | None] = [None] * world.size
    dist.all_gather_object(shares, local)
    out = local.new_empty(sum(len(share) for share in shares), *local.shape[1:])
    for rank, share in enumerate(shares):
        out[rank::world.size] = share
    return out


def _stacked_forward(base, params, buffers, x, shared: bool) -> torch.Tensor:
    """vmap over the model axis; ``x`` is (N, d) shared by all models or (R, B, d) per model."""

    def one(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    return torch.vmap(one, in_dims=(0, 0, None if shared else 0), randomness="different")(
        params, buffers, x)


def _stack(models: list[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stacked parameters for training. Weight matrices (R, out, in) are stored with the memory
    layout of (R, in, out): the batched backward produces their gradients as ``x^T @ grad`` in that
    layout, so autograd accumulates them as they are instead of copying each one transposed."""
    params, buffers = stack_module_state(models)
    params = {k: v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
              if v.dim() == 3 else v for k, v in params.items()}
    return params, buffers


def _index_schedule(in_mask: np.ndarray, model_ids: range, batch_size: int, seed: int, epoch: int):
    """Per step, an (R, b) tensor of pool indices: every model walks its own shuffled IN set with
    ShuffledBatches semantics (fixed batch size, a smaller last batch). Model r's order depends only
    on (seed, epoch, r), so batched and one-by-one training see the same batches."""
    rows = []
    for r, row in zip(model_ids, in_mask):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_007 + r)
        members = torch.as_tensor(np.nonzero(row)[0])
        rows.append(members[torch.randperm(len(members), generator=gen)])
    shuffled = torch.stack(rows)
    for start in range(0, shuffled.shape[1], batch_size):
        yield shuffled[:, start:start + batch_size]


def _optimizer(config: Config, params, fused: bool) -> torch.optim.Optimizer:
    """The suite's optimiser (same class and hyper-parameters); ``fused`` switches to the fused
    kernel, the same element-wise update in one pass over all tensors."""
    optimizer = make_optimizer(config.train, params)
    if fused:
        for group in optimizer.param_groups:
            group.update(fused=True, foreach=False)
    return optimizer


def _build(config: Config, n_features: int, n_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = config.model
    return MLP(n_features, m.hidden, n_classes, m.activation, m.dropout, m.norm)


def _steps(config: Config, in_mask: np.ndarray, model_ids: range, seed: int):
    """(epoch, index batch) pairs of the whole run, honouring ``train.max_steps``."""
    done = 0
    for epoch in range(config.train.epochs):
        for index in _index_schedule(in_mask, model_ids, config.train.batch_size, seed, epoch):
            if config.train.max_steps is not None and done >= config.train.max_steps:
                return
            done += 1
            yield epoch, index


def train_reference_mlps(
    config: Config,
    x: torch.Tensor,
    y: torch.Tensor,
    in_mask: np.ndarray,
    device: str | torch.device = "cpu",
    batched: bool = True,
    seed: int = 0,
    progress: bool = True,
    fused: bool | None = None,
    world: World | None = None,
) -> ReferenceMLPs:
    """Train ``len(in_mask)`` MLPs of ``config.model`` with ``config.train``'s optimiser, batch
    size and epochs, model r on the pool rows where ``in_mask[r]`` is True. ``fused`` picks the
    fused optimiser kernel (default: on CUDA only; the CPU kernel rounds its vectorised body and
    scalar tail differently, so a model's update would depend on its place in the stack;
    ``fused=False, batched=False`` is exactly what ``run_training`` does per step). ``world``
    (default: this process's, one rank outside torchrun) shares the models out across ranks
    (``device`` is then this rank's device)."""
    if config.model.kind != "mlp":
        raise ConfigError(f"model.kind: batched reference models need 'mlp', got "
                          f"{config.model.kind!r} (language models train in turn)")
    in_mask = np.asarray(in_mask, dtype=bool)
    if in_mask.ndim != 2 or in_mask.shape[1] != len(x) or len(set(in_mask.sum(1))) != 1:
        raise ValueError("in_mask must be (R, N) over the pool with equally many IN rows per model")
    device = torch.device(device)
    fused = device.type == "cuda" if fused is None else fused
    x, y = x.to(device), y.to(device)
    n_classes = max(int(y.max()) + 1, 2)
    world = current() if world is None else world
    if len(in_mask) < world.size:
        raise ConfigError(f"attack.n_reference: {len(in_mask)} reference models cannot be shared "
                          f"by {world.size} ranks; use at least one per rank")
    share, mine = range(world.rank, len(in_mask), world.size), in_mask[world.rank::world.size]
    models = [_build(config, x.shape[1], n_classes, seed + r).to(device) for r in share]
    total = sum(1 for _ in _steps(config, in_mask[:1], range(1), seed))
    progress = progress and world.is_main
    if batched:
        params, buffers = _stack(models)
        base = copy.deepcopy(models[0]).to("meta")
        optimizer = _optimizer(config, params.values(), fused)
        steps = _steps(config, mine, share, seed)
        for _, index in progress_bar(steps, total=total, disable=not progress, leave=False,
                             desc=f"{len(models)} reference MLPs (batched)"):
            flat = index.to(device).flatten()
            xb = x.index_select(0, flat).view(*index.shape, x.shape[1])
            logits = _stacked_forward(base, params, buffers, xb, shared=False)
            losses = F.cross_entropy(logits.flatten(0, 1), y.index_select(0, flat),
                                     reduction="none")
            optimizer.zero_grad(set_to_none=True)
            losses.view(index.shape).mean(1).sum().backward()
            optimizer.step()
        return ReferenceMLPs(base, {k: v.detach() for k, v in params.items()}, buffers, in_mask,
                             world)
    objective = ClassificationObjective()
    for r, row, model in zip(share, mine, progress_bar(models, disable=not progress, leave=False,
                                                       desc="reference MLPs (one by one)")):
        step = PlainStep(_optimizer(config, model.parameters(), fused))
        model.train()
        for _, index in _steps(config, row[None], range(r, r + 1), seed):
            index = index[0].to(device)
            step.step(model, objective, {"x": x[index], "y": y[index]})
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return ReferenceMLPs(base, {k: v.detach() for k, v in params.items()}, buffers, in_mask, world)
