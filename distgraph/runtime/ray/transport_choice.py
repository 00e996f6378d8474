"""``transport="auto"``: measure both transports on a plan's own steps and keep the faster.

Why measure instead of rules: on a quiet machine a Compiled Graph's step is a fraction of an
actor call's, but Ray 2.60's channel readers spin (``sched_yield``) while they wait, so when
the cores are contended (more processes than cores) the same step can run several times
slower compiled than on calls. Which one wins depends on the plan and on the machine's load
at the time, and results are bit-identical on both, so the step times decide.

:class:`TransportChoice` is the decision alone (no Ray, no clock: the caller times its steps
and reports them), one per repeated plan (a training session, a run() plan):

1. probe calls: the plan's first ``1 + k`` steps run on calls (the first is a warm-up: it
   installs the plan and fills caches, and is not counted);
2. probe compiled: the next ``1 + k`` steps run compiled (the first compiles the graph and
   is not counted);
3. decide: the median of the ``k`` compiled steps against the median of the ``k`` calls
   steps. Calls is the incumbent at first (no compile, no spinning readers): compiled is
   chosen only if its median is at least ``margin`` (15 %) below calls'; afterwards whichever
   transport holds the plan is the incumbent, and the other must beat it by the margin;
4. settled: every step runs on the chosen transport; its latest ``k`` step times are kept.
   The other transport is probed again (``1 + k`` steps, then step 3 with the incumbent's
   latest ``k``) after ``interval`` steps, an interval that starts at ``reprobe_after``
   (256) and doubles, up to ``max_interval``, each time a re-probe keeps the choice (so a
   stable plan is re-probed ever more rarely); it also comes early when the chosen
   transport's median drifts by more than ``drift`` x (2x, either way) from its median when
   chosen, which is what a change of load looks like (at most once every ``min_gap`` steps).

A step that ran on calls while compiled was asked for (the compiled path refused the plan, or
compiles it only from its second step in a row) is not a measurement of either; after
``max_misses`` (3) such steps in a row (probing compiled, or settled on it) calls is kept,
with the compiled path's reason, until the next re-probe. A step after a change of transport (the previous
step ran on the other one) is always a warm-up: it paid for an install or a compile.

Switching is safe because both transports give bit-identical results; what a switch away
from compiled must also do (tear the graph down so no spinning reader stays behind) is the
caller's job, as is running steps on what :meth:`choose` says.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

log = logging.getLogger(__name__)

CALLS, COMPILED = "calls", "compiled"


class TransportChoice:
    """The measured choice between ``"calls"`` and ``"compiled"`` for one repeated plan (see
    the module docstring). ``label`` names the plan in the log and in :meth:`explain`."""

    def __init__(
        self,
        label: str = "plan",
        *,
        k: int = 5,
        margin: float = 0.15,
        reprobe_after: int = 256,
        max_interval: int = 8192,
        drift: float = 2.0,
        min_gap: int = 32,
        max_misses: int = 3,
    ) -> None:
        if k < 1 or not 0 <= margin < 1 or drift <= 1 or reprobe_after < 1 or max_misses < 1:
            raise ValueError("TransportChoice: k >= 1, 0 <= margin < 1, drift > 1 and counts >= 1")
        self.label = label
        self.k, self.margin, self.drift = k, margin, drift
        self.reprobe_after, self.max_interval, self.min_gap = reprobe_after, max_interval, min_gap
        self.max_misses = max_misses
        #: The latest ``k`` counted step times (seconds) of each transport.
        self.samples: dict[str, deque[float]] = {CALLS: deque(maxlen=k), COMPILED: deque(maxlen=k)}
        #: "calls" / "compiled" while probing that transport; None once settled.
        self.probing: str | None = CALLS
        #: The transport the plan runs on when settled (the incumbent while probing the other).
        self.chosen = CALLS
        #: Why :attr:`chosen` holds (one line, with both measurements once there are some).
        self.reason = "measuring calls first"
        #: Every decision so far: (chosen, calls median, compiled median, reason).
        self.decisions: list[tuple[str, float | None, float | None, str]] = []
        self.interval = reprobe_after
        self._probe_counted = 0  # counted steps of the current probe
        self._misses = 0  # steps in a row that ran on calls while compiled was probed
        self._since = 0  # steps since the latest decision
        self._chosen_median: float | None = None  # the chosen transport's median when chosen
        self._last: str | None = None  # what the latest recorded step ran on

    # What to run ---------------------------------------------------------------------------------
    def choose(self) -> str:
        """The transport the next step should run on: ``"calls"`` or ``"compiled"``."""
        return self.probing if self.probing is not None else self.chosen

    # What ran -----------------------------------------------------------------------------------
    def record(self, transport: str, seconds: float, *, cold: bool = False, why: str = "") -> None:
        """A step of this plan ran on ``transport`` in ``seconds``. ``cold``: it paid a one-off
        cost (an install, a compile) and is not counted. ``why``: when it ran on calls while
        compiled was asked for, the compiled path's reason."""
        if transport not in (CALLS, COMPILED):
            raise ValueError(f"transport must be 'calls' or 'compiled', got {transport!r}")
        switched = self._last is not None and transport != self._last
        first = self._last is None
        self._last = transport
        self._since += 1
        asked = self.choose()
        if asked == COMPILED and transport == CALLS:
            self._misses += 1
            if self._misses >= self.max_misses:
                self._settle(CALLS, f"compiled did not run: {why or 'refused'}", kept=False)
            return  # not a measurement of what was asked
        self._misses = 0
        if cold or switched or first:
            return
        self.samples[transport].append(float(seconds))
        if self.probing is not None:
            if transport == self.probing:
                self._probe_counted += 1
                if self._probe_counted >= self.k:
                    self._finish_probe()
            return
        self._maybe_reprobe()

    # Decisions ----------------------------------------------------------------------------------
    def _finish_probe(self) -> None:
        probed = self.probing
        if probed == CALLS and not self.decisions:
            self._start_probe(COMPILED)  # the first round measures both
            return
        calls, compiled = self.median(CALLS), self.median(COMPILED)
        if calls is None or compiled is None:  # a re-probe with nothing to compare against
            self._settle(self.chosen, self.reason, kept=True)
            return
        incumbent = self.chosen
        other = COMPILED if incumbent == CALLS else CALLS
        inc_s, other_s = (calls, compiled) if incumbent == CALLS else (compiled, calls)
        if other_s <= inc_s * (1 - self.margin):
            winner, verdict = other, "faster by more than the margin"
        elif inc_s <= other_s:
            winner, verdict = incumbent, "faster"
        else:
            winner, verdict = incumbent, "kept: the other was not faster by the margin"
        reason = (
            f"{winner} {verdict}: calls {calls * 1e3:.2f} ms/step, compiled "
            f"{compiled * 1e3:.2f} ms/step (medians of {self.k} steps each, "
            f"margin {self.margin:.0%})"
        )
        self._settle(winner, reason, kept=winner == incumbent and bool(self.decisions))

    def _settle(self, winner: str, reason: str, *, kept: bool) -> None:
        flipped = winner != self.chosen
        self.chosen, self.reason, self.probing = winner, reason, None
        self._probe_counted = self._misses = self._since = 0
        self._chosen_median = self.median(winner)
        if kept:  # the choice stands: look again less often
            self.interval = min(self.max_interval, self.interval * 2)
        elif flipped or not self.decisions:
            self.interval = self.reprobe_after
        self.decisions.append((winner, self.median(CALLS), self.median(COMPILED), reason))
        log.info("transport for %s: %s (%s)", self.label, winner, reason)

    def _maybe_reprobe(self) -> None:
        if self._since >= self.interval:
            self._start_probe(COMPILED if self.chosen == CALLS else CALLS, "re-probe")
            return
        now, then = self.median(self.chosen), self._chosen_median
        if (
            now is not None
            and then is not None
            and self._since >= max(self.min_gap, self.k)
            and not then / self.drift <= now <= then * self.drift
        ):
            self._start_probe(
                COMPILED if self.chosen == CALLS else CALLS,
                f"{self.chosen} drifted from {then * 1e3:.2f} to {now * 1e3:.2f} ms/step",
            )

    def _start_probe(self, transport: str, why: str = "") -> None:
        self.probing = transport
        self._probe_counted = self._misses = 0
        self.samples[transport].clear()  # old measurements of it say nothing about now
        if why:
            log.info("transport for %s: probing %s again (%s)", self.label, transport, why)

    # Reads --------------------------------------------------------------------------------------
    def median(self, transport: str) -> float | None:
        """Median of the latest counted step times of ``transport`` (None: none yet)."""
        s = self.samples[transport]
        return statistics.median(s) if s else None

    def status(self) -> str:
        """A few words: what the choice is doing now (for a "why on calls" field)."""
        if self.probing is not None:
            return f"measuring {self.probing} ({self._probe_counted} of {self.k} steps)"
        if self.decisions and self.decisions[-1][3].startswith("compiled did not run"):
            return self.decisions[-1][3]
        return f"{self.chosen} measured faster"

    def explain(self) -> str:
        """One line: what auto runs now and why, with both measurements when there are some."""
        if self.probing is not None:
            line = f"auto: measuring {self.probing} ({self._probe_counted} of {self.k} steps)"
            if self.decisions:
                line += f"; {self.chosen} until then ({self.reason})"
            return line
        return (
            f"auto: {self.chosen} ({self.reason}); probed again in "
            f"{max(0, self.interval - self._since)} steps"
        )
