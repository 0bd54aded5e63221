"""benchmarks/dp_step.py compares like with like: the peers' position-id workaround computes the
same losses as the untouched model, a peer's failure is recorded beside its workaround run, and the
script emits one table row per method with the ratios the issue's targets are checked on."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import dp_step  # noqa: E402

TINY = {
    "tiny_gpt2": dp_step.Row("tiny GPT-2", lambda: dp_step.gpt2(1, 64, 100, positions=16), "lm",
                             3, 8, 100),
    "tiny_bert": dp_step.Row("tiny BERT", lambda: tiny_bert(), "cls", 3, 8, 100),
}


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("key", list(TINY))
def test_workaround_ids_give_the_untouched_models_losses(key):
    row = TINY[key]
    torch.manual_seed(0)
    model = row.build().double()
    batch = dp_step.make_batch(row, torch.device("cpu"))
    untouched = dp_step.objective_for(row, explicit_ids=False)(model, batch).losses
    explicit = dp_step.objective_for(row, explicit_ids=True)(model, batch).losses
    assert untouched.shape == (row.batch,)
    torch.testing.assert_close(explicit, untouched, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_peer_failure_on_the_untouched_model_is_kept_beside_the_workaround(monkeypatch):
    monkeypatch.setattr(dp_step, "ROWS", {**dp_step.ROWS, **TINY})
    args = argparse.Namespace(warmup=1, repeats=1, amp="none", verbose=False)
    step, result = dp_step.start("tiny_gpt2", "Opacus hooks", torch.device("cpu"), args)
    assert step is not None, result
    step()
    if result["explicit_ids"]:  # the untouched model failed: its error is in the note
        assert result["error"] and result["error"] in dp_step.note_of(result)
        assert dp_step.WORKAROUND in dp_step.note_of(result)
    else:
        assert "error" not in result and dp_step.note_of(result) == ""
    _, ours = dp_step.start("tiny_gpt2", "trustml", torch.device("cpu"), args)
    assert ours == {"row": "tiny_gpt2", "method": "trustml", "explicit_ids": False}


@pytest.mark.slow
def test_script_writes_a_row_per_method_and_the_targets(tmp_path):
    out = tmp_path / "dp.md"
    methods = "non-private,trustml,Opacus ghost,fastDP"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp_step.py"), "--rows", "mlp256",
                    "--repeats", "2", "--warmup", "1", "--methods", methods, "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    lines = out.read_text().splitlines()
    title = dp_step.ROWS["mlp256"].title
    rows = {line.split(" | ")[1]: line.split(" | ") for line in lines
            if line.startswith(f"| {title} | ") and line.count("|") > 8}
    assert list(rows) == methods.split(",")
    for name in ("non-private", "trustml", "Opacus ghost"):
        ratio, steady = rows[name][3], rows[name][5]
        assert ratio.endswith(")") and float(ratio.split("x")[0]) > 0
        assert float(steady) > 0  # peak growth measured in its own process
    assert rows["non-private"][3].startswith("1.00x")
    targets = [line for line in lines if line.startswith(f"| {title} | <= 1.30x")]
    assert len(targets) == 1 and ("met" in targets[0])


def test_memory_run_splits_off_the_file_backed_pages(monkeypatch):
    monkeypatch.setattr(dp_step, "ROWS", {**dp_step.ROWS, **TINY})
    cpu = torch.device("cpu")
    before = dp_step.file_backed(cpu)
    got = dp_step.memory_growth("tiny_gpt2", "trustml", cpu, "none", 1, explicit_ids=False)
    assert set(got) == {"steady", "first", "file", "steady_no_file"}
    assert got["first"] >= 0 and got["steady"] >= 0
    assert 0 <= got["file"] <= (dp_step.file_backed(cpu) - before) / 2**20
    assert got["steady_no_file"] == pytest.approx(got["steady"] - got["file"])


SPLIT_PROBE = """
import json, mmap, sys
import torch
import dp_step
data, mapped = sys.argv[1], []

def step():
    if not mapped:
        with open(data, "rb") as f:
            mapped.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        sum(mapped[0][i] for i in range(0, len(mapped[0]), mmap.PAGESIZE))  # page it in
    torch.ones(24 << 18)  # 24 MiB of float32, written

dp_step.pin_malloc()  # as the benchmark's memory runs do
dp_step.build = lambda *args: step
print(json.dumps(dp_step.memory_growth("cnn", "trustml", torch.device("cpu"), "none", 2, False)))
"""


def test_memory_without_file_pages_keeps_the_working_tensors(tmp_path):
    """A step that pages in 16 MiB of a file once and keeps it mapped (as library code stays) and
    writes a 24 MiB tensor every step, measured in its own process as the benchmark's memory runs
    are: the steady total counts both, the figure without file-backed pages the tensor alone --
    the split hides no working memory."""
    data = tmp_path / "library.bin"
    data.write_bytes(os.urandom(16 << 20))
    out = subprocess.run([sys.executable, "-c", SPLIT_PROBE, str(data)], check=True,
                         capture_output=True, text=True, cwd=ROOT / "benchmarks").stdout
    got = json.loads(out.splitlines()[-1])
    assert 15.5 <= got["file"] <= 20.0, got  # the file, and torch code paged in
    assert 23.5 <= got["steady_no_file"] <= 26.0, got
    assert got["steady"] == pytest.approx(got["file"] + got["steady_no_file"])


def test_breakdown_script_times_every_part_of_the_engine_it_names():
    """benchmarks/dp_breakdown.py wraps engine functions by name: after a refactor it must still
    find them (it failed when the noise moved into privacy/noise.py) and list each part it ran."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp_breakdown.py"),
                          "--row", "mlp256", "--repeats", "1"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    *table, dp_only = out.splitlines()[1:]
    rows = [line.split(maxsplit=3) for line in table]  # ms, "ms", faults, part
    parts = {part: float(ms) for ms, _, _, part in rows}
    for part in ("noise (drawn into .grad)", "norms: 2-D Linear (weight and bias)",
                 "clipped sums: 2-D Linear", "output-gradient backward", "backward (plain)",
                 "graph walk", "forward (trustml)", "optimizer step (plain)"):
        assert part in parts and parts[part] >= 0, (part, out)  # a part is listed once it ran
    dp_only_ms = parts["noise draw alone (timed apart)"] + parts.get("Gram bmm", 0.0)
    noised = (100 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)  # the MLP 100-64-32-2's parameters
    assert dp_only.startswith(f"DP-only work: noise draw alone (timed apart) + Gram bmm ({noised} "
                            "numbers) = "), out
    assert float(dp_only.split(" = ")[1].split(" ms")[0]) == pytest.approx(dp_only_ms, abs=0.11), out


def test_no_memory_ratio_to_a_base_near_zero():
    """The Adult MLP's step without file pages grows the heap by about 0 MiB (or shrinks it): a
    ratio to that is noise, so none is given; a real base gives the plain quotient."""
    def run(**memory):
        return {"memory": memory}

    base = run(steady=11.2, steady_no_file=-0.1)
    ours = run(steady=12.0, steady_no_file=0.7)
    assert dp_step.memory_ratio(ours, base, "steady_no_file") is None
    assert dp_step.memory_ratio(ours, base) == pytest.approx(12.0 / 11.2)
    assert dp_step.memory_ratio(ours, None) is None
    assert dp_step.memory_ratio(run(steady=None), base) is None
