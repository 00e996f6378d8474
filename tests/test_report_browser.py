"""The HTML report in headless Chromium (Debian's package): replay, gradients, loss curve, no network."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

import distgraph as dg
from distgraph.viz import write_report

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page that records every request leaving the file system, and every script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.outside_requests = []
    pg.errors = []
    pg.on(
        "request",
        lambda r: (
            None
            if r.url.startswith(("file:", "data:", "about:"))
            else pg.outside_requests.append(r.url)
        ),
    )
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def step_to_end(pg) -> int:
    steps = 0
    while not pg.is_disabled("#step"):
        pg.click("#step")
        steps += 1
        assert steps < 1000, "the replay never ends"
    return steps


def counters(pg) -> dict[str, int]:
    return {
        k: int(pg.inner_text(f"#count-{k}")) for k in ("active", "completed", "waiting", "total")
    }


def test_seed_report_replays_to_the_gradients(page, tmp_path):
    g = dg.Graph()
    x = g.input("x")
    w = g.param("w", 3.0)
    b = g.param("b", 1.0)
    g.output("z", x * w + b)
    res = dg.LocalExecutor().run(g, {"x": 2.0}, grad="z", trace=True)
    report = write_report(
        tmp_path / "report-seed.html",
        g.spec,
        placement={"x": 0, "w": 1, "b": 0, "mul_1": 1, "z": 0},
        trace=res.trace,
        values={"x": 2.0, **res.values},
        grads=res.grads,
        title="z = x * w + b",
    )
    page.goto(report.as_uri())
    total = len(g.spec.nodes)
    assert counters(page) == {"active": 0, "completed": 0, "waiting": total, "total": total}
    assert page.inner_text("#grad-x") == "—"  # gradients appear only on the backward pass

    page.click("#step")  # level 0 of the forward wave is running
    first = counters(page)
    assert first["active"] == 3 and first["completed"] == 0  # x, w, b run in parallel

    steps = 1 + step_to_end(page)
    assert steps == int(page.inner_text("#step-label").split()[-1])
    assert counters(page) == {"active": 0, "completed": total, "waiting": 0, "total": total}
    assert page.inner_text("#phase-label") == "done"
    grads = {n: float(page.get_attribute(f"#grad-{n}", "data-value")) for n in ("x", "w", "b")}
    assert grads == {"x": 3.0, "w": 2.0, "b": 1.0}
    assert page.inner_text("#grad-w") == "2"
    assert page.inner_text("#value-z") == "7"
    # Every node of the picture ends in the completed state.
    states = page.eval_on_selector_all(
        "#graph g.node", "els => els.map(e => e.classList.contains('state-done'))"
    )
    assert states == [True] * total
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-seed.png"), full_page=True)

    page.click("#reset")
    assert counters(page)["completed"] == 0
    page.click("#run")  # auto-play reaches the same end state
    page.wait_for_function(f"document.getElementById('count-completed').textContent === '{total}'")
    assert page.outside_requests == []
    assert page.errors == []


def test_training_report_shows_a_decreasing_loss(page, tmp_path):
    g = dg.Graph()
    x = g.input("x", shape=(None,))
    y = g.input("y", shape=(None,))
    w = g.param("w", -2.0)
    b = g.param("b", 15.0)
    g.output("loss", dg.mse(x * w + b, y))
    xs = np.linspace(-2.0, 2.0, 32)
    feeds = {"x": xs, "y": 3 * xs + 7}
    executor = dg.LocalExecutor()
    trainer = dg.Trainer(
        g, loss="loss", optimizer=dg.SGD(lr=0.05), executor=executor, progress=False
    )
    history = trainer.fit(feeds, epochs=40, batch_size=8, seed=0)
    res = executor.run(g, feeds, grad="loss", trace=True)
    report = write_report(
        tmp_path / "report-train.html",
        g.spec,
        placement=res.placement,
        trace=res.trace,
        values={**feeds, **res.values},
        grads=res.grads,
        history=history,
        title="fit f(x) = 3x + 7",
    )
    page.goto(report.as_uri())
    assert page.is_visible("#loss-curve")
    loss = json.loads(page.get_attribute("#loss-curve", "data-loss"))
    assert len(loss) == 40
    assert loss[-1] < loss[0] / 10
    assert sum(b < a for a, b in itertools.pairwise(loss)) >= 30  # mostly going down
    drawn = page.eval_on_selector("#loss-curve polyline.series", "p => p.points.numberOfItems")
    assert drawn == 40
    series = page.eval_on_selector_all(
        "#param-curves polyline.series", "ps => ps.map(p => p.getAttribute('data-series'))"
    )
    assert sorted(series) == ["b", "w"]
    final_w = float(page.inner_text("#param-w b"))
    assert final_w == pytest.approx(float(history.params[-1]["w"]), rel=1e-4)
    page.fill("#epoch-slider", "1")
    page.dispatch_event("#epoch-slider", "input")
    assert page.inner_text("#epoch-value") == "1"
    assert float(page.inner_text("#epoch-loss")) == pytest.approx(loss[0], rel=1e-4)
    page.fill("#epoch-slider", "40")
    page.dispatch_event("#epoch-slider", "input")
    step_to_end(page)
    c = counters(page)
    assert c["completed"] == c["total"] == len(g.spec.nodes) and c["active"] == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-train.png"), full_page=True)
    assert page.outside_requests == []
    assert page.errors == []


def test_scaling_section_is_visible_and_the_replay_still_runs(page, tmp_path):
    """A data-parallel run's page (2 replicas x 2 shards, a status as the session gives it):
    the scaling card shows its three tables, and the replay above it is unaffected."""
    g = dg.Graph()
    x = g.input("x", shape=(None,))
    y = g.input("y", shape=(None,))
    g.output("loss", dg.mse(x * g.param("w", -2.0) + g.param("b", 15.0), y))
    xs = np.linspace(-1.0, 1.0, 8)
    feeds = {"x": xs, "y": 3 * xs + 7}
    res = dg.LocalExecutor().run(g, feeds, grad="loss", trace=True)
    entries = [
        {"replica": r, "rows": [4 * r, 4 * r + 4], "workers": [r], "nodes": ["ab" * 20],
         "ips": ["10.0.0.1"]}
        for r in range(2)
    ]  # fmt: skip
    steps = list(range(1, 13))
    status = {
        "applied": steps,
        "consistency": "sync",
        "replicas": {"count": 2, "width": 1, "kind": "mean", "last_step": 12,
                     "rows": [[0, 4], [4, 8]], "steps": {s: entries for s in steps}},
        "shards": [{"version": 12, "applied": steps, "params": ["w"]},
                   {"version": 12, "applied": steps, "params": ["b"]}],
    }  # fmt: skip
    report = write_report(
        tmp_path / "report-scaling.html",
        g.spec,
        placement=res.placement,
        trace=res.trace,
        values={**feeds, **res.values},
        grads=res.grads,
        title="two replicas, two shards",
        status=status,
    )
    page.goto(report.as_uri())
    for table in ("#replicas-table", "#shards-table", "#replica-rows"):
        assert page.is_visible(table), table
    assert page.eval_on_selector_all("#shards-table tbody tr", "rs => rs.length") == 2
    assert page.eval_on_selector_all("#replica-rows tbody tr", "rs => rs.length") == 10
    assert "2 earlier steps" in page.inner_text("#rows-earlier")
    step_to_end(page)
    c = counters(page)
    assert c["completed"] == c["total"] == len(g.spec.nodes)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-scaling.png"), full_page=True)
    assert page.outside_requests == []
    assert page.errors == []
