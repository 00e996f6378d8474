"""The graph picture (SVG, DOT) and the report page's data, parsed and checked without a browser."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import distgraph as dg
from distgraph.result import TraceEvent
from distgraph.spec import GraphSpec, NodeSpec
from distgraph.viz import build_replay, render_report, render_svg, to_dot, write_report

SVG = "{http://www.w3.org/2000/svg}"


def seed_graph() -> dg.Graph:
    """The seed's z = x * w + b."""
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 3.0)
    b = g.param("b", 1.0)
    g.output("z", x * w + b)
    return g


def mlp_graph() -> dg.Graph:
    """Two dense layers: x[N,4] -> relu(x@W1+b1)[N,8] -> @W2+b2 -> logits[N,3]."""
    rng = np.random.default_rng(0)
    g = dg.Graph()
    x = g.input("x", shape=(None, 4))
    w1 = g.param("W1", rng.normal(size=(4, 8)))
    b1 = g.param("b1", np.zeros(8))
    w2 = g.param("W2", rng.normal(size=(8, 3)))
    b2 = g.param("b2", np.zeros(3))
    h = dg.relu(x @ w1 + b1)
    g.output("logits", h @ w2 + b2)
    return g


def mlp_spec() -> GraphSpec:
    """The same two-layer MLP as plain IR, with every shape spelled out."""

    def node(name, op, inputs=(), shape=None):
        return NodeSpec(name=name, op=op, inputs=list(inputs), shape=shape, dtype="float64")

    return GraphSpec(
        nodes=[
            node("x", "input", shape=[None, 4]),
            node("W1", "param", shape=[4, 8]),
            node("b1", "param", shape=[8]),
            node("W2", "param", shape=[8, 3]),
            node("b2", "param", shape=[3]),
            node("matmul_1", "matmul", ["x", "W1"], [None, 8]),
            node("add_2", "add", ["matmul_1", "b1"], [None, 8]),
            node("relu_3", "relu", ["add_2"], [None, 8]),
            node("matmul_4", "matmul", ["relu_3", "W2"], [None, 3]),
            node("logits", "add", ["matmul_4", "b2"], [None, 3]),
        ],
        outputs=["logits"],
    )


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def nodes_of(root: ET.Element) -> dict[str, ET.Element]:
    found = [g for g in root.iter(f"{SVG}g") if g.get("data-node") is not None]
    names = [g.get("data-node") for g in found]
    assert len(names) == len(set(names)), "a node was drawn twice"
    return {g.get("data-node"): g for g in found}


def edges_of(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if "edge" in (g.get("class") or "").split()]


def shape_of(node: ET.Element) -> ET.Element:
    shapes = [r for r in node.iter(f"{SVG}rect") if r.get("class") == "shape"]
    assert len(shapes) == 1, f"node {node.get('data-node')} has {len(shapes)} shapes"
    return shapes[0]


@pytest.mark.parametrize("make", [lambda: seed_graph().spec, mlp_spec, lambda: mlp_graph().spec])
def test_one_shape_per_node(make):
    spec = make()
    root = parse(render_svg(spec))
    drawn = nodes_of(root)
    assert set(drawn) == {n.name for n in spec.nodes}
    for node in drawn.values():
        shape_of(node)
    assert root.get("data-nodes") == str(len(spec.nodes))


@pytest.mark.parametrize("make", [lambda: seed_graph().spec, mlp_spec, lambda: mlp_graph().spec])
def test_three_kinds_in_three_colours(make):
    spec = make()
    drawn = nodes_of(parse(render_svg(spec)))
    colours: dict[str, set[str]] = {}
    for node in spec.nodes:
        el = drawn[node.name]
        expected = (
            "output"
            if node.name in spec.outputs
            else "variable"
            if node.op in ("input", "param", "const")
            else "operation"
        )
        assert el.get("data-kind") == expected, node.name
        colours.setdefault(expected, set()).add(shape_of(el).get("fill"))
    assert set(colours) == {"variable", "operation", "output"}
    # One colour per kind, and the three kinds differ.
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == 3


def test_seed_kinds_are_the_seed_picture():
    drawn = nodes_of(parse(render_svg(seed_graph().spec)))
    assert {n: e.get("data-kind") for n, e in drawn.items()} == {
        "x": "variable",
        "w": "variable",
        "b": "variable",
        "mul_1": "operation",
        "z": "output",
    }


