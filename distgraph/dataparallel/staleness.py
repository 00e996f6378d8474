"""Bounded-delay bookkeeping for asynchronous data parallelism.

Owns :class:`StalenessClock` (which steps every shard has applied, which steps may start under
staleness bound tau, which (replica, step) was computed on which parameter version, and the
staleness histogram), its record :class:`Computed`, and :class:`DuplicateStepError` (the
exactly-once rule broken). Kept apart because it is the async driver's state machine: pure,
with no arrays and no graph, so its invariants are tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DistgraphError


class DuplicateStepError(DistgraphError):
    """A (shard, step) applied twice or a (replica, step) recorded twice: exactly-once broken."""


@dataclass(frozen=True)
class Computed:
    """A replica's gradient for ``step``, computed on params of ``version`` (see
    :class:`StalenessClock`); ``staleness`` counts steps before ``step`` possibly missing."""

    replica: int
    step: int
    version: int
    staleness: int


class StalenessClock:
    """Bounded-delay bookkeeping for asynchronous training (pure; the driver owns one).

    Steps are numbered from ``first_step`` (the Trainer's first step id is 1; a resumed run
    passes the first step not yet applied; every step below it counts as applied). Each
    parameter-server shard reports the steps it has applied (:meth:`mark_applied`, at most once
    per (shard, step)); shards may apply steps out of order. The parameter *version* is the
    last step ``v`` such that every shard has applied every step ``<= v``: params pulled now
    reflect at least those. A replica may start step ``t`` under staleness bound ``tau`` when
    ``version >= t - tau - 1`` (:meth:`may_start`); ``tau = 0`` is synchronous training (step
    t waits for every earlier step). Each (replica, step) is recorded once with the version it
    was computed on (:meth:`record`); its staleness is ``t - 1 - version``, the number of
    earlier steps whose updates it may not have seen.
    """

    def __init__(self, num_shards: int = 1, first_step: int = 1):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ConfigError(f"num_shards must be an int >= 1, got {num_shards!r}")
        self.num_shards = num_shards
        self.first_step = first_step
        self._applied: list[set[int]] = [set() for _ in range(num_shards)]
        #: Per shard: every step <= this one is applied.
        self._through = [first_step - 1] * num_shards
        self._records: dict[tuple[int, int], Computed] = {}

    def mark_applied(self, shard: int, step: int) -> None:
        """Shard ``shard`` applied step ``step``; a second report of the same pair raises
        :class:`DuplicateStepError` (the caller has applied an update twice)."""
        if not 0 <= shard < self.num_shards:
            raise ConfigError(f"shard {shard} is out of range 0..{self.num_shards - 1}")
        if self.has_applied(shard, step):
            raise DuplicateStepError(
                f"shard {shard} already applied step {step}: each (shard, step) is applied once"
            )
        done = self._applied[shard]
        done.add(step)
        through = self._through[shard]
        while through + 1 in done:
            through += 1
            done.discard(through)  # only steps past the contiguous prefix are kept
        self._through[shard] = through

    def applied_through(self, shard: int) -> int:
        """The last step ``v`` such that shard ``shard`` has applied every step ``<= v``."""
        return self._through[shard]

    def has_applied(self, shard: int, step: int) -> bool:
        """Whether shard ``shard`` has applied step ``step``."""
        return step <= self._through[shard] or step in self._applied[shard]

    @property
    def version(self) -> int:
        """The last step every shard has applied with every step before it."""
        return min(self._through)

    def may_start(self, step: int, tau: int) -> bool:
        """Whether step ``step`` may start: every shard applied all steps ``<= step - tau - 1``."""
        if not isinstance(tau, int) or tau < 0:
            raise ConfigError(f"staleness must be an int >= 0, got {tau!r}")
        return self.version >= step - tau - 1

    def record(self, replica: int, step: int, version: int | None = None) -> Computed:
        """Record that ``replica`` computed step ``step`` on params of ``version`` (default: the
        current one); a second record of the same (replica, step) raises
        :class:`DuplicateStepError`."""
        key = (replica, step)
        if key in self._records:
            raise DuplicateStepError(
                f"replica {replica} already recorded step {step} (on version "
                f"{self._records[key].version}): each (replica, step) is recorded once"
            )
        v = self.version if version is None else version
        entry = Computed(replica, step, v, max(0, step - 1 - v))
        self._records[key] = entry
        return entry

    @property
    def records(self) -> list[Computed]:
        """Every record, in the order they were made."""
        return list(self._records.values())

    def histogram(self) -> dict[int, int]:
        """How many recorded (replica, step) had each staleness, by staleness ascending."""
        counts: dict[int, int] = {}
        for c in self._records.values():
            counts[c.staleness] = counts.get(c.staleness, 0) + 1
        return dict(sorted(counts.items()))

    def max_staleness(self) -> int:
        """The largest recorded staleness (0 with no records)."""
        return max((c.staleness for c in self._records.values()), default=0)

    def status(self) -> dict[str, Any]:
        """For ``status()``: applied-through per shard, version, staleness histogram."""
        return {
            "applied_through": list(self._through),
            "version": self.version,
            "staleness_histogram": self.histogram(),
        }
