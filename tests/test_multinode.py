"""Real multi-node runs on one machine: ray.cluster_utils.Cluster and a `ray start` head (issue 3)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from graphs import SPREAD_COST, mlp, towers

import distgraph as dg
from distgraph import models

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def three_node_cluster():
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the suite's shared runtime; raysupport.ensure_ray() restarts it later
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def assert_results_equal(a: dg.Result, b: dg.Result) -> None:
    assert a.values.keys() == b.values.keys() and a.grads.keys() == b.grads.keys()
    for k in a.values:
        assert np.array_equal(a.values[k], b.values[k]), k
    for k in a.grads:
        assert np.array_equal(a.grads[k], b.grads[k]), k


def nodes_that_ran(events, worker_info) -> set[str]:
    """Ray nodes that executed graph nodes, as the workers' trace events say; each event's node
    must be its worker's."""
    node_of = {i["index"]: i["node_id"] for i in worker_info}
    ran = [e for e in events if e.kind == "node"]
    assert ran, "no node events in the trace"
    for e in ran:
        assert e.args["node_id"] == node_of[e.worker], e
    return {e.args["node_id"] for e in ran}


def test_spread_workers_cross_nodes_and_match_local(three_node_cluster):
    g, feeds, out = mlp()
    local = dg.LocalExecutor().run(g, feeds, grad=out)
    with dg.RayExecutor(
        num_workers=3,
        strategy="round_robin",
        address=three_node_cluster.address,
        placement="spread",
        replicas=1,  # one plan partitioned over the nodes, bit for bit (replicas: below)
    ) as ex:
        nodes = {i["node_id"] for i in ex.worker_info}
        assert len(nodes) >= 2, ex.worker_info
        res = ex.run(g, feeds, grad=out, trace=True)
        # What makes the test multi-node: nodes of the graph executed on >= 2 Ray nodes.
        assert len(nodes_that_ran(res.trace, ex.worker_info)) >= 2
        plan = ex.plan(g, grad=out)
        node_of = {i["index"]: i["node_id"] for i in ex.worker_info}
        crossing_nodes = [
            (v, d) for v, d, _ in plan.cross_edges if node_of[plan.placement[v]] != node_of[d]
        ]
        assert crossing_nodes, "some tensors must travel between nodes"
        for k, v in local.values.items():
            np.testing.assert_array_equal(res.values[k], v)
        for k, v in local.grads.items():
            np.testing.assert_array_equal(res.grads[k], v)
        # Training across nodes ends where the reference does, bit for bit.
        g2, data = models.mlp_classifier((2, 8, 8, 2), seed=1), models.spirals(24)
        ref = dg.Trainer(g2, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
        ref.fit(data, epochs=2, batch_size=16)
        tr = dg.Trainer(
            g2,
            loss="loss",
            optimizer=dg.Adam(lr=0.05),
            executor=ex,
            progress=False,
            trace=True,  # the last step's events: where its nodes ran
        )
        tr.fit(data, epochs=2, batch_size=16)
        assert len(nodes_that_ran(tr.last_trace, ex.worker_info)) >= 2
        for k, v in ref.params.items():
            np.testing.assert_array_equal(tr.params[k], v, err_msg=k)
        assert tr.history.loss == ref.history.loss
        tr.close()
    assert ray.is_initialized()  # joined, not owned: the executor leaves the connection alone


def test_replicas_spread_over_nodes_each_compute_rows_of_every_step(three_node_cluster):
    """Data parallel across machines (issue 14, item 6): three replicas, one per node, and
    every node computes its rows of every step."""
    g, data = models.mlp_classifier((2, 8, 8, 2), seed=1), models.spirals(24)
    ref = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), progress=False)
    ref.fit(data, epochs=2, batch_size=16)
    with dg.RayExecutor(
        num_workers=3, replicas=3, address=three_node_cluster.address, placement="spread"
    ) as ex:
        nodes = {i["node_id"] for i in ex.worker_info}
        assert len(nodes) == 3, ex.worker_info  # the precondition: one worker per node
        tr = dg.Trainer(
            g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False, trace=True
        )
        tr.fit(data, epochs=2, batch_size=16)
        info = tr.session.status()["replicas"]
        assert (info["count"], info["width"]) == (3, 1)
        steps = info["steps"]
        assert sorted(steps) == tr.applied_steps == list(range(1, len(ref.applied_steps) + 1))
        for step, entries in steps.items():
            # Every node computed rows of this step, each replica on its own node.
            assert {n for e in entries for n in e["nodes"]} == nodes, (step, entries)
            assert all(e["rows"][1] > e["rows"][0] for e in entries), (step, entries)
        # The workers' own trace events of the last step say the same.
        assert nodes_that_ran(tr.last_trace, ex.worker_info) == nodes
        assert {e.args["replica"] for e in tr.last_trace if e.kind == "node"} == {0, 1, 2}
        for k, v in ref.params.items():
            np.testing.assert_allclose(tr.params[k], v, rtol=1e-12, atol=1e-15, err_msg=k)
        tr.close()


