"""Execution events -> Chrome trace event JSON (opens in Perfetto and chrome://tracing).

One process, one thread per track ("worker 0", "worker 1", ...; "replica 0", ... with
data-parallel replicas; "driver"; "parameter server", or "parameter server shard 0", ... with
sharded servers), named with ``thread_name`` metadata; every event is a complete event
(``ph: "X"``) whose ``ts``/``dur`` are microseconds from the earliest event of the run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from .result import TraceEvent

PID = 1
_WORKER_TRACK = re.compile(r"^worker\s+(\d+)$")
_NUMBERED_TRACK = re.compile(r"^(replica|parameter server shard)\s+(\d+)$")


def event_track(event: TraceEvent) -> str:
    """The track an event belongs to; events without one fall back to their worker."""
    if event.track:
        return event.track
    return f"worker {event.worker}" if event.worker is not None else "driver"


def track_sort_key(track: str) -> tuple[int, int, str]:
    """Workers in number order, then the replicas, the driver, the parameter server, its
    shards in number order, then the rest."""
    m = _WORKER_TRACK.match(track)
    if m:
        return (0, int(m.group(1)), track)
    m = _NUMBERED_TRACK.match(track)
    if m:
        return (1 if m.group(1) == "replica" else 4, int(m.group(2)), track)
    order = {"driver": 2, "parameter server": 3}
    return (order.get(track, 5), 0, track)


def ordered_tracks(events: Iterable[TraceEvent]) -> list[str]:
    """The distinct tracks of ``events`` in display order."""
    return sorted({event_track(e) for e in events}, key=track_sort_key)


def jsonable(value: Any) -> Any:
    """Plain JSON data from numpy scalars/arrays and containers; non-finite floats as strings."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    return str(value)


def to_chrome_trace(events: list[TraceEvent]) -> dict:
    """Chrome trace JSON data for ``events``: one named thread per track, ``ph: "X"`` events."""
    tracks = ordered_tracks(events)
    tids = {track: i + 1 for i, track in enumerate(tracks)}
    out: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": "distgraph"}}
    ]
    for i, track in enumerate(tracks):
        tid = tids[track]
        out.append(
            {"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": track}}
        )
        out.append(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": PID,
                "tid": tid,
                "args": {"sort_index": i},
            }
        )
    t0 = min((e.start for e in events), default=0.0)
    timed = []
    for e in events:
        args: dict[str, Any] = {"kind": e.kind, "phase": e.phase, "level": e.level}
        if e.kind in ("node", "transfer"):
            args["node"] = e.name
        if e.op:
            args["op"] = e.op
        if e.worker is not None:
            args["worker"] = e.worker
        args.update(jsonable(e.args))
        timed.append(
            {
                "name": e.name,
                "cat": f"{e.kind},{e.phase}" if e.phase else e.kind,
                "ph": "X",
                # Microseconds from the run's start; rounded to nanoseconds to keep files small.
                "ts": round((e.start - t0) * 1e6, 3),
                "dur": round(max(e.end - e.start, 0.0) * 1e6, 3),
                "pid": PID,
                "tid": tids[event_track(e)],
                "args": args,
            }
        )
    timed.sort(key=lambda ev: (ev["ts"], ev["tid"]))
    return {"traceEvents": out + timed, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | os.PathLike[str], events: list[TraceEvent]) -> None:
    """Write ``events`` as a Chrome trace JSON file, into a folder that exists (a missing one is
    a ``ConfigError``, as for every writer: a typo must not create folders)."""
    from .viz._paths import output_path

    target = output_path(path, "trace")
    target.write_text(json.dumps(to_chrome_trace(events), allow_nan=False), encoding="utf-8")
