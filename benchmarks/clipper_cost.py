"""What the per-sample clipper costs on top of the plain step, and where that time goes.

Three steps per model, built in ONE process and run round-robin (CPU time of the process, one thread
by default; the median over ``--rounds``): ``plain`` (PlainStep: mean loss, backward, SGD),
``clip`` (forward, ``PerSampleClipper.backward``, SGD: the clipper alone, no noise, no accountant)
and ``dp`` (``make_private(...).step``: Poisson-batch step with clipping, noise and accounting).
``--profile`` adds a torch.profiler table of the clipped step's top ops.

    python benchmarks/clipper_cost.py --models gpt2v8k,bert --rounds 15
    python benchmarks/clipper_cost.py --models mlp --profile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trustml.privacy import PerSampleClipper, make_private  # noqa: E402
from trustml.training.step import PlainStep  # noqa: E402


class Out:
    def __init__(self, losses: torch.Tensor):
        self.losses, self.outputs = losses, {}


def gpt2(n_layer: int, n_embd: int, vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64,
                                      vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 2))


def lm(model, batch):
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return Out(losses.view(ids.shape[0], -1).mean(1))


def cls(model, batch):
    return Out(F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["y"],
                               reduction="none"))


def tabular(model, batch):
    return Out(F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"))


MODELS = {  # name: (build, objective, batch, sequence length, vocabulary)
    "gpt2v8k": (lambda: gpt2(4, 256, 8000), lm, 16, 64, 8000),
    "gpt2small": (lambda: gpt2(12, 768, 50257), lm, 4, 128, 50257),
    "bert": (bert, cls, 16, 128, 30522),
    "mlp": (mlp, tabular, 256, None, None),
}


def make_batch(name: str) -> dict[str, torch.Tensor]:
    _, _, b, t, vocab = MODELS[name]
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        return {"x": torch.randn(b, 100, generator=g), "y": torch.randint(0, 2, (b,), generator=g)}
    return {"input_ids": torch.randint(0, vocab, (b, t), generator=g),
            "y": torch.randint(0, 2, (b,), generator=g)}


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def steps(name: str) -> dict[str, Callable[[], None]]:
    build, objective, size, _, _ = MODELS[name]
    batch = make_batch(name)
    out = {}
    torch.manual_seed(0)
    model = build()
    plain = PlainStep(torch.optim.SGD(model.parameters(), lr=1e-4))
    out["plain"] = lambda: plain.step(model, objective, batch)

    torch.manual_seed(0)
    model_c = build()
    clipper = PerSampleClipper(model_c, 1.0)
    opt_c = torch.optim.SGD(model_c.parameters(), lr=1e-4)

    def clip() -> None:
        opt_c.zero_grad(set_to_none=True)
        clipper.backward(objective(model_c, batch).losses)
        opt_c.step()

    out["clip"] = clip
    torch.manual_seed(0)
    model_d = build()
    dp = make_private(model_d, torch.optim.SGD(model_d.parameters(), lr=1e-4), Rows(batch),
                      noise_multiplier=1.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0,
                      batch_size=size)
    out["dp"] = lambda: dp.step.step(model_d, objective, batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2v8k,bert,mlp")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(" ".join(["python", *sys.argv]), f"(torch {torch.__version__})")
    for name in args.models.split(","):
        fns = steps(name)
        for fn in fns.values():  # warm-up: the probe and the self-check run once here
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t0 = time.process_time()
                fn()
                times[k].append(time.process_time() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: plain {med['plain'] * 1e3:.1f} ms; clip {med['clip'] / med['plain']:.3f}x; "
              f"dp {med['dp'] / med['plain']:.3f}x")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fns["clip"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
