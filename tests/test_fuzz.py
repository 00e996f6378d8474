"""Fuzzing (issue 6, acceptance 6): random graphs and mutated JSON specs, on both executors.

Every case either runs, with ``RayExecutor(2)`` giving exactly the reference executor's
values and gradients, or raises a ``DistgraphError`` on both; any other exception type is a
bug. Hypothesis is derandomized, so a run in CI sees the same examples as a run here.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import faulthandler
import functools
import itertools
import json
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import ray
from graphs import BUILDERS, random_graphs, seed_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raysupport import ensure_ray

import distgraph as dg
from distgraph.ops import BUILTIN_OPS, OPS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

STRATEGIES = ("round_robin", "level", "mincut")


class Hang(Exception):
    """An example ran past ``HANG_SECONDS``."""


#: No single case may take this long; the slowest legitimate one takes well under a second.
HANG_SECONDS = 30


#: Where a hang's tracebacks go: pytest's copy of the real stderr (fd 2 is being captured).
_REPORT_FD = 2


@pytest.fixture(scope="module", autouse=True)
def _hang_report_fd(request: pytest.FixtureRequest) -> None:
    global _REPORT_FD
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        _REPORT_FD = request.config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):
        _REPORT_FD = 2


@contextlib.contextmanager
def no_hang(what: str) -> Iterator[None]:
    """Turn a hang into a failure instead of a stalled run.

    SIGALRM fails the test when Python code hangs; a single C call (a numpy loop) cannot be
    interrupted, so faulthandler ends the whole process a little later, printing every
    thread's traceback.
    """

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what}: still running after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    faulthandler.dump_traceback_later(HANG_SECONDS * 2, exit=True, file=_REPORT_FD)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fuzz_settings(n: int) -> settings:
    """Reproducible (derandomized, no example database), no per-example deadline."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def ray_ex():
    ensure_ray()
    ex = dg.RayExecutor(num_workers=2)
    yield ex
    ex.close()


