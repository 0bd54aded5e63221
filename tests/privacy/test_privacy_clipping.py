"""PerSampleClipper equals a naive loop (one sample at a time: autograd, clip, sum) in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from trustml.privacy import PerSampleClipper
from trustml.privacy.broadcast import _differs
from trustml.privacy.clipping import _probe_groups
from trustml.privacy.factored import Factored, Grams

STRATEGIES = ["auto", "ghost", "materialise"]


def naive(model, loss_fn, inputs, max_norm=float("inf")):
    """Reference: per-sample gradients by one autograd call per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(inputs[0].shape[0]):
        loss = loss_fn(model, *[x[i : i + 1] for x in inputs]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_norm / norm.item())
        for t, g in zip(total, grads):
            t += factor * g
    return torch.stack(norms), total


def check(model, loss_fn, inputs, strategy="auto", device="cpu", dtype=torch.float64, rtol=1e-6):
    model = model.to(device, dtype)
    inputs = [(x.to(dtype) if x.is_floating_point() else x).to(device) for x in inputs]
    norms_ref, _ = naive(model, loss_fn, inputs)
    max_norm = norms_ref.median().item()  # some samples clipped, some not
    _, grads_ref = naive(model, loss_fn, inputs, max_norm)
    clipper = PerSampleClipper(model, max_norm, strategy=strategy)
    model.zero_grad(set_to_none=True)
    norms = clipper.backward(loss_fn(model, *inputs))
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(norms.to(norms_ref.dtype), norms_ref, rtol=rtol, atol=atol)
    for (name, p), ref in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], grads_ref
    ):
        assert p.grad is not None, name
        torch.testing.assert_close(
            p.grad, ref, rtol=rtol, atol=atol * 100, msg=lambda m, name=name: f"{name}: {m}"
        )
    clipper.remove()
    return clipper


def sq_loss(model, x, target):
    out = model(x)
    return ((out - target) ** 2).flatten(1).sum(1) + out.flatten(1).sin().sum(1)


torch.manual_seed(0)
B, T = 6, 5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_2d(strategy):
    torch.manual_seed(1)
    check(nn.Linear(7, 3), sq_loss, [torch.randn(B, 7), torch.randn(B, 3)], strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [2, 12])  # short: ghost cheaper; long: materialising cheaper