def test_node_lost_mid_run_with_replicas_recovers_and_equals_the_uninterrupted_run(
    three_node_cluster, tmp_path
):
    """Issue 14, item 5: a node that runs one replica (and maybe a parameter-server shard) is
    removed from the cluster during a synchronous data-parallel fit. Its workers are replaced
    on the surviving nodes, the step runs again with the same rows, and the final params equal
    (bit for bit) those of the same configuration's uninterrupted run."""
    g, data = models.mlp_classifier((2, 8, 8, 2), seed=1), models.spirals(24, seed=3)
    fit = {"epochs": 4, "batch_size": 16, "seed": 11}
    head = three_node_cluster.head_node
    others = [n for n in three_node_cluster.list_all_nodes() if n is not head]
    layout = {
        "num_workers": 2,
        "replicas": 2,
        "ps_shards": 2,
        "address": three_node_cluster.address,
        "placement": "spread",
    }
    with dg.RayExecutor(**layout) as ex:  # the uninterrupted run
        whole = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False)
        whole.fit(data, **fit)
        want, steps = whole.params, whole.applied_steps
        whole.close()
    assert len(steps) >= 12, steps  # enough steps after the loss to mean something
    with dg.RayExecutor(**layout, checkpoint_dir=str(tmp_path / "ps"), checkpoint_every=4) as ex:
        by_id = {n.node_id: n for n in others}
        nodes = {i["node_id"] for i in ex.worker_info}
        assert len(nodes) == 2, ex.worker_info  # the precondition: one replica per node
        victim = next(by_id[i["node_id"]] for i in ex.worker_info if i["node_id"] in by_id)
        lost = {i["index"] for i in ex.worker_info if i["node_id"] == victim.node_id}
        removed: list[int] = []

        def remove(tr, step):
            if step == 6 and not removed:
                three_node_cluster.remove_node(victim)
                removed.append(step)

        tr = dg.Trainer(g, loss="loss", optimizer=dg.Adam(lr=0.05), executor=ex, progress=False)
        tr.fit(data, callback=lambda step, loss: remove(tr, step), **fit)
        assert removed == [6]
        assert tr.session.recoveries, "the node loss was never noticed"
        assert set(ex.replacements) >= lost
        assert all(i["node_id"] != victim.node_id for i in ex.worker_info)
        info = tr.session.status()
        assert info["applied"] == steps
        by_step = info["replicas"]["steps"]
        # When a shard lived on the victim, the server restarts from its checkpoint (step 4)
        # and the steps after it are replayed -- on the survivors, which then record them.
        replayed = {
            int(n)
            for r in tr.session.recoveries
            if "replaying steps" in r
            for n in re.findall(r"\d+", r.split("replaying steps", 1)[1])
        }
        before = [s for s in steps if s <= 6 and s not in replayed]
        assert 1 in before, (tr.session.recoveries, replayed)
        # Before the loss the victim computed one replica's rows of each step; after it (and
        # in a replay), no step ran there, and both replicas still computed rows of every step.
        for s in steps:
            assert [e["replica"] for e in by_step[s]] == [0, 1], by_step[s]
            ran_on = {n for e in by_step[s] for n in e["nodes"]}
            assert (victim.node_id in ran_on) == (s in before), (s, replayed, by_step[s])
        for k in want:
            assert np.array_equal(tr.params[k], want[k]), k
        tr.close()


def _compiled_mlp():
    """The recovery tests' model and data (tests/test_recovery.py): 24 steps of 16 rows."""
    g = models.mlp_classifier((2, 16, 16, 2), seed=4)
    return g, models.spirals(48, seed=3), dg.Adam(lr=0.02)