# --- running a case on both executors ----------------------------------------------------------


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("error", the DistgraphError); any other exception propagates."""
    try:
        return "ok", fn()
    except dg.DistgraphError as e:
        return "error", e


class Both:
    """Runs each case on the reference executor, then on Ray with a rotating strategy."""

    def __init__(self, ray_ex: dg.RayExecutor):
        self.ray_ex = ray_ex
        self.local = dg.LocalExecutor()
        self.turn = itertools.cycle(STRATEGIES)
        self.counts = {"ok": 0, "error": 0}

    def run(self, graph: dg.Graph, feeds: Any, **kwargs: Any) -> str:
        local = outcome(lambda: self.local.run(graph, feeds, **kwargs))
        self.ray_ex.strategy = next(self.turn)
        remote = outcome(lambda: self.ray_ex.run(graph, feeds, **kwargs))
        what = f"strategy {self.ray_ex.strategy}, {kwargs}"
        if local[0] == "ok":
            assert remote[0] == "ok", f"Ray failed where local ran ({what}): {remote[1]!r}"
            assert_same(local[1], remote[1], what)
        else:
            assert remote[0] == "error", f"Ray ran where local raised {local[1]!r} ({what})"
            assert type(remote[1]) is type(local[1]), (what, local[1], remote[1])
        self.counts[local[0]] += 1
        return local[0]


def assert_same(local: dg.Result, remote: dg.Result, what: str) -> None:
    assert local.values.keys() == remote.values.keys(), what
    assert local.grads.keys() == remote.grads.keys(), what
    for kind, a, b in (("value", local.values, remote.values), ("grad", local.grads, remote.grads)):
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=f"{kind} {k} ({what})")
            assert np.asarray(b[k]).dtype == np.asarray(a[k]).dtype, (kind, k, what)


# --- random graphs: valid ones, and ones built from anything -----------------------------------

_JUNK: list[Any] = [None, 0, -1, 1.5, "", "junk", [], {}, True, 2**70, float("nan"), [1, "a"]]
_AXES: list[Any] = [None, 0, 1, -1, 5, [0, 1], [0, 0], "a"]
_ATTRS: dict[str, list[dict[str, Any]]] = {
    "sum": [{"axis": a, "keepdims": k} for a in _AXES for k in (False, True, "yes")],
    "softmax": [{"axis": a} for a in (0, -1, 3, None)],
    "concat": [{"axis": a} for a in (0, 1, -1, 3, "x")],
    "reshape": [
        {"shape": s}
        for s in ([3, 4], [12], [4, 3], [-1], [2, -1], [5, 5], [2**40], [-1, -1], "abc", [])
    ],
    "transpose": [{"axes": a} for a in (None, [1, 0], [0], [0, 0], [2, 0, 1], "x")],
    "broadcast_to": [{"shape": s} for s in ([3, 4], [2, 3, 4], [4], [5, 4], [1], [-2], [])],
    "index": [
        {"index": i}
        for i in (
            [0],
            [5],
            [-1, 1],
            [{"slice": [0, 2, None]}],
            [{"slice": [None, None, -1]}],
            [None, 0],
            ["..."],
            [[0, 2, 1]],
            [[7]],
            ["bad"],
            [{"slice": "x"}],
            [{"slice": [0, 1, 0]}],
            [1.5],
        )
    ],
    "pow": [{"exponent": e} for e in (2, 0.5, -1, 3.0, "a", None)],
    "cast": [
        {"dtype": d}
        for d in ("float32", "int64", "bool", "float64", "object", "complex128", "str", "nonsense")
    ],
}
_ATTRS["mean"] = _ATTRS["max"] = _ATTRS["sum"]
#: Keywords numpy's ufuncs and reductions accept: a spec must not pass them to a kernel.
_NUMPY_KWARGS = ["where", "out", "dtype", "casting", "order", "subok", "signature", "axes"]
_NUMPY_KWARGS += ["keepdims", "axis", "initial", "extobj", "sig", "copy", "like", "mode"]
#: Values for them that numpy would take (where=False leaves the output uninitialised).
_NUMPY_VALUES: list[Any] = [False, True, None, 0, 1, -1, "float32", "unsafe", "F", "K", [0]]
_NUMPY_VALUES += [[True, False, True], 2.5, "ii->i", [[0], [1]]]
_ATTRS["log_softmax"] = _ATTRS["softmax"]
_NAMES = ["n_ok", "1x", "has space", "a:b", "", "x", "p0", "ünï", "a\nb", "grad:x", None]


def _value(shape: tuple | None, dtype: str, rng: np.random.Generator) -> np.ndarray:
    concrete = tuple(2 if d is None else d for d in (shape if shape is not None else (3, 4)))
    arr = rng.standard_normal(concrete)
    if dtype == "bool":
        return arr > 0
    return (arr * 3).astype(dtype)


def _feed(value: np.ndarray, how: str) -> Any:
    """A feed spoiled in one of many ways (or left as it is)."""
    if how == "nan":
        bad = np.array(value, dtype=np.float64)
        bad.reshape(-1)[:1] = np.nan
        return bad
    if how == "inf":
        return np.full(np.shape(value), np.inf)
    if how == "shape":
        return np.ones((*np.shape(value), 2))
    if how == "scalar":
        return 1.0
    if how == "ragged":
        return [[1.0, 2.0], [3.0]]
    if how == "text":
        return np.array(["a"] * max(1, np.size(value))).reshape(np.shape(value))
    if how == "object":
        return {"a": 1}
    if how == "none":
        return None
    if how == "complex":
        return np.asarray(value, dtype=np.complex128)
    if how == "float32":
        return np.asarray(value, dtype=np.float32)
    if how == "int":
        return np.round(np.asarray(value, dtype=np.float64)).astype(np.int64)
    if how == "huge":
        return np.full(np.shape(value), 1e308)
    return value


_FEED_SPOILERS = ["ok"] * 8 + [
    "nan",
    "inf",
    "shape",
    "scalar",
    "ragged",
    "text",
    "object",
    "none",
    "complex",
    "float32",
    "int",
    "huge",
    "missing",
]


@st.composite
def wild_graphs(draw: Any, max_nodes: int = 10) -> tuple[dg.Graph, dict[str, Any], dict]:
    """Graphs built through the API from any op, operand, attribute and name.

    Building steps that raise a DistgraphError are skipped (the graph is unchanged by them);
    any other exception fails the test at once. Returns the graph, feeds (maybe spoiled) and
    the keyword arguments of the run.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = dg.Graph()

    def attempt(build: Callable[[], Any]) -> Any:
        try:
            return build()
        except dg.DistgraphError:
            return None

    x_shape = draw(st.sampled_from([(3, 4), (None, 4), None, (3,), (), (None,)]))
    x_dtype = draw(st.sampled_from(["float64", "float64", "float32", "int64", "bool"]))
    x_name = draw(st.sampled_from(["x", "x", "x", "1x", "x y", "x:0"]))
    x = attempt(lambda: g.input(x_name, shape=x_shape, dtype=x_dtype))
    pool = [] if x is None else [x]
    pool.append(g.param("p0", rng.standard_normal((3, 4))))
    pool.append(g.param("p1", rng.standard_normal(4).astype(np.float32)))
    pool.append(g.param("p2", 0.5))
    odd = draw(st.sampled_from(["none", "label", "neg", "obj", "str", "const", "dup"]))
    leaf = {
        "none": lambda: None,
        "label": lambda: g.input("label", shape=(None,), dtype="int64"),
        "neg": lambda: g.input("neg", shape=(-1, 2)),
        "obj": lambda: g.input("obj", dtype="object"),
        "str": lambda: g.param("text", np.array(["a", "b"])),
        "const": lambda: g.const(np.array([1.0, 2.0, 3.0, 4.0]), name="c4"),
        "dup": lambda: g.param("p0", 1.0),
    }[odd]
    node = attempt(leaf)
    if node is not None:
        pool.append(node)
    extras: list[Any] = [2.0, 3, np.array([1.0, 2.0, 3.0]), True]

    for _ in range(draw(st.integers(1, max_nodes))):
        # Built-in ops only: other tests register ops (a sleeping one) that workers do not load.
        op = draw(st.sampled_from(sorted(BUILTIN_OPS)))
        arity = OPS[op].arity if OPS[op].arity is not None else draw(st.integers(0, 3))
        if draw(st.integers(0, 9)) == 0:
            arity = draw(st.integers(0, 3))  # the wrong number of operands
        operands = [draw(st.sampled_from(pool + extras)) for _ in range(arity)]
        attrs = dict(draw(st.sampled_from(_ATTRS.get(op, [{}]))))
        if draw(st.integers(0, 9)) == 0:
            attrs[draw(st.sampled_from(["junk", "axis", "shape"]))] = draw(st.sampled_from(_JUNK))
        if draw(st.integers(0, 4)) == 0:
            attrs[draw(st.sampled_from(_NUMPY_KWARGS))] = draw(st.sampled_from(_NUMPY_VALUES))
        name = draw(st.sampled_from(_NAMES))
        built = attempt(lambda: g.apply(op, *operands, name=name, **attrs))  # noqa: B023
        if built is not None:
            pool.append(built)

    consumed = {i for n in g.nodes for i in n.inputs}
    sinks = [n for n in pool if n.name not in consumed] or pool[-1:]
    total = attempt(lambda: functools.reduce(lambda a, b: a + b.sum(), sinks[1:], sinks[0].sum()))
    if total is not None:
        attempt(lambda: g.output("out", total))

    feeds: dict[str, Any] = {}
    for name in g.inputs:
        spec = g[name]
        how = draw(st.sampled_from(_FEED_SPOILERS))
        if how != "missing":
            feeds[name] = _feed(_value(spec.shape, spec.dtype.name, rng), how)
    if draw(st.integers(0, 9)) == 0:
        feeds["unexpected"] = 1.0
    kwargs = {
        "grad": draw(st.sampled_from([None, "out", "out", "p0"])),
        "check_finite": draw(st.booleans()),
    }
    return g, feeds, kwargs


