"""A custom op for tests: identity that sleeps. Custom ops are registered in code, like this."""

from __future__ import annotations

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