def test_linear_3d(strategy, steps):
    torch.manual_seed(2)
    check(nn.Linear(8, 6), sq_loss, [torch.randn(B, steps, 8), torch.randn(B, steps, 6)], strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hf_conv1d(strategy):
    torch.manual_seed(3)
    check(Conv1D(3, 4), sq_loss, [torch.randn(B, T, 4), torch.randn(B, T, 3)], strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_embedding_with_padding(strategy):
    torch.manual_seed(4)
    emb = nn.Embedding(11, 4, padding_idx=0)
    ids = torch.randint(0, 11, (B, 8))  # repeated tokens: the token-equality mask matters
    check(emb, sq_loss, [ids, torch.randn(B, 8, 4)], strategy)


def test_layernorm_and_groupnorm():
    torch.manual_seed(5)
    ln = nn.LayerNorm(4)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    check(ln, sq_loss, [torch.randn(B, T, 4), torch.randn(B, T, 4)])
    gn = nn.GroupNorm(2, 4)
    nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
    check(gn, sq_loss, [torch.randn(B, 4, 3), torch.randn(B, 4, 3)])


class Gated(nn.Module):
    """A layer with its own parameter and no fast rule: goes through torch.func."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) * torch.sigmoid(self.gate) + x.tanh() * self.gate


def test_generic_path_and_conv2d():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 4), Gated())
    check(model, sq_loss, [torch.randn(B, T, 4), torch.randn(B, T, 4)])
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    check(conv, sq_loss, [torch.randn(B, 2, 4, 4), torch.randn(B, 2)])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mlp_with_frozen_layer(strategy):
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 2)
    )
    model[0].bias.requires_grad_(False)

    def ce(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    check(model, ce, [torch.randn(B, 10), torch.randint(0, 2, (B,))], strategy)
    assert model[0].bias.grad is None


class TwiceAndTied(nn.Module):
    """A layer called twice per forward, a broadcast (batch-1) input, and a tied weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.pos = nn.Embedding(T, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 9, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        h = self.mix(torch.tanh(self.mix(h)))
        return self.out(h)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reuse_broadcast_and_tying(strategy):
    torch.manual_seed(8)
    check(TwiceAndTied(), sq_loss, [torch.randint(0, 9, (B, T)), torch.randn(B, T, 9)], strategy)


class SharedReads(nn.Module):
    """Three layers read one input (BERT's query / key / value) and three embeddings are summed
    into one hidden state (one output gradient): their Gram matrices are shared."""

    def __init__(self):
        super().__init__()
        self.words, self.kinds = nn.Embedding(9, 4), nn.Embedding(2, 4)
        self.places = nn.Embedding(T, 4)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, ids):
        places = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.words(ids) + self.kinds(ids % 2) + self.places(places)
        return self.q(h) * self.k(h).tanh() + self.v(h)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_inputs_and_output_gradients(strategy):
    torch.manual_seed(11)
    check(SharedReads(), sq_loss, [torch.randint(0, 9, (B, T)), torch.randn(B, T, 4)], strategy)


def test_grams_shared_by_memory_not_by_object():
    grams = Grams()
    a, b = torch.randn(3, 5, 4), torch.randn(3, 2, 4)
    first = grams(a, a)
    assert grams(a.view(3, 5, 4), a.detach()) is first  # other views of the same rows: one Gram
    torch.testing.assert_close(first, torch.bmm(a, a.transpose(1, 2)))
    torch.testing.assert_close(grams(b, a), torch.bmm(b, a.transpose(1, 2)))
    assert grams(a, b).data_ptr() == grams(b, a).data_ptr()  # the transpose, not a second bmm
    assert grams(a[:, :2], b) is not grams(b, b)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_auto_ghost_or_materialised_on_the_same_layer(steps):
    """Linear(4, 4): G_i has 16 numbers, its factors 8 T: ghost below T = 2, materialised from
    T = 2 on (no larger than the factors); both exact."""
    torch.manual_seed(12)
    layer = nn.Linear(4, 4)
    x = torch.randn(B, steps, 4, dtype=torch.float64)
    use = Factored(torch.randn(B, steps, 4), x.float())
    assert use.ghost_cheaper() == (steps < 2)
    check(layer, sq_loss, [x, torch.randn(B, steps, 4)], "auto")


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    tokens = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return tokens.mean(1)


def tiny_gpt2():
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_untouched_gpt2_tied_default_positions(strategy):
    torch.manual_seed(9)
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    check(model, lm_loss, [torch.randint(0, 100, (4, 12))], strategy)


def test_gpt2_with_gradient_checkpointing():
    """Hugging Face's gradient checkpointing (non-reentrant): the blocks run forward again inside
    the backward. The proof's replay of the model (under no_grad, where HF turns checkpointing off
    and also returns its key-value cache) is compared on what the call returned only."""
    torch.manual_seed(9)
    model = tiny_gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    check(model, lm_loss, [torch.randint(0, 100, (4, 12))])


def test_replay_compares_the_outputs_the_call_returned():
    """An extra output of the replay is ignored; a missing or changed one is a difference."""
    returned = {"logits": torch.ones(2)}
    assert _differs({"logits": torch.ones(2), "cache": torch.zeros(1)}, returned) is None
    assert _differs({"cache": torch.zeros(1)}, returned) == "no output 'logits'"
    assert _differs({"logits": torch.zeros(2), "cache": None}, returned) == "different output values"


def test_reentrant_checkpointing_refused_naming_the_fix():
    """A reentrant checkpoint's backward cannot give the outputs inside it their gradients: torch's
    own error becomes a refusal that says what to change."""
    torch.manual_seed(9)
    model = tiny_gpt2().double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    clipper = PerSampleClipper(model, 1.0)
    with pytest.raises(ValueError, match=r"module <model> \(GPT2LMHeadModel\).*use_reentrant=False"):
        clipper.backward(lm_loss(model, torch.randint(0, 100, (4, 12))))


def test_expanded_call_output_held_only_until_proved():
    """GPT-2's batch-1 positions are expanded; the logits the proof replays against must not be
    held by the clipper on every later step (a logits-sized copy per step), yet a second,
    still-unproved pass after a proven forward is refused, not taken on trust."""
    torch.manual_seed(11)
    model = tiny_gpt2().double()
    clipper = PerSampleClipper(model, 1.0)
    ids = torch.randint(0, 100, (4, 12))
    losses = lm_loss(model, ids)
    assert clipper._calls and clipper._calls[0].output is not None  # unproven: kept for the proof
    clipper.backward(losses)
    losses = lm_loss(model, ids)
    assert clipper._calls and clipper._calls[0].output is None  # proven structure: released
    clipper.backward(losses)
    lm_loss(model, ids)  # two forwards before one backward: a new, unproved structure
    with pytest.raises(ValueError, match="more than once before backward"):
        clipper.backward(lm_loss(model, ids) + 0)


def test_accumulates_over_physical_batches():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    clipper = PerSampleClipper(model, 0.5)
    clipper.backward(sq_loss(model, x, y))
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 3), slice(3, 8)):
        clipper.backward(sq_loss(model, x[part], y[part]))
    for p, ref in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, ref)


