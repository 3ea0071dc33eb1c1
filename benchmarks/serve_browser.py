"""End-to-end check of `firmad serve` in a real headless browser (Chromium + Selenium).

Run by `.ci/run` after the test suite (Debian: apt-get install chromium chromium-driver
python3-selenium), or by hand:

    python3 benchmarks/serve_browser.py [--python .venv/bin/python] [--out DIR]

This script needs only Selenium; firmad runs in its own Python (``--python``, default
``.venv/bin/python``). `benchmarks/serve_fixture.py` makes a tiny detector and the files (in
``--work``, a temporary folder by default), then `firmad serve` runs as a user runs it and the
page is driven as a user drives it:

- every image picked with the file input, dropped on the drop zone and picked as a folder:
  each score, p-value and decision on the page equals `firmad score`'s CSV (to the page's 6
  significant digits: relative 1e-5), the file that is no image shows its error, a folder's
  files come in sorted order;
- the results table sorts by score and name, filters by name and decision, pages (50 rows),
  and its CSV download holds every row shown with the page's numbers;
- file names made of HTML or Markdown stay text (no script runs, no alert); a listed file named
  ``javascript:alert(...)`` is a link to a file; rendered reports (one of them `firmad score`'s
  of those names) load nothing from outside the server and link nowhere else;
- the report links open the reports; no JavaScript error.

Screenshots and check.json (every row, every problem) go to ``--out`` (default
benchmarks/results/serve). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
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
document.getElementById("drop-source").remove();
"""
# Every image and link of the page points to the server itself; nothing was loaded elsewhere.
OUTSIDE_JS = """
const own = (u) => u.startsWith(location.origin + "/") || u.startsWith("blob:" + location.origin);
const bad = [...document.images].map((i) => i.src).filter((u) => u && !own(u));
bad.push(...[...document.links].map((a) => a.href).filter((u) => u && !own(u)));
bad.push(...performance.getEntriesByType("resource").map((e) => e.name).filter((u) => !own(u)));
return bad;
"""


class Problems(list):
    """The problems found; ``checks`` counts every check made."""

    checks = 0

    def check(self, ok: bool, message: str) -> bool:
        self.checks += 1
        if not ok:
            self.append(message)
        return ok


def browser(downloads: Path) -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,1000"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver()))
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    return driver


def chromedriver() -> str:
    for path in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"):
        if os.path.exists(path):
            return path
    return "chromedriver"


def start_server(python: str, files: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """`firmad serve` on a free port, as a user starts it; returns the process and its URL."""
    cmd = [python, "-m", "firmad", "serve", files["detector"], "--port", "0"]
    for folder in files["reports"]:
        cmd += ["--report", folder]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"firmad serve did not start:\n{log.read_text()}")


def expected_rows(path: str) -> dict[str, dict]:
    """`firmad score`'s CSV by file name."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


def table(driver) -> list[dict]:
    out = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr"):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        out.append({"name": cells[1], "score": cells[2], "p": cells[3], "decision": cells[4]})
    return out


def wait_scored(driver, total: int) -> None:
    def done(d):
        text = d.find_element(By.ID, "status").text
        found = re.match(r"(\d+) scored, \d+ flagged as anomalies, (\d+) could not", text)
        return found and int(found.group(1)) + int(found.group(2)) >= total

    WebDriverWait(driver, 300).until(done)


def show_all(driver, size: str = "500") -> list[dict]:
    Select(driver.find_element(By.ID, "pagesize")).select_by_visible_text(size)
    return table(driver)


def same_number(shown: float, want: float) -> bool:
    """Equal to the page's precision: it shows 6 significant digits (half a unit of the last is
    at most 5e-6 of the value), so a relative 1e-5 (at least 1e-5 absolute near zero)."""
    return abs(shown - want) <= 1e-5 * max(abs(want), 1.0)


def check_scores(got: list[dict], expected: dict[str, dict], problems: Problems) -> None:
    """Each row equals `firmad score`'s; the file that is no image shows its error."""
    for row in got:
        name = Path(row["name"]).name
        want = expected.get(name)
        if want is None:  # not scored by the CLI: the page must show why
            shown = row["score"] == "" and row["decision"].startswith(row["name"] + ":")
            problems.check(shown, f"{row['name']}: no clear error shown ({row['decision']!r})")
            continue
        score = float(row["score"]) if row["score"] else float("nan")
        problems.check(same_number(score, float(want["score"])),
                       f"{name}: page {row['score']} vs firmad score {want['score']}")  # fmt: skip
        decision = {"1": "anomaly", "0": "normal", "": "no threshold"}[want["anomaly"]]
        problems.check(row["decision"] == decision, f"{name}: decision {row['decision']!r}")
        problems.check(row["p"] != "", f"{name}: no p-value shown")


