"""Privacy accounting through Opacus's accountants (RDP or PRV), with checkpointable history.

The history of (noise multiplier, sample rate, steps) is the whole privacy state: it is saved with
every checkpoint so that a resumed run never forgets the epsilon it already spent.
"""

from __future__ import annotations

import warnings
from typing import Any

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

KINDS = ("rdp", "prv")
# Opacus's orders (1.1 ... 63) plus larger ones: early in a run, with few steps, the best order is
# above 63, and the epsilon Opacus's grid gives is needlessly loose there. Extra orders can only
# lower the minimum, and epsilon(order) is unimodal, so wherever Opacus's optimum is inside its
# grid the two epsilons are equal.
RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS + [80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]


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
    with warnings.catch_warnings():
        # Opacus's search first probes sigma = 20, 40, ...: their epsilons are tiny and optimal
        # at the largest RDP order, so Opacus warns "Optimal order is the largest alpha" about a
        # probe, not about the sigma it returns. Only that message is silenced.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                category=UserWarning)
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
        """Epsilon spent so far (plus ``extra`` = (sigma, q, steps) not yet taken), at ``delta``.

        Cached per (history, delta): asking again before the next step (the log, the evaluation,
        the summary, the budget's look-ahead that the next step makes real) runs no analysis."""
        return self.epsilon_of(self._with(extra), delta)

    def epsilon_of(self, history: list[tuple[float, float, int]], delta: float) -> float:
        """Epsilon of ``history`` (e.g. a snapshot of :attr:`history`), cached like :meth:`epsilon`."""
        key = (tuple(history), delta)
        if key not in self._cache:
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._compute(list(history), delta)
        return self._cache[key]

    def steps_within(self, budget: float, delta: float, sigma: float, q: float) -> int:
        """The most further steps of (``sigma``, ``q``) after which epsilon stays <= ``budget``.

        Exactly the count of steps that a look-ahead check before each step (``epsilon(delta,
        extra=(sigma, q, 1)) <= budget``) would allow: RDP epsilon is monotone in the step count
        (every order's RDP grows with it, and so does their minimum after the conversion, in
        floating point too), and each probe evaluates the very history that check would. Found
        by doubling then bisection (~2 log2(k) analyses, once) so a caller can count steps
        instead of converting RDP to epsilon before every step. RDP only: PRV's numerical
        epsilon is not provably monotone. Capped at 2**40 (then all 2**40 steps do fit)."""
        if self.kind != "rdp":
            raise ValueError("steps_within needs the rdp accountant (PRV is checked per step)")

        def fits(more: int) -> bool:
            return self._compute(self._with((sigma, q, more)), delta) <= budget

        with warnings.catch_warnings():
            # probes far past the budget (2**k steps) are optimal at Opacus's smallest order and
            # it warns about that probe, not about any epsilon this run spends: only that is off
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha",
                                    category=UserWarning)
            if not fits(0):
                return 0
            low, high = 0, 1  # fits(low) holds
            while fits(high):
                if high >= 2**40:
                    return high
                low, high = high, 2 * high
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def _with(self, extra: tuple[float, float, int] | None) -> list[tuple[float, float, int]]:
        """The history after ``extra`` more steps, in the form Opacus will store it."""
        history = self.history
        if extra is not None and extra[2] > 0:
            if history and tuple(history[-1][:2]) == tuple(extra[:2]):
                history[-1] = (extra[0], extra[1], history[-1][2] + extra[2])
            else:
                history.append(tuple(extra))
        return history

    def _compute(self, history: list[tuple[float, float, int]], delta: float) -> float:
        if not history:
            return 0.0
        if self.kind == "rdp":
            return self._rdp_epsilon(history, delta)
        probe = create_accountant(self.kind)
        probe.history = history
        return float(probe.get_epsilon(delta=delta))

    def _rdp_epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        """Opacus's RDPAccountant.get_privacy_spent, with the one-step RDP curve of each (sigma, q)
        cached: RDP composes additively, so every step costs one vector sum, not a new analysis."""
        orders = RDP_ORDERS
        total = 0.0
        for sigma, q, steps in history:
            if (sigma, q) not in self._unit_rdp:
                self._unit_rdp[(sigma, q)] = rdp_analysis.compute_rdp(
                    q=q, noise_multiplier=sigma, steps=1, orders=orders
                )
            total = total + steps * self._unit_rdp[(sigma, q)]
        with warnings.catch_warnings():
            # After the first few steps epsilon is tiny and its best order can lie beyond any
            # finite grid; the epsilon returned is then a valid, slightly loose upper bound that
            # tightens as steps accumulate. Nothing for the user to do: only that message is off.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                    category=UserWarning)
            spent = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)[0]
        return float(spent)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(
                f"checkpoint used the {state['kind']!r} accountant, this run {self.kind!r}"
            )
        self._opacus.history = [_segment(h) for h in state["history"]]
        self._cache = {}

    def noise_for(self, target_epsilon: float, delta: float, sample_rate: float,
                  steps: int) -> float:
        """The noise multiplier with which ``steps`` more steps at ``sample_rate`` bring the total
        spent (this history included) to at most ``target_epsilon`` (within 0.01 below it, the
        tolerance of Opacus's ``get_noise_multiplier``, which only knows uniform histories).
        Raises ValueError, with the figures, when no noise can keep the total under the target."""
        spent = self.epsilon(delta)
        if spent >= target_epsilon:
            raise ValueError(f"this run already spent epsilon {spent:.4f} in {self.steps} steps, "
                             f"which leaves nothing of target_epsilon {target_epsilon} for "
                             f"{steps} more steps")
        def total(sigma: float) -> float:
            return self.epsilon(delta, extra=(sigma, sample_rate, steps))

        high = 1.0
        while total(high) > target_epsilon:
            high *= 2
            if high > 1e6:
                raise ValueError(f"this run already spent epsilon {spent:.4f} in {self.steps} "
                                 f"steps; {steps} more steps cannot stay within target_epsilon "
                                 f"{target_epsilon} at any noise")
        low = 0.0
        while total(high) < target_epsilon - 0.01 and high - low > 1e-6:
            middle = (low + high) / 2
            low, high = (middle, high) if total(middle) > target_epsilon else (low, middle)
        return high


def _segment(raw: Any) -> tuple[float, float, int]:
    """One (noise multiplier, sample rate, steps) entry of a saved history, type-checked."""
    ok = (isinstance(raw, (list, tuple)) and len(raw) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
          and isinstance(raw[2], int) and raw[0] >= 0 and 0 < raw[1] <= 1 and raw[2] >= 1)
    if not ok:
        raise ValueError(f"accountant history entry {raw!r}: expected [noise_multiplier >= 0, "
                         "sample_rate in (0, 1], steps >= 1]")
    return float(raw[0]), float(raw[1]), int(raw[2])
