"""The ``distgraph`` command: demo, train, run, explain, viz, bench.

Exit codes: 0 success; 1 a check failed (``train --check-local`` mismatch, a failed benchmark)
or an internal error (one ``distgraph: internal error: ...`` line, the traceback under ``-v``);
2 bad input or settings (one ``distgraph: error: ...`` line, never a traceback); 130
interrupted. ``--json`` output is strict JSON: non-finite floats are written as ``null``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import models
from .errors import ConfigError, DistgraphError
from .graph import Graph
from .memory import parse_bytes
from .optim import SGD, Adam, Momentum, Optimizer
from .runtime.base import Executor
from .runtime.local import LocalExecutor
from .spec import read_spec_file
from .train import Trainer

log = logging.getLogger("distgraph")


def _jsonable(value: Any) -> Any:
    """Plain JSON data; NaN and infinities become ``None`` (strict JSON has no literal for them)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return _jsonable(value.tolist())
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_json(value: Any, indent: int | None = None) -> None:
    # allow_nan=False: fail loudly here rather than print NaN that strict parsers reject.
    print(json.dumps(_jsonable(value), indent=indent, allow_nan=False))


# --- argument checks ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as a ``ConfigError`` (one line, exit 2) instead of usage text."""

    def error(self, message: str) -> Any:  # argparse's hook; never returns
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _replicas(text: str) -> int | str:
    """``--replicas``: ``auto`` or an integer >= 1 (that it divides --workers is checked by the
    executor, which names the choices)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {value}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _checked_output(path: str | None, what: str) -> None:
    """Refuse an output path in a missing folder before any work starts."""
    if path is not None:
        from .viz._paths import output_path

        output_path(path, what)


def _resolve_backend(args: argparse.Namespace) -> None:
    """``--address`` implies ``--backend ray``; Ray-only options on the local backend are refused."""
    if not hasattr(args, "backend"):
        return
    chosen = args.backend
    if chosen is None:
        args.backend = "ray" if args.address is not None else "local"
    if args.backend != "local":
        return
    given = [
        flag
        for flag, value in (
            ("--address", args.address),
            ("--connect-timeout", args.connect_timeout),
            ("--oversubscribe", args.oversubscribe or None),
            # "auto" (the default) and 1 mean one replica, which is all the local backend runs.
            ("--replicas", None if args.replicas in ("auto", 1) else args.replicas),
            ("--transport", getattr(args, "transport", None)),
            ("--consistency", None if getattr(args, "consistency", "sync") == "sync" else "async"),
        )
        if value is not None
    ]
    if given:
        flags = ", ".join(given)
        why = "--backend local was given" if chosen == "local" else "the backend is local"
        raise ConfigError(
            f"{flags} applies to Ray only, but {why}; use --backend ray "
            f"(--address alone implies it) or drop {flags}"
        )


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["local", "ray"],
        default=None,
        help="executor (default: local, or ray when --address is given)",
    )
    p.add_argument(
        "--workers", type=_int_at_least(1), default=2, help="Ray worker actors (default: 2)"
    )
    p.add_argument(
        "--strategy",
        default="mincut",
        help="partition strategy: mincut, level, round_robin, pipeline",
    )
    p.add_argument(
        "--replicas",
        type=_replicas,
        default="auto",
        help="data-parallel replicas of a training program, each over workers/replicas "
        "workers: an integer dividing --workers, or auto (default: the cost model chooses; "
        "more than one only when clearly faster, e.g. a large MLP at batch 256, never for a "
        "loss that couples rows; 1 gives results bit-identical to --backend local)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="join a Ray cluster ('auto', 'host:6379'); implies --backend ray; default: embedded Ray",
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="give up joining the cluster at --address after this long (default: 30)",
    )
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="let an embedded Ray start more workers than this machine has CPUs",
    )
    p.add_argument(
        "--placement",
        choices=["spread", "pack"],
        default="spread",
        help="worker placement over nodes",
    )
    p.add_argument(
        "--transport",
        choices=["calls", "compiled", "auto"],
        default=None,
        help="how Ray steps travel: actor calls, a Ray Compiled Graph, or auto (default: "
        "whichever measured faster on the plan's own first steps)",
    )
    p.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="refuse a run estimated to need more (e.g. 8G; default: half of physical memory)",
    )


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    from .pipeline import SCHEDULES

    p.add_argument(
        "--microbatches",
        type=_int_at_least(1),
        default=None,
        help="train as a pipeline: split each batch into this many micro-batches "
        "(needs a chain of stages: --strategy pipeline)",
    )
    p.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="gpipe",
        help="pipeline schedule with --microbatches (default: gpipe)",
    )


@contextlib.contextmanager
def _executor(args: argparse.Namespace) -> Iterator[Executor]:
    if args.backend == "local":
        ex: Executor = LocalExecutor(max_bytes=args.max_memory)
    else:
        from .runtime.ray import RayExecutor

        options: dict[str, Any] = {}
        if args.connect_timeout is not None:
            options["connect_timeout"] = args.connect_timeout
        if getattr(args, "transport", None) is not None:
            options["transport"] = args.transport
        if getattr(args, "ps_shards", 1) > 1:  # only `train` has the flag
            options["ps_shards"] = args.ps_shards
        if getattr(args, "consistency", "sync") != "sync":  # only `train` has these flags
            options["consistency"] = args.consistency
            options["staleness"] = args.staleness
        ex = RayExecutor(
            num_workers=args.workers,
            strategy=args.strategy,
            address=args.address,
            placement=args.placement,
            oversubscribe=args.oversubscribe,
            max_bytes=args.max_memory,
            replicas=args.replicas,
            microbatches=getattr(args, "microbatches", None),
            schedule=getattr(args, "schedule", "gpipe"),
            **options,
        )
    try:
        yield ex
    finally:
        ex.close()


def _load_graph(source: str) -> tuple[Graph, dict[str, Any], str | None]:
    if source in models.BUILTIN:
        return models.builtin_graph(source)
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"no such graph file {source!r} (or use one of {', '.join(models.BUILTIN)})"
        )
    g = Graph.from_json(read_spec_file(path))  # the size limit holds while reading
    return g, {}, g.grad_of


# --- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    _checked_output(args.report, "report")
    _checked_output(args.trace, "trace")
    g, feeds = models.seed_graph()
    with _executor(args) as ex:
        res = ex.run(g, feeds, grad="z", trace=True)
    workers = sorted(set(res.placement.values()))
    if args.json:
        out: dict[str, Any] = {"values": res.values, "grads": res.grads, "levels": res.levels}
        if args.backend == "ray":
            out["placement"] = res.placement
        _print_json(out)
    else:
        print("z = x * w + b with x = 2, w = 3, b = 1")
        print(
            f"backend: {args.backend}"
            + (
                f", {args.workers} workers, strategy {args.strategy}"
                if args.backend == "ray"
                else ""
            )
        )
        ran = {e.name: e for e in res.trace if e.kind == "node"}
        total = len(res.placement)
        done = 0
        for i, level in enumerate(res.levels):
            phase = (
                "forward" if all(not n.startswith(("grad:", "vjp:")) for n in level) else "backward"
            )
            cells = []
            for n in level:
                where = f"worker {res.placement[n]}"
                cells.append(f"{n}@{where}" if n in ran else f"{n} (given)")
            done += len(level)
            print(
                f"  level {i} [{phase:8s}] active: {', '.join(cells)}  | completed {done}/{total}, waiting {total - done}"
            )
        print("values:", ", ".join(f"{k} = {v:g}" for k, v in res.values.items()))
        print("gradients of z:", ", ".join(f"d{'z'}/d{k} = {v:g}" for k, v in res.grads.items()))
        if args.backend == "ray":
            print(f"nodes ran on workers {workers}")
            if len(workers) == 1 and args.workers > 1:
                print(
                    "(the cost model keeps a graph this small on one worker; --strategy round_robin spreads it)"
                )
    if args.trace:
        _write_trace(args.trace, res.trace)
    if args.report:
        path = _write_report(args.report, g, res, feeds, None, "distgraph demo: z = x * w + b")
        print(f"report written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _write_trace(path: str, events: list) -> None:
    from .trace import write_chrome_trace

    write_chrome_trace(path, events)
    log.info("trace written to %s", path)


def _write_report(
    path: str,
    g: Graph,
    res: Any,
    feeds: dict[str, Any],
    history: dict | None,
    title: str,
    timeline: list | None = None,
    status: dict | None = None,
) -> Path:
    from .viz import write_report

    # Every node's value as the run saw it: feeds, params, then what each forward event produced.
    values: dict[str, Any] = {**feeds, **g.params}
    values.update(
        {
            e.name: e.args["value"]
            for e in res.trace
            if e.kind == "node" and e.phase == "forward" and "value" in e.args
        }
    )
    values.update(res.values)
    report = write_report(
        path,
        g.spec,
        placement=res.placement,
        trace=res.trace if timeline is None else timeline,
        values=values,
        grads=res.grads,
        history=history,
        title=title,
        status=status,
    )
    return Path(report).resolve()


# --- train ------------------------------------------------------------------------------------


def _optimizer(args: argparse.Namespace, default_lr: float) -> Optimizer:
    lr = args.lr if args.lr is not None else default_lr
    if args.optimizer == "sgd":
        return SGD(lr=lr)
    if args.optimizer == "momentum":
        return Momentum(lr=lr)
    return Adam(lr=lr)


def _train_task(
    task: str, args: argparse.Namespace
) -> tuple[Graph, dict[str, np.ndarray], Optimizer, int]:
    if task == "linear":
        return (
            models.linear_regression(),
            models.linear_data(200, args.seed),
            _optimizer(args, 0.05),
            16,
        )
    return (
        models.mlp_classifier(seed=args.seed),
        models.spirals(200, seed=args.seed),
        _optimizer(args, 0.01 if args.optimizer == "adam" else 0.1),
        32,
    )


def cmd_train(args: argparse.Namespace) -> int:
    _checked_output(args.report, "report")
    _checked_output(args.trace, "trace")
    if args.optimizer is None:
        args.optimizer = "sgd" if args.task == "linear" else "adam"
    g, data, opt, batch = _train_task(args.task, args)
    batch = args.batch_size if args.batch_size is not None else batch
    epochs = args.epochs if args.epochs is not None else (200 if args.task == "linear" else 60)
    quiet = args.quiet or args.json
    with _executor(args) as ex:
        pipelined = args.backend == "ray" and args.microbatches is not None
        # Replicas or shards: the report's timeline is the last training step's, with a track
        # per replica and per parameter-server shard.
        scaled = args.backend == "ray" and (args.replicas != 1 or args.ps_shards > 1)
        trainer = Trainer(
            g,
            loss="loss",
            optimizer=opt,
            executor=ex,
            progress=None if not quiet else False,
            # Keeps the last training step's events, update included (a pipelined step's
            # timeline goes into the report too).
            trace=bool(args.trace) or (bool(args.report) and (pipelined or scaled)),
        )
        history = trainer.fit(data, epochs=epochs, batch_size=batch, seed=args.seed)
        params = trainer.params
        worker_nodes = {str(i): ip for i, ip in enumerate(getattr(ex, "nodes", []))}
        session_status = trainer.session.status()
        replicas = _replica_summary(session_status.get("replicas"))
        staleness = session_status.get("async")
        trained = g.with_params(params)
        res = ex.run(trained, data, outputs=[g.outputs[0]])
        if args.report:  # one traced forward+backward run on the first batch, for the replay
            batch_feeds = {k: v[:batch] for k, v in data.items()}
            traced = ex.run(trained, batch_feeds, grad="loss", trace=True)
        trainer.close()
    out: dict[str, Any] = {
        "task": args.task,
        "backend": args.backend,
        "workers": args.workers if args.backend == "ray" else 1,
        "ps_shards": args.ps_shards if args.backend == "ray" else 1,
        "epochs": epochs,
        "loss": history.loss,
        "params": params,
    }
    if worker_nodes:
        out["worker_nodes"] = worker_nodes
    if replicas:
        out["replicas"] = replicas
    if staleness:
        out["async"] = {
            "staleness": staleness["staleness"],
            "staleness_histogram": staleness["staleness_histogram"],
            "max_staleness": staleness["max_staleness"],
        }
    if args.task == "mlp":
        out["accuracy"] = models.accuracy(res.values["logits"], data["y"])
    status = 0
    if args.check_local:
        ref = Trainer(g, loss="loss", optimizer=opt, executor=LocalExecutor(), progress=False)
        ref.fit(data, epochs=epochs, batch_size=batch, seed=args.seed)
        diff = max(
            float(
                np.max(
                    np.abs(np.asarray(params[k]) - np.asarray(v))
                    / np.maximum(np.abs(np.asarray(v)), 1e-300)
                )
            )
            for k, v in ref.params.items()
        )
        out["max_rel_diff"] = diff
        out["matches_local"] = diff <= 1e-9
        status = 0 if out["matches_local"] else 1
    if args.json:
        _print_json(out)
    else:
        print(
            f"trained {args.task} on {args.backend} for {epochs} epochs: loss {history.loss[0]:.6g} -> {history.loss[-1]:.6g}"
        )
        for k, v in params.items():
            print(f"  {k} = {v:.6g}" if isinstance(v, float) else f"  {k}: shape {np.shape(v)}")
        if "accuracy" in out:
            print(f"  training accuracy: {out['accuracy']:.1%}")
        if worker_nodes:
            print(f"  workers on nodes: {worker_nodes}")
        if replicas:
            print(
                f"  replicas: {replicas['count']} x {replicas['width']} workers; "
                + (
                    f"last step's rows per replica {replicas['rows']}; "
                    if replicas["count"] > 1
                    else "the whole batch on one replica; "
                )
                + f"steps computed per node {replicas['ip_steps']}"
            )
        if args.check_local:
            print(
                f"  matches LocalExecutor: {out['matches_local']} (max relative difference {out['max_rel_diff']:.3g})"
            )
    if args.trace:
        _write_trace(args.trace, trainer.last_trace)
    if args.report:
        path = _write_report(
            args.report,
            trained,
            traced,
            batch_feeds,
            history.to_dict(),
            f"distgraph train {args.task}",
            # A pipelined run's timeline is its last training step's: F3/B1 blocks per worker;
            # so is a data-parallel or sharded one's (an async run's: its last epoch's steps).
            timeline=trainer.last_trace if (pipelined or scaled) and trainer.last_trace else None,
            status=session_status,
        )
        print(f"report written to {path}", file=sys.stderr if args.json else sys.stdout)
    return status


def _replica_summary(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The data-parallel layout of a Ray training run, for its output: replicas, workers per
    replica, the last step's rows per replica, and per Ray node (``node_steps``, by node id)
    and per IP (``ip_steps``) the number of steps in which a replica's worker there computed
    rows (of ``steps`` recorded)."""
    if not info:
        return None
    node_steps: dict[str, int] = {}
    ip_steps: dict[str, int] = {}
    for entries in info["steps"].values():
        for node in {n for e in entries for n in e["nodes"]}:
            node_steps[node] = node_steps.get(node, 0) + 1
        for ip in {n for e in entries for n in e["ips"]}:
            ip_steps[ip] = ip_steps.get(ip, 0) + 1
    return {
        "count": info["count"],
        "width": info["width"],
        "kind": info["kind"],
        "rows": info["rows"],
        "steps": len(info["steps"]),
        "node_steps": dict(sorted(node_steps.items())),
        "ip_steps": dict(sorted(ip_steps.items())),
    }