def test_columns_follow_topological_levels():
    spec = mlp_spec()
    drawn = nodes_of(parse(render_svg(spec)))

    def x_of(name: str) -> float:
        m = re.match(r"translate\(([-\d.]+),", drawn[name].get("transform"))
        return float(m.group(1))

    for node in spec.nodes:
        for src in node.inputs:
            assert x_of(src) < x_of(node.name), f"{src} -> {node.name} does not go right"
            assert int(drawn[src].get("data-level")) < int(drawn[node.name].get("data-level"))
    assert x_of("x") == x_of("W2")  # leaves share column 0


def test_worker_mark_on_every_node():
    spec = mlp_spec()
    placement = {n.name: i % 2 for i, n in enumerate(spec.nodes)}
    drawn = nodes_of(parse(render_svg(spec, placement=placement)))
    for name, el in drawn.items():
        badges = [g for g in el.iter(f"{SVG}g") if g.get("class") == "worker-badge"]
        assert len(badges) == 1, name
        assert el.get("data-worker") == badges[0].get("data-worker") == str(placement[name])
        assert "".join(badges[0].itertext()) == f"W{placement[name]}"


def test_no_placement_no_marks_no_cross_edges():
    root = parse(render_svg(seed_graph().spec))
    assert not [g for g in root.iter(f"{SVG}g") if g.get("class") == "worker-badge"]
    assert all("cross" not in e.get("class") for e in edges_of(root))


def test_seed_byte_labels_on_crossing_edges_only():
    spec = seed_graph().spec
    placement = {"x": 0, "w": 0, "b": 1, "mul_1": 0, "z": 1}
    root = parse(render_svg(spec, placement=placement))
    edges = {(e.get("data-src"), e.get("data-dst")): e for e in edges_of(root)}
    assert set(edges) == {("x", "mul_1"), ("w", "mul_1"), ("mul_1", "z"), ("b", "z")}
    crossing = {k for k, e in edges.items() if "cross" in e.get("class").split()}
    assert crossing == {("mul_1", "z")}
    label = edges[("mul_1", "z")]
    assert label.get("data-bytes") == "8"  # one float64 scalar
    assert "".join(label.itertext()).strip() == "8 B"
    for key in set(edges) - crossing:
        assert "".join(edges[key].itertext()).strip() == "", f"{key} has a label"
        assert edges[key].get("data-bytes") is None


def test_mlp_byte_labels_count_batch_and_itemsize():
    spec = mlp_spec()
    # Layer 1 on worker 0, layer 2 on worker 1; W2 lives on worker 0 and is shipped over.
    placement = dict.fromkeys(["x", "W1", "b1", "W2", "matmul_1", "add_2", "relu_3"], 0)
    placement.update(dict.fromkeys(["b2", "matmul_4", "logits"], 1))
    root = parse(render_svg(spec, placement=placement, batch_size=16))
    cross = {
        (e.get("data-src"), e.get("data-dst")): int(e.get("data-bytes"))
        for e in edges_of(root)
        if "cross" in e.get("class").split()
    }
    # relu_3 is [16, 8] float64 = 1024 bytes; W2 is [8, 3] float64 = 192 bytes.
    assert cross == {("relu_3", "matmul_4"): 1024, ("W2", "matmul_4"): 192}
    labels = {"".join(e.itertext()).strip() for e in edges_of(root) if "cross" in e.get("class")}
    assert labels == {"1.0 KiB", "192 B"}
    assert len(edges_of(root)) == 9


def test_float32_and_unknown_shapes_count_bytes():
    spec = GraphSpec(
        nodes=[
            NodeSpec(name="a", op="input", shape=[None, 10], dtype="float32"),
            NodeSpec(name="s", op="sum", inputs=["a"], dtype="float32"),
            NodeSpec(name="o", op="neg", inputs=["s"]),
        ],
        outputs=["o"],
    )
    root = parse(render_svg(spec, placement={"a": 0, "s": 1, "o": 0}, batch_size=5))
    got = {e.get("data-src"): int(e.get("data-bytes")) for e in edges_of(root)}
    assert got == {"a": 5 * 10 * 4, "s": 4}


