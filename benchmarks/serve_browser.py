"""End-to-end check of `firmad serve` in a real headless browser (Chromium + Selenium).

Not part of `make test` (it needs a browser): run it by hand where Chromium is installed,

    apt-get install -y chromium chromium-driver && pip install selenium
    python benchmarks/serve_browser.py DET_DIR IMAGE_FOLDER [--report DIR] [--out DIR]

It serves DET_DIR on 127.0.0.1, picks every file of IMAGE_FOLDER with the page's file input,
drops two of them on the drop zone, picks the folder with the folder picker, then reads the
page's table back and compares each score and decision with the detector's own
`decision_function` on the file; an unreadable file must show its error in the page.
Screenshots of the page and of the reports, and check.json with every row, go to --out
(default benchmarks/results/serve). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from firmad import serve
from firmad.data.sources import IMAGE_EXTENSIONS
from firmad.detector import OneClassDetector

DROP_JS = """
const input = document.createElement("input");
input.type = "file"; input.multiple = true; input.id = "drop-source";
document.body.append(input);
"""
DISPATCH_JS = """
const dt = new DataTransfer();
for (const f of document.getElementById("drop-source").files) dt.items.add(f);
document.getElementById("drop").dispatchEvent(
  new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
"""


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,1000"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def rows(driver) -> list[dict]:
    out = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr"):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        out.append({"name": cells[1], "score": cells[2], "decision": cells[3]})
    return out


def wait_for_rows(driver, n: int) -> None:
    def done(d):
        return len(rows(d)) >= n and "scored," in d.find_element(By.ID, "status").text

    WebDriverWait(driver, 300).until(done)


def screenshot(driver, path: Path) -> None:
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1200, min(max(height + 40, 600), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1200, 1000)


def check_rows(got: list[dict], det, folder: Path) -> list[str]:
    """Problems: a score or decision that differs from the detector's, a bad file not shown."""
    problems = []
    threshold = getattr(det, "threshold_", None)
    for row in got:
        name = row["name"].removeprefix(f"{folder.resolve().name}/")  # from the folder picker
        path = folder / name
        if row["score"] == "":  # unreadable: the error must name the file
            if not row["decision"].startswith(f"{row['name']}:"):  # the name as the page has it
                problems.append(f"{row['name']}: no clear error shown ({row['decision']!r})")
            continue
        with tempfile.TemporaryDirectory() as tmp:  # the file alone, read as `firmad score` does
            shutil.copy(path, tmp)
            expected = float(det.decision_function(tmp)[0])
        if abs(float(row["score"]) - expected) > 1e-5 * max(1.0, abs(expected)):
            problems.append(f"{row['name']}: page {row['score']} vs detector {expected:.6g}")
        want = (
            "no threshold" if threshold is None else "anomaly" if expected > threshold else "normal"
        )
        if row["decision"] != want:
            problems.append(f"{row['name']}: decision {row['decision']!r}, expected {want!r}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("detector", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--report", type=Path, action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    det = OneClassDetector.load(args.detector)
    server = serve.make_server(serve.App(det, args.detector, args.report), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = serve.url_of(server)
    files = sorted(p for p in args.images.iterdir() if p.is_file())
    driver = browser()
    report: dict = {"url": url, "browser": driver.capabilities.get("browserVersion")}
    try:
        start = time.time()
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: "Scorer" in d.find_element(By.ID, "info").text)
        driver.find_element(By.ID, "files").send_keys("\n".join(str(f.resolve()) for f in files))
        wait_for_rows(driver, len(files))
        # the drop zone: two image files dropped (a DataTransfer built from a file input)
        driver.execute_script(DROP_JS)
        dropped = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS][:2]
        source = driver.find_element(By.ID, "drop-source")
        source.send_keys("\n".join(str(f.resolve()) for f in dropped))
        driver.execute_script(DISPATCH_JS)
        wait_for_rows(driver, len(files) + len(dropped))
        # the folder picker: the whole folder again (names relative to its parent)
        driver.find_element(By.ID, "folder").send_keys(str(args.images.resolve()))
        wait_for_rows(driver, 2 * len(files) + len(dropped))
        report["seconds"] = round(time.time() - start, 1)
        got = rows(driver)
        report["rows"] = got
        report["status"] = driver.find_element(By.ID, "status").text
        report["problems"] = check_rows(got, det, args.images)
        if not any(r["score"] == "" for r in got):
            report["problems"].append("no unreadable file among the uploads: add one")
        screenshot(driver, args.out / "page.png")
        for i, folder in enumerate([args.detector, *args.report]):
            # each report folder's Markdown report rendered, or its listing
            found = [m for m in ("report.md", "attack.md") if (folder / m).exists()]
            driver.get(f"{url}reports/{i}/{found[0] if found else ''}")
            name = "detector" if i == 0 else folder.resolve().name
            screenshot(driver, args.out / f"report-{i}-{name}.png")
        driver.get(f"{url}reports/{len(args.report)}/")
        screenshot(driver, args.out / "listing.png")
    finally:
        driver.quit()
        server.shutdown()
    (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