# --- run / explain / viz / bench ----------------------------------------------------------------


def _load_feeds(path: str, graph: Graph, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of a feeds ``.npz``, each member's name, shape and size checked against the
    graph's inputs (and ``max_bytes``, default 1 GiB) before its data is read; FeedError else."""
    from .npzio import MAX_BYTES, read_npz

    expect = {name: (graph[name].spec.shape, None) for name in graph.inputs}
    return read_npz(
        path,
        max_bytes=MAX_BYTES if max_bytes is None else max_bytes,
        expect=expect,
        require_all=False,  # a missing input is named by run(), which knows what it needs
    )


def cmd_run(args: argparse.Namespace) -> int:
    g, feeds, _ = _load_graph(args.graph)
    if args.feeds:
        # --max-memory bounds the feeds file too (its arrays are part of the run's memory).
        feeds = _load_feeds(args.feeds, g, args.max_memory)
    with _executor(args) as ex:
        res = ex.run(
            g, feeds, outputs=args.outputs or None, grad=args.grad, check_finite=args.check_finite
        )
    if args.json:
        out: dict[str, Any] = {"values": res.values, "grads": res.grads}
        if args.backend == "ray":
            out["placement"] = res.placement
        _print_json(out)
    else:
        for k, v in res.values.items():
            print(f"{k} = {v}")
        for k, v in res.grads.items():
            print(f"d/d{k} = {v}")
    return 0


def _calibration(args: argparse.Namespace) -> Any:
    """``explain --calibrate``: the runtime constants measured on ``--workers`` Ray workers
    (the embedded runtime, or the cluster at ``--address``); None without the flag."""
    if not args.calibrate:
        return None
    from .runtime.ray import RayExecutor

    ex = RayExecutor(num_workers=args.workers, address=args.address, oversubscribe=True)
    with ex:
        return ex.calibrate()


def cmd_explain(args: argparse.Namespace) -> int:
    from .plan import plan_for

    g, _, grad = _load_graph(args.graph)
    cal = _calibration(args)
    if args.grad is not None:
        grad = args.grad
    elif grad is None:
        grad = g.outputs[-1] if g.outputs else None
    if args.ps_shards > 1:
        if grad is None:
            raise ConfigError(
                "--ps-shards explains a training plan's parameter servers: give --grad OUTPUT"
            )
        from .viz.scaling import explain_shards

        shards = explain_shards(g.params, args.ps_shards)  # before printing: a bad count fails
    else:
        shards = ""
    if args.microbatches is not None and args.replicas not in (1, "auto"):
        raise ConfigError(
            "explain draws one pipeline's grid: give --replicas 1 (or auto) with "
            "--microbatches; training composes R pipelines (train --replicas R --microbatches m)"
        )
    if args.microbatches is not None:
        from .stageplan import build_stage_plan

        plan = plan_for(
            g,
            grad=grad,
            num_workers=args.workers,
            strategy=args.strategy,
            batch_size=args.batch_size,
            training=True,
        )
        staged = build_stage_plan(plan, args.microbatches, args.schedule, args.batch_size)
        print(staged.explain(cal))
        if shards:
            print(shards)
        return 0
    if grad is None or args.replicas == 1:
        plan = plan_for(
            g,
            grad=grad,
            num_workers=args.workers,
            strategy=args.strategy,
            batch_size=args.batch_size,
        )
        print(plan.explain(cal))
        if shards:
            print(shards)
        return 0
    # A training plan: the data-parallel layout first (what was chosen, why, alternatives),
    # then one replica's plan over its workers.
    from .cost import CostModel
    from .dataparallel import analyze_rows, choose_layout, explain_layout
    from .plan import program_of

    prog = program_of(g, grad=grad, wrt=list(g.params))
    forced = None if args.replicas == "auto" else args.replicas
    if forced is not None and forced > 1:
        analyze_rows(prog)  # a loss that couples rows: the GraphError naming the node
    cost = CostModel(batch_size=args.batch_size)
    layout = choose_layout(
        prog, cost, args.workers, args.batch_size, strategy=args.strategy, replicas=forced
    )
    print(explain_layout(layout))
    if shards:
        print(shards)
    plan = plan_for(
        prog,
        num_workers=layout.width,
        strategy=args.strategy,
        training=True,
        batch_size=max(layout.rows_per_replica),
    )
    where = "each replica's" if layout.replicas > 1 else "the"
    print(f"{where} plan:")
    print(plan.explain(cal))
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from .autodiff import grad as differentiate
    from .plan import plan_for
    from .viz import render_svg, to_dot
    from .viz._paths import output_path

    target = output_path(args.output, "picture")
    g, _, grad = _load_graph(args.graph)
    if args.backward and grad and g.grad_of is None:
        g = differentiate(g, grad)
    plan = plan_for(
        g,
        outputs=g.outputs or None,
        grad=None if g.outputs else grad,
        num_workers=args.workers,
        strategy=args.strategy,
        batch_size=args.batch_size,
    )
    placement = dict(plan.placement)
    placement.update({n.name: 0 for n in g.nodes if n.name not in placement})
    text = (
        to_dot(g.spec, placement=placement, batch_size=args.batch_size)
        if args.output.endswith(".dot")
        else render_svg(g.spec, placement=placement, batch_size=args.batch_size, title=args.graph)
    )
    target.write_text(text)
    print(f"wrote {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: only this command needs the suite. Missing peers (the ``bench`` extra)
    # raise a ConfigError naming the install command before anything runs.
    from . import bench

    unknown = [n for n in args.names if n not in bench.NAMES]
    if unknown:
        raise ConfigError(
            f"no benchmark named {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(bench.NAMES)} (or none for all)"
        )
    results = bench.run(
        args.names or None, quick=args.quick, progress=not args.json and sys.stderr.isatty()
    )
    if args.json:
        # JSON carries the machine description BENCHMARKS.md quotes. to_json writes NaN as null;
        # the round trip also turns any infinity into null, so the output is strict JSON.
        _print_json(json.loads(bench.to_json(results)), indent=2)
    else:
        print(bench.format_table(results))
    return 1 if any(r.get("error") for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    p = _Parser(
        prog="distgraph",
        description="Computational graphs with autodiff, run level by level on Ray actors.",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress (-vv for debug); show the traceback of an internal error",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the seed graph z = x*w + b forward and backward")
    _add_backend(d)
    d.add_argument(
        "--json", action="store_true", help="print values, grads, levels (and placement) as JSON"
    )
    d.add_argument("--report", help="write a self-contained HTML report here")
    d.add_argument("--trace", help="write a Chrome trace (JSON) here")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser(
        "train", help="train a built-in model (linear regression or an MLP on spirals)"
    )
    t.add_argument("task", choices=["linear", "mlp"])
    _add_backend(t)
    _add_pipeline(t)
    t.add_argument(
        "--epochs", type=_int_at_least(1), default=None, help="(default: linear 200, mlp 60)"
    )
    t.add_argument(
        "--batch-size", type=_int_at_least(1), default=None, help="(default: linear 16, mlp 32)"
    )
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default=None)
    t.add_argument("--seed", type=_int_at_least(0), default=0)
    t.add_argument(
        "--ps-shards",
        type=_int_at_least(1),
        default=1,
        help="parameter-server shards (Ray backend; params split over them by bytes; default: 1)",
    )
    t.add_argument(
        "--consistency",
        choices=["sync", "async"],
        default="sync",
        help="training updates (Ray backend): sync (default) combines every replica's rows of "
        "each step; async runs whole steps per replica, applied as they arrive (needs "
        "--replicas >= 2)",
    )
    t.add_argument(
        "--staleness",
        type=_int_at_least(0),
        default=0,
        help="async: a replica may start step t once every step <= t - staleness - 1 is "
        "applied (default: 0)",
    )
    t.add_argument(
        "--check-local",
        action="store_true",
        help="also train with LocalExecutor and compare (exit 1 on mismatch)",
    )
    t.add_argument("--json", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--report", help="write a self-contained HTML report here")
    t.add_argument("--trace", help="write a Chrome trace of one step here")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="run a serialized graph (JSON) on feeds (npz)")
    r.add_argument("graph", help="GRAPH.json or a built-in: seed, linear, mlp")
    r.add_argument("--feeds", help="an .npz file with one array per input")
    r.add_argument("--outputs", nargs="+", help="outputs to compute (default: the graph's)")
    r.add_argument("--grad", help="output to differentiate")
    r.add_argument("--check-finite", action="store_true")
    r.add_argument("--json", action="store_true")
    _add_backend(r)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("explain", help="show how a graph would be partitioned and run")
    e.add_argument("graph", help="GRAPH.json or a built-in: seed, linear, mlp")
    e.add_argument("--workers", type=_int_at_least(1), default=2)
    e.add_argument("--strategy", default="mincut")
    e.add_argument(
        "--replicas",
        type=_replicas,
        default="auto",
        help="data-parallel replicas to explain the training plan for: an integer dividing "
        "--workers, or auto (default: the layout train would choose at --batch-size, why, and "
        "the alternatives' estimated step times)",
    )
    e.add_argument(
        "--ps-shards",
        type=_int_at_least(1),
        default=1,
        help="parameter-server shards to explain for the training plan: which params each "
        "holds and their bytes (default: 1)",
    )
    e.add_argument("--grad", help="output to differentiate (default: the last output)")
    e.add_argument(
        "--batch-size", type=_int_at_least(1), default=1, help="size assumed for batch dimensions"
    )
    _add_pipeline(e)
    e.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the runtime's call, driver and transfer costs on --workers Ray workers "
        "(about a second; embedded Ray, or --address) and predict the step time with them "
        "instead of the default constants",
    )
    e.add_argument("--address", default=None, help="with --calibrate: a Ray cluster to join")
    e.set_defaults(func=cmd_explain)

    v = sub.add_parser("viz", help="draw a graph with its placement as SVG (or DOT with -o x.dot)")
    v.add_argument("graph", help="GRAPH.json or a built-in: seed, linear, mlp")
    v.add_argument("-o", "--output", default="graph.svg")
    v.add_argument("--workers", type=_int_at_least(1), default=2)
    v.add_argument("--strategy", default="mincut")
    v.add_argument("--batch-size", type=_int_at_least(1), default=1)
    v.add_argument("--backward", action="store_true", help="include the backward nodes")
    v.set_defaults(func=cmd_viz)

    b = sub.add_parser(
        "bench", help="run the benchmark suite (peers: pip install 'distgraph[bench]')"
    )
    b.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    b.add_argument("--quick", action="store_true", help="small sizes")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _fail(text: str) -> None:
    print(f"distgraph: {_one_line(text)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distgraph`` console script; returns the exit code.

    0 success; 1 a failed check or an internal error; 2 bad input or settings; 130 interrupted;
    141 stdout closed by its reader (a broken pipe).
    Every failure prints exactly one ``distgraph: ...`` line on stderr (plus the traceback of
    an internal error under ``-v``).
    """
    verbose = 0
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        _resolve_backend(args)
        # numpy's RuntimeWarnings (log of 0, overflow) printed source lines next to the one
        # result or error line; NaN/Inf show in the output (null in --json) and --check-finite
        # names the node. -v shows them.
        quiet = np.errstate(all="ignore") if verbose == 0 else contextlib.nullcontext()
        with quiet:
            return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`distgraph run ... | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except DistgraphError as e:
        if verbose >= 2:
            traceback.print_exc()
        _fail(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: treat as a bug below
            return _internal_error(e, verbose)
        # The system refused a file or folder the user named (permissions, a folder given
        # where a file is expected): bad input, not a bug.
        _fail(f"error: {e.strerror or e}: {e.filename}")
        return 2
    except Exception as e:
        return _internal_error(e, verbose)


def _internal_error(e: Exception, verbose: int) -> int:
    if verbose:
        traceback.print_exc()
    hint = "" if verbose else " (run 'distgraph -v ...' to see the traceback)"
    _fail(f"internal error: {type(e).__name__}: {e}{hint}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
