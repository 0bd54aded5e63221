"""Every architecture of the Hugging Face zoo: the DP engine is exact (to 1e-6 in float64, against the
naive per-sample loop) or refuses with an error naming a module -- never silently wrong.

Three shapes per architecture: a plain batch (B=3, T=5, one padded sample), a batch whose size
collides with the sequence length (B == T; for vision, B == a token or window count) and a batch of
one sample.
"""

from __future__ import annotations

import pytest
from zoo_models import ZOO, ZooModel, check_trustml

SEQ = 5
SHAPES = {
    "plain": lambda spec: (3, SEQ),
    "b_eq_t": lambda spec: (spec.collide, SEQ) if spec.collide else (4, 4),
    "single": lambda spec: (1, SEQ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spec", ZOO, ids=[s.name for s in ZOO])
def test_exact_or_refused(spec: ZooModel, shape: str) -> None:
    batch, seq = SHAPES[shape](spec)
    verdict = check_trustml(spec, batch, seq)
    assert verdict.kind in ("exact", "refused"), f"{spec.name} (B={batch}, T={seq}): {verdict}"