def test_backward_nodes_get_their_own_style_but_stay_operations():
    spec = dg.grad(seed_graph(), of="z").spec
    drawn = nodes_of(parse(render_svg(spec)))
    backward = [n.name for n in spec.nodes if n.phase == "backward"]
    assert backward
    fills = {shape_of(drawn[n]).get("fill") for n in backward}
    forward_fills = {shape_of(drawn[n]).get("fill") for n in ("x", "mul_1", "z")}
    assert len(fills) == 1 and not fills & forward_fills
    assert {drawn[n].get("data-kind") for n in backward} == {"operation"}


def test_large_graph_is_valid_and_compact():
    g = dg.Graph()
    x = g.input("x")
    acc = x
    for i in range(150):
        acc = acc * g.param(f"p{i}", 1.0)
    g.output("out", acc)
    spec = g.spec
    assert len(spec.nodes) > 200
    root = parse(render_svg(spec, placement={n.name: i % 3 for i, n in enumerate(spec.nodes)}))
    drawn = nodes_of(root)
    assert len(drawn) == len(spec.nodes)
    small = float(shape_of(drawn["x"]).get("height"))
    normal = float(shape_of(nodes_of(parse(render_svg(seed_graph().spec)))["x"]).get("height"))
    assert small < normal


def test_title_and_names_are_escaped():
    spec = seed_graph().spec
    root = parse(render_svg(spec, title='a < b & "c"'))
    titles = [t for t in root.iter(f"{SVG}text") if t.get("class") == "title"]
    assert "".join(titles[0].itertext()) == 'a < b & "c"'


def test_cycle_is_reported():
    spec = GraphSpec(
        nodes=[
            NodeSpec(name="a", op="neg", inputs=["b"]),
            NodeSpec(name="b", op="neg", inputs=["a"]),
        ]
    )
    with pytest.raises(ValueError, match="cycle"):
        render_svg(spec)


def test_dot_output():
    spec = seed_graph().spec
    placement = {"x": 0, "w": 0, "b": 1, "mul_1": 0, "z": 1}
    dot = to_dot(spec, placement)
    assert dot.startswith("digraph distgraph {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    for n in spec.nodes:
        assert re.search(rf'^  "{n.name}" \[label=', dot, re.M), n.name
    arrows = re.findall(r'^  "([^"]+)" -> "([^"]+)"(.*);$', dot, re.M)
    assert {(a, b) for a, b, _ in arrows} == {
        ("x", "mul_1"),
        ("w", "mul_1"),
        ("mul_1", "z"),
        ("b", "z"),
    }
    labelled = {(a, b): rest for a, b, rest in arrows if "label=" in rest}
    assert list(labelled) == [("mul_1", "z")]
    assert 'label="8 B"' in labelled[("mul_1", "z")]
    assert dot.count("rank=same") == 3
    assert 'xlabel="W1"' in dot
    assert "xlabel" not in to_dot(spec)


def test_dot_quotes_names():
    spec = GraphSpec(nodes=[NodeSpec(name='we"ird', op="input")])
    assert '"we\\"ird"' in to_dot(spec)


# --- the report page, without a browser ------------------------------------------------------


def seed_run():
    g = seed_graph()
    res = dg.LocalExecutor().run(g, {"x": 2.0}, grad="z", trace=True)
    return g, res


def report_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "no data block"
    return json.loads(m.group(1))


def test_replay_of_seed_runs_forward_levels_then_backward():
    g, res = seed_run()
    groups = build_replay(g.spec, res.trace)
    phases = [grp.phase for grp in groups]
    assert phases == sorted(phases, key=["forward", "backward"].index)
    forward = [grp.nodes for grp in groups if grp.phase == "forward"]
    assert forward == [["x", "w", "b"], ["mul_1"], ["z"]]
    backward = [grp.nodes for grp in groups if grp.phase == "backward"]
    assert backward == [["z"], ["mul_1"]]  # gradients flow right to left


def test_replay_of_gradient_graph_has_one_task_per_node():
    g, res = seed_run()
    spec = dg.grad(g, of="z").spec
    groups = build_replay(spec, res.trace)
    names = [n for grp in groups for n in grp.nodes]
    assert sorted(names) == sorted(n.name for n in spec.nodes)


def test_replay_follows_the_clock_when_backward_levels_count_down():
    spec = seed_graph().spec
    t = 100.0
    events = []
    for name, phase, level in [
        ("mul_1", "forward", 1),
        ("z", "forward", 2),
        ("z", "backward", 2),
        ("mul_1", "backward", 1),
    ]:
        events.append(TraceEvent(name, "node", phase, level, "worker 0", t, t + 0.001, worker=0))
        t += 0.002
    groups = build_replay(spec, events)
    assert [(grp.phase, grp.nodes) for grp in groups][-2:] == [
        ("backward", ["z"]),
        ("backward", ["mul_1"]),
    ]


def test_report_embeds_data_and_needs_no_network(tmp_path):
    g, res = seed_run()
    (tmp_path / "sub").mkdir()  # write_report refuses a missing folder (issue 12)
    path = write_report(
        tmp_path / "sub" / "seed.html",
        g.spec,
        placement={"x": 0, "w": 1, "b": 0, "mul_1": 1, "z": 0},
        trace=res.trace,
        values={"x": 2.0, **res.values},
        grads=res.grads,
        title="</script><script>alert(1)</script>",
    )
    page = path.read_text()
    assert page.count("</script>") == 2  # the data block and the replay script, nothing injected
    data = report_data(page)
    assert data["title"] == "</script><script>alert(1)</script>"
    assert {r["name"]: r["number"] for r in data["grads"]} == {"x": 3.0, "w": 2.0, "b": 1.0}
    values = {r["name"]: r["display"] for r in data["values"]}
    assert values == {"x": "2", "w": "3", "b": "1", "z": "7"}  # params come from the spec
    # Self-contained: nothing is loaded from anywhere (the SVG namespace is not a request).
    assert not re.search(r"""(?<![\w-])(src|href)\s*=|@import|url\(\s*['"]?(https?:|//)""", page)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)