def test_fuzz_random_valid_graphs(ray_ex):
    """The shared random DAGs: all must run, and Ray must match the reference exactly."""
    both = Both(ray_ex)

    @fuzz_settings(150)
    @given(built=random_graphs(max_nodes=10))
    def check(built):
        g, feeds, out = built
        with no_hang("random graph"):
            assert both.run(g, feeds, grad=out) == "ok"

    check()
    assert both.counts["ok"] >= 150


def test_fuzz_wild_graphs(ray_ex):
    """Graphs from any op/operand/attr/name and spoiled feeds: run and match, or a DistgraphError."""
    both = Both(ray_ex)

    @fuzz_settings(300)
    @given(case=wild_graphs())
    def check(case):
        g, feeds, kwargs = case
        with no_hang("wild graph"):
            both.run(g, feeds, **kwargs)
            # A graph that could be built can be written and read back.
            text = g.to_json()
            again = dg.Graph.from_json(text)
            assert again.to_json() == text

    check()
    assert sum(both.counts.values()) >= 300
    assert both.counts["ok"] >= 25 and both.counts["error"] >= 25, both.counts


# --- mutated JSON specs ------------------------------------------------------------------------


@functools.cache
def base_specs() -> list[tuple[str, str, dict[str, Any], str, bool]]:
    """(name, JSON text, feeds, loss, differentiated) for every builder, with and without grads."""
    out = []
    for name, build in sorted(BUILDERS.items()):
        g, feeds, loss = build()
        out.append((name, g.to_json(), feeds, loss, False))
        out.append((f"{name}+grad", dg.grad(g, loss).to_json(), feeds, loss, True))
    return out


