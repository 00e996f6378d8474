"""Bounded work for untrusted specs (issue 12, item 2): memory estimated and limited before any
kernel runs, spec files read with the size limit enforced while reading, and specs under the
size limit refused before they explode while loading.

Cases that would allocate gigabytes if a fix regressed run in a subprocess under
``RLIMIT_AS``, so a regression fails instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import distgraph as dg
from distgraph.memory import check_memory, default_max_bytes, estimate_memory, parse_bytes
from distgraph.ops import defop
from distgraph.program import compile_program
from distgraph.spec import MAX_SPEC_BYTES, read_spec_file

#: Address space allowed to a guarded subprocess (Python + numpy + distgraph need ~0.5 GiB).
CEILING = 1536 * 2**20


def run_limited(
    code: str, ceiling: int = CEILING, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space is capped at ``ceiling``."""
    prologue = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({ceiling}, {ceiling}))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )


def huge_broadcast_spec() -> str:
    """The probe's shape of attack: a few hundred bytes asking for a 74 GiB broadcast."""
    g = dg.Graph()
    c = g.param("c", np.ones(1))
    g.output("y", dg.broadcast_to(c, (10**5, 10**5)).sum())
    return g.to_json()


# --- memory estimated before running ---------------------------------------------------------


def test_a_tiny_spec_asking_for_a_huge_broadcast_is_refused_before_allocating():
    text = huge_broadcast_spec()
    assert len(text) < 700
    proc = run_limited(
        f"""
        import distgraph as dg
        g = dg.Graph.from_json({text!r})
        try:
            dg.LocalExecutor().run(g)
        except dg.ResourceError as e:
            print("REFUSED", e)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout, proc.stdout
    assert "'broadcast_to_" in proc.stdout and "74.5 GiB" in proc.stdout
    assert "max_bytes=" in proc.stdout and "--max-memory" in proc.stdout


def test_the_check_runs_before_any_kernel():
    calls: list[str] = []
    defop("test_limits_probe", lambda a: calls.append("ran") or a * 1.0, lambda g, out, a: g)
    g = dg.Graph()
    x = g.input("x", shape=(4,), dtype="float64")  # declared: no re-inference per feed
    y = g.apply("test_limits_probe", x)
    g.output("z", dg.broadcast_to(y, (1000, 1000, 4)).sum())
    calls.clear()  # shape inference ran it on a stand-in
    ex = dg.LocalExecutor(max_bytes=10 * 2**20)
    with pytest.raises(dg.ResourceError, match=r"more than the limit of 10\.0 MiB"):
        ex.run(g, {"x": np.ones(4)})
    assert calls == []  # refused at compile time: not even the first node ran
    # Raising the limit runs it.
    assert dg.LocalExecutor(max_bytes=200 * 2**20).run(g, {"x": np.ones(4)}).values["z"] == 4e6
    assert calls == ["ran"]


def test_batch_dependent_sizes_are_checked_once_the_feeds_fix_the_batch():
    g = dg.Graph()
    x = g.input("x", shape=(None, 100))
    g.output("y", ((x @ dg.transpose(x)) * 2.0).sum())  # (batch, batch): quadratic in the feed
    ex = dg.LocalExecutor(max_bytes=64 * 2**20)
    assert ex.run(g, {"x": np.ones((10, 100))}).values["y"] == 2 * 100 * 100
    with pytest.raises(dg.ResourceError, match=r"for these feeds.*'matmul_\d+' 190\.7 MiB"):
        ex.run(g, {"x": np.ones((5000, 100))})
    assert ex.run(g, {"x": np.ones((3, 100))}).values["y"] == 2 * 100 * 9  # still usable


def test_training_steps_are_checked_too():
    g = dg.Graph()
    x = g.input("x", shape=(None, 50))
    w = g.param("w", np.zeros((50, 50)))
    g.output("loss", ((x @ w) @ dg.transpose(x @ w)).mean())
    trainer = dg.Trainer(g, "loss", dg.SGD(0.1), dg.LocalExecutor(max_bytes=32 * 2**20))
    trainer.fit({"x": np.ones((16, 50))}, epochs=1, batch_size=8)
    before = trainer.params["w"].copy()
    with pytest.raises(dg.ResourceError, match="for these feeds"):
        trainer.fit({"x": np.ones((4000, 50))}, epochs=1, batch_size=4000)
    np.testing.assert_array_equal(trainer.params["w"], before)  # nothing half-applied


def test_estimate_counts_every_value_and_kernel_scratch():
    g = dg.Graph()
    x = g.input("x", shape=(None, 10))
    w = g.param("w", np.ones((10, 20), dtype=np.float32))
    g.output("y", (x.astype("float32") @ w).sum())
    prog = compile_program(g)
    static = estimate_memory(prog)  # batch dimensions count as 1
    assert static.values_bytes == 10 * 8 + 10 * 4 + 10 * 20 * 4 + 20 * 4 + 4
    batch = estimate_memory(prog, {"x": (1000, 10)})
    assert batch.values_bytes == 1000 * 10 * 8 + 1000 * 10 * 4 + 10 * 20 * 4 + 1000 * 20 * 4 + 4
    assert batch.scratch_bytes == 2 * 1000 * 20 * 4  # twice the largest operand of one kernel
    assert batch.largest[0][0] == "x" and batch.largest[0][2] == (1000, 10)
    with pytest.raises(dg.ResourceError, match=r"'x' 78\.1 KiB"):
        check_memory(prog, 10_000, {"x": (1000, 10)})


def test_unknown_sizes_are_bounded_by_their_inputs():
    g = dg.Graph()
    big = dg.broadcast_to(g.param("c", np.ones(1)), (2**25,))
    s = big.sum()  # too large to infer by running: its shape stays unknown
    g.output("y", dg.concat([big, big]).sum() + s)
    assert s.shape is None and big.shape == (2**25,)
    est = estimate_memory(compile_program(g))
    sizes = {name: nbytes for name, nbytes, _, _ in est.largest}
    assert sizes[big.name] == 2**25 * 8
    concat = next(n.name for n in g.nodes if n.op == "concat")
    assert sizes[concat] == 2 * 2**25 * 8  # unknown concat: the sum of its inputs


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "1G"])
def test_max_bytes_must_be_a_positive_int(bad: Any):
    with pytest.raises(dg.ConfigError, match="max_bytes"):
        dg.LocalExecutor(max_bytes=bad)


def test_default_limit_is_half_of_physical_memory():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_max_bytes() == total // 2
    assert dg.LocalExecutor().max_bytes == total // 2


@pytest.mark.parametrize(
    ("text", "n"),
    [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("1000", 1000), ("2k", 2048)],
)
def test_sizes_parse(text: str, n: int):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "1X", "nan"])
def test_bad_sizes_do_not_parse(text: str):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_cli_max_memory(tmp_path: Path):
    spec = tmp_path / "huge.json"
    spec.write_text(huge_broadcast_spec())
    proc = subprocess.run(
        [sys.executable, "-m", "distgraph.cli", "run", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("distgraph: error: the program needs about")
    small = tmp_path / "small.json"
    g = dg.Graph()
    g.output("y", dg.broadcast_to(g.param("c", np.ones(1)), (1000, 1000)).sum())
    small.write_text(g.to_json())
    cmd = [sys.executable, "-m", "distgraph.cli", "run", str(small), "--json"]
    refused = subprocess.run([*cmd, "--max-memory", "1M"], capture_output=True, text=True)
    assert refused.returncode == 2 and "limit of 1.0 MiB" in refused.stderr, refused.stderr
    ran = subprocess.run([*cmd, "--max-memory", "100M"], capture_output=True, text=True)
    assert ran.returncode == 0 and json.loads(ran.stdout)["values"]["y"] == 1e6, ran.stderr
    bad = subprocess.run([*cmd, "--max-memory", "lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-memory" in bad.stderr


def test_a_huge_fancy_index_does_not_allocate_while_building():
    """Inference ran index on a stand-in: (1, 2**24) picked 64 times is an 8 GiB array."""
    proc = run_limited(
        """
        import numpy as np
        import distgraph as dg
        g = dg.Graph()
        row = dg.broadcast_to(g.param("c", np.ones(1)), (1, 2**24))
        picked = row[[[0] * 64]]
        print("SHAPE", picked.shape)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SHAPE (1, 64, 16777216)" in proc.stdout


def test_a_long_concat_of_large_inputs_does_not_allocate_while_building():
    proc = run_limited(
        """
        import numpy as np
        import distgraph as dg
        g = dg.Graph()
        x = dg.broadcast_to(g.param("c", np.ones(1)), (2**23,))
        joined = dg.concat([x] * 100)
        print("BUILT", joined.shape)
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BUILT" in proc.stdout


def test_a_long_concat_gradient_stays_small():
    """A 49 KiB spec whose gradient asked for 763 MiB (each VJP read every input)."""
    g = dg.Graph()
    x = g.input("x", shape=(1,))
    g.output("loss", dg.concat([x] * 4000).sum())
    text = g.to_json()
    assert len(text) < 50_000
    proc = run_limited(
        f"""
        import distgraph as dg
        g = dg.Graph.from_json({text!r})
        print("GRAD", dg.LocalExecutor().run(g, {{"x": [1.0]}}, grad="loss").grads["x"])
        """,
        ceiling=1024 * 2**20,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GRAD [4000.]" in proc.stdout


# --- spec files read with the limit enforced while reading -------------------------------------


def test_dev_zero_is_refused_without_reading():
    with pytest.raises(dg.SpecError, match="'/dev/zero' is not a regular file or a pipe"):
        read_spec_file("/dev/zero")
    proc = run_limited(
        """
        import sys
        from distgraph.cli import main
        sys.exit(main(["explain", "/dev/zero"]))
        """,
        ceiling=1024 * 2**20,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("distgraph: error: spec file '/dev/zero'")


def test_a_directory_or_missing_file_is_a_spec_error(tmp_path: Path):
    with pytest.raises(dg.SpecError, match="is a directory"):
        read_spec_file(tmp_path)
    with pytest.raises(dg.SpecError, match="does not exist"):
        read_spec_file(tmp_path / "nothing.json")


def test_an_oversized_file_is_refused_before_reading(tmp_path: Path, monkeypatch):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 5000)
    with pytest.raises(dg.SpecError, match=r"is 5000 bytes, larger than the limit of 4096"):
        read_spec_file(big, max_bytes=4096)
    assert read_spec_file(big, max_bytes=5000) == b" " * 5000
    assert MAX_SPEC_BYTES == 512 * 2**20


def test_a_pipe_is_read_at_most_to_the_limit(tmp_path: Path):
    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    written = [0]

    def writer() -> None:
        try:
            with open(fifo, "wb") as f:
                for _ in range(10_000):  # 640 MB unless the reader stops early
                    f.write(b" " * 65536)
                    written[0] += 65536
        except BrokenPipeError:
            pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    with pytest.raises(dg.SpecError, match="larger than the limit of 100000 bytes"):
        # The writer is blocked opening the FIFO until this opens it for reading.
        read_spec_file(fifo, max_bytes=100_000)
    t.join(timeout=30)
    assert not t.is_alive()
    assert written[0] < 2_000_000  # stopped after the limit (plus the pipe's buffer)


def test_cli_loads_graph_files_through_the_bounded_reader(tmp_path: Path, monkeypatch):
    from distgraph import cli

    seen: list[str] = []
    real = cli.read_spec_file

    def spy(path: Any, *args: Any, **kwargs: Any) -> bytes:
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cli, "read_spec_file", spy)
    g = dg.Graph()
    g.output("y", g.param("w", 2.0) * 3.0)
    spec = tmp_path / "g.json"
    spec.write_text(g.to_json())
    assert cli.main(["run", str(spec), "--json"]) == 0
    assert seen == [str(spec)]


# --- specs under the size limit that would explode while loading ------------------------------


def test_a_spec_of_many_tiny_values_is_refused_before_parsing(monkeypatch):
    text = json.dumps({"nodes": [], "outputs": [0] * 1000})
    with pytest.raises(dg.SpecError, match=r"about 100\d JSON values, more than the limit of 500"):
        dg.GraphSpec.from_json(text, max_values=500)


def test_too_many_nodes_are_refused():
    nodes = [{"name": "x", "op": "input"}] + [
        {"name": f"n{i}", "op": "neg", "inputs": ["x"]} for i in range(50)
    ]
    text = json.dumps({"nodes": nodes})
    with pytest.raises(dg.SpecError, match=r"51 nodes, more than the limit of 50"):
        dg.GraphSpec.from_json(text, max_nodes=50)
    with pytest.raises(dg.SpecError, match=r"raise it with max_nodes="):
        dg.Graph.from_json(text, max_nodes=50)
    assert len(dg.Graph.from_json(text, max_nodes=51)) == 51
    with pytest.raises(dg.SpecError, match=r"raise it with max_values="):
        dg.Graph.from_json(text, max_values=100)


def test_a_200_mib_spec_of_tiny_nodes_is_refused_within_a_memory_ceiling():
    """Under the 512 MiB size limit, 200 MiB of tiny nodes parsed to gigabytes."""
    proc = run_limited(
        """
        import distgraph as dg
        node = b'{"name":"a","op":"neg","inputs":["x"]},'
        text = b'{"nodes":[' + node * (200 * 2**20 // len(node)) + b'{"name":"x","op":"input"}]}'
        try:
            dg.Graph.from_json(text)
        except dg.SpecError as e:
            print("REFUSED", e)
        """,
        ceiling=1200 * 2**20,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED spec holds about" in proc.stdout


def test_array_data_is_checked_against_its_shape_before_decoding(monkeypatch):
    import distgraph.spec as spec_module

    g = dg.Graph()
    g.output("y", g.param("w", np.ones(3)).sum())
    doc = json.loads(g.to_json())
    doc["params"]["w"]["shape"] = [10**9]

    def no_decoding(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("decoded before the shape was checked")

    monkeypatch.setattr(spec_module.base64, "b64decode", no_decoding)
    with pytest.raises(dg.SpecError, match=r"holds 24 bytes, shape \[1000000000\]"):
        dg.Graph.from_json(json.dumps(doc))


def test_ray_executor_refuses_before_touching_the_cluster():
    """max_bytes on RayExecutor: the checks run on the driver, before any call to a worker."""
    from raysupport import ensure_ray

    from distgraph.runtime.ray import RayExecutor

    ensure_ray()  # the suite's one shared runtime
    with pytest.raises(dg.ConfigError, match="max_bytes"):
        RayExecutor(num_workers=1, max_bytes=0)
    ex = RayExecutor(num_workers=1, max_bytes=64 * 2**20)
    try:
        assert ex.max_bytes == 64 * 2**20
        with pytest.raises(dg.ResourceError, match="before any feed"):
            ex.run(dg.Graph.from_json(huge_broadcast_spec()))
        g = dg.Graph()
        x = g.input("x", shape=(None, 100))
        g.output("y", (x @ dg.transpose(x)).sum())
        with pytest.raises(dg.ResourceError, match="for these feeds"):
            ex.run(g, {"x": np.ones((5000, 100))})
        assert ex.last_calls == []  # no actor call was made
        assert ex.run(g, {"x": np.ones((10, 100))}).values["y"] == 10 * 10 * 100
    finally:
        ex.close()


def test_cli_max_memory_bounds_the_feeds_file_too(tmp_path: Path, capsys):
    from distgraph.cli import main

    """A feeds file is part of the run's memory: --max-memory caps it before it is read."""
    g = dg.Graph()
    x = g.input("x", shape=(None,), dtype="float64")
    g.output("y", (x * 2.0).sum())
    spec = tmp_path / "g.json"
    spec.write_text(g.to_json())
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.ones(100_000))  # 800 kB once read
    argv = ["run", str(spec), "--feeds", str(feeds), "--json"]
    assert main([*argv, "--max-memory", "100K"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distgraph: error:") and "feeds.npz" in err, err
    assert main([*argv, "--max-memory", "10M"]) == 0
    assert json.loads(capsys.readouterr().out)["values"]["y"] == 200_000.0


@pytest.mark.parametrize(
    "build",
    [
        lambda x: dg.broadcast_to(x, (1,) * 38 + (2, 3)),  # 40 dimensions
        lambda x: x.reshape((1,) * 38 + (2, 3)),
        lambda x: x[(None,) * 40],
        lambda x: dg.broadcast_to(x[:1, :1], (2**20, 2**20)),  # 2**40 elements
    ],
    ids=["broadcast_to-ndim", "reshape-ndim", "index-ndim", "broadcast_to-elements"],
)
def test_a_result_no_spec_can_hold_is_refused_where_it_is_built(build):
    # Review: these nodes were built and run, but g.to_json() then wrote a spec that
    # Graph.from_json refused (shape limits of 32 dimensions and 2**36 elements).
    g = dg.Graph()
    x = g.input("x", shape=(2, 3))
    with pytest.raises(dg.ShapeError, match=r"limit of (32|68719476736)"):
        build(x)
    g.output("y", x * 2.0)
    assert dg.Graph.from_json(g.to_json()).outputs == ["y"]  # the graph is still usable


def test_the_refusal_of_a_training_run_names_an_undeclared_inputs_dtype_in_words():
    # Review: the largest values of a training program were listed as "(shape (40, 3) None)".
    g = dg.Graph()
    x, y = g.input("x"), g.input("y")
    g.output("loss", dg.cross_entropy(x @ g.param("W", np.zeros((3, 3))), y))
    tr = dg.Trainer(
        g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=dg.LocalExecutor(max_bytes=2000)
    )
    data = {"x": np.ones((40, 3)), "y": np.zeros(40, dtype=np.int64)}
    with pytest.raises(dg.ResourceError) as info:
        tr.fit(data, epochs=1, batch_size=40)
    assert "'x' 960 B" in str(info.value)  # the precondition: the undeclared input is listed
    assert "None)" not in str(info.value) and "dtype of its feed" in str(info.value)