class Switching(nn.Module):
    """Its pass structure changes between steps: ``extra`` adds a call of a second layer that
    also reads the first layer's weight outside its module (a use the clipper cannot see)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
        self.extra = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        if self.extra:
            out = out + self.b(h * 2) + (x @ self.a.weight.T).sum(1, keepdim=True)
        return out


def test_proof_cached_per_structure_and_reproved_when_it_changes(monkeypatch):
    """A steady step reuses its structure's proof (no second probe) and stays exact; a frozen
    layer, a new call or a forgotten proof makes a new structure, which is proved afresh --
    and refused when that proof fails, never served a cached one."""
    torch.manual_seed(12)
    model, twin = Switching().double(), Switching().double()  # twin: the unhooked reference
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    clipper = PerSampleClipper(model, 0.7)
    probes = []
    probe = clipper._probe
    clipper._probe = lambda *a: probes.append(1) or probe(*a)

    def step_matches_naive():
        model.zero_grad(set_to_none=True)
        norms = clipper.backward(sq_loss(model, x, y))
        for p, q in zip(model.parameters(), twin.parameters()):
            q.requires_grad_(p.requires_grad)
        ref_norms, _ = naive(twin, sq_loss, [x, y])
        _, ref = naive(twin, sq_loss, [x, y], 0.7)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
        for p, r in zip([p for p in model.parameters() if p.requires_grad], ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)

    for _ in range(3):
        step_matches_naive()
    assert len(probes) == 1  # one structure, proved once
    model.a.requires_grad_(False)  # the trainable set changed: a new structure
    step_matches_naive()
    step_matches_naive()
    assert len(probes) == 2 and model.a.weight.grad is None
    model.a.requires_grad_(True)
    step_matches_naive()
    assert len(probes) == 2  # the first structure's proof still holds
    monkeypatch.setattr("trustml.privacy.clipping.PROOFS_KEPT", 1)
    model.b.requires_grad_(False)
    step_matches_naive()  # a third structure: its proof evicts the first structure's ...
    model.b.requires_grad_(True)
    step_matches_naive()  # ... which is then proved again, not assumed
    assert len(probes) == 4
    model.extra = True  # b called twice and a.weight read outside a's call: refused
    with pytest.raises(ValueError, match=r"parameter a\.weight \(Linear\) reaches the loss"):
        clipper.backward(sq_loss(model, x, y))


class Sometimes(nn.Module):
    """The same layer calls every step; some steps add a weight penalty or mix the samples."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
        self.penalty = self.mix = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.mix:
            h = h + h.mean(0)  # every sample's output now depends on every other sample
        out = self.b(h)
        if self.penalty:
            out = out + (self.a.weight ** 2).sum()  # a use outside a's call
        return out


