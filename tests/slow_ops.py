"""A custom op for tests: identity that sleeps. Custom ops are registered in code, like this."""

from __future__ import annotations

import time

from distgraph.ops import OPS, defop


def _sleep(a, seconds=0.0):
    time.sleep(seconds)
    return a


if "sleep" not in OPS:
    defop("sleep", _sleep, lambda g, out, a, seconds=0.0: g, elementwise=True)
