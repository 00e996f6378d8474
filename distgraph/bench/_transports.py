"""The three transports side by side in one benchmark run: ``calls``, ``compiled``, ``auto``.

``auto`` (``transport_choice.py``) measures both transports on the plan's own first steps and
keeps the faster one; a benchmark warms it up until it has decided, then times it like the
others, and reports what it chose and the step times it measured (its own probe, which can
differ from the benchmark's figures: they are taken at other moments of a loaded machine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._harness import Record

TRANSPORTS = ("calls", "compiled", "auto")
#: Most steps an ``auto`` warm-up runs before giving up on a decision (the first decision
#: takes 12: 1 + 5 steps on each transport).
AUTO_WARMUP_LIMIT = 40


def warm_until_decided(step: Callable[[], Any], choice: Callable[[], Any]) -> Any:
    """Run ``step()`` until the :class:`TransportChoice` returned by ``choice()`` (None before
    the plan has one) has decided; returns the choice (AssertionError past the limit)."""
    for _ in range(AUTO_WARMUP_LIMIT):
        step()
        c = choice()
        if c is not None and c.probing is None and c.decisions:
            return c
    c = choice()
    raise AssertionError(f"auto did not decide in {AUTO_WARMUP_LIMIT} steps: {c and c.explain()}")


def run_choice(ex: Any) -> Any:
    """The choice of the latest run() plan of executor ``ex`` (None before its first run)."""
    plans = list(ex.waves.plans.values())
    return ex.compiled.choices.get(plans[-1][1]) if plans else None


def record_choice(rec: Record, prefix: str, choice: Any) -> None:
    """Figures ``{prefix}_auto_chose_compiled`` (1 or 0) and ``{prefix}_auto_probe_{calls,
    compiled}_s`` (the medians auto decided on), and a note with its reason."""
    chosen, calls_s, compiled_s, reason = choice.decisions[-1]
    rec.figure(f"{prefix}_auto_chose_compiled", 1.0 if chosen == "compiled" else 0.0)
    if calls_s is not None:
        rec.figure(f"{prefix}_auto_probe_calls_s", calls_s)
    if compiled_s is not None:
        rec.figure(f"{prefix}_auto_probe_compiled_s", compiled_s)
    rec.note(f"{prefix} auto chose {chosen}: {reason}.")
