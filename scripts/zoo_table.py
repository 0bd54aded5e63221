"""Print the README's model-zoo table: for every tiny Hugging Face architecture of
``tests/privacy/zoo_models.py``, whether trustml's DP engine is exact or refuses (and why), which
path computes its per-sample gradients (fast rules, or the generic ``torch.func`` path for which
modules), and how Opacus's hooks-mode ``GradSampleModule`` fares on the same model.

Each architecture runs the three cases of the test (plain batch, B == T, one sample); a column shows
the worst case. Opacus is run as ``PrivacyEngine.make_private`` would run it: ``ModuleValidator``
first, then ``GradSampleModule(model, batch_first=True)``; its per-sample gradients (``grad_sample``)
are compared with one autograd call per sample in float64 (rtol/atol 1e-6). A parameter left without
``grad_sample`` counts as a refusal (Opacus's optimizer raises on it).

    python scripts/zoo_table.py [--only gpt2 bert ...] [--no-opacus]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "privacy")]

import torch  # noqa: E402
from torch import nn  # noqa: E402
from zoo_models import (  # noqa: E402
    ZOO,
    Verdict,
    ZooModel,
    check_trustml,
    compare_grads,
    reference,
    shapes,
)

SEVERITY = {"exact": 0, "ok": 0, "refused": 1, "crash": 2, "wrong": 3}


def worst(verdicts: dict[str, Verdict]) -> tuple[str, Verdict]:
    return max(verdicts.items(), key=lambda kv: SEVERITY[kv[1].kind])


def short(text: str, n: int = 90) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def engine_path(model: nn.Module) -> str:
    """'fast' when every module owning trainable parameters has a fast rule; else the classes of the
    outermost modules that take the generic path (their whole subtree goes with them)."""
    from trustml.privacy.layers import rule_for

    generic: list[str] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        try:
            rule = rule_for(module)
        except ValueError:
            continue  # refused: the verdict column says why
        if rule is None:
            covered.append(name)
            if type(module).__name__ not in generic:
                generic.append(type(module).__name__)
    return "fast" if not generic else "generic: " + ", ".join(generic)


def check_opacus(spec: ZooModel, batch_size: int, seq: int) -> Verdict:
    """Opacus as ``PrivacyEngine.make_private`` runs it (validator, hooks-mode GradSampleModule,
    DPOptimizer's clipping without noise), against the same naive clipped sum."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    model = spec.build()
    batch = spec.batch(batch_size, seq)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = reference(spec, model, batch, eps=1e-6)  # Opacus's clip factor is C / (norm + 1e-6)
    c = 1.0 if ref is None else ref[1]
    model.zero_grad(set_to_none=True)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        return Verdict("refused", f"validator: {str(errors[0]).split('.')[0]}")
    try:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    except NotImplementedError as e:
        named_in = re.findall(r"support\(([\w.]+):", str(e))
        why = f"trainable layer with buffers: {', '.join(named_in[:2])}" if named_in else str(e)
        return Verdict("refused", why)
    sgd = torch.optim.SGD([p for _, p in named], lr=0.0)
    optimizer = DPOptimizer(
        sgd, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=batch_size, loss_reduction="sum"
    )
    try:
        spec.loss(gsm, batch).sum().backward()
        optimizer.clip_and_accumulate()
    except Exception as e:  # noqa: BLE001 - any failure is reported as such
        return Verdict("crash", f"{type(e).__name__}: {e}")
    if ref is None:
        return Verdict("wrong", "samples of a batch are coupled, not refused")
    verdict = compare_grads(named, [p.summed_grad for _, p in named], ref[0], rtol=1e-6, atol=1e-6)
    return Verdict("ok") if verdict.kind == "exact" else verdict


def cell(case: str, verdict: Verdict) -> str:
    if verdict.kind in ("exact", "ok"):
        return verdict.kind
    where = "" if case == "plain" else f" at {case.replace('_', ' ')}"
    if verdict.kind == "wrong":
        return f"**WRONG**{where} (max rel err {verdict.max_err:.2g}; {short(verdict.detail, 70)})"
    if verdict.kind == "crash":
        return f"crash{where}: {short(verdict.detail)}"
    reason = re.sub(r"^[A-Z]\w*: (module )?", "", verdict.detail)  # drop the exception class
    return f"refused{where}: {short(reason, 110)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architecture names (default: the whole zoo)")
    parser.add_argument("--no-opacus", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    zoo = [s for s in ZOO if not args.only or s.name in args.only]
    header = "| architecture | family | trustml | path |" + ("" if args.no_opacus else " Opacus hooks |")
    rows = [header, "|---|---|---|---|" + ("" if args.no_opacus else "---|")]
    tally: dict[str, int] = {}
    start = time.time()
    for spec in zoo:
        cases = shapes(spec)
        ours = {c: check_trustml(spec, *bt) for c, bt in cases.items()}
        case, verdict = worst(ours)
        tally[verdict.kind] = tally.get(verdict.kind, 0) + 1
        row = f"| {spec.name} | {spec.family} | {cell(case, verdict)} | {engine_path(spec.build())} |"
        if not args.no_opacus:
            theirs = {c: check_opacus(spec, *bt) for c, bt in cases.items()}
            row += f" {cell(*worst(theirs))} |"
            key = "opacus " + worst(theirs)[1].kind
            tally[key] = tally.get(key, 0) + 1
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    print("\n".join(rows))
    print(f"\n{len(zoo)} architectures: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    import opacus
    import transformers

    print(
        f"({time.time() - start:.0f} s; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"opacus {opacus.__version__})"
    )


if __name__ == "__main__":
    main()