def add_files(driver, files: list[Path], folder: Path) -> int:
    """The file input, two files dropped on the drop zone, then the folder picker."""
    driver.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    wait_scored(driver, len(files))
    driver.execute_script(DROP_JS)
    driver.find_element(By.ID, "drop-source").send_keys("\n".join(str(f) for f in files[:2]))
    driver.execute_script(DISPATCH_JS)
    wait_scored(driver, len(files) + 2)
    driver.find_element(By.ID, "folder").send_keys(str(folder))
    wait_scored(driver, 2 * len(files) + 2)
    return 2 * len(files) + 2


def check_folder_order(got: list[dict], n: int, problems: Problems) -> None:
    picked = [r["name"] for r in got[-n:]]
    problems.check(picked == sorted(picked), f"folder pick not in sorted order: {picked[:5]}")


def check_table(driver, total: int, problems: Problems) -> None:
    """Sorting, filtering and paging of the results table."""
    rows = show_all(driver)
    problems.check(len(rows) == total, f"{len(rows)} rows shown of {total}")
    driver.find_element(By.CSS_SELECTOR, "button.sort[data-key=score]").click()
    scores = [float(r["score"]) for r in table(driver) if r["score"]]
    problems.check(scores == sorted(scores, reverse=True), "score sort: not highest first")
    driver.find_element(By.CSS_SELECTOR, "button.sort[data-key=score]").click()
    scores = [float(r["score"]) for r in table(driver) if r["score"]]
    problems.check(scores == sorted(scores), "score sort again: not lowest first")
    driver.find_element(By.CSS_SELECTOR, "button.sort[data-key=name]").click()
    names = [r["name"] for r in table(driver)]
    problems.check(names == sorted(names), "name sort: not in order")
    box = driver.find_element(By.ID, "filter")
    box.send_keys("anomaly 1")
    names = [r["name"] for r in table(driver)]
    problems.check(bool(names) and all("anomaly 1" in n for n in names), f"filter: {names[:3]}")
    box.clear()
    box.send_keys(" ")
    box.clear()  # an input event with the empty filter
    driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    Select(driver.find_element(By.ID, "show")).select_by_value("anomaly")
    shown = table(driver)
    problems.check(bool(shown) and all(r["decision"] == "anomaly" for r in shown), "show anomalies")
    Select(driver.find_element(By.ID, "show")).select_by_value("all")
    rows = show_all(driver, "50")
    problems.check(len(rows) == min(50, total), f"page of 50: {len(rows)} rows")
    driver.find_element(By.ID, "next").click()
    problems.check(len(table(driver)) == total - 50, "second page: wrong number of rows")
    problems.check(f"rows 51-{total} of {total}" in driver.find_element(By.ID, "pageinfo").text,
                   "page info")  # fmt: skip
    show_all(driver)


def check_csv(driver, downloads: Path, problems: Problems) -> None:
    """The CSV download holds every row shown, with the page's numbers."""
    rows = show_all(driver)
    driver.find_element(By.ID, "csv").click()
    path = downloads / "scores.csv"
    for _ in range(100):
        if path.exists() and path.stat().st_size:
            break
        time.sleep(0.1)
    if not problems.check(path.exists(), "CSV download: no file"):
        return
    got = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    problems.check(len(got) == len(rows), f"CSV: {len(got)} rows, page {len(rows)}")
    for page, row in zip(rows, got, strict=False):
        same = page["name"] == row["path"] and (
            page["score"] == "" or same_number(float(page["score"]), float(row["score"]))
        )
        problems.check(same, f"CSV row {row['path']} differs from the page")