def test_report_summarises_arrays_and_numpy_history(tmp_path):
    g = dg.Graph()
    xin = g.input("x", shape=(None, 4))
    g.output("logits", xin * g.param("scale", np.full(4, 0.5)) + g.param("shift", 1.0))
    x = np.arange(8.0).reshape(2, 4)
    res = dg.LocalExecutor().run(g, {"x": x}, trace=True)
    history = {
        "loss": [np.float64(3.0), np.float32(2.0), 1.0],
        "params": [{"b": np.float64(v), "v": np.array([v, -v])} for v in (1.0, 0.5, 0.25)],
    }
    page = render_report(
        g.spec,
        placement={},
        trace=res.trace,
        values={"x": x, **res.values},
        grads={"W1": np.ones((4, 8))},
        history=history,
    )
    data = report_data(page)
    values = {r["name"]: r["display"] for r in data["values"]}
    assert values["x"] == "float64[2, 4] [0, 1, 2, 3, …]"
    assert values["logits"] == "float64[2, 4] [1, 1.5, 2, 2.5, …]"
    assert values["scale"] == "float64[4] [0.5, 0.5, 0.5, 0.5]"
    assert data["grads"][0]["number"] is None and data["grads"][0]["display"].startswith(
        "float64[4, 8]"
    )
    assert data["history"]["loss"] == [3.0, 2.0, 1.0]
    assert data["history"]["params"] == {
        "b": [1.0, 0.5, 0.25],
        "v[0]": [1.0, 0.5, 0.25],
        "v[1]": [-1.0, -0.5, -0.25],
    }
    m = re.search(r'<svg[^>]*id="loss-curve"[^>]*data-loss="([^"]*)"', page)
    assert m and json.loads(m.group(1).replace("&quot;", '"')) == [3.0, 2.0, 1.0]


def test_report_timeline_has_a_lane_per_track():
    spec = seed_graph().spec
    events = [
        TraceEvent("mul_1", "node", "forward", 1, "worker 1", 1.0, 1.1, worker=1),
        TraceEvent("z", "node", "forward", 2, "worker 0", 1.2, 1.3, worker=0),
        TraceEvent("apply", "update", "update", 0, "parameter server", 1.4, 1.5),
        TraceEvent("step", "call", "forward", 0, "driver", 0.9, 1.6),
    ]
    page = render_report(spec, placement={}, trace=events, values={}, grads={})
    lanes = re.findall(r'<g class="lane" data-track="([^"]+)"', page)
    assert lanes == ["worker 0", "worker 1", "driver", "parameter server"]
    assert len(re.findall(r'<rect class="event"', page)) == 4


# --- scaling out: replicas, shards, rows (issue 14, item 7) -----------------------------------


