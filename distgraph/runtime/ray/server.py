"""The parameter server of one training session, as the driver sees it.

:class:`ServerBase` keeps what is alike for one server actor (:class:`ServerLink`) and for S
shards (``shards.ShardedServer``), the session seeing either as one server:
- ``pending``: the ref of the latest commit's status, not yet awaited (the next step, or any
  read of the server, waits for it);
- ``progress``: the Trainer's progress, sent with every (re)start so checkpoints carry it;
- ``unsettled``: a step whose failure came while its commit was being sent, with the ref of
  the server's answer to its abort; decided before the session's next step (``settle``);
- ``recovering``: set while the session recovers (a lost server then fails a read).

A :class:`ServerLink` adds ``handle``, its actor (None before the session's first step and
after close), and ``sent``, the refs of calls sent without waiting since the latest step.

A read (:meth:`ServerBase.call`) first waits for ``pending``; if the server was lost, the
session's recovery (``recover``: restart from a checkpoint and replay) runs, then the read is
asked again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ...checkpoint import (
    Checkpoint,
    checkpoint_run_id,
    foreign_run_error,
    is_checkpoint,
    load_checkpoint,
)
from ...errors import WorkerLostError
from ...optim import Optimizer
from ...plan import PARAM_SERVER, Plan
from ...result import TraceEvent
from . import actors
from .options import RayOptions
from .waves import Waves

log = logging.getLogger(__name__)


class ServerBase:
    """The driver's state and calls alike for one parameter-server actor and for several
    shards: the deferred commit, the unsettled step, and a read that recovers a lost server.
    A subclass says how to ask its actor(s) (``_ask``) and how their answers to an abort
    decide a step (``_applied``)."""

    #: Who was lost, as the log says it.
    lost = "the parameter server"
    #: The actor (a sharded server: shard 0's), None when no server runs.
    handle: Any

    def __init__(
        self,
        waves: Waves,
        options: RayOptions,
        optimizer: Optimizer,
        grads: Mapping[str, str],
        recover: Callable[[int | None], None],
    ) -> None:
        self.waves, self.options = waves, options
        self.optimizer, self.grads = optimizer, dict(grads)
        self.recover = recover
        self.pending: Any = None
        self.progress: dict[str, Any] | None = None
        #: Set while the session recovers: a lost server then fails the call instead.
        self.recovering = False
        #: (step id, ref of the server's answer to its abort): a step whose failure came while
        #: its commit was being sent; decided before the session's next step (``settle``).
        self.unsettled: tuple[int, Any] | None = None

    def drain(self) -> None:
        """Wait for a deferred commit, recovering (and replaying) if the server died."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            self.waves.get([pending], "applying the latest update")
        except WorkerLostError as e:
            log.warning("%s was lost after the last step (%s); recovering", self.lost, e)
            self.recover(None)

    def call(self, method: str, *args: Any) -> Any:
        """Ask the server, as one server answers (after any deferred commit); None when no
        server runs."""
        if self.handle is None:
            return None
        self.drain()
        try:
            return self._ask(method, *args)
        except WorkerLostError as e:
            if self.recovering:
                raise
            # A read after the server died: restart it (checkpoint + replay), then ask again.
            log.warning("%s was lost (%s); recovering", self.lost, e)
            self.recover(None)
            return self._ask(method, *args)

    def _ask(self, method: str, *args: Any) -> Any:
        """The answer to ``method(*args)``; WorkerLostError if the server is lost."""
        raise NotImplementedError

    def reported(self, pending: Any, error: BaseException | None) -> bool:
        """Whether the earlier commit ``pending`` failed with ``error``, the error this failed
        step raises: kept, it would fail every later call of the session with the same error
        (a checkpoint the server could not write made even ``Trainer.close`` raise)."""
        if pending is None or error is None or not ray.wait([pending], timeout=0)[0]:
            return pending is None
        try:
            self.waves.get([pending], "applying the latest update")
        except BaseException as e:  # compared with the step's error, not handled
            return type(e) is type(error) and str(e) == str(error)
        return False

    def settle(self) -> tuple[int, bool] | None:
        """Decide the unsettled step: (its id, whether it is applied), or None if none was."""
        if self.unsettled is None:
            return None
        step_id, answer = self.unsettled
        try:
            answered = self.waves.get([answer], f"settling step {step_id}")[0]
        except WorkerLostError:
            # The server died since: ask the one that replaced it (it restarts from this
            # run's checkpoint, every shard from one step, and the counted steps are
            # replayed; the question is still open).
            self.unsettled = None
            try:
                applied = self.call("abort", step_id)
            except BaseException:
                self.unsettled = (step_id, answer)
                raise
            return step_id, bool(applied)
        self.unsettled = None
        return step_id, self._applied(step_id, answered)

    def _applied(self, step_id: int, answered: Any) -> bool:
        """Whether ``step_id`` is applied, given the answer of :meth:`abort`'s ref."""
        raise NotImplementedError