def check_no_alert(driver, where: str, problems: Problems) -> None:
    try:
        text = driver.switch_to.alert.text
        driver.switch_to.alert.dismiss()
        problems.append(f"{where}: a script ran (alert {text!r})")
    except NoAlertPresentException:
        pass


def check_reports(driver, url: str, out: Path, problems: Problems) -> None:
    """Report links open reports; hostile names stay text; nothing loads from outside."""
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reports a"))
    links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#reports a")]
    problems.check(links[0] == f"{url}reports/0/report.md", f"detector report link: {links[0]}")
    for i, link in enumerate(links):
        driver.get(link)
        check_no_alert(driver, link, problems)
        problems.check(not driver.execute_script(OUTSIDE_JS), f"{link}: loads or links outside")
        driver.save_screenshot(str(out / f"report-{i}.png"))
    driver.get(f"{url}reports/1/beacon.md")
    problems.check(not driver.execute_script(OUTSIDE_JS), "beacon.md: loads or links outside")
    problems.check("evil.example" in driver.page_source, "beacon.md: the text is gone")
    driver.get(f"{url}reports/1/")
    link = driver.find_element(By.PARTIAL_LINK_TEXT, "javascript:alert")
    problems.check(link.get_attribute("href").startswith(url), "javascript: name is a script link")
    link.click()
    check_no_alert(driver, "the javascript: file", problems)
    problems.check(driver.current_url.startswith(url), f"left the server: {driver.current_url}")
    driver.get(url)


def js_errors(driver) -> list[str]:
    """Errors in the browser's console, but a failed upload's expected 400."""
    return [
        e["message"] for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "status of 400" not in e["message"]
    ]  # fmt: skip


def run(args, files: dict) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    downloads = Path(tempfile.mkdtemp(prefix="firmad-downloads-"))
    proc, url = start_server(args.python, files, Path(files["images"]).parent / "serve.log")
    driver = browser(downloads)
    problems = Problems()
    report: dict = {"url": url, "browser": driver.capabilities.get("browserVersion")}
    try:
        start = time.time()
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: "Scorer" in d.find_element(By.ID, "info").text)
        folder = Path(files["images"]).resolve()
        images = sorted(p for p in folder.iterdir() if p.is_file())
        total = add_files(driver, images, folder)
        report["seconds"] = round(time.time() - start, 1)
        check_no_alert(driver, "the scoring page", problems)
        got = show_all(driver)
        report["rows"] = got
        check_scores(got, expected_rows(files["expected"]), problems)
        check_folder_order(got, len(images), problems)
        check_table(driver, total, problems)
        check_csv(driver, downloads, problems)
        driver.save_screenshot(str(args.out / "page.png"))
        check_reports(driver, url, args.out, problems)
        errors = js_errors(driver)
        problems.check(not errors, f"JavaScript errors: {errors}")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)
    report["problems"] = list(problems)
    report["checks"] = problems.checks
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_py = ROOT / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(default_py) if default_py.exists() else sys.executable,
                    help="The Python that runs firmad (default: .venv/bin/python).")  # fmt: skip
    ap.add_argument("--work", type=Path, help="Folder for the fixture (default: a temporary one).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="firmad-serve-"))
    made = subprocess.run(
        [args.python, str(ROOT / "benchmarks" / "serve_fixture.py"), str(work)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    if made.returncode != 0:
        print(made.stdout, made.stderr, sep="\n")
        return 1
    report = run(args, json.loads(made.stdout.strip().splitlines()[-1]))
    (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    failed = len(report["problems"])
    print(f"browser: {report['checks'] - failed} passed, {failed} failed")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