def shard_rows_of(page: str) -> dict[int, dict]:
    """The report's shard table: shard -> params, bytes, applied steps."""
    found = re.findall(
        r'<tr data-shard="(\d+)" data-params="([^"]*)" data-bytes="(\d+)" data-applied="(\d+)">',
        page,
    )
    return {
        int(s): {"params": p.split(",") if p else [], "bytes": int(b), "applied": int(a)}
        for s, p, b, a in found
    }


def replica_rows_of(page: str) -> dict[int, dict[int, list[int] | None]]:
    """The report's rows table: step -> replica -> [start, stop] (None: it sat the step out)."""
    table = re.search(r'<table class="grid" id="replica-rows">(.*?)</table>', page, re.S)
    assert table, "no rows table in the report"
    out: dict[int, dict[int, list[int] | None]] = {}
    for step, cells in re.findall(r'<tr data-step="(\d+)">(.*?)</tr>', table.group(1), re.S):
        out[int(step)] = {}
        for r, rows in re.findall(r'<td data-replica="(\d+)"(?: data-rows="([^"]*)")?', cells):
            out[int(step)][int(r)] = json.loads(rows) if rows else None
    return out


def _status(steps: int, rows_per_step: int = 6) -> dict:
    """A status() of 2 replicas x 1 worker and 2 shards after ``steps`` steps."""
    half = rows_per_step // 2
    entry = [
        {"replica": r, "rows": [r * half, (r + 1) * half], "workers": [r], "nodes": [f"n{r}" * 8],
         "ips": ["10.0.0.1"]}
        for r in range(2)
    ]  # fmt: skip
    applied = list(range(1, steps + 1))
    return {
        "version": steps,
        "applied": applied,
        "consistency": "sync",
        "replicas": {
            "count": 2,
            "width": 1,
            "kind": "mean",
            "last_step": steps,
            "rows": [e["rows"] for e in entry],
            "steps": {s: entry for s in applied},
        },
        "shards": [
            {"version": steps, "applied": applied, "params": ["W1", "b1", "b2"]},
            {"version": steps, "applied": applied, "params": ["W2"]},
        ],
    }


def test_scaling_section_shows_replicas_shards_and_the_latest_steps_rows():
    g = mlp_graph()
    page = render_report(g.spec, placement={}, trace=[], values={}, grads={}, status=_status(14))
    assert "2 replicas × 1 worker<" in page and "2 parameter-server shards" in page
    replicas = re.findall(r'<tr data-replica="(\d+)"><td>replica \d+</td><td>([^<]*)</td>', page)
    assert replicas == [("0", "worker 0"), ("1", "worker 1")]
    shards = shard_rows_of(page)
    nbytes = {k: np.asarray(v).nbytes for k, v in g.params.items()}
    assert shards == {
        0: {"params": ["W1", "b1", "b2"], "bytes": nbytes["W1"] + nbytes["b1"] + nbytes["b2"],
            "applied": 14},
        1: {"params": ["W2"], "bytes": nbytes["W2"], "applied": 14},
    }  # fmt: skip
    # The latest 10 steps row by row, the rule for the 4 before them.
    rows = replica_rows_of(page)
    assert sorted(rows) == list(range(5, 15))
    assert all(r == {0: [0, 3], 1: [3, 6]} for r in rows.values())
    assert "4 earlier steps, split by the same rule" in page
    assert "contiguous ranges in replica order" in page and "rows / the batch" in page
    # No layout, no section (a local session's status has none).
    plain = render_report(g.spec, placement={}, trace=[], values={}, grads={}, status={})
    assert 'id="scaling"' not in plain


def test_scaling_section_lists_async_records_with_their_staleness():
    status = _status(3)
    status["consistency"] = "async"
    status["async"] = {
        "staleness": 2,
        "staleness_histogram": {0: 2, 1: 1},
        "max_staleness": 1,
        "records": [
            {"replica": 0, "step": 1, "version": 0, "staleness": 0},
            {"replica": 1, "step": 2, "version": 0, "staleness": 1},
            {"replica": 0, "step": 3, "version": 2, "staleness": 0},
        ],
    }
    page = render_report(mlp_graph().spec, placement={}, trace=[], values={}, grads={},
                         status=status)  # fmt: skip
    assert "τ = 2" in page and '<b id="staleness-histogram">0: 2, 1: 1</b>' in page
    got = re.findall(r'<tr data-step="(\d+)" data-replica="(\d+)"><td>\d+</td><td>replica \d+'
                     r"</td><td>(\d+)</td><td>(\d+)</td>", page)  # fmt: skip
    assert got == [("1", "0", "0", "0"), ("2", "1", "0", "1"), ("3", "0", "2", "0")]
    # Whole steps per replica, counted from the records; no row split to show.
    steps = re.findall(
        r'<tr data-replica="(\d+)"><td>.*?</td><td>.*?</td><td>.*?</td><td>(\d+)</td>', page
    )
    assert steps == [("0", "2"), ("1", "1")]
    assert 'id="replica-rows"' not in page and "whole batch runs on one replica" in page


