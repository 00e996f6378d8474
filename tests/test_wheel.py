"""distgraph as a user gets it: built into a wheel, installed in a fresh venv outside the checkout.

The wheel is built from a copy of what a source distribution holds (pyproject.toml, README.md,
LICENSE, distgraph/), so the checkout gets no build/ or egg-info and nothing lying beside the
package can leak into the wheel. The venv is made without ``--system-site-packages`` and the
wheel is installed with ``--no-deps``; its dependencies (``.[dev,bench]``) are borrowed from the
venv running this test through a ``.pth`` file naming its site-packages directories. A ``.pth``
line only appends a directory to ``sys.path`` (the ``.pth`` files inside it are not processed),
so the checkout's editable install stays inert and the venv's own copy of distgraph comes first;
the test asserts both. Installing the dependencies from the index instead takes about 80 s here,
for no more coverage of what this test is about: the files the wheel ships.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
#: Files of the source tree that a wheel is built from.
SDIST_FILES = ("pyproject.toml", "README.md", "LICENSE")
LATENCY_FIGURES = ("ray_round_trip_s", "ray_round_trip_pipelined_s", "distgraph_step_s")


def _run(argv: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a copy of the source tree."""
    src = tmp_path_factory.mktemp("src")
    for name in SDIST_FILES:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "distgraph", src / "distgraph", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(out)], 300)
    (built,) = out.glob("distgraph-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv (no system site-packages) with the wheel installed; returns its bin/."""
    home = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(home)], 120)
    python = home / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        300,
    )
    theirs = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60
    ).stdout.strip()
    # Where this interpreter's packages live (a venv's site-packages, or the system's).
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    ours.update(p for p in site.getsitepackages() if os.path.isdir(p))
    Path(theirs, "_distgraph_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return home / "bin"


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, dict]:
    """A working directory outside the checkout and an environment that does not point into it."""
    assert not tmp_path.resolve().is_relative_to(ROOT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return tmp_path, env


def test_wheel_ships_the_bench_suite_typing_marker_and_report_assets(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "distgraph/py.typed" in names
    bench = {n for n in names if n.startswith("distgraph/bench/")}
    for module in (
        "__init__",
        "__main__",
        "_harness",
        "fine",
        "latency",
        "mlp",
        "scale",
        "soak",
        "wide",
    ):
        assert f"distgraph/bench/{module}.py" in bench, sorted(bench)
    # Every asset the report reads from distgraph/viz/ (today report.js and report.css).
    assets = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "distgraph" / "viz").iterdir()
        if p.is_file() and p.suffix in (".js", ".css", ".html")
    ]
    assert {"distgraph/viz/report.js", "distgraph/viz/report.css"} <= set(assets)
    assert set(assets) <= names, sorted(set(assets) - names)
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)
    # The peers the suite needs are the wheel's `bench` extra.
    extra = [line for line in metadata.splitlines() if 'extra == "bench"' in line]
    for peer in ("dask[distributed]", "pymetis", "psutil"):
        assert any(peer in line for line in extra), (peer, extra)


def test_bench_runs_from_the_installed_wheel_outside_the_checkout(venv: Path, outside):
    cwd, env = outside
    # Precondition: this venv imports its own distgraph, and the checkout (where a bare
    # `import distgraph` would find the sources) is not on its path.
    probe = "import distgraph, json, sys; print(json.dumps([distgraph.__file__, sys.path]))"
    found = _run([str(venv / "python"), "-c", probe], 60, cwd=cwd, env=env).stdout
    module, path = json.loads(found)
    assert Path(module).resolve().is_relative_to(venv.parent.resolve()), module
    assert ROOT not in {Path(p or cwd).resolve() for p in path}, path

    done = subprocess.run(
        [str(venv / "distgraph"), "bench", "latency", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["machine"]["distgraph"] == version("distgraph")
    (result,) = doc["results"]
    assert result["name"] == "latency" and result["error"] is None
    for label in LATENCY_FIGURES:
        assert isinstance(result["figures"][label], float) and result["figures"][label] > 0, label
    from distgraph.bench import latency

    assert set(result["targets"]) == set(latency.TARGETS)
    assert isinstance(result["targets"]["step_vs_round_trip"]["met"], bool)


def test_the_installed_wheel_ships_and_loads_the_data_sets(wheel: Path, venv: Path, outside):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for data in ("digits.npz", "seed.txt", "README.md"):
        assert f"distgraph/data/{data}" in names, sorted(n for n in names if "/data/" in n)
    cwd, env = outside
    probe = (
        "import distgraph, json; from distgraph.datasets import load_digits, load_text; "
        "d = load_digits(); print(json.dumps([distgraph.__file__, d.images.shape, "
        "int(d.labels.sum()), len(load_text())]))"
    )
    module, shape, label_sum, chars = json.loads(
        _run([str(venv / "python"), "-c", probe], 120, cwd=cwd, env=env).stdout
    )
    assert Path(module).resolve().is_relative_to(venv.parent.resolve()), module
    from distgraph.datasets import load_digits

    assert shape == [1797, 8, 8] and label_sum == int(load_digits().labels.sum())
    assert chars == 10157
