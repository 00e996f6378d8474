"""The `distgraph` command line (issues 2, 3 and 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raysupport import ensure_ray

import distgraph as dg
from distgraph import models
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
