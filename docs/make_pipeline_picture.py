"""Redraw docs/pipeline-1f1b.png: a real 1F1B step of the pipeline benchmark's simulated model.

Four ``sim_layer`` stages (20 ms forward / 40 ms backward per micro-batch, sleeping kernels),
8 micro-batches, on 4 Ray workers; the fourth step is traced, written as an HTML report, and
the report's timeline card is photographed in headless Chromium (``pip install playwright``,
``apt-get install chromium``). Usage: ``python docs/make_pipeline_picture.py``.
"""

from pathlib import Path

import numpy as np
from playwright.sync_api import sync_playwright

import distgraph as dg
from distgraph.paramstore import ParameterStore
from distgraph.simops import SimCostModel, sim_chain
from distgraph.viz.report import write_report

HERE = Path(__file__).resolve().parent


def main() -> None:
    graph = sim_chain(4, f_ms=20, b_ms=40)
    feeds = {"x": np.ones((16, 1))}
    with dg.RayExecutor(
        num_workers=4,
        strategy="pipeline",
        cost=SimCostModel(),
        ops_modules=["distgraph.simops"],
        resources_per_worker={"CPU": 0.25},
        microbatches=8,
        schedule="1f1b",
        oversubscribe=True,
    ) as ex:
        opt = dg.SGD(lr=0.01)
        session = ex.training_session(graph, "loss", opt, ParameterStore(graph.param_values, opt))
        for step in range(1, 4):  # warm-up: install, first calls
            session.step(step, feeds)
        session.step(4, feeds, trace=True)
        trace, placement, status = (
            session.last_trace,
            dict(session.plan.placement),
            session.status(),
        )
        session.close()
    page_path = HERE / "pipeline-1f1b.html"
    write_report(
        page_path,
        graph.spec,
        placement=placement,
        trace=trace,
        values={},
        grads={},
        title="1F1B, 4 stages x 8 micro-batches (simulated 20 ms F / 40 ms B)",
        status=status,
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_path.as_uri())
        page.locator("#timeline-card").screenshot(path=str(HERE / "pipeline-1f1b.png"))
        browser.close()
    page_path.unlink()


if __name__ == "__main__":
    main()
