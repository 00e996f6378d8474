"""The `distgraph` command line (issues 2, 3 and 7)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import cli, models
from distgraph.cli import main

CONSOLE = str(Path(sys.executable).with_name("distgraph"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_json_local_prints_the_quickstart_numbers(capsys):
    code, out, _ = run_cli(capsys, "demo", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["values"] == {"z": 7.0}
    assert got["grads"] == {"x": 3.0, "w": 2.0, "b": 1.0}
    assert [len(lv) for lv in got["levels"][:3]] == [3, 1, 1]
    assert sorted(got["levels"][0]) == ["b", "w", "x"]
    assert "placement" not in got


def test_demo_json_ray_adds_the_placement(capsys):
    ensure_ray()
    code, out, _ = run_cli(capsys, "demo", "--backend", "ray", "--workers", "2", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["values"] == {"z": 7.0} and got["grads"] == {"x": 3.0, "w": 2.0, "b": 1.0}
    assert set(got["placement"]) == {n for lv in got["levels"] for n in lv}
    assert set(got["placement"].values()) <= {0, 1}


def test_demo_text_shows_levels_workers_and_counters(capsys):
    ensure_ray()
    code, out, _ = run_cli(
        capsys, "demo", "--backend", "ray", "--workers", "2", "--strategy", "round_robin"
    )
    assert code == 0
    assert "level 1 [forward ] active: mul_1@worker" in out
    assert "completed 10/10, waiting 0" in out
    assert "dz/dx = 3, dz/dw = 2, dz/db = 1" in out
    assert "nodes ran on workers [0, 1]" in out


def test_train_linear_json_check_local(capsys):
    ensure_ray()
    code, out, _ = run_cli(
        capsys,
        "train",
        "linear",
        "--backend",
        "ray",
        "--workers",
        "2",
        "--epochs",
        "40",
        "--json",
        "--check-local",
    )
    assert code == 0
    got = json.loads(out)
    assert got["matches_local"] is True and got["max_rel_diff"] <= 1e-9
    assert abs(got["params"]["w"] - 3) < 0.01 and abs(got["params"]["b"] - 7) < 0.05
    assert got["loss"][-1] < got["loss"][0]
    assert set(got["worker_nodes"]) == {"0", "1"}


def test_run_a_serialized_graph_with_npz_feeds(tmp_path, capsys):
    g = models.mlp_classifier((2, 8, 3), seed=2)
    (tmp_path / "g.json").write_text(g.to_json())
    data = models.spirals(5, classes=3)
    np.savez(tmp_path / "feeds.npz", **data)
    local = dg.LocalExecutor().run(g, data, grad="loss")
    code, out, _ = run_cli(
        capsys,
        "run",
        str(tmp_path / "g.json"),
        "--feeds",
        str(tmp_path / "feeds.npz"),
        "--grad",
        "loss",
        "--json",
    )
    assert code == 0
    got = json.loads(out)
    assert got["values"]["loss"] == local.values["loss"]
    np.testing.assert_array_equal(got["grads"]["W1"], local.grads["W1"])
    ensure_ray()
    code, out, _ = run_cli(
        capsys,
        "run",
        str(tmp_path / "g.json"),
        "--feeds",
        str(tmp_path / "feeds.npz"),
        "--grad",
        "loss",
        "--json",
        "--backend",
        "ray",
        "--workers",
        "2",
    )
    remote = json.loads(out)
    assert code == 0 and remote["values"] == got["values"] and remote["grads"] == got["grads"]
    assert "placement" in remote


def test_explain_prints_load_parallelism_critical_path_and_bytes(tmp_path, capsys):
    g = models.mlp_classifier()
    (tmp_path / "mlp.json").write_text(g.to_json())
    code, out, _ = run_cli(
        capsys,
        "explain",
        str(tmp_path / "mlp.json"),
        "--workers",
        "2",
        "--strategy",
        "level",
        "--batch-size",
        "32",
    )
    assert code == 0
    for needle in (
        "per-worker load",
        "worker 1",
        "per-level parallelism",
        "critical path",
        "bytes crossing workers per run",
    ):
        assert needle in out


def test_viz_writes_svg_and_dot(tmp_path, capsys):
    code, _, _ = run_cli(
        capsys,
        "viz",
        "seed",
        "-o",
        str(tmp_path / "g.svg"),
        "--workers",
        "2",
        "--strategy",
        "round_robin",
    )
    assert code == 0 and (tmp_path / "g.svg").read_text().startswith("<svg")
    code, _, _ = run_cli(capsys, "viz", "mlp", "-o", str(tmp_path / "g.dot"))
    assert code == 0 and "digraph" in (tmp_path / "g.dot").read_text()


def test_report_and_trace_files(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "demo", "--report", str(tmp_path / "r.html"), "--trace", str(tmp_path / "t.json")
    )
    assert code == 0 and "report written to" in out
    assert "<html" in (tmp_path / "r.html").read_text().lower()
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"nodes": [{"name": "a", "op": "frobnicate"}]}')
    code, _, err = run_cli(capsys, "run", str(tmp_path / "bad.json"))
    assert code == 2
    assert err.startswith("distgraph: error:") and "nodes.0.op" in err and "frobnicate" in err
    code, _, err = run_cli(capsys, "run", str(tmp_path / "missing.json"))
    assert code == 2 and "no such graph file" in err


@pytest.mark.parametrize("command", ["demo", "train", "run", "explain", "viz", "bench"])
def test_console_script_help(command):
    done = subprocess.run([CONSOLE, command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: distgraph" in done.stdout


# --- exit codes and one-line errors (issue 12, items 5-8) ---------------------------------------


def _one_error_line(err: str, prefix: str = "distgraph: error:") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


BAD_INVOCATIONS = {
    "batch-size-negative": (["train", "linear", "--batch-size", "-5"], ["--batch-size", "-5"]),
    "batch-size-zero": (["train", "linear", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    "epochs-zero": (["train", "linear", "--epochs", "0"], ["--epochs", ">= 1"]),
    "epochs-not-int": (["train", "linear", "--epochs", "x"], ["--epochs", "'x'"]),
    "seed-negative": (["train", "linear", "--seed", "-1"], ["--seed", ">= 0"]),
    "lr-nan": (["train", "linear", "--lr", "nan", "--epochs", "1"], ["lr", "nan"]),
    "unknown-task": (["train", "nosuch"], ["nosuch"]),
    "unknown-command": (["nosuchcmd"], ["nosuchcmd"]),
    "no-command": ([], ["command"]),
    "explain-batch-size": (["explain", "seed", "--batch-size", "-3"], ["--batch-size"]),
    "explain-workers": (["explain", "seed", "--workers", "0"], ["--workers"]),
    "viz-batch-size": (["viz", "seed", "--batch-size", "0"], ["--batch-size"]),
    "run-empty-outputs": (["run", "seed", "--outputs"], ["--outputs"]),
    "run-unknown-output": (["run", "seed", "--outputs", "nosuch"], ["nosuch"]),
    "bench-unknown": (["bench", "nosuch"], ["nosuch", "fine"]),
    "local-with-address": (
        ["demo", "--backend", "local", "--address", "127.0.0.1:1"],
        ["--address", "--backend local"],
    ),
    "local-with-oversubscribe": (
        ["demo", "--backend", "local", "--oversubscribe"],
        ["--oversubscribe"],
    ),
    "connect-timeout-zero": (["demo", "--connect-timeout", "0"], ["--connect-timeout"]),
    "connect-timeout-without-ray": (
        ["demo", "--connect-timeout", "3"],
        ["--connect-timeout", "backend is local"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INVOCATIONS))
def test_bad_invocations_exit_2_with_one_line(capsys, case):
    argv, needles = BAD_INVOCATIONS[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, err)
    line = _one_error_line(err)
    for needle in needles:
        assert needle in line, line
    assert out == ""


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["viz", "seed", "-o", "{missing}/g.svg"], "picture"),
        (["demo", "--report", "{missing}/r.html"], "report"),
        (["demo", "--trace", "{missing}/t.json"], "trace"),
        (["train", "linear", "--epochs", "1", "--report", "{missing}/r.html"], "report"),
    ],
    ids=["viz-o", "demo-report", "demo-trace", "train-report"],
)
def test_outputs_into_a_missing_folder_are_refused_before_any_work(tmp_path, capsys, argv, what):
    missing = tmp_path / "no" / "such"
    code, out, err = run_cli(capsys, *[a.format(missing=missing) for a in argv])
    assert code == 2
    line = _one_error_line(err)
    assert what in line and str(missing) in line and "does not exist" in line
    assert not (tmp_path / "no").exists(), "no folder may be created"
    assert "trained" not in out  # refused before training


def test_json_output_is_strict_json_when_training_diverges(capsys):
    code, out, _ = run_cli(capsys, "train", "linear", "--lr", "1e6", "--epochs", "3", "--json")
    assert code == 0

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in the output")

    got = json.loads(out, parse_constant=refuse)
    assert got["loss"][-1] is None  # precondition: the run did diverge, and says so as null
    assert all(isinstance(v, (float, type(None))) for v in got["loss"])


@pytest.mark.parametrize(
    ("exc", "code", "prefix"),
    [
        (RuntimeError("boom\nsecond line"), 1, "distgraph: internal error: RuntimeError: boom"),
        (KeyboardInterrupt(), 130, "distgraph: interrupted"),
        (dg.ExecutionError("node 'a' failed\nwith detail"), 2, "distgraph: error: node 'a'"),
    ],
    ids=["internal", "interrupt", "library-error"],
)
def test_failures_print_one_line_and_the_exit_code(monkeypatch, capsys, exc, code, prefix):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_demo", fail)
    got, _, err = run_cli(capsys, "demo")
    assert got == code
    line = _one_error_line(err, prefix)
    if code == 1:
        assert "second line" in line and "-v" in line  # the whole message, and how to see more
        assert "Traceback" not in err


def test_internal_error_traceback_only_with_verbose(monkeypatch, capsys):
    def fail(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_demo", fail)
    code, _, err = run_cli(capsys, "-v", "demo")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in fail" in err
    assert err.splitlines()[-1] == "distgraph: internal error: RuntimeError: boom"


def test_bad_input_through_the_real_entry_point_prints_one_line():
    """``python -m distgraph.cli``, as a user runs it: exit 2, one line, no traceback."""
    for argv in (["train", "linear", "--epochs", "0"], ["bench", "nosuch"]):
        done = subprocess.run(
            [sys.executable, "-m", "distgraph.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        _one_error_line(done.stderr)
        assert done.stdout == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_implies_the_ray_backend():
    """``--address`` without ``--backend`` goes to Ray (here: a closed port, so it must fail)."""
    port = _free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "distgraph.cli", "demo", "--address", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    line = _one_error_line(done.stderr)
    assert "could not connect to Ray" in line and f"127.0.0.1:{port}" in line
    assert "z = x * w + b" not in done.stdout  # it did not quietly run locally


def test_embedded_runtime_refuses_more_workers_than_cpus():
    """A fresh process (no Ray yet): refused at once, before any Ray process starts."""
    from distgraph.runtime.ray import machine_cpus

    workers = machine_cpus() + 1
    done = subprocess.run(
        [sys.executable, "-m", "distgraph.cli", "demo", "--backend", "ray"]
        + ["--workers", str(workers)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    line = _one_error_line(done.stderr)
    assert f"{workers} workers" in line and "--oversubscribe" in line


def test_ctrl_c_exits_130_with_one_line():
    """SIGINT in the middle of training: exit 130 and ``distgraph: interrupted``, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distgraph.cli", "-v", "train", "linear"]
        + ["--epochs", "1000000", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # -v logs each epoch: wait until training is under way
            if "epoch 1:" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest[-2000:]
    assert "Traceback" not in rest
    assert rest.splitlines()[-1] == "distgraph: interrupted"


def _log_graph(tmp_path: Path) -> tuple[str, str]:
    g = dg.Graph()
    x = g.input("x")
    g.output("s", dg.log(x).sum())
    spec, feeds = tmp_path / "log.json", tmp_path / "feeds.npz"
    spec.write_text(g.to_json())
    np.savez(feeds, x=np.array([0.0, -1.0, 1.0]))  # log(0) and log(-1): numpy warns
    return str(spec), str(feeds)


def test_numpy_warnings_do_not_add_lines_to_a_refusal(tmp_path):
    # Review: numpy's RuntimeWarnings (with their source lines) preceded the one error line.
    spec, feeds = _log_graph(tmp_path)
    done = subprocess.run(
        [CONSOLE, "run", spec, "--feeds", feeds, "--check-finite"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "NaN" in _one_error_line(done.stderr)


def test_a_reader_closing_the_pipe_is_not_an_internal_error(tmp_path):
    # Review: `distgraph run ... | head` ended with "internal error: BrokenPipeError", exit 1.
    spec, feeds = _log_graph(tmp_path)
    np.savez(feeds, x=np.ones(200_000))  # output larger than a pipe's buffer
    proc = subprocess.Popen(
        [CONSOLE, "run", spec, "--feeds", feeds, "--grad", "s", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(10) == b'{"values":'  # the reader takes a little, then leaves
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_a_missing_graph_file_is_a_config_error_naming_it(tmp_path):
    """The library's rule: every refusal is a specific DistgraphError subclass."""
    with pytest.raises(dg.ConfigError, match="no such graph file"):
        cli._load_graph(str(tmp_path / "nope.json"))
