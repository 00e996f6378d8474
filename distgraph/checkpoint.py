"""Checkpoints on disk: a directory the library owns, switched atomically between versions.

Layout of a checkpoint directory ``path``::

    path/checkpoint.json        {"format": "distgraph.checkpoint/2", "current": "v00000007-1a2b3c4d"}
    path/v00000007-1a2b3c4d/    the current version:
        state.json              run id, step, applied step ids, optimizer config, progress,
                                and for every array its key, shape and dtype
        arrays.npz              params and optimizer state under keys p0, p1, ... / s0, s1, ...

A save writes a new version directory, fsyncs it, then replaces ``checkpoint.json`` with one
``os.replace``: a crash at any point leaves the previous version current and complete. Only
then are older versions removed. Arrays are stored under index keys (names live in
``state.json``), so any param name round-trips. A save never deletes what it did not write: a
non-empty directory that is not a checkpoint is refused, and files a user adds next to the
versions of a checkpoint are left alone. One process writes a given directory at a time.

Loading reads ``state.json`` through a pydantic model and ``arrays.npz`` through
:func:`distgraph.npzio.read_npz`, which checks every member's header against ``state.json``
before decompressing it. Checkpoints of format 1 (three files in ``path``) are still read.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .errors import CheckpointError
from .npzio import MAX_BYTES, read_npz

FORMAT = "distgraph.checkpoint/2"
_OLD_FORMAT = "distgraph.checkpoint/1"
POINTER = "checkpoint.json"
_VERSION = re.compile(r"^v(\d{8})-[0-9a-f]{8}$")
_TMP_PREFIX = ".tmp-"
_OLD_FILES = ("params.npz", "optimizer.npz", "state.json")
#: ``state.json`` larger than this is refused unread (it holds names and the loss history).
MAX_STATE_BYTES = 64 << 20


@dataclass
class Checkpoint:
    """Everything needed to resume training exactly.

    ``run_id`` names the training run that wrote it (a server restarting only adopts its own
    run's checkpoints); ``extra`` holds the Trainer's progress (epoch, fit segments, history).
    """

    params: dict[str, np.ndarray]
    opt_state: dict[str, dict[str, np.ndarray]]
    optimizer: dict[str, Any]
    step: int
    applied_steps: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""


# --- state.json ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArrayEntry(_Strict):
    """Where one array lives in ``arrays.npz`` and what it must look like."""

    key: str = Field(pattern=r"^[ps][0-9]{1,9}$")
    shape: list[StrictInt]
    dtype: str = Field(max_length=16)


class Segment(_Strict):
    """One ``fit`` call: enough to rebuild the batch of any of its steps from the same data."""

    first: StrictInt = Field(ge=1)
    n: StrictInt = Field(ge=1)
    batch_size: StrictInt = Field(ge=1)
    seed: StrictInt
    shuffle: StrictBool
    first_epoch: StrictInt = Field(ge=0)


class HistoryState(_Strict):
    """The Trainer's history; ``None`` stands for a loss that was not recorded (or NaN)."""

    loss: list[float | None] = []
    step_loss: list[float | None] = []
    params: list[dict[str, Any]] = []
    val_loss: list[float | None] = []
    val_metrics: dict[str, list[float | None]] = {}


class Progress(BaseModel):
    """The Trainer's part of a checkpoint (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow")
    epoch: StrictInt = Field(default=0, ge=0)
    segments: list[Segment] = []
    history: HistoryState = HistoryState()


class State(_Strict):
    """The fields of ``state.json``."""

    format: Literal["distgraph.checkpoint/2"]
    run_id: str = Field(pattern=r"^[0-9a-f]{0,64}$")
    step: StrictInt = Field(ge=0)
    applied_steps: list[StrictInt]
    optimizer: dict[str, Any]
    params: dict[str, ArrayEntry]
    opt_state: dict[str, dict[str, ArrayEntry]]
    extra: Progress = Progress()


class _Pointer(_Strict):
    format: Literal["distgraph.checkpoint/2"]
    current: str = Field(pattern=_VERSION.pattern)
    run_id: str = Field(default="", pattern=r"^[0-9a-f]{0,64}$")  # a copy, for a cheap run check


def _invalid(where: str, e: ValidationError) -> CheckpointError:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return CheckpointError(f"{where}: field {loc}: {first['msg']} (got {first.get('input')!r:.80})")


def _json_safe(value: Any) -> Any:
    """JSON without NaN/Infinity (not JSON): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _read_json(path: Path, error_where: str) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise CheckpointError(
                f"{error_where} is {size:,} bytes, more than the limit of {MAX_STATE_BYTES:,}"
            )
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{error_where} is missing: the checkpoint is incomplete") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{error_where} is unreadable: {e}") from None


