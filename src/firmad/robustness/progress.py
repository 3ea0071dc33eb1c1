"""An honest ETA for a run of attacks of unequal cost.

The sweep announces its attacks with their costs (gradient steps x sources x images, see
`SweepHooks.plan`): the convergence checks at the end cost twice an ordinary attack, so
counting attacks alone promises too little time left. `Timeline` weighs each attack by its
cost and measures the speed on computed work only: attacks taken from a resume cache, the
batches an interrupted attack kept, and the loading before the first step take no part in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["Timeline"]


class Timeline:
    """Cost-weighted progress: ``begin(i)`` when attack ``i`` of ``plan`` starts (or is taken
    from a cache), ``step(done, total)`` after each of its steps; ``share()`` is the finished
    share of the whole cost and ``eta()`` the seconds left (None before any work is timed)."""

    def __init__(
        self, plan: Sequence[tuple[str, float]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.costs = [max(float(c), 0.0) for _, c in plan]
        self.total = sum(self.costs) or 1.0
        self.clock = clock
        self.i, self.frac = 0, 0.0
        self.work_cost = self.work_time = 0.0
        self.mark: tuple[float, float] | None = None  # (time, cost done) of the last step
        self.begun = clock()

    def _done_cost(self) -> float:
        i = min(self.i, len(self.costs))
        cur = self.costs[i] * self.frac if i < len(self.costs) else 0.0
        return sum(self.costs[:i]) + cur

    def begin(self, i: int) -> None:
        """Attack ``i`` starts now; the ones before it are finished."""
        self.i, self.frac, self.mark, self.begun = i, 0.0, None, self.clock()

    def step(self, done: int, total: int) -> None:
        """Step ``done`` of ``total`` of the current attack is finished."""
        now, frac = self.clock(), min(done / max(total, 1), 1.0)
        if self.mark is None:
            # The first step is timed from begin() (the attack's setup belongs to it); the
            # steps before it, kept from an interrupted run, took no time now.
            self.frac = max(frac - 1 / max(total, 1), 0.0)
            self.mark = (self.begun, self._done_cost())
        self.frac = frac
        t0, c0 = self.mark
        cost = self._done_cost()
        if now > t0 and cost > c0:
            self.work_time += now - t0
            self.work_cost += cost - c0
        self.mark = (now, cost)

    def share(self) -> float:
        return min(self._done_cost() / self.total, 1.0)

    def eta(self) -> float | None:
        if self.work_cost <= 0 or self.work_time <= 0:
            return None
        return (self.total - self._done_cost()) * self.work_time / self.work_cost