def test_cached_proof_not_reused_for_a_changed_graph():
    """The hooked calls are the same on every step below; what changes is the graph between them.
    A weight read outside its module's call is refused even after the structure was proved, and a
    sample-mixing op makes the pass be proved again (and refused), never served the cached proof."""
    torch.manual_seed(13)
    model = Sometimes().double()
    x, y = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    clipper = PerSampleClipper(model, 0.7)
    for _ in range(2):
        clipper.backward(sq_loss(model, x, y))
    model.penalty = True
    with pytest.raises(ValueError, match=r"parameter a\.weight \(Linear\) reaches the loss outside"):
        clipper.backward(sq_loss(model, x, y))
    model.penalty, model.mix = False, True
    with pytest.raises(ValueError, match=r"module a \(Linear\).*samples mixed"):
        clipper.backward(sq_loss(model, x, y))


@pytest.mark.parametrize("batch", range(1, 34))
def test_probes_separate_every_ordered_pair_of_samples(batch):
    """For every samples i != j, some probe keeps i's loss and not j's rows: a loss of i reaching
    j's rows shows there. The least n probes with C(n, n // 2) >= B (one for B = 1), weights in
    [1, 2) on the kept losses."""
    weights, probes = _probe_groups(batch, torch.zeros(batch, dtype=torch.float64))
    n = len(probes)
    assert n == 1 if batch == 1 else math.comb(n, n // 2) >= batch > math.comb(n - 1, (n - 1) // 2)
    keep = torch.ones(n, batch, dtype=torch.bool)
    assert bool((weights >= 1).all() and (weights < 2).all())
    for k, (others, kept) in enumerate(probes):
        keep[k, others] = False
        assert torch.equal(kept[keep[k]], weights[keep[k]])
        assert bool((kept[others] == 0).all())
    separated = (keep.unsqueeze(2) & ~keep.unsqueeze(1)).any(0)  # [i, j]: i kept, j not
    assert bool((separated | torch.eye(batch, dtype=torch.bool)).all())


def test_batchnorm_refused():
    with pytest.raises(ValueError, match="GroupNorm"):
        PerSampleClipper(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 1.0)


def test_functional_use_detected():
    model = nn.Linear(3, 2)

    def loss(m, x):
        return (F.linear(x, m.weight) ** 2).sum(1)  # bypasses the module's forward

    clipper = PerSampleClipper(model, 1.0)
    with pytest.raises(ValueError, match=r"parameter weight \(Linear\) reaches the loss outside"):
        clipper.backward(loss(model, torch.randn(4, 3)))


def test_bad_inputs():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        PerSampleClipper(model, 0.0)
    clipper = PerSampleClipper(model, 1.0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        clipper.backward(model(torch.randn(4, 3)).sum())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("strategy", ["auto", "materialise"])
def test_cuda_gpt2_float32(strategy):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(11)
    check(
        tiny_gpt2(),
        lm_loss,
        [torch.randint(0, 100, (4, 12))],
        strategy,
        "cuda",
        torch.float32,
        rtol=1e-4,
    )


@cuda
def test_cuda_bf16_autocast_norms_in_fp32():
    torch.manual_seed(12)
    model = tiny_gpt2().cuda()
    ids = torch.randint(0, 100, (4, 12), device="cuda")
    clipper = PerSampleClipper(model, 1.0)
    ref = clipper.backward(lm_loss(model, ids))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = lm_loss(model, ids)
    norms = clipper.backward(losses.float())
    assert norms.dtype == torch.float32 and all(
        p.grad.dtype == torch.float32 for p in model.parameters()
    )
    torch.testing.assert_close(norms, ref, rtol=0.05, atol=0.0)