def _slots(doc: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) in a JSON document, depth first."""
    stack = [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            yield node, key
            if isinstance(value, (dict, list)):
                stack.append(value)


def _shapes(doc: dict, where: str) -> list[list]:
    """Shape lists of one kind: "array" (params, constants), "input" nodes, or op "attrs"."""
    found = []
    for parent, key in _slots(doc):
        value = parent[key]
        if key != "shape" or not isinstance(value, list):
            continue
        is_array = "data" in parent
        is_input = parent.get("op") == "input"
        is_attr = not is_array and "op" not in parent
        if {"array": is_array, "input": is_input, "attrs": is_attr}[where]:
            found.append(value)
    return found


_OPS_TO_TRY = ["frobnicate", "", "vjp", "input", "param", "const", "os.system", "__import__"]
_OPS_TO_TRY += ["matmul", "add_n", "concat", "cast", "index", "Add", "ADD", "eval"]
_DTYPES_TO_TRY = ["float128", "object", "complex64", "int64", "bool", "<f8", "f8", "float"]
_DTYPES_TO_TRY += ["void", "U8", "datetime64", "", "float16", "i4,i4", "(2)f8", "O", "S3", "uint8"]
_HUGE = [2**31, 2**40, 2**62, 2**63, 2**64, 2**70, 10**30]
_DEEP = 5_000


def _mutate(kind: str, doc: Any, draw: Callable[[Any], Any]) -> Any:
    """Apply one structural mutation to a parsed spec (in place where possible)."""
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    nodes = nodes if isinstance(nodes, list) and nodes else None
    node = draw(st.sampled_from(nodes)) if nodes else None
    node = node if isinstance(node, dict) else None
    slots = list(_slots(doc)) if isinstance(doc, (dict, list)) else []
    if kind in ("delete", "rename", "retype") and slots:
        parent, key = draw(st.sampled_from(slots))
        if kind == "retype":
            parent[key] = copy.deepcopy(draw(st.sampled_from(_JUNK)))
        elif kind == "rename" and isinstance(parent, dict):
            parent[f"{key}_x"] = parent.pop(key)
        else:
            del parent[key]
    elif kind == "op" and node is not None:
        node["op"] = draw(st.sampled_from(_OPS_TO_TRY + sorted(BUILTIN_OPS)))
    elif kind == "dangling" and node is not None and nodes:
        others = [n.get("name") for n in nodes if isinstance(n, dict)]
        src = draw(st.sampled_from(["ghost", "", node.get("name"), *others]))
        inputs = node.get("inputs") or []
        if inputs and draw(st.booleans()):
            inputs[draw(st.integers(0, len(inputs) - 1))] = src
        else:
            node["inputs"] = [*inputs, src]
    elif kind == "cycle" and nodes and len(nodes) > 1:
        # An early node reads a later one: a cycle whenever the later one depends on it.
        i = draw(st.integers(0, len(nodes) - 2))
        j = draw(st.integers(i + 1, len(nodes) - 1))
        if isinstance(nodes[i], dict) and isinstance(nodes[j], dict):
            nodes[i].setdefault("inputs", []).append(nodes[j].get("name"))
    elif kind == "base64":
        arrays = [v for p, k in slots if isinstance(v := p[k], dict) and "data" in v]
        if arrays:
            arr = draw(st.sampled_from(arrays))
            data = str(arr.get("data"))
            arr["data"] = draw(
                st.sampled_from(
                    [
                        data[: len(data) // 2],
                        data + "=",
                        "!" + data,
                        data.replace("A", "é"),
                        "",
                        base64.b64encode(b"\x00" * 3).decode(),
                        data[::-1],
                        " " + data,
                    ]
                )
            )
    elif kind == "dtype":
        holders = [v for p, k in slots if isinstance(v := p[k], dict) and "dtype" in v]
        if holders:
            draw(st.sampled_from(holders))["dtype"] = draw(st.sampled_from(_DTYPES_TO_TRY))
    elif kind in ("huge", "negative") and isinstance(doc, dict):
        shapes = _shapes(doc, draw(st.sampled_from(["array", "input", "attrs"])))
        if shapes:
            shape = draw(st.sampled_from(shapes))
            value = draw(st.sampled_from(_HUGE if kind == "huge" else [-1, -7, -(2**63)]))
            if shape and draw(st.booleans()):
                shape[draw(st.integers(0, len(shape) - 1))] = value
            else:
                shape.insert(0, value)  # scalars too get a dimension
    elif kind == "constant" and isinstance(doc, dict):
        consts = doc.get("constants")
        if isinstance(consts, dict) and consts:
            key = draw(st.sampled_from(sorted(consts)))
            consts[key] = copy.deepcopy(draw(st.sampled_from([*_JUNK, 10**30, -(2**63), 2**64])))
    elif kind == "leaf_inputs" and nodes:
        leaves = [n for n in nodes if isinstance(n, dict) and n.get("op") in ("input", "param")]
        if leaves:
            draw(st.sampled_from(leaves))["inputs"] = [nodes[-1].get("name")]
    elif kind == "vjp" and nodes:
        vjps = [n for n in nodes if isinstance(n, dict) and n.get("op") == "vjp"]
        if vjps:
            attrs = draw(st.sampled_from(vjps)).setdefault("attrs", {})
            key = draw(st.sampled_from(["op", "argnum", "attrs", "inner", *_NUMPY_KWARGS[:3]]))
            if key == "inner" and isinstance(attrs.get("attrs"), dict):
                inner = draw(st.sampled_from(_NUMPY_KWARGS + ["axis", "keepdims", "shape"]))
                attrs["attrs"][inner] = copy.deepcopy(draw(st.sampled_from(_NUMPY_VALUES)))
            else:
                attrs[key] = copy.deepcopy(
                    draw(
                        st.sampled_from(
                            [*_JUNK, -1, 1, 2, 7, "add", "matmul", "concat", "ones_like"]
                        )
                    )
                )
    elif kind == "attrs" and node is not None:
        attrs = node.get("attrs")
        if isinstance(attrs, dict):
            key = draw(
                st.sampled_from([*attrs, "axis", "junk", "shape", "op", "argnum", *_NUMPY_KWARGS])
            )
            attrs[key] = copy.deepcopy(
                draw(st.sampled_from([*_JUNK, 99, -99, [0, 0], *_NUMPY_VALUES]))
            )
    elif kind == "outputs" and isinstance(doc, dict):
        target = draw(st.sampled_from(["outputs", "grads", "grad_of"]))
        if target == "outputs":
            doc["outputs"] = [*(doc.get("outputs") or []), "ghost"]
        elif target == "grads":
            doc["grads"] = {"ghost": "x", **(doc.get("grads") or {})}
        else:
            doc["grad_of"] = "ghost"
    elif kind == "duplicate" and nodes:
        nodes.insert(draw(st.integers(0, len(nodes))), copy.deepcopy(draw(st.sampled_from(nodes))))
    elif kind == "shuffle" and nodes:
        nodes.reverse()
    elif kind == "deep" and node is not None:
        node["attrs"] = {"deep": "__DEEP__"}  # replaced by deep nesting in the text
    return doc


_STRUCTURAL = ["delete", "rename", "retype", "op", "dangling", "cycle", "base64", "dtype"]
_STRUCTURAL += ["huge", "negative", "attrs", "outputs", "duplicate", "shuffle", "deep"]
_STRUCTURAL += ["constant", "leaf_inputs", "vjp", "huge", "vjp", "attrs"]
_TEXTUAL = ["none", "none", "none", "truncate", "non_utf8", "bom", "garbage"]


@st.composite
def mutated_specs(draw: Any) -> tuple[str | bytes, dict[str, Any], str, bool, bool, str]:
    """A builder's spec after 1-3 structural mutations and maybe one to its text or bytes."""
    name, text, feeds, loss, differentiated = draw(st.sampled_from(base_specs()))
    doc = json.loads(text)
    kinds = draw(st.lists(st.sampled_from(_STRUCTURAL), min_size=1, max_size=3))
    for kind in kinds:
        doc = _mutate(kind, doc, draw)
    out: str | bytes = json.dumps(doc)
    out = out.replace('"__DEEP__"', "[" * _DEEP + "]" * _DEEP)
    textual = draw(st.sampled_from(_TEXTUAL))
    if textual == "truncate":
        out = out[: draw(st.integers(0, len(out) - 1))]
    elif textual == "non_utf8":
        raw = out.encode()
        at = draw(st.integers(0, len(raw)))
        out = (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
            + raw[at:]
        )
    elif textual == "bom":
        out = "\ufeff" + out
    elif textual == "garbage":
        out = draw(st.sampled_from(["null", "[]", '"nodes"', "1e999", "{" * 20, "{}" * 3]))
    check_finite = draw(st.booleans())
    label = f"{name}: {kinds} + {textual}, check_finite={check_finite}"
    return out, feeds, loss, differentiated, check_finite, label