def gradient_refs(plan: Plan, refs: Mapping[int, list[Any]], dest: str) -> list[Any]:
    """The refs of the gradients ``plan``'s tasks send to ``dest``, in task order."""
    return [refs[t.id][t.slot(dest)] for t in plan.tasks if any(d == dest for d, _ in t.outputs)]


class ServerLink(ServerBase):
    """Start, call and stop a session's parameter-server actor."""

    def __init__(
        self,
        waves: Waves,
        options: RayOptions,
        optimizer: Optimizer,
        grads: Mapping[str, str],
        recover: Callable[[int | None], None],
        shard: int | None = None,
    ) -> None:
        super().__init__(waves, options, optimizer, grads, recover)
        #: Which shard of several this server is (None: the only one); names its directory.
        self.shard = shard
        self.handle = None
        #: Refs of calls sent without waiting since the latest step (the Trainer's progress): a
        #: compiled step waits for them first (see compiled_training.py).
        self.sent: list[Any] = []

    @property
    def directory(self) -> str | None:
        """Where this server writes its checkpoints: ``checkpoint_dir``, or its
        ``shard-<s>`` subdirectory when it is one shard of several."""
        base = self.options.checkpoint_dir
        if base and self.shard is not None:
            return os.path.join(base, f"shard-{self.shard}")
        return base

    def start(self, ckpt: Checkpoint, routes: Mapping[int, list[str]]) -> None:
        """Start the server from ``ckpt`` (``routes``: worker -> the params it takes after each
        step). The first start also claims ``checkpoint_dir`` for this run: a directory
        holding another run's checkpoint is refused (a restart would otherwise adopt it),
        else this run's state is written there. A first start that fails leaves no server."""
        self._launch(ckpt, routes, first=self.handle is None)

    def restart(
        self,
        initial: Checkpoint,
        routes: Mapping[int, list[str]],
        start_from: Checkpoint | None = None,
    ) -> Checkpoint:
        """Replace a lost server with one started from this run's latest checkpoint (in
        ``checkpoint_dir``) or else ``initial``; returns the checkpoint it started from.
        Another run's checkpoint is never adopted: its steps are not this run's.
        ``start_from``: start from exactly this checkpoint instead (a sharded server picks one
        that every shard has)."""
        ckpt = self.latest_checkpoint(initial) if start_from is None else start_from
        with contextlib.suppress(Exception):
            ray.kill(self.handle)
        self._launch(ckpt, routes, first=False)
        return ckpt

    def latest_checkpoint(self, initial: Checkpoint) -> Checkpoint:
        """This run's latest checkpoint in this server's directory, else ``initial``."""
        path = self.directory
        if path and is_checkpoint(path):
            latest = load_checkpoint(path)
            if latest.run_id == initial.run_id and set(latest.params) == set(initial.params):
                return latest
            log.warning("%s holds another run's checkpoint; restarting from this run's start", path)
        return initial

    def _launch(self, ckpt: Checkpoint, routes: Mapping[int, list[str]], first: bool) -> None:
        directory = self.directory
        if first and directory and is_checkpoint(directory):
            other = checkpoint_run_id(directory)
            if other != ckpt.run_id:
                raise foreign_run_error(directory, other)
        self.handle = actors.ParamServerActor.options(num_cpus=0, max_restarts=0).remote(
            ckpt.params,
            self.optimizer,
            dict(routes),
            self.grads,
            directory,
            self.options.checkpoint_every,
            keep_undo=self.shard is not None,
        )
        calls = [self.handle.restore.remote(ckpt)]
        if self.progress is not None:  # newer than the checkpoint's: the fit under way
            calls.append(self.handle.set_progress.remote(self.progress))
        if first and directory:
            calls.append(self.handle.save.remote(directory))
        try:
            self.waves.get(calls, "starting the parameter server")
        except BaseException:
            if first:
                self.kill()
            raise

    def kill(self) -> None:
        """Stop the actor (if any) without waiting; the link then holds no server."""
        if self.handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.handle)
        self.handle = None

    def alive(self) -> bool:
        """Whether the server answers within 30 s."""
        try:
            actors.fetch(self.handle.status.remote(), timeout=30)
            return True
        except (RayActorError, GetTimeoutError, RayTaskError):
            return False

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """Keep the Trainer's progress and send it without waiting (the server takes it in
        order with the updates)."""
        self.progress = dict(progress)
        if self.handle is not None:
            self.sent.append(self.handle.set_progress.remote(self.progress))

    def _ask(self, method: str, *args: Any) -> Any:
        what = f"calling the parameter server's {method}"
        return self.waves.get([getattr(self.handle, method).remote(*args)], what)[0]

    # A compiled step's layout (compiled_training.py) ------------------------------------------
    @property
    def handles(self) -> list[Any]:
        """The server's actors (one here; a sharded server has one per shard)."""
        return [self.handle]

    @property
    def dests(self) -> list[str]:
        """The plan destination of each actor's gradients."""
        return [PARAM_SERVER]

    def stage_splits(
        self, plan: Plan, split: Mapping[str, Any] | None, width: int
    ) -> list[dict[str, Any]]:
        """Each actor's data-parallel stage arguments (``split``, as :meth:`stage` takes it)."""
        return [dict(split or {})]

    def serves(self, takers: Sequence[int]) -> list[list[int]]:
        """Per actor, the takers it sends new params to."""
        return [list(takers)]

    def take_sent(self) -> list[Any]:
        """The refs of calls sent without waiting since the latest step (cleared)."""
        sent, self.sent = self.sent, []
        return sent

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
        """Submit ``stage`` with the step's gradient refs; returns (refs to wait for before a
        commit, worker -> ref of its new params for the takers). ``split``: the data-parallel
        stage's arguments (``replicas``, ``kind``); ``width``: workers per replica."""
        split = dict(split or {})
        grads = gradient_refs(plan, refs, PARAM_SERVER)
        args: tuple[Any, ...] = (step_id, *grads)
        if split:
            # Data-parallel replicas: the server takes the gradients as the workers finish
            # (one hop), rather than after the driver has seen every one finish (two hops).
            args, split["grad_refs"], split["wait"] = (step_id,), grads, self.options.deadline
        staged, routed = self.submit_stage(args, takers, **split)
        return [staged], routed

    def submit_stage(
        self, args: Sequence[Any], takers: Sequence[int], **kwargs: Any
    ) -> tuple[Any, dict[int, Any]]:
        """Submit the actor's ``stage(*args, **kwargs)``; returns (its ref, worker -> ref of
        its new params for each of ``takers``)."""
        if takers:  # the new params are computed with the update: no extra trip
            n = self.options.num_workers
            out = self.handle.stage.options(num_returns=1 + n).remote(*args, routed=True, **kwargs)
            return out[0], {w: out[1 + w] for w in takers}
        return self.handle.stage.remote(*args, **kwargs), {}

    def commit(self, step_id: int) -> Any:
        """Submit the commit of ``step_id``; returns the ref of its status."""
        return self.handle.commit.remote(step_id)

    def abort(self, step_id: int) -> Any:
        """Submit the abort of ``step_id``; returns the ref of whether it is applied."""
        return self.handle.abort.remote(step_id)

    def params_of(self, worker: int) -> Any:
        """Ref of the current values of the params ``worker`` keeps."""
        return self.handle.params_of.remote(worker)

    def checkpoint_ref(self) -> Any:
        """Ref of the server's checkpoint, read after every call already submitted."""
        return self.handle.checkpoint.remote()

    def _applied(self, step_id: int, answered: Any) -> bool:
        return bool(answered)