def test_explain_shows_which_params_each_shard_holds(capsys):
    from distgraph import models
    from distgraph.cli import main
    from distgraph.dataparallel import shard_params

    params = models.mlp_classifier().params
    want = shard_params({k: np.asarray(v).nbytes for k, v in params.items()}, 2)
    argv = ["explain", "mlp", "--workers", "2", "--replicas", "2", "--ps-shards", "2"]
    assert main([*argv, "--batch-size", "32"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("layout:") and "parameter-server shards: 2" in text
    for s, keys in enumerate(want):
        line = next(x for x in text.splitlines() if x.strip().startswith(f"shard {s}:"))
        assert line.rstrip().endswith(", ".join(keys)), line
    assert main(["explain", "linear", "--ps-shards", "3"]) == 2  # more shards than params
    assert "ps_shards=3 is more than the 2 params" in capsys.readouterr().err


def test_report_of_a_real_run_shows_its_replicas_shards_and_rows(tmp_path, capsys):
    """`distgraph train --replicas 2 --ps-shards 2 --report`: the page holds the replica rows
    and the shard table of the run itself, and its timeline a lane per replica and shard."""
    from raysupport import ensure_ray

    from distgraph import models
    from distgraph.cli import main

    ensure_ray()
    path = tmp_path / "dp.html"
    argv = ["train", "mlp", "--backend", "ray", "--workers", "2", "--replicas", "2"]
    argv += ["--ps-shards", "2", "--epochs", "2", "--batch-size", "64", "--json"]
    assert main([*argv, "--report", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    steps = out["replicas"]["steps"]
    assert out["replicas"]["count"] == 2 and steps >= 2  # the precondition: 2 replicas ran
    page = path.read_text()
    params = models.mlp_classifier(seed=0).params
    shards = shard_rows_of(page)
    assert sorted(shards) == [0, 1]
    owned = [p for s in shards.values() for p in s["params"]]
    assert sorted(owned) == sorted(params) and len(owned) == len(params)
    assert all(s["params"] and s["applied"] == steps for s in shards.values())
    for s in shards.values():
        assert s["bytes"] == sum(np.asarray(params[p]).nbytes for p in s["params"])
    replicas = re.findall(r'<tr data-replica="(\d+)"><td>replica \d+</td><td>([^<]*)</td>', page)
    assert replicas == [("0", "worker 0"), ("1", "worker 1")]
    rows = replica_rows_of(page)
    assert sorted(rows) == list(range(max(1, steps - 9), steps + 1))
    last = out["replicas"]["rows"]
    assert rows[steps] == {0: last[0], 1: last[1]}
    for by in rows.values():  # together the whole batch, in replica order, contiguous
        assert by[0][0] == 0 and by[0][1] == by[1][0] and by[1][1] - by[1][0] >= 1
    lanes = re.findall(r'<g class="lane" data-track="([^"]+)"', page)
    for track in ("worker 0", "worker 1", "replica 0", "replica 1", "parameter server shard 0",
                  "parameter server shard 1"):  # fmt: skip
        assert track in lanes, lanes


def test_a_ray_training_plan_explains_its_shards():
    from raysupport import ensure_ray

    from distgraph import models

    ensure_ray()
    g = models.mlp_classifier(seed=0)
    with dg.RayExecutor(num_workers=2, replicas=2, ps_shards=2) as ex:
        text = ex.plan(g, grad="loss", training=True, batch_size=32).explain()
    assert text.startswith("layout: 2 replicas")
    shard_lines = [x.strip() for x in text.splitlines() if x.strip().startswith("shard ")]
    assert "parameter-server shards: 2" in text and len(shard_lines) == 2, text
    named = [p for line in shard_lines for p in line.split(")", 1)[1].split(", ")]
    assert sorted(p.strip() for p in named) == sorted(g.params)
