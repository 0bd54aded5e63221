"""Every architecture of the Hugging Face zoo: the DP engine is exact (to 1e-6 in float64, against the
naive per-sample loop) or refuses with an error naming a module -- never silently wrong.

Three cases per architecture (:func:`zoo_models.shapes`): a plain batch (B=3, T=5, one padded
sample), a batch whose size collides with the sequence length (B == T; for vision, B == a token or
window count) and a batch of one sample.
"""

from __future__ import annotations

import pytest
from zoo_models import ZOO, ZooModel, check_trustml, shapes

CASES = ["plain", "b_eq_t", "single"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spec", ZOO, ids=[s.name for s in ZOO])
def test_exact_or_refused(spec: ZooModel, case: str) -> None:
    batch, seq = shapes(spec)[case]
    verdict = check_trustml(spec, batch, seq)
    assert verdict.kind in ("exact", "refused"), f"{spec.name} (B={batch}, T={seq}): {verdict}"