COMPILED_FIT = {"epochs": 4, "batch_size": 16, "seed": 11}


def _server_on(node_id: str, monkeypatch: pytest.MonkeyPatch, first_only: bool = False) -> None:
    """Start parameter servers on node ``node_id`` (Ray otherwise places the 0-CPU actor on
    any node, the victim's included); ``first_only``: only the first, so a server restarted
    after that node's loss goes wherever Ray puts it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distgraph.runtime.ray import actors

    options = actors.ParamServerActor.options
    pinned = NodeAffinitySchedulingStrategy(node_id, soft=False)
    launched: list[int] = []

    def launch(**kw):
        launched.append(1)
        if first_only and len(launched) > 1:
            return options(**kw)
        return options(scheduling_strategy=pinned, **kw)

    monkeypatch.setattr(actors.ParamServerActor, "options", launch)


def _node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()))


def test_node_lost_during_compiled_training_recovers_recompiles_and_equals_calls(
    three_node_cluster, tmp_path, monkeypatch
):
    """Issue 16, item 3: a node holding a worker is removed while training runs as a Ray
    Compiled Graph (one replica, workers spread over the nodes, the server on the head). The
    failed compiled step tears the graph down, the worker is replaced on a surviving node, the
    step runs again, the next steps compile a new graph on the replacement, and the final
    params equal (bit for bit) the uninterrupted run on actor calls."""
    import threading

    g, data, opt = _compiled_mlp()
    ref = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    ref.fit(data, **COMPILED_FIT)  # LocalExecutor: bit-identical to calls and compiled runs
    want, steps = ref.params, ref.applied_steps
    assert len(steps) == 24, steps
    head = three_node_cluster.head_node
    _server_on(head.node_id, monkeypatch)
    others = [n for n in three_node_cluster.list_all_nodes() if n is not head]
    with dg.RayExecutor(
        num_workers=2,
        strategy="round_robin",  # the MLP over both workers: tensors cross the nodes
        replicas=1,
        address=three_node_cluster.address,
        placement="spread",
        transport="compiled",
        checkpoint_dir=str(tmp_path / "ps"),
        checkpoint_every=4,
    ) as ex:
        by_id = {n.node_id: n for n in others}
        nodes = {i["node_id"] for i in ex.worker_info}
        assert len(nodes) == 2, ex.worker_info  # the precondition: the workers span two nodes
        victim = next(by_id[i["node_id"]] for i in ex.worker_info if i["node_id"] in by_id)
        lost = {i["index"] for i in ex.worker_info if i["node_id"] == victim.node_id}
        before: dict[str, object] = {}
        remover: list[threading.Thread] = []

        failed: list[tuple[int, str]] = []  # (step, error) of each failed compiled step

        def spy(compiled):
            original = compiled.failed

            def failed_step(graph, step, error):
                out = original(graph, step, error)
                failed.append((step, type(out).__name__))
                return out

            compiled.failed = failed_step

        def remove(tr, step):
            # No idle reaping: under load the gap at an epoch's end can pass the reaper's 5 s,
            # and a reaped graph's next step is a first one on calls -- which would then meet
            # the loss instead of a compiled step (what this test is about).
            tr.session.compiled.slot.idle_s = 3600.0
            if step == 6 and not remover:
                # The precondition: the victim holds a worker only, so its loss is found by
                # a compiled step's graph (a server there is found by the wait before it).
                assert _node_of(tr.session.server.handle) == head.node_id != victim.node_id
                spy(tr.session.compiled)
                graph = tr.session.compiled.graph
                before.update(
                    graph=graph, reason=tr.session.compiled.last_reason, workers=list(ex.workers)
                )
                # Removed from another thread: the node goes while the next compiled steps
                # run (removing a node takes Ray a while), not between two of them.
                remover.append(
                    threading.Thread(target=three_node_cluster.remove_node, args=(victim,))
                )
                remover[0].start()

        g, data, opt = _compiled_mlp()
        tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
        tr.fit(data, callback=lambda step, loss: remove(tr, step), **COMPILED_FIT)
        remover[0].join(60)
        assert not remover[0].is_alive()
        # The precondition: step 6 ran compiled, its graph spanning both nodes' workers.
        assert before["reason"] == "" and before["graph"] is not None, before
        assert before["graph"].workers == before["workers"]
        assert tr.session.recoveries, "the node loss was never noticed"
        # The loss failed a compiled step (not a call), one after the removal began.
        reaped = tr.session.compiled.slot.reaped
        assert len(failed) == 1 and failed[0][0] > 6, (failed, tr.session.recoveries, reaped)
        assert failed[0][1] == "WorkerLostError", failed
        assert any("replaced workers" in r for r in tr.session.recoveries), tr.session.recoveries
        assert set(ex.replacements) >= lost
        assert all(i["node_id"] != victim.node_id for i in ex.worker_info)
        # Compiled again after the recovery, on the replacement worker.
        compiled = tr.session.compiled
        assert compiled.last_reason == "", compiled.last_reason
        assert compiled.graph is not None and not compiled.graph.torn_down
        assert compiled.graph is not before["graph"]
        assert compiled.graph.workers == list(ex.workers) != before["workers"]
        assert tr.session.status()["applied"] == steps
        for k in want:
            assert np.array_equal(tr.params[k], want[k]), k
        tr.close()


@pytest.mark.parametrize("transport", ["calls", "compiled"])
def test_the_servers_node_lost_mid_run_restarts_it_from_the_checkpoint_and_equals_local(
    three_node_cluster, tmp_path, monkeypatch, transport
):
    """The node that holds the parameter server (one replica, no shards) is removed during a
    fit, under both transports. The server is restarted on a surviving node from its latest
    checkpoint (step 4), the steps applied after it are replayed, and the final params equal
    (bit for bit) an uninterrupted LocalExecutor run; under "compiled" the steps compile
    again on the new server."""
    g, data, opt = _compiled_mlp()
    ref = dg.Trainer(g, loss="loss", optimizer=opt, progress=False)
    ref.fit(data, **COMPILED_FIT)
    want, steps = ref.params, ref.applied_steps
    head = three_node_cluster.head_node
    victim = next(n for n in three_node_cluster.list_all_nodes() if n is not head)
    _server_on(victim.node_id, monkeypatch, first_only=True)
    with dg.RayExecutor(
        num_workers=2,
        strategy="round_robin",
        replicas=1,
        address=three_node_cluster.address,
        placement="spread",
        transport=transport,
        checkpoint_dir=str(tmp_path / "ps"),
        checkpoint_every=4,
    ) as ex:
        removed: list[int] = []

        def remove(tr, step):
            if step == 6 and not removed:
                # The precondition: the server runs on the node about to go.
                assert _node_of(tr.session.server.handle) == victim.node_id
                if transport == "compiled":
                    assert tr.session.compiled.last_reason == "", tr.session.compiled.last_reason
                three_node_cluster.remove_node(victim)
                removed.append(step)

        g, data, opt = _compiled_mlp()
        tr = dg.Trainer(g, loss="loss", optimizer=opt, executor=ex, progress=False)
        tr.fit(data, callback=lambda step, loss: remove(tr, step), **COMPILED_FIT)
        assert removed == [6]
        recoveries = tr.session.recoveries
        assert any("parameter server restarted from version 4" in r for r in recoveries), recoveries
        # Steps 5 and 6 ran again (and step 7, had the loss met its commit).
        assert any(re.search(r"replaying steps \[5, 6[],]", r) for r in recoveries), recoveries
        assert _node_of(tr.session.server.handle) != victim.node_id
        assert all(i["node_id"] != victim.node_id for i in ex.worker_info)
        assert tr.session.status()["applied"] == steps
        if transport == "compiled":  # compiled again, with the new server in the graph
            compiled = tr.session.compiled
            assert compiled.last_reason == "", compiled.last_reason
            assert compiled.graph is not None and not compiled.graph.torn_down
            servers = list(tr.session.server.handles)
            assert len(compiled.graph.servers) == len(servers)
            assert all(a is b for a, b in zip(compiled.graph.servers, servers))
        for k in want:
            assert np.array_equal(tr.params[k], want[k]), k
        tr.close()


def test_node_lost_during_compiled_runs_recovers_and_recompiles(three_node_cluster):
    """Issue 16, item 3, run() plans: a node holding a worker is removed while one graph's
    run() steps repeat as a compiled graph. The failed compiled run replaces the worker and
    runs again, the plan compiles again on the replacement, and every run equals the
    LocalExecutor's results bit for bit."""
    import threading

    g, feeds, out = towers()
    local = dg.LocalExecutor().run(g, feeds, grad=out)
    head = three_node_cluster.head_node
    others = [n for n in three_node_cluster.list_all_nodes() if n is not head]
    with dg.RayExecutor(
        num_workers=2,
        strategy="round_robin",
        cost=SPREAD_COST,  # both towers' workers take part
        address=three_node_cluster.address,
        placement="spread",
        transport="compiled",
    ) as ex:
        by_id = {n.node_id: n for n in others}
        assert len({i["node_id"] for i in ex.worker_info}) == 2, ex.worker_info
        victim = next(by_id[i["node_id"]] for i in ex.worker_info if i["node_id"] in by_id)
        lost = {i["index"] for i in ex.worker_info if i["node_id"] == victim.node_id}
        results = [ex.run(g, feeds, grad=out) for _ in range(3)]
        # The precondition: the plan uses both nodes' workers and runs compiled.
        assert set(results[-1].placement.values()) == {0, 1}
        assert ex.compiled.last_reason == "" and ex.compiled.graphs
        before = list(ex.workers)
        failed: list[str] = []
        original = ex.compiled._failed

        def failed_run(plan_id, compiled, step, error):
            got = original(plan_id, compiled, step, error)
            failed.append(type(got).__name__)
            return got

        ex.compiled._failed = failed_run
        remover = threading.Thread(target=three_node_cluster.remove_node, args=(victim,))
        remover.start()
        while remover.is_alive() or not ex.replacements:
            results.append(ex.run(g, feeds, grad=out))
            assert len(results) < 10_000, "the node loss was never noticed"
        results += [ex.run(g, feeds, grad=out) for _ in range(3)]
        remover.join(60)
        assert failed == ["WorkerLostError"], failed  # the loss failed a compiled run
        assert set(ex.replacements) >= lost
        assert all(i["node_id"] != victim.node_id for i in ex.worker_info)
        # Compiled again, on the replacement worker.
        assert ex.compiled.last_reason == "", ex.compiled.last_reason
        (graph,) = ex.compiled.graphs.values()
        assert graph.workers == list(ex.workers) != before
        for res in results:
            assert_results_equal(res, local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = """
import json, sys
import distgraph as dg
from distgraph import models
g, feeds = models.seed_graph()
with dg.RayExecutor(num_workers=2, address=sys.argv[1]) as ex:
    res = ex.run(g, feeds, grad="z")
    print(json.dumps({"values": res.values, "grads": res.grads, "nodes": ex.nodes}))
"""


def test_existing_cluster_started_with_ray_start(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - lives as long as the head process
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
        ]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it never touches other Ray runtimes
    )

    def status() -> int:
        return subprocess.run(
            [RAY, "status", f"--address={address}"], env=env, capture_output=True, timeout=60
        ).returncode

    try:
        deadline = time.time() + 90
        while status() != 0:
            assert time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, address],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert got["values"] == {"z": 7.0}
        assert got["grads"] == {"x": 3.0, "w": 2.0, "b": 1.0}
        assert status() == 0, "the cluster must still be up after the driver leaves"

        # A driver with the wrong token is refused with a clear error, within the connect timeout.
        bad = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(16))
        probe = "import distgraph as dg, sys\ndg.RayExecutor(num_workers=1, address=sys.argv[1], connect_timeout=20)"
        started = time.time()
        wrong = subprocess.run(
            [sys.executable, "-c", probe, address],
            env=bad,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert wrong.returncode != 0
        assert "could not connect to Ray" in wrong.stderr and "RAY_AUTH_TOKEN" in wrong.stderr, (
            wrong.stderr[-2000:]
        )
        assert time.time() - started < 90
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        log.close()
    assert (
        subprocess.run(["pgrep", "-f", f"gcs_server_port={port}"], capture_output=True).returncode
        == 1
    )


def test_unreachable_address_fails_fast():
    port = _free_port()  # nothing listens there
    started = time.time()
    probe = "import distgraph as dg, sys\ndg.RayExecutor(num_workers=1, address=sys.argv[1])"
    run = subprocess.run(
        [sys.executable, "-c", probe, f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "ClusterError" in run.stderr and f"127.0.0.1:{port}" in run.stderr
    assert time.time() - started < 30
