"""Sharded parameter servers: one training session's params over S server actors.

State:
- ``keys``: per shard, the params it owns (whole params, balanced by bytes:
  ``dataparallel.shard_params``), fixed at the first start; ``owner``: param -> shard;
- ``links``: one :class:`~.server.ServerLink` per shard (its actor, its checkpoint directory
  ``checkpoint_dir/shard-<s>``);
- ``pending`` / ``unsettled`` / ``progress`` / ``recovering``: kept and used as on a single
  ServerLink (both are a :class:`~.server.ServerBase`), for the shards together (the session
  sees one server).

Order of a step (the session's, unchanged; here fanned out over the shards):
1. each worker sends each shard only the gradients of the params that shard owns (the plan's
   ``ps`` outputs are split per shard by :func:`route_plan`); with ``clip_norm`` every shard
   first reports its params' sums of squares, a small task combines them exactly
   (``optim.global_norm``) and every shard stages with that one norm, so the update equals one
   server's; every shard stages and holds its update;
2. the driver waits for every shard's stage, then commits on every shard; the commits'
   statuses are combined in one ref (a shard whose commit finds nothing staged fails the step
   as a lost server: recovery and replay);
3. an abort goes to every shard too.

A step is applied by every shard or by none. Between the commits of two shards the driver can
be interrupted, or a shard can die: then some shards applied the step and others did not.
Shards record the state before their latest step, so the driver rolls the step back where it
was applied (``settle`` after an interrupted commit, ``alive`` before a recovery), and the
step is decided alike everywhere. A lost shard makes every shard restart from one step: the
latest checkpoint when all shards wrote it at the same step, else the initial state; the
session then replays the steps counted since (the Trainer's deterministic batches).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import ray

from ...checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ...dataparallel import shard_params
from ...errors import WorkerLostError
from ...optim import Optimizer, global_norm
from ...plan import PARAM_SERVER, Plan
from .actors import resolve
from .options import RayOptions
from .server import ServerBase, ServerLink, gradient_refs
from .waves import Waves

log = logging.getLogger(__name__)


def shard_dest(shard: int) -> str:
    """The plan destination of gradients for server shard ``shard``."""
    return f"{PARAM_SERVER}{shard}"


# --- Pure pieces (no Ray) ---------------------------------------------------------------------


def assign_shards(params: Mapping[str, Any], shards: int) -> list[list[str]]:
    """Per shard, the params it owns: whole params balanced by bytes."""
    return shard_params({k: int(np.asarray(v).nbytes) for k, v in params.items()}, shards)


def route_plan(plan: Plan, grad_shard: Mapping[str, int]) -> Plan:
    """``plan`` with each task's gradients for the server split by the shard that owns them
    (``grad_shard``: gradient node -> shard), so a worker sends each shard only its own."""
    tasks = copy.deepcopy(plan.tasks)
    for t in tasks:
        outputs: list[tuple[int | str, list[str]]] = []
        for dest, names in t.outputs:
            if dest != PARAM_SERVER:
                outputs.append((dest, names))
                continue
            per_shard: dict[int, list[str]] = {}
            for n in names:
                per_shard.setdefault(grad_shard[n], []).append(n)
            outputs.extend((shard_dest(s), per_shard[s]) for s in sorted(per_shard))
        t.outputs = sorted(outputs, key=lambda kv: (isinstance(kv[0], str), str(kv[0])))
    by_id = {t.id: t for t in tasks}
    for t in tasks:  # output slots may have moved: point every import at its slot again
        t.imports = [(src, by_id[src].slot(t.worker), names) for src, _, names in t.imports]
    return dataclasses.replace(plan, tasks=tasks)


def shard_split(
    plan: Plan, dest: str, split: Mapping[str, Any] | None, width: int
) -> dict[str, Any]:
    """One shard's data-parallel stage arguments: per replica, how many of the gradient dicts
    sent to ``dest`` are that replica's, and its rows (``split["replicas"]`` has them for the
    whole server); ``{}`` without replicas."""
    if not split:
        return {}
    rows = [r for _, r in split["replicas"]]
    counts = [0] * len(rows)
    for t in plan.tasks:
        if any(d == dest for d, _ in t.outputs):
            counts[t.worker // width] += 1
    return {"replicas": list(zip(counts, rows)), "kind": split["kind"]}


def split_checkpoint(ckpt: Checkpoint, keys: Sequence[str]) -> Checkpoint:
    """The part of ``ckpt`` one shard owns (its params and their optimizer state)."""
    return dataclasses.replace(
        ckpt,
        params={k: ckpt.params[k] for k in keys},
        opt_state={k: ckpt.opt_state[k] for k in keys if k in ckpt.opt_state},
        applied_steps=list(ckpt.applied_steps),
        extra=dict(ckpt.extra),
    )


def merge_checkpoints(parts: Sequence[Checkpoint]) -> Checkpoint:
    """One checkpoint from every shard's (taken at the same step: checked)."""
    first = parts[0]
    for s, p in enumerate(parts):
        if list(p.applied_steps) != list(first.applied_steps):
            raise WorkerLostError(
                f"parameter-server shard {s} has applied steps {_steps(p.applied_steps)}, shard "
                f"0 {_steps(first.applied_steps)}: the shards are not at one step; recover first"
            )
    params: dict[str, np.ndarray] = {}
    state: dict[str, dict[str, np.ndarray]] = {}
    for p in parts:
        params.update(p.params)
        state.update(p.opt_state)
    return dataclasses.replace(first, params=params, opt_state=state)


