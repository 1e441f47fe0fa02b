"""A screenshot of the MLflow UI showing one ``compare``'s runs (docs/img/mlflow-compare.png).

The UI is the full MLflow server (``pip install 'posterfusion[ui]'``, or ``mlflow`` in a venv of its
own), on loopback, reading the store the runs were tracked in; Debian's chromium (``make browser``)
takes the picture, with no background traffic::

    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true mlflow ui --backend-store-uri sqlite:///mlflow.db \\
        --host 127.0.0.1 --port 5055 &
    .venv/bin/python docs/mlflow_screenshot.py http://127.0.0.1:5055 docs/img/mlflow-compare.png
"""

from __future__ import annotations

import argparse
import json
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--metrics-recording-only"]


def latest_compare(ui: str) -> tuple[str, str]:
    """(experiment id, run id) of the newest run tagged ``posterfusion.kind = compare``."""
    query = {"experiment_ids": [], "filter": "tags.`posterfusion.kind` = 'compare'", "max_results": 1,
             "order_by": ["attributes.start_time DESC"]}
    with urllib.request.urlopen(f"{ui}/api/2.0/mlflow/experiments/search?max_results=100") as answer:
        query["experiment_ids"] = [e["experiment_id"] for e in json.load(answer)["experiments"]]
    request = urllib.request.Request(f"{ui}/api/2.0/mlflow/runs/search", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        run = json.load(answer)["runs"][0]["info"]
    return run["experiment_id"], run["run_id"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ui", help="the MLflow UI's address (loopback)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds to let the page render")
    args = parser.parse_args()
    experiment, run = latest_compare(args.ui)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(f"{args.ui}/#/experiments/{experiment}/runs/{run}", wait_until="load")
        page.wait_for_timeout(args.settle * 1000)  # the UI keeps polling: no network-idle moment to wait for
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"{args.out}: experiment {experiment}, compare run {run}")


if __name__ == "__main__":
    main()
