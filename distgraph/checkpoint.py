"""Checkpoints on disk: a directory with ``params.npz``, ``optimizer.npz`` and ``state.json``.

Written to a temporary sibling directory and renamed into place, so a crash mid-write never
leaves a half checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

FORMAT = "distgraph.checkpoint/1"


@dataclass
class Checkpoint:
    """Everything needed to resume training exactly."""

    params: dict[str, np.ndarray]
    opt_state: dict[str, dict[str, np.ndarray]]
    optimizer: dict[str, Any]
    step: int
    applied_steps: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to directory ``path`` atomically (replacing an older one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        np.savez(tmp / "params.npz", **ckpt.params)
        flat = {f"{p}/{k}": v for p, st in ckpt.opt_state.items() for k, v in st.items()}
        np.savez(tmp / "optimizer.npz", **flat)
        meta = {
            "format": FORMAT,
            "step": ckpt.step,
            "applied_steps": ckpt.applied_steps,
            "optimizer": ckpt.optimizer,
            "params": sorted(ckpt.params),
            "extra": ckpt.extra,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickles are loaded)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: not a distgraph checkpoint (format {meta.get('format')!r})"
            )
        with np.load(path / "params.npz", allow_pickle=False) as f:
            params = {k: f[k] for k in f.files}
        opt_state: dict[str, dict[str, np.ndarray]] = {p: {} for p in params}
        with np.load(path / "optimizer.npz", allow_pickle=False) as f:
            for key in f.files:
                p, _, k = key.rpartition("/")
                opt_state.setdefault(p, {})[k] = f[key]
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or missing: {e.filename}") from None
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    return Checkpoint(
        params=params,
        opt_state=opt_state,
        optimizer=meta["optimizer"],
        step=int(meta["step"]),
        applied_steps=[int(s) for s in meta.get("applied_steps", [])],
        extra=meta.get("extra", {}),
    )
