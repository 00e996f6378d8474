"""The example scripts: their targets, determinism, ``--help``, and Ray imported only on demand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from graphs import load_example

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["seed_graph", "linear_regression", "mlp_classifier"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")
    if name != "seed_graph":
        assert "--backend" in proc.stdout and "--workers" in proc.stdout


def test_seed_graph_prints_both_passes(capsys):
    out = load_example("seed_graph").main([])
    assert out["values"]["z"] == 7.0 and out["grads"] == {"x": 3.0, "w": 2.0, "b": 1.0}
    assert [len(lv) for lv in out["levels"]] == [3, 1, 1]
    assert [len(lv) for lv in out["backward_levels"]] == [1, 2, 2]
    text = capsys.readouterr().out
    lines = text.splitlines()
    forward = [ln for ln in lines if ln.strip().startswith("level ")]
    assert len(forward) == 3
    assert "x = 2" in forward[0] and "w = 3" in forward[0] and "b = 1" in forward[0]
    assert "x * w = 6" in forward[1] and "= 7" in forward[2]
    backward = [ln for ln in lines if ln.strip().startswith("step ")]
    assert len(backward) == 3 and "dz/dz" in backward[0] and "= 1" in backward[0]
    assert "dz/dx" in backward[2] and "= 3" in backward[2] and "= 2" in backward[2]
    assert "dz/dx = 3, dz/dw = 2, dz/db = 1" in text


def test_seed_graph_other_values(capsys):
    out = load_example("seed_graph").main(["--x", "5", "--w", "-1", "--b", "0.5"])
    assert out["values"]["z"] == -4.5 and out["grads"] == {"x": -1.0, "w": 5.0, "b": 1.0}


def test_linear_regression_reaches_the_targets_deterministically(capsys):
    example = load_example("linear_regression")
    first = example.main([])
    assert abs(first["w"] - 3) < 0.01 and abs(first["b"] - 7) < 0.05
    assert first["history"][-1] < first["history"][0]
    assert "w = 3.0000" in capsys.readouterr().out
    second = example.main(["--quiet"])
    assert second == first
    noisy = example.main(["--quiet", "--noise", "0.1", "--seed", "3"])
    assert abs(noisy["w"] - 3) < 0.05 and abs(noisy["b"] - 7) < 0.1


def test_mlp_classifier_reaches_95_percent_deterministically(capsys):
    example = load_example("mlp_classifier")
    first = example.main(["--quiet"])
    assert first["accuracy"] >= 0.95
    assert first["history"][-1] < 0.5 * first["history"][0]
    second = example.main(["--quiet"])
    assert second["accuracy"] == first["accuracy"] and second["history"] == first["history"]
    assert all((first["params"][k] == second["params"][k]).all() for k in first["params"])
    assert "training accuracy" in capsys.readouterr().out


def test_spirals_are_balanced_and_interleaved():
    data = load_example("mlp_classifier").spirals(100, seed=1)
    assert data["x"].shape == (200, 2) and data["y"].tolist().count(1) == 100
    # Interleaved: a linear classifier cannot separate them.
    import numpy as np

    x1 = np.c_[data["x"], np.ones(200)]
    w, *_ = np.linalg.lstsq(x1, data["y"] * 2.0 - 1, rcond=None)
    assert np.mean((x1 @ w > 0) == (data["y"] == 1)) < 0.8


def test_local_backend_does_not_import_ray():
    code = (
        "import sys, runpy; sys.argv = ['linear_regression.py', '--epochs', '2', '--quiet']; "
        f"runpy.run_path({str(ROOT / 'examples' / 'linear_regression.py')!r}, run_name='__main__'); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