def shard_track(shard: int) -> str:
    """The trace track of parameter-server shard ``shard``."""
    return f"parameter server shard {shard}"


def shard_events(
    step_id: int, shard: int, status: Mapping[str, Any], params: Sequence[str] = ()
) -> list[TraceEvent]:
    """A shard's part of step ``step_id`` on its own track, from its answer to the commit:
    ``stage`` (combine the gradients, compute and hold the update), ``commit`` (the update
    held until the driver's commit arrives: every replica and every shard staged) and
    ``apply`` (install it, checkpoint if due). ``params``: the params the shard owns."""
    track = shard_track(shard)
    # A server from before the split times (or a clock step back) must not draw backwards.
    staged = max(status.get("staged", status["start"]), status["start"])
    committed = min(max(status.get("committed", staged), staged), status["end"])
    args = {"shard": shard, "step": step_id, "params": list(params)}
    spans = [
        ("stage", status["start"], staged),
        ("commit", staged, committed),
        ("apply", committed, status["end"]),
    ]
    return [
        TraceEvent(
            f"{phase} step {step_id}",
            "update",
            phase,
            -1,
            track,
            start,
            end,
            args={**args, "version": status["version"]} if phase == "apply" else dict(args),
        )
        for phase, start, end in spans
    ]


def server_events(
    step_id: int, status: Mapping[str, Any], keys: Sequence[Sequence[str]] = ()
) -> list[TraceEvent]:
    """The server's trace events of step ``step_id``: one ``apply`` event on the
    ``"parameter server"`` track, or with several shards (``status["shards"]``, from
    ``ShardedServer.commit``) each shard's stage / commit / apply on its own track
    (``keys``: the params each shard owns)."""
    shards = status.get("shards")
    if not shards:
        return [apply_event(step_id, status)]
    out: list[TraceEvent] = []
    for s, part in enumerate(shards):
        out.extend(shard_events(step_id, s, part, keys[s] if s < len(keys) else ()))
    return out


def apply_event(step_id: int, status: Mapping[str, Any]) -> TraceEvent:
    """The trace event of the server applying step ``step_id``, from its answer to the commit."""
    return TraceEvent(
        f"apply step {step_id}",
        "update",
        "update",
        -1,
        "parameter server",
        status["start"],
        status["end"],
        args={"version": status["version"]},
    )