# --- the directory -----------------------------------------------------------------------------


def _is_ours(path: Path, name: str) -> bool:
    if name == POINTER or name.startswith(_TMP_PREFIX) or _VERSION.match(name):
        return True
    return name in _OLD_FILES and _old_format(path)


def _old_format(path: Path) -> bool:
    try:
        return json.loads((path / "state.json").read_text()).get("format") == _OLD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_writable(path: Path) -> None:
    """Refuse a path that is a file, or a non-empty directory that is not a checkpoint."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; choose a checkpoint folder")
    if not path.exists() or (path / POINTER).exists() or _old_format(path):
        return
    foreign = sorted(n for n in os.listdir(path) if not _is_ours(path, n))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointError(
            f"{path} is not empty and is not a distgraph checkpoint (it holds {shown}); "
            "nothing was written: save into a new or empty directory"
        )


def _pointer(path: Path) -> _Pointer | None:
    """The pointer file's content, or None when ``path`` holds no format-2 checkpoint."""
    pointer = path / POINTER
    if not pointer.exists():
        return None
    where = f"checkpoint {path}: {POINTER}"
    try:
        return _Pointer.model_validate(_read_json(pointer, where))
    except ValidationError as e:
        raise _invalid(where, e) from None


def _current(path: Path) -> str | None:
    """The current version directory's name, or None when ``path`` holds no format-2 pointer."""
    pointer = _pointer(path)
    return None if pointer is None else pointer.current


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint (of either format)."""
    path = Path(path)
    return (path / POINTER).exists() or _old_format(path)


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, *, same_run: bool = False) -> Path:
    """Write ``ckpt`` as the new current version of checkpoint directory ``path``.

    Crash-safe (see the module docstring). With ``same_run=True`` a directory holding another
    run's checkpoint is refused instead of replaced (the parameter server's rule).
    """
    path = Path(path)
    _check_writable(path)
    current = _current(path) if path.exists() else None
    if same_run and path.exists() and is_checkpoint(path):
        other = checkpoint_run_id(path)
        if other != ckpt.run_id:
            raise foreign_run_error(path, other)
    path.mkdir(parents=True, exist_ok=True)
    # The pointer's model checked `current` against _VERSION, so match() is not None.
    seq = int(_VERSION.match(current).group(1)) + 1 if current else 1  # type: ignore[union-attr]
    name = f"v{seq:08d}-{secrets.token_hex(4)}"
    tmp = path / f"{_TMP_PREFIX}{name}"
    arrays: dict[str, np.ndarray] = {}
    params: dict[str, dict[str, Any]] = {}
    opt_state: dict[str, dict[str, dict[str, Any]]] = {}

    def entry(prefix: str, value: Any) -> dict[str, Any]:
        arr = np.asarray(value)
        key = f"{prefix}{len(arrays)}"
        arrays[key] = arr
        return {"key": key, "shape": list(arr.shape), "dtype": arr.dtype.str}

    for p, v in ckpt.params.items():
        params[p] = entry("p", v)
    for p, st in ckpt.opt_state.items():
        opt_state[p] = {k: entry("s", v) for k, v in st.items()}
    meta = {
        "format": FORMAT,
        "run_id": ckpt.run_id,
        "step": int(ckpt.step),
        "applied_steps": [int(s) for s in ckpt.applied_steps],
        "optimizer": ckpt.optimizer,
        "params": params,
        "opt_state": opt_state,
        "extra": _json_safe(ckpt.extra),
    }
    text = json.dumps(meta, indent=1, allow_nan=False).encode()
    try:
        tmp.mkdir()
        # numpy's stub checks every **kwds value against savez's allow_pickle: bool too; the
        # keys here are p<i>/s<i>, never a savez option.
        members = cast("dict[str, Any]", arrays)
        _write_file(tmp / "arrays.npz", lambda f: np.savez(f, **members))
        _write_file(tmp / "state.json", lambda f: f.write(text))
        _fsync_dir(tmp)
        os.rename(tmp, path / name)
        _fsync_dir(path)
        pointer_tmp = path / f"{_TMP_PREFIX}{name}.json"
        pointer = json.dumps({"format": FORMAT, "current": name, "run_id": ckpt.run_id}).encode()
        _write_file(pointer_tmp, lambda f: f.write(pointer))
        os.replace(pointer_tmp, path / POINTER)  # the one atomic switch
        _fsync_dir(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_old(path, keep=name)
    return path


def _remove_old(path: Path, keep: str) -> None:
    """Remove what earlier saves of the library left (never anything else)."""
    for n in os.listdir(path):
        if n in (keep, POINTER):
            continue
        if _VERSION.match(n) or n.startswith(_TMP_PREFIX):
            target = path / n
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        elif n in _OLD_FILES and n != "state.json":
            (path / n).unlink(missing_ok=True)
    if _old_format(path):
        (path / "state.json").unlink(missing_ok=True)


def foreign_run_error(path: str | os.PathLike, other: str) -> CheckpointError:
    """The error for a checkpoint directory that holds another run's checkpoint."""
    return CheckpointError(
        f"checkpoint directory {path} holds the checkpoint of another training run (run "
        f"{other or 'unknown'}); nothing was written. To continue that run, call "
        f"trainer.load({str(path)!r}) before fit(); to start a new run, give an empty or new "
        "checkpoint_dir"
    )


