"""A custom op for tests: identity that sleeps. Custom ops are registered in code, like this."""

from __future__ import annotations

import os
import time

from distgraph.ops import OPS, Attr, defop


def _sleep(a, seconds=0.0):
    time.sleep(seconds)
    return a


if "sleep" not in OPS:
    defop(
        "sleep",
        _sleep,
        lambda g, out, a, seconds=0.0: g,
        attrs={"seconds": Attr("float", default=0.0, low=0.0)},
        elementwise=True,
    )


def _stall(a, flag=""):
    # Identity that waits while the file ``flag`` exists (at most two minutes), so a test
    # decides exactly which step stalls and when it finishes.
    give_up = time.monotonic() + 120.0
    while flag and os.path.exists(flag) and time.monotonic() < give_up:
        time.sleep(0.02)
    return a


if "stall" not in OPS:
    defop(
        "stall",
        _stall,
        lambda g, out, a, flag="": g,
        attrs={"flag": Attr("str", default="")},
        elementwise=True,
    )
