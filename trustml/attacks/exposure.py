"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a random secret in a fixed format ("my pin is 3 8 1 4 0 9") inserted into the training
text. Exposure = log2|R| - log2 rank, where rank is the canary's position when all |R| possible secrets
are sorted by the model's log-perplexity. A memorised canary ranks first: exposure = log2|R|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class CanaryFormat:
    """Secrets are ``length`` symbols from ``alphabet`` filled into ``template``'s ``{}``."""

    template: str = "my secret code is {}."
    alphabet: str = "0123456789"
    length: int = 6
    separator: str = " "

    @property
    def log2_space(self) -> float:
        return self.length * math.log2(len(self.alphabet))

    def random_secrets(self, n: int, rng: np.random.Generator) -> list[str]:
        picks = rng.integers(0, len(self.alphabet), size=(n, self.length))
        return [self.separator.join(self.alphabet[i] for i in row) for row in picks]

    def fill(self, secret: str) -> str:
        return self.template.format(secret)


def make_canaries(fmt: CanaryFormat, n: int, seed: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """``n`` distinct random canary texts, none in ``exclude`` (also used to draw the non-inserted
    reference candidates that canaries are ranked against)."""
    if n + len(exclude) > 2**fmt.log2_space:
        raise ValueError(f"cannot draw {n} distinct canaries from a space of 2^{fmt.log2_space:.1f}")
    rng, banned = np.random.default_rng(seed), set(exclude)
    texts: dict[str, None] = {}
    while len(texts) < n:
        for secret in fmt.random_secrets(n - len(texts), rng):
            if fmt.fill(secret) not in banned:
                texts.setdefault(fmt.fill(secret))
    return list(texts)


def exposure_by_rank(canary_logppl, candidate_logppl) -> np.ndarray:
    """Exposure of each canary against candidates drawn uniformly from the non-inserted secrets.

    rank / |R| is estimated by (1 + #candidates with lower log-perplexity) / (n + 1); with every
    other secret as a candidate this is exactly log2|R| - log2 rank. The estimate saturates at
    log2(n + 1), which is why the skew-normal extrapolation exists.
    """
    canary = np.atleast_1d(np.asarray(canary_logppl, dtype=np.float64))
    cand = np.sort(np.asarray(candidate_logppl, dtype=np.float64))
    better = np.searchsorted(cand, canary, side="left")
    return np.log2(cand.size + 1) - np.log2(1 + better)


def exposure_skewnorm(canary_logppl, candidate_logppl) -> np.ndarray:
    """Exposure = -log2 P(candidate log-perplexity <= canary's) under a skew-normal fitted to the
    candidates: extrapolates beyond the sampled candidates' resolution."""
    canary = np.atleast_1d(np.asarray(canary_logppl, dtype=np.float64))
    a, loc, scale = stats.skewnorm.fit(np.asarray(candidate_logppl, dtype=np.float64))
    return -stats.skewnorm.logcdf(canary, a, loc, scale) / math.log(2)