def test_fuzz_mutated_json_specs(ray_ex):
    """Each mutated spec loads (then runs or raises a DistgraphError) or raises a DistgraphError."""
    both = Both(ray_ex)
    loaded = {"yes": 0, "no": 0}

    @fuzz_settings(600)
    @given(case=mutated_specs())
    def check(case):
        text, feeds, loss, differentiated, check_finite, label = case
        with no_hang(label):
            try:
                g = dg.Graph.from_json(text)
            except dg.DistgraphError:
                loaded["no"] += 1
                return
            except Exception as e:  # say which mutation got through
                raise AssertionError(f"{label}: {type(e).__name__}: {e}") from e
            loaded["yes"] += 1
            again = outcome(lambda: dg.Graph.from_json(g.to_json()))
            assert again[0] == "ok", (label, again[1])
            run_feeds = {k: v for k, v in feeds.items() if k in g.inputs}
            grad = None if differentiated or loss not in g else loss
            both.run(g, run_feeds, grad=grad, check_finite=check_finite)

    check()
    assert loaded["yes"] + loaded["no"] >= 600
    assert loaded["yes"] >= 60 and loaded["no"] >= 60, loaded


@st.composite
def attr_mutated_specs(draw: Any) -> tuple[str, dict[str, Any], str, bool, str]:
    """A builder's spec with 1-3 node attributes set to names and values numpy would accept."""
    name, text, feeds, loss, differentiated = draw(st.sampled_from(base_specs()))
    doc = json.loads(text)
    ops = [n for n in doc["nodes"] if n["op"] not in ("input", "param", "const")]
    with_attrs = [n for n in ops if n["op"] in OPS and OPS[n["op"]].attrs]
    changes = []
    for _ in range(draw(st.integers(1, 2))):
        node = draw(st.sampled_from(with_attrs if with_attrs and draw(st.booleans()) else ops))
        attrs = node.setdefault("attrs", {})
        op = node["op"]
        if op == "vjp" and draw(st.booleans()):
            attrs, op = attrs.setdefault("attrs", {}), attrs.get("op")
        declared = sorted(OPS[op].attrs) if op in OPS else []
        # Declared names half the time (often valid values), else any of numpy's keywords.
        if declared and draw(st.booleans()):
            key = draw(st.sampled_from(declared))
            value = draw(st.sampled_from([0, -1, 1, True, False, None, [0], [0, 1], 2.0]))
        else:
            key = draw(st.sampled_from(_NUMPY_KWARGS))
            value = draw(st.sampled_from(_NUMPY_VALUES + _AXES))
        attrs[key] = copy.deepcopy(value)
        changes.append(f"{node['name']}.{key}={attrs[key]!r}")
    return json.dumps(doc), feeds, loss, differentiated, f"{name}: {changes}"


