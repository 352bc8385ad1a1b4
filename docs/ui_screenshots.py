"""Take the two MLflow UI screenshots of the docs' Tracking page (docs/tracking.md: docs/mlflow_*.png).

Needs a running UI with the quickstart experiment, e.g.::

    nt-dist quickstart --out runs/quickstart
    nt-dist ui --port 5077 &
    python docs/ui_screenshots.py --url http://127.0.0.1:5077 --experiment-id 1

and playwright-python (``pip install playwright``) driving a system Chromium
(``apt-get install chromium``; ``--chromium``); ``playwright install`` is not needed.

The browser is a fresh profile at 1440x900 that has seen MLflow once: the one thing set is that
MLflow's Assistant panel already opened by itself (on a local server it opens, 350 px wide, on
the first page a browser loads; a user closes it once). Nothing is dragged or widened: the
columns and their widths are nt_dist's ``nt-dist`` view.

Writes into --out-dir:
  mlflow_runs.png     the runs table opened with the ``nt-dist`` shared view
                      (run names, top-1, role, network, teacher, adversary, data set)
  mlflow_compare.png  the compare-runs page of the five seed-0 runs (the default plot:
                      network, role, teacher against test_top1)
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

VIEW_KEY = "nt-dist"  # shared view stored by `nt-dist` as an experiment tag

# Params and tags are <table>s that scroll inside a 500px box.
UNCLAMP_TABLES_CSS = (
    "table.mlflow-compare-table { height: auto !important; max-height: none !important; }"
)
# Metrics are a react-virtualized grid of fixed (300px) height: grow the grid
# and the wrappers of the same height to the height of all rows.
UNCLAMP_METRICS_GRID_JS = """() => {
  for (const grid of document.querySelectorAll('.ReactVirtualized__Grid')) {
    const full = grid.firstElementChild.scrollHeight, shown = grid.clientHeight;
    for (let e = grid; e && e.clientHeight === shown; e = e.parentElement) {
      e.style.setProperty('height', full + 'px', 'important');
      e.style.setProperty('max-height', 'none', 'important');
    }
  }
}"""


def seed_run_ids(base: str, experiment_id: str, seed: str = "0") -> list[str]:
    """Run ids of the runs tagged seed=<seed>, via the REST API."""
    body = json.dumps(
        {
            "experiment_ids": [experiment_id],
            "filter": f"tags.seed = '{seed}'",
            "max_results": 100,
        }
    ).encode()
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        runs = json.load(resp).get("runs", [])
    runs.sort(key=lambda r: r["info"]["run_name"])
    return [r["info"]["run_id"] for r in runs]


def dismiss_popups(page: Page) -> None:
    """Close the assistant panel / 'Detect issues' pop-ups if they show up."""
    page.keyboard.press("Escape")
    for name in ("Close", "Dismiss", "Got it", "No thanks"):
        button = page.get_by_role("button", name=name)
        for i in range(button.count()):
            try:
                if button.nth(i).is_visible():
                    button.nth(i).click(timeout=1000)
            except Exception:  # a pop-up that went away by itself
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:5077", help="MLflow UI base URL")
    ap.add_argument("--experiment-id", default="1")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()

    base = args.url.rstrip("/")
    exp = args.experiment_id
    args.out_dir.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
        context = browser.new_context(
            viewport={"width": args.width, "height": args.height},
            device_scale_factor=1,
        )
        # The Assistant panel has opened once already (see the docstring); the model-training
        # mode comes from the address (workflowType=machine_learning), as nt-dist prints it.
        context.add_init_script(
            "window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        )
        page = context.new_page()

        # (a) Runs table with the shared view.
        page.goto(
            f"{base}/#/experiments/{exp}/runs"
            f"?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
        )
        page.wait_for_selector(".ag-row", timeout=60_000)
        page.wait_for_timeout(3000)  # the UI polls, so no "networkidle"
        page.screenshot(path=str(args.out_dir / "mlflow_runs.png"))  # as it opens: nothing closed or dragged

        # (b) Compare view of the seed-0 runs.
        ids = seed_run_ids(base, exp)
        query = urllib.parse.urlencode(
            {"runs": json.dumps(ids), "experiments": json.dumps([exp])}
        )
        page.goto(f"{base}/#/compare-runs?{query}&workflowType=machine_learning")
        page.wait_for_selector("table.mlflow-compare-table", timeout=60_000)
        page.wait_for_timeout(3000)
        dismiss_popups(page)
        # The default plot, then the params/metrics/tags tables: fold the artifact
        # section, show only what differs (the metrics grid draws some 17 rows, however tall).
        for section in ("Artifacts",):
            page.locator(".du-bois-light-collapse-header", has_text=section).first.click()
        for table in ("Parameters", "Metrics", "Tags"):
            page.get_by_role("switch", name=f"{table} - Show diff only").click()
        # The tables scroll inside fixed-height boxes; unclamp them and make
        # the window as tall as the (scrolling) main panel so all rows show.
        page.add_style_tag(content=UNCLAMP_TABLES_CSS)
        page.evaluate(UNCLAMP_METRICS_GRID_JS)
        page.wait_for_timeout(1000)
        height = page.evaluate("document.querySelector('main').scrollHeight")
        page.set_viewport_size({"width": args.width, "height": height + 40})
        page.wait_for_timeout(1000)
        page.screenshot(path=str(args.out_dir / "mlflow_compare.png"))

        browser.close()
    for name in ("mlflow_runs.png", "mlflow_compare.png"):
        path = args.out_dir / name
        print(f"{path}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
