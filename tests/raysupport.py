"""Shared Ray set-up for the test suite: one embedded runtime, started on first use."""

from __future__ import annotations

import ray

#: Logical CPUs of the shared runtime, so several executors fit at once on a 2-core machine.
NUM_CPUS = 8


def ensure_ray() -> None:
    """Start the shared local Ray runtime unless one is already up.

    ``address="local"`` always starts a new runtime, even when another Ray cluster runs on
    this machine (``ray.init()`` alone would join it).
    """
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=NUM_CPUS,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