def checkpoint_run_id(path: str | os.PathLike) -> str:
    """The run id of the checkpoint in ``path`` (from the pointer file; "" for format 1)."""
    pointer = _pointer(Path(path))
    return "" if pointer is None else pointer.run_id


def _read_state(version: Path) -> State:
    where = f"checkpoint {version}/state.json"
    try:
        return State.model_validate(_read_json(version / "state.json", where))
    except ValidationError as e:
        raise _invalid(where, e) from None


def load_checkpoint(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES) -> Checkpoint:
    """Read the current version of checkpoint directory ``path`` (no pickles are loaded).

    ``max_bytes`` bounds the bytes its arrays may hold once read (default 1 GiB).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (a checkpoint is a folder)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is missing (no such directory)")
    current = _current(path)
    if current is None:
        if (path / "state.json").exists():
            return _load_old(path, max_bytes)
        raise CheckpointError(
            f"checkpoint {path} is missing: the directory holds no {POINTER} (not a checkpoint)"
        )
    version = path / current
    state = _read_state(version)
    entries = {f"params.{p}": e for p, e in state.params.items()}
    entries.update(
        {f"opt_state.{p}.{k}": e for p, st in state.opt_state.items() for k, e in st.items()}
    )
    expect: dict[str, tuple[Any, Any]] = {}
    for label, e in entries.items():
        if e.key in expect:
            raise CheckpointError(f"checkpoint {version}/state.json: field {label}: key reused")
        try:
            dtype = np.dtype(e.dtype)
        except TypeError:
            raise CheckpointError(
                f"checkpoint {version}/state.json: field {label}.dtype: unknown dtype {e.dtype!r}"
            ) from None
        expect[e.key] = (tuple(e.shape), dtype)
    arrays = read_npz(
        version / "arrays.npz",
        max_bytes=max_bytes,
        expect=expect,
        error=CheckpointError,
        what="checkpoint file",
    )
    return Checkpoint(
        params={p: arrays[e.key] for p, e in state.params.items()},
        opt_state={
            p: {k: arrays[e.key] for k, e in st.items()} for p, st in state.opt_state.items()
        },
        optimizer=dict(state.optimizer),
        step=state.step,
        applied_steps=list(state.applied_steps),
        extra=state.extra.model_dump(),
        run_id=state.run_id,
    )


class _OldState(BaseModel):
    """The fields of a format-1 ``state.json`` that are read."""

    format: Literal["distgraph.checkpoint/1"]
    step: StrictInt = Field(ge=0)
    applied_steps: list[StrictInt] = []
    optimizer: dict[str, Any]
    extra: Progress = Progress()


def _load_old(path: Path, max_bytes: int) -> Checkpoint:
    """Format 1: ``params.npz`` (names as keys), ``optimizer.npz`` (``param/field``), state."""
    where = f"checkpoint {path}/state.json"
    try:
        state = _OldState.model_validate(_read_json(path / "state.json", where))
    except ValidationError as e:
        raise _invalid(where, e) from None
    params = read_npz(
        path / "params.npz", max_bytes=max_bytes, error=CheckpointError, what="checkpoint file"
    )
    flat = read_npz(
        path / "optimizer.npz", max_bytes=max_bytes, error=CheckpointError, what="checkpoint file"
    )
    opt_state: dict[str, dict[str, np.ndarray]] = {p: {} for p in params}
    for key, value in flat.items():
        p, _, k = key.rpartition("/")
        opt_state.setdefault(p, {})[k] = value
    return Checkpoint(
        params=params,
        opt_state=opt_state,
        optimizer=dict(state.optimizer),
        step=state.step,
        applied_steps=list(state.applied_steps),
        extra=state.extra.model_dump(),
    )