def test_fuzz_attribute_mutations(ray_ex):
    """numpy's keywords and other attributes in specs: refused with a SpecError naming the node
    and the attribute, or (declared, valid) run to the same values on both executors, twice."""
    both = Both(ray_ex)
    loaded = {"yes": 0, "no": 0}

    @fuzz_settings(300)
    @given(case=attr_mutated_specs())
    def check(case):
        text, feeds, loss, differentiated, label = case
        with no_hang(label):
            try:
                g = dg.Graph.from_json(text)
            except dg.SpecError as e:
                assert "attribute" in str(e) or "attrs" in str(e), (label, e)
                loaded["no"] += 1
                return
            except dg.DistgraphError:  # a valid value that does not fit the shapes
                loaded["no"] += 1
                return
            loaded["yes"] += 1
            for node in g.nodes:  # what reaches a kernel is declared
                if node.op == "vjp":
                    assert set(node.attrs) <= {"op", "argnum", "attrs"}, label
                    assert set(node.attrs.get("attrs", {})) <= set(OPS[node.attrs["op"]].attrs)
                elif node.op in OPS:
                    assert set(node.attrs) <= set(OPS[node.op].attrs), (label, node)
            run_feeds = {k: v for k, v in feeds.items() if k in g.inputs}
            grad = None if differentiated or loss not in g else loss
            if both.run(g, run_feeds, grad=grad) == "ok":
                again = both.run(g, run_feeds, grad=grad)
                assert again == "ok", label
                first = dg.LocalExecutor().run(g, run_feeds, grad=grad)
                second = dg.LocalExecutor().run(g, run_feeds, grad=grad)
                assert_same(first, second, f"{label}: the same run twice")

    check()
    assert loaded["yes"] >= 5 and loaded["no"] >= 100, loaded


