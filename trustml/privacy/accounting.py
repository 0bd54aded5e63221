"""Privacy accounting through Opacus's accountants (RDP or PRV), with checkpointable history.

The history of (noise multiplier, sample rate, steps) is the whole privacy state: it is saved with
every checkpoint so that a resumed run never forgets the epsilon it already spent.
"""

from __future__ import annotations

from typing import Any

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

KINDS = ("rdp", "prv")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"accountant must be one of {KINDS}, got {kind!r}")
    return kind


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp"
) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` in ``steps`` (Opacus's search)."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=_check_kind(kind),
            epsilon_tolerance=0.01,
        )
    )


class PrivacyAccountant:
    """An Opacus accountant plus ``epsilon(delta, extra_steps)`` and JSON state."""

    def __init__(self, kind: str = "rdp"):
        self.kind = _check_kind(kind)
        self._opacus = create_accountant(self.kind)
        self._cache: dict[tuple, float] = {}
        self._unit_rdp: dict[tuple[float, float], Any] = {}

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._opacus.history)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._opacus.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._opacus.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """Epsilon spent so far (plus ``extra`` = (sigma, q, steps) not yet taken), at ``delta``."""
        history = self.history
        if extra is not None and extra[2] > 0:
            if history and tuple(history[-1][:2]) == tuple(extra[:2]):  # the form Opacus will store
                history[-1] = (extra[0], extra[1], history[-1][2] + extra[2])
            else:
                history.append(tuple(extra))
        if not history:
            return 0.0
        key = (tuple(history), delta)
        if key not in self._cache:  # the budget check's one-step look-ahead is the next log's now
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._compute(history, delta)
        return self._cache[key]

    def steps_within(self, budget: float, delta: float, sigma: float, q: float) -> int:
        """The most further steps of (``sigma``, ``q``) that keep epsilon <= ``budget``.

        Epsilon grows with every step, so this is found once (doubling, then bisection: ~2 log2(k)
        evaluations) and a caller can then check a budget by counting steps instead of re-running
        the analysis before every step."""
        def fits(k: int) -> bool:
            return self.epsilon(delta, extra=(sigma, q, k)) <= budget

        if not fits(0):
            return 0
        low, high = 0, 1  # fits(low) holds
        while fits(high):
            if high >= 2**40:  # no budget in sight: the caller checks step by step from here on
                return high
            low, high = high, 2 * high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def _compute(self, history: list[tuple[float, float, int]], delta: float) -> float:
        if self.kind == "rdp":
            return self._rdp_epsilon(history, delta)
        probe = create_accountant(self.kind)
        probe.history = history
        return float(probe.get_epsilon(delta=delta))

    def _rdp_epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        """Opacus's RDPAccountant.get_privacy_spent, with the one-step RDP curve of each (sigma, q)
        cached: RDP composes additively, so every step costs one vector sum, not a new analysis."""
        orders = RDPAccountant.DEFAULT_ALPHAS
        total = 0.0
        for sigma, q, steps in history:
            if (sigma, q) not in self._unit_rdp:
                self._unit_rdp[(sigma, q)] = rdp_analysis.compute_rdp(
                    q=q, noise_multiplier=sigma, steps=1, orders=orders
                )
            total = total + steps * self._unit_rdp[(sigma, q)]
        return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)[0])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(
                f"checkpoint used the {state['kind']!r} accountant, this run {self.kind!r}"
            )
        self._opacus.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._cache = {}