def merge_status(statuses: Sequence[Mapping[str, Any]], keys: Sequence[Sequence[str]]) -> dict:
    """The shards' statuses as one server's (steps applied by every shard), with ``shards``:
    each shard's own status and the params it owns."""
    everywhere = set.intersection(*(set(s["applied"]) for s in statuses))
    first = statuses[0]
    return {
        "version": min(s["version"] for s in statuses),
        "applied": [a for a in first["applied"] if a in everywhere],
        "duplicates": list(first["duplicates"]),
        "clipped": list(first["clipped"]),
        "lr": first["lr"],
        "grad_norm": first["grad_norm"],
        "shards": [dict(s, params=list(k)) for s, k in zip(statuses, keys)],
    }


def _steps(steps: Sequence[int]) -> str:
    steps = list(steps)
    return str(steps) if len(steps) <= 6 else f"[{steps[0]} .. {steps[-1]}] ({len(steps)})"


# --- Small tasks that combine the shards' answers without the driver reading them -----------


@ray.remote(num_cpus=0)
def _combine_norm(*sums: dict[str, float]) -> float:
    merged: dict[str, float] = {}
    for s in sums:
        merged.update(s)
    return global_norm(merged)


@ray.remote(num_cpus=0)
def _merge_dicts(*parts: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in resolve(list(parts)):  # with data_path="store" a shard answers by reference
        out.update(p)
    return out


def merge_commits(statuses: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shards' answers to one step's commit as one server's (``shards``: each one's)."""
    return {
        "version": min(s["version"] for s in statuses),
        "applied": all(s["applied"] for s in statuses),
        "step": statuses[0]["step"],
        "start": min(s["start"] for s in statuses),
        "end": max(s["end"] for s in statuses),
        "shards": [dict(s) for s in statuses],
    }


@ray.remote(num_cpus=0)
def _merge_commits(*statuses: dict[str, Any]) -> dict[str, Any]:
    return merge_commits(statuses)


@ray.remote(num_cpus=0)
def _gather(*answers: Any) -> list[Any]:
    return list(answers)


@ray.remote(num_cpus=0)
def _merge_checkpoint_refs(*parts: Checkpoint) -> Checkpoint:
    return merge_checkpoints(parts)


class ShardedServer(ServerBase):
    """S parameter-server shards behind the interface of one :class:`ServerLink`."""

    lost = "a parameter-server shard"

    def __init__(
        self,
        waves: Waves,
        options: RayOptions,
        optimizer: Optimizer,
        grads: Mapping[str, str],
        recover: Callable[[int | None], None],
        shards: int,
    ) -> None:
        super().__init__(waves, options, optimizer, grads, recover)
        self.num_shards = shards
        self.keys: list[list[str]] = []
        self.owner: dict[str, int] = {}
        self.links: list[ServerLink] = []
        self._routes: dict[int, list[str]] = {}

    # Layout -------------------------------------------------------------------------------------
    def assign(self, params: Mapping[str, Any]) -> None:
        """Fix which shard owns which param (once, from the initial params)."""
        if self.keys:
            return
        self.keys = assign_shards(params, self.num_shards)
        self.owner = {p: s for s, ks in enumerate(self.keys) for p in ks}

    def route_plan(self, plan: Plan) -> Plan:
        """``plan`` with gradients sent per shard (see :func:`route_plan`)."""
        return route_plan(plan, {g: self.owner[p] for p, g in self.grads.items()})

    def _shard_routes(self, s: int) -> dict[int, list[str]]:
        mine = set(self.keys[s])
        return {w: [p for p in ps if p in mine] for w, ps in self._routes.items()}

    @property
    def handle(self) -> Any:
        """Shard 0's actor (None before the first step and after close), for ``is None``
        checks; the shards' actors are ``links[s].handle``."""
        return self.links[0].handle if self.links else None

    # Lifetime -----------------------------------------------------------------------------------
    def start(self, ckpt: Checkpoint, routes: Mapping[int, list[str]]) -> None:
        """Start every shard from its part of ``ckpt``; a failed first start leaves none."""
        self.assign(ckpt.params)
        self._routes = {w: list(ps) for w, ps in routes.items()}
        first = not self.links
        if first:
            self.links = [
                ServerLink(
                    self.waves,
                    self.options,
                    self.optimizer,
                    {p: self.grads[p] for p in ks if p in self.grads},
                    self.recover,
                    shard=s,
                )
                for s, ks in enumerate(self.keys)
            ]
            for link in self.links:
                link.progress = self.progress
        try:
            for s, link in enumerate(self.links):
                link.start(split_checkpoint(ckpt, self.keys[s]), self._shard_routes(s))
        except BaseException:
            if first:
                self.kill()
                self.links = []
            raise

    def restart(self, initial: Checkpoint, routes: Mapping[int, list[str]]) -> Checkpoint:
        """Restart every shard from one step: the latest checkpoint when every shard wrote
        it at the same step, else ``initial``; returns that step's merged checkpoint."""
        self._routes = {w: list(ps) for w, ps in routes.items()}
        parts = [split_checkpoint(initial, ks) for ks in self.keys]
        latest = [link.latest_checkpoint(p) for link, p in zip(self.links, parts)]
        if all(list(c.applied_steps) == list(latest[0].applied_steps) for c in latest):
            parts = latest
        else:
            log.warning(
                "the parameter-server shards' checkpoints are at different steps (%s); "
                "restarting every shard from the run's start",
                [c.step for c in latest],
            )
        for s, (link, part) in enumerate(zip(self.links, parts)):
            link.restart(part, self._shard_routes(s), start_from=part)
        return merge_checkpoints(parts)

    def kill(self) -> None:
        """Stop every shard's actor without waiting."""
        for link in self.links:
            link.kill()

    def alive(self) -> bool:
        """Whether every shard answers and all are at one step (a step that reached only some
        shards is rolled back where it was applied, so it is decided alike everywhere)."""
        if not all(link.alive() for link in self.links):
            return False
        try:
            self._reconcile()
        except WorkerLostError as e:
            log.warning("%s; restarting every shard", e)
            return False
        return True

    def _reconcile(self) -> None:
        """Roll back a step that reached only some shards (it must be the latest of each)."""
        statuses = self.waves.get(
            [link.handle.status.remote() for link in self.links], "reading the shards' status"
        )
        applied = [list(s["applied"]) for s in statuses]
        longest = max(applied, key=len)
        if all(a == longest for a in applied):
            return
        common = min(applied, key=len)
        step = longest[-1]
        ahead = [s for s, a in enumerate(applied) if a == common + [step]]
        if not all(a in (common, common + [step]) for a in applied) or not ahead:
            raise WorkerLostError(f"the parameter-server shards are at different steps: {applied}")
        self._roll_back(step, ahead, "rolling back a step")

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """Keep the Trainer's progress and send it to every shard without waiting."""
        self.progress = dict(progress)
        for link in self.links:
            link.set_progress(progress)

    def _each(self, method: str, *args: Any) -> list[Any]:
        what = f"calling the parameter-server shards' {method}"
        return self.waves.get(
            [getattr(link.handle, method).remote(*args) for link in self.links], what
        )

    def _ask(self, method: str, *args: Any) -> Any:
        """Ask the shards together, as one server would answer."""
        if method == "status":
            return merge_status(self._each("status"), self.keys)
        if method == "params":
            out: dict[str, Any] = {}
            for part in self._each("params"):
                out.update(part)
            return out
        if method == "checkpoint":
            return merge_checkpoints(self._each("checkpoint"))
        if method == "worker_params":
            merged: list[dict[str, Any]] = []
            for part in self._each("worker_params"):
                for w, values in enumerate(part):
                    if w == len(merged):
                        merged.append({})
                    merged[w].update(values)
            return merged
        if method == "save":
            # One merged checkpoint, written by the driver (a file any executor can restore).
            save_checkpoint(args[0], merge_checkpoints(self._each("checkpoint")), same_run=True)
            return args[0]
        if method == "restore":
            ckpt = args[0]
            if isinstance(ckpt, (str, os.PathLike)):
                ckpt = load_checkpoint(ckpt)
            parts = [split_checkpoint(ckpt, ks) for ks in self.keys]
            versions = self.waves.get(
                [link.handle.restore.remote(p) for link, p in zip(self.links, parts)],
                "restoring the parameter-server shards",
            )
            return versions[0]
        if method == "abort":
            return self._applied(args[0], self._each("abort", args[0]))
        raise AssertionError(f"no sharded form of the server's {method}")

    # A compiled step's layout (compiled_training.py) ------------------------------------------
    @property
    def handles(self) -> list[Any]:
        """Every shard's actor, in shard order."""
        return [link.handle for link in self.links]

    @property
    def dests(self) -> list[str]:
        """The plan destination of each shard's gradients (see :func:`route_plan`)."""
        return [shard_dest(s) for s in range(len(self.links))]

    def stage_splits(
        self, plan: Plan, split: Mapping[str, Any] | None, width: int
    ) -> list[dict[str, Any]]:
        """Each shard's data-parallel stage arguments (see :func:`shard_split`)."""
        return [shard_split(plan, dest, split, width) for dest in self.dests]

    def serves(self, takers: Sequence[int]) -> list[list[int]]:
        """Per shard, the takers it sends new params to (those keeping some of its params)."""
        out = []
        for s in range(len(self.links)):
            routes = self._shard_routes(s)
            out.append([w for w in takers if routes.get(w)])
        return out

    def take_sent(self) -> list[Any]:
        """The refs of calls sent without waiting since the latest step, every shard's
        (cleared)."""
        return [ref for link in self.links for ref in link.take_sent()]

    # A step's calls ----------------------------------------------------------------------------
    def stage(
        self,
        step_id: int,
        plan: Plan,
        refs: Mapping[int, list[Any]],
        takers: Sequence[int],
        split: Mapping[str, Any] | None = None,
        width: int = 1,
    ) -> tuple[list[Any], dict[int, Any]]:
        """Stage the step on every shard with its own gradients (data-parallel replicas'
        combined per shard, in replica order; one global norm for clipping); returns (every
        shard's stage ref, worker -> ref of its new params)."""
        grads = [gradient_refs(plan, refs, dest) for dest in self.dests]
        splits = self.stage_splits(plan, split, width)
        norm = None
        if self.optimizer.clip_norm is not None:
            sums = [
                link.handle.sum_of_squares.remote(*g, **sp)
                for link, g, sp in zip(self.links, grads, splits)
            ]
            norm = _combine_norm.remote(*sums)
        staged: list[Any] = []
        parts: dict[int, list[Any]] = {w: [] for w in takers}
        for link, g, sp, serves in zip(self.links, grads, splits, self.serves(takers)):
            ref, mine = link.submit_stage((step_id, *g), serves, grad_norm=norm, **sp)
            staged.append(ref)
            for w, part in mine.items():
                parts[w].append(part)
        routed = {w: p[0] if len(p) == 1 else _merge_dicts.remote(*p) for w, p in parts.items()}
        return staged, routed

    def commit(self, step_id: int) -> Any:
        """Commit on every shard; returns one ref of their combined status."""
        return _merge_commits.remote(*[link.commit(step_id) for link in self.links])

    def abort(self, step_id: int) -> Any:
        """Abort on every shard; returns one ref of their answers (decided by ``settle``)."""
        return _gather.remote(*[link.abort(step_id) for link in self.links])

    def params_of(self, worker: int) -> Any:
        """Ref of the params ``worker`` keeps, from the shards that own them."""
        return _merge_dicts.remote(*[link.params_of(worker) for link in self.links])

    def checkpoint_ref(self) -> Any:
        """Ref of the merged checkpoint, read after every call already submitted."""
        return _merge_checkpoint_refs.remote(*[link.checkpoint_ref() for link in self.links])

    # Step outcomes (``reported`` and ``settle``: as one server's, see ServerBase) -------------
    def _applied(self, step_id: int, answers: Sequence[bool]) -> bool:
        """Whether ``step_id`` is applied, given each shard's answer; a step that reached only
        some shards is rolled back there, so it is applied by none."""
        if all(answers) or not any(answers):
            return bool(answers[0])
        ahead = [s for s, a in enumerate(answers) if a]
        self._roll_back(step_id, ahead, f"rolling back step {step_id}")
        return False

    def _roll_back(self, step_id: int, ahead: Sequence[int], what: str) -> None:
        """Undo ``step_id`` on the shards ``ahead`` (the only ones that applied it, as their
        latest step); WorkerLostError if one cannot."""
        undone = self.waves.get(
            [self.links[s].handle.rollback.remote(step_id) for s in ahead], what
        )
        if not all(undone):
            raise WorkerLostError(
                f"step {step_id} reached only shards {ahead} and cannot be rolled back there"
            )
        log.warning("step %d reached only shards %s; rolled back there", step_id, ahead)