# --- regressions the fuzzing found -------------------------------------------------------------


def test_views_give_the_same_bits_on_every_executor(ray_ex):
    """sum's gradient is a broadcast view; matmul summed a view and its pickled (contiguous)
    copy in different orders, so Ray and the reference differed in the last bit."""
    g = dg.Graph()
    p = g.param(
        "p1",
        np.array(
            [-0.7364540870016669, -0.16290994799305278, -0.4821193126799783, 0.5988462126346276]
        ),
    )
    m = g.param(
        "m0",
        np.array(
            [
                [
                    0.019861053740829495,
                    -0.1462283754825443,
                    -0.39095423117842104,
                    -0.12859612030943535,
                ],
                [0.004071090259171754, -0.1378014526496852, 0.6470319071991036, 0.5033621576528972],
                [
                    -1.3555812394829843,
                    -0.9445066229838364,
                    -0.08738604602758097,
                    -0.21109520578817678,
                ],
                [0.10682149874930555, 0.10866096551128179, 1.0589193775255241, -0.5560103813461407],
            ]
        ),
    )
    g.output("out", (p @ m).sum())
    local = dg.LocalExecutor().run(g, {}, grad="out")
    np.testing.assert_array_equal(local.grads["p1"], np.ones(4) @ g.params["m0"].T)
    for strategy in STRATEGIES:
        ray_ex.strategy = strategy
        assert_same(local, ray_ex.run(g, {}, grad="out"), strategy)
    ray_ex.strategy = "mincut"
    # The same holds for a strided feed: it is made contiguous, as a transfer would make it.
    g2 = dg.Graph()
    x = g2.input("x", shape=(4,))
    g2.output("out", (x @ g2.param("m0", g.params["m0"])).sum())
    view = np.broadcast_to(1.0, (4,))
    assert_same(
        dg.LocalExecutor().run(g2, {"x": view}, grad="out"),
        ray_ex.run(g2, {"x": view}, grad="out"),
        "feed",
    )


@pytest.mark.parametrize("dtype", ["str", "object", "complex128", "datetime64[s]"])
def test_cast_to_an_unsupported_dtype_is_refused(dtype):
    g = dg.Graph()
    x = g.input("x", shape=(3,))
    with pytest.raises(dg.DTypeError, match=r"'as_text'.*cast.*not supported"):
        g.apply("cast", x, name="as_text", dtype=dtype)
    assert "as_text" not in g


def test_deeply_nested_json_is_a_spec_error():
    doc = json.dumps({"nodes": [{"name": "x", "op": "input", "attrs": {"a": "DEEP"}}]})
    with pytest.raises(dg.SpecError, match="nested too deeply"):
        dg.Graph.from_json(doc.replace('"DEEP"', "[" * 100_000 + "]" * 100_000))


@pytest.mark.parametrize("dims", [[2**70], [2**63], [2**40, 2**40], [3, 2**64]])
def test_a_huge_array_shape_is_a_spec_error(dims):
    g = dg.Graph()
    g.output("out", g.param("w", np.ones(3)).sum())
    doc = json.loads(g.to_json())
    doc["params"]["w"]["shape"] = dims
    with pytest.raises(dg.SpecError, match=r"params|bytes"):
        dg.Graph.from_json(json.dumps(doc))


@pytest.mark.parametrize("check_finite", [False, True])
def test_a_huge_broadcast_loads_at_once_and_is_refused_before_running(check_finite):
    """Shape inference ran the reduction on a 2**42-element stand-in: a hang while loading.
    Running it is refused by the memory estimate (issue 12), before any kernel allocates."""
    g = dg.Graph()
    row = g.param("row", np.ones(4))
    g.output("out", dg.broadcast_to(row, (3, 4)).mean(axis=0).sum())
    doc = json.loads(g.to_json())
    next(n for n in doc["nodes"] if n["op"] == "broadcast_to")["attrs"]["shape"] = [2**30, 3, 4]
    with no_hang("loading a huge broadcast"):
        loaded = dg.Graph.from_json(json.dumps(doc))
        mean = next(n for n in loaded.nodes if n.op == "mean")
        assert mean.shape is None  # too large to infer by running: bounded by its input
        with pytest.raises(dg.ResourceError, match=r"'broadcast_to_\d+' 96\.0 GiB"):
            dg.LocalExecutor().run(loaded, {}, check_finite=check_finite)


def test_spec_consistency_checks_found_by_fuzzing():
    g = dg.Graph()
    x = g.input("x", shape=(3,))
    g.output("out", (x * g.param("w", np.ones(3))).sum())
    base = json.loads(dg.grad(g, "out").to_json())

    doc = copy.deepcopy(base)
    doc["nodes"][1]["inputs"] = ["x"]  # a param with an input was silently rebuilt without it
    with pytest.raises(dg.SpecError, match=r"nodes\.1\.inputs.*'w'.*no inputs"):
        dg.Graph.from_json(json.dumps(doc))

    doc = copy.deepcopy(base)
    doc["grad_of"] = "ghost"
    with pytest.raises(dg.SpecError, match=r"grad_of.*'ghost'"):
        dg.Graph.from_json(json.dumps(doc))

    for bad in (-1, True, "0"):
        doc = copy.deepcopy(base)
        next(n for n in doc["nodes"] if n["op"] == "vjp")["attrs"]["argnum"] = bad
        with pytest.raises(dg.SpecError, match="argnum"):
            dg.Graph.from_json(json.dumps(doc))
    doc = copy.deepcopy(base)
    next(n for n in doc["nodes"] if n["op"] == "vjp")["attrs"]["attrs"] = 5
    with pytest.raises(dg.SpecError, match=r"attrs\.attrs"):
        dg.Graph.from_json(json.dumps(doc))


def test_ray_still_correct_after_fuzzing(ray_ex):
    """The shared runtime survived every case above: exact results, no values left behind."""
    g, feeds, out = seed_graph()
    for strategy in STRATEGIES:
        ray_ex.strategy = strategy
        res = ray_ex.run(g, feeds, grad=out)
        assert res.values == {"z": 7.0} and res.grads == {"x": 3.0, "w": 2.0, "b": 1.0}
    ray_ex.strategy = "mincut"
    assert ray.get([w.held_steps.remote() for w in ray_ex.workers]) == [[], []]
    mlp_g, mlp_feeds, loss = BUILDERS["mlp"]()
    assert_same(
        dg.LocalExecutor().run(mlp_g, mlp_feeds, grad=loss),
        ray_ex.run(mlp_g, mlp_feeds, grad=loss),
        "mlp after fuzzing",
    )
