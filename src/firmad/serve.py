"""`firmad serve`: a local web page to score images with a detector and browse reports.

Python's own ``http.server`` and one plain HTML page: nothing to install, and the whole server
is this file. Markdown reports are rendered by markdown-it-py (already required by rich) with
raw HTML switched off.

Safety: the server listens on 127.0.0.1 unless told otherwise, and then answers only requests
addressed to this computer by name (no DNS rebinding); uploads are capped in bytes and pixels;
report files are served only from inside the folders named on the command line (no ``..``, no
symlinks out, no hidden files) and only as plain types (Markdown, PNG/JPEG, CSV, JSON, text).

Routes: ``GET /`` the page; ``GET /api/detector`` what the page shows about the detector;
``POST /api/score`` one image file as the request body (its name in ``X-Filename``) -> score
and decision; ``POST /api/histogram`` ``{"scores": [...]}`` -> PNG of the held-out scores, the
threshold and those scores; ``GET /reports/N/PATH`` a file of the N-th report folder (0 = the
detector's own), Markdown rendered, a folder listed.
"""

from __future__ import annotations

import errno
import html
import io
import json
import logging
import re
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from firmad.data.sources import load_image
from firmad.detector import OneClassDetector
from firmad.errors import DataError, FirmadError, InputError
from firmad.report import plot_threshold_hist
from firmad.scoring.scales import score_scale

log = logging.getLogger(__name__)

MAX_UPLOAD = 32 * 1024 * 1024  # bytes of one uploaded image
MAX_PIXELS = 40_000_000  # pixels of one uploaded image (a decoded 40 MP RGB image is 120 MB)
MAX_JSON = 1024 * 1024  # bytes of a histogram request
MAX_LISTED = 400  # files shown in a folder listing
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# file types served from report folders (Markdown is rendered)
SERVED = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".csv": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".md": "text/html; charset=utf-8",
}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode("utf-8"))


def _error(message: str, status: int = 400) -> Response:
    return _json({"error": message}, status)


class App:
    """The page's routes, apart from the HTTP server: ``get(path)`` and ``post(path, headers,
    body)`` return a `Response`."""

    def __init__(self, detector, detector_dir: str | Path, reports=(), max_upload=MAX_UPLOAD):
        self.det = detector
        self.max_upload = int(max_upload)
        self.folders: list[tuple[str, Path]] = [("detector", Path(detector_dir))]
        for folder in reports:
            folder = Path(folder)
            if not folder.is_dir():
                raise InputError(f"--report {folder}: no such folder; give a run, attack or "
                                 "score-report folder")  # fmt: skip
            self.folders.append((folder.resolve().name, folder))
        self._lock = threading.Lock()  # one scoring at a time: torch is not re-entrant here

    # --- routing ---------------------------------------------------------------------------

    def get(self, path: str) -> Response:
        route = urlsplit(path).path
        if route in ("/", "/index.html"):
            return Response(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        if route == "/api/detector":
            return _json(self.info())
        m = re.fullmatch(r"/reports/(\d+)(/.*)?", route)
        if m:
            if m.group(2) is None:  # relative links need the trailing slash
                return Response(301, b"", "text/plain", {"Location": f"/reports/{m.group(1)}/"})
            return self.report_file(int(m.group(1)), m.group(2)[1:])
        return _error("not found", 404)

    def post(self, path: str, headers, body: bytes) -> Response:
        route = urlsplit(path).path
        try:
            if route == "/api/score":
                name = unquote(headers.get("X-Filename") or "upload")
                return _json(self.score(name, body))
            if route == "/api/histogram":
                return Response(200, self.histogram(body), "image/png")
        except FirmadError as err:
            return _error(str(err))
        return _error("not found", 404)

    # --- detector ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        det, vs = self.det, self.det.scorer_
        heldout = getattr(det, "heldout_scores_", None)
        c, h, w = det.input_shape_
        return {
            "scorer": vs.label,
            "scale": score_scale(det),
            "threshold": getattr(det, "threshold_", None),
            "input": f"{'RGB' if c == 3 else 'grey'}, squashed to {h} x {w}",
            "heldout": None if heldout is None else len(heldout),
            "reports": [
                {"id": i, "name": name, "url": f"/reports/{i}/"}
                for i, (name, _) in enumerate(self.folders)
            ],
        }

    def score(self, name: str, data: bytes) -> dict[str, Any]:
        """Score one image file's bytes as `firmad score` does (same decoding and resize)."""
        import torch

        image = self._decode(name, data, load_image)
        with self._lock:
            score = float(self.det.score_images(torch.from_numpy(image[None]))[0])
        threshold = getattr(self.det, "threshold_", None)
        decision = None if threshold is None else int(score > threshold)
        return {"name": name, "score": score, "decision": decision, "threshold": threshold}

    def _decode(self, name: str, data: bytes, load_image) -> np.ndarray:
        from PIL import Image

        if not data:
            raise InputError(f"{name}: the file is empty")
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Exception as err:  # Pillow raises many kinds of errors on bad files
            raise InputError(
                f"{name}: not an image firmad can read ({type(err).__name__}); use PNG, JPEG, "
                "BMP, TIFF or WebP files"
            ) from None
        if width * height > MAX_PIXELS:
            raise InputError(
                f"{name}: {width} x {height} pixels is more than this page takes "
                f"({MAX_PIXELS // 1_000_000} MP); make the image smaller first"
            )
        c = self.det.config_.data
        try:
            return load_image(io.BytesIO(data), c.size, c.channels).copy()
        except DataError as err:
            cause = err.__cause__
            raise InputError(
                f"{name}: cannot decode this image ({type(cause).__name__}: {cause})"
            ) from None

    def histogram(self, body: bytes) -> bytes:
        """PNG: the held-out normal scores, the threshold and the given scores."""
        try:
            scores = json.loads(body or b"{}").get("scores", [])
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        except (ValueError, TypeError, AttributeError):
            raise InputError('expected JSON {"scores": [numbers]}') from None
        heldout = getattr(self.det, "heldout_scores_", None)
        threshold = getattr(self.det, "threshold_", None)
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_threshold_hist(Path(tmp) / "h.png", heldout, threshold, scores)
            return path.read_bytes()

    # --- report folders ---------------------------------------------------------------------

    def resolve(self, folder: int, rel: str) -> Path | None:
        """The file or folder ``rel`` inside report folder ``folder``, or None if it is outside
        it (``..``, a symlink out), hidden, or does not exist."""
        if not 0 <= folder < len(self.folders):
            return None
        root = self.folders[folder][1].resolve()
        rel = unquote(rel)
        if "\x00" in rel or rel.startswith(("/", "\\")):
            return None
        target = (root / rel).resolve()
        if target != root and root not in target.parents:
            return None
        if any(p.startswith(".") for p in target.relative_to(root).parts) or not target.exists():
            return None
        return target

    def report_file(self, folder: int, rel: str) -> Response:
        target = self.resolve(folder, rel)
        if target is None:
            return _error("not found (only files inside the report folder are served)", 404)
        if target.is_dir():
            return Response(200, self.listing(folder, target), "text/html; charset=utf-8")
        kind = SERVED.get(target.suffix.lower())
        if kind is None:
            return _error(f"{target.name}: this kind of file is not shown here", 404)
        if target.suffix.lower() == ".md":
            return Response(200, self.markdown(folder, target), kind)
        return Response(200, target.read_bytes(), kind)

    def markdown(self, folder: int, path: Path) -> bytes:
        from markdown_it import MarkdownIt

        renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
        body = renderer.render(path.read_text(encoding="utf-8", errors="replace"))
        return _page(path.name, folder, body)

    def listing(self, folder: int, directory: Path) -> bytes:
        root = self.folders[folder][1].resolve()
        files = []
        for p in sorted(directory.rglob("*")):
            if p.suffix.lower() in SERVED and self.resolve(folder, str(p.relative_to(root))):
                files.append(p)  # inside the folder, not hidden, a type that is shown
            if len(files) == MAX_LISTED:
                break
        files.sort(key=lambda p: (p.suffix.lower() != ".md", p))  # reports first
        rel = [p.relative_to(directory).as_posix() for p in files]
        md = [f'<li><a href="{html.escape(r)}">{html.escape(r)}</a></li>' for r in rel]
        images = [
            f'<figure><img src="{html.escape(r)}" alt="{html.escape(r)}">'
            f"<figcaption>{html.escape(r)}</figcaption></figure>"
            for r in rel
            if r.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
        ]
        body = (
            f"<h1>{html.escape(self.folders[folder][0])}</h1><ul>{''.join(md)}</ul>"
            f'<div class="plots">{"".join(images)}</div>'
        )
        return _page(self.folders[folder][0], folder, body)


def _page(title: str, folder: int, body: str) -> bytes:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{REPORT_CSS}</style></head><body>"
        f"<nav><a href='/'>scoring page</a> · <a href='/reports/{folder}/'>folder</a></nav>"
        f"{body}</body></html>"
    ).encode()


# --- HTTP ----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "firmad"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self._host_ok():
            self._reply(self._call(self.server.app.get, self.path))

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(_error("send the file with a Content-Length", 411))
            return
        cap = MAX_JSON if self.path.startswith("/api/histogram") else self.server.app.max_upload
        if int(length) > cap:
            self._drain(int(length))  # read it so the client sees the answer, not a reset
            self._reply(_error(f"the upload is larger than this page takes ({_size(cap)})", 413))
            return
        body = self.rfile.read(int(length))
        self._reply(self._call(self.server.app.post, self.path, self.headers, body))

    def _host_ok(self) -> bool:
        """On a loopback address, answer only requests addressed to this computer by name."""
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if host in LOOPBACK:
            return True
        self._reply(_error("requests must be addressed to 127.0.0.1 or localhost", 400))
        return False

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)

    def _call(self, route, *args) -> Response:
        try:
            return route(*args)
        except Exception:  # a bug: say so on the page, keep the server running
            log.error("internal error on %s:\n%s", self.path, traceback.format_exc())
            return _error("internal error; the server's terminal shows the traceback", 500)

    def _reply(self, r: Response) -> None:
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for key, value in r.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(r.body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s - %s", self.address_string(), format % args)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app: App) -> None:
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        self.app = app
        self.loopback = address[0] in LOOPBACK
        super().__init__(address, _Handler)


def make_server(app: App, host: str = "127.0.0.1", port: int = 8765) -> _Server:
    """An HTTP server for the page (not yet serving); port 0 picks a free port."""
    try:
        return _Server((host, port), app)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} is in use; choose another with --port (0 picks a free one)"
            ) from None
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def url_of(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(detector_dir, host="127.0.0.1", port=8765, reports=(), open_browser=False, say=print):
    """Serve the page until Ctrl-C."""
    app = App(OneClassDetector.load(detector_dir), detector_dir, reports)
    server = make_server(app, host, port)
    url = url_of(server)
    if host not in LOOPBACK:
        say(f"warning: listening on {host}: anyone who can reach this computer can use the page")
    try:
        say(f"Scoring page for {detector_dir}: {url}  (Ctrl-C stops it)")
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()


REPORT_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;border-bottom:1px solid #ddd}
img{max-width:100%}nav{margin-bottom:1em}.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;font-size:12px}.plots img{max-width:520px}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>firmad: score images</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
#drop{border:2px dashed #888;border-radius:8px;padding:1.5em;text-align:center;background:#fafafa}
#drop.over{background:#e8eeff}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
td.num{text-align:right;font-family:monospace}.anomaly{color:#b00;font-weight:bold}
.normal{color:#070}.err{color:#b00}.muted{color:#666}
.thumb{width:40px;height:40px;object-fit:contain;image-rendering:pixelated;background:#eee}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin:.3em 0 1em}
.gallery figure{margin:0;text-align:center;font-size:12px;width:104px;overflow:hidden}
.gallery img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee}
</style></head><body>
<h1>firmad: score images</h1>
<p id="info" class="muted">Loading the detector…</p>
<details><summary>What the scores mean</summary><p id="scale"></p></details>
<h2>Score images</h2>
<div id="drop">Drop images or folders here, or
<label>choose files <input type="file" id="files" multiple></label>
<label>choose a folder <input type="file" id="folder" webkitdirectory multiple></label>
<button id="clear">clear</button></div>
<p id="status"></p>
<h3>Scores against the threshold</h3>
<img id="hist" alt="held-out normal scores, the threshold and the scored images">
<h3>Gallery</h3>
<b>Most anomalous</b><div class="gallery" id="top"></div>
<b>Most normal</b><div class="gallery" id="low"></div>
<h3>All scored images</h3>
<table id="results"><thead><tr><th></th><th>image</th><th>score</th><th>decision</th></tr>
</thead><tbody></tbody></table>
<h2>Reports</h2><ul id="reports"></ul>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const results = [];
let failed = 0;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function decisionText(d) { return d === null ? "no threshold" : d ? "anomaly" : "normal"; }

async function loadInfo() {
  const info = await (await fetch("/api/detector")).json();
  const thr = info.threshold === null ? "none (no decisions)" : info.threshold.toPrecision(6);
  const held = info.heldout === null ? "" : `, ${info.heldout} held-out normal scores`;
  $("info").textContent = `Scorer ${info.scorer}; input ${info.input}; threshold ${thr}${held}.`;
  $("scale").textContent = info.scale;
  for (const r of info.reports) {
    const li = el("li"); const a = el("a", r.name); a.href = r.url; li.append(a);
    $("reports").append(li);
  }
  drawHistogram();
}

async function drawHistogram() {
  const body = JSON.stringify({scores: results.map((r) => r.score)});
  const resp = await fetch("/api/histogram", {method: "POST", body});
  if (resp.ok) $("hist").src = URL.createObjectURL(await resp.blob());
}

function figure(r) {
  const f = el("figure"); const img = el("img"); img.src = r.url; img.alt = r.name;
  f.append(img, el("div", r.score.toPrecision(4), r.decision ? "anomaly" : ""),
           el("div", r.name.split("/").pop()));
  return f;
}

function drawGallery() {
  const sorted = [...results].sort((a, b) => b.score - a.score);
  const nTop = Math.min(8, Math.ceil(sorted.length / 2));
  const nLow = Math.min(8, sorted.length - nTop);
  $("top").replaceChildren(...sorted.slice(0, nTop).map(figure));
  $("low").replaceChildren(...sorted.slice(sorted.length - nLow).reverse().map(figure));
}

async function scoreOne(file, name) {
  const tr = el("tr"); const img = el("img", undefined, "thumb");
  const url = URL.createObjectURL(file); img.src = url; img.alt = "";
  const cells = [el("td"), el("td", name), el("td", "…", "num"), el("td")];
  cells[0].append(img); tr.append(...cells); $("results").tBodies[0].append(tr);
  try {
    const resp = await fetch("/api/score", {method: "POST", body: file,
      headers: {"X-Filename": encodeURIComponent(name)}});
    const j = await resp.json();
    if (!resp.ok) throw new Error(j.error || resp.statusText);
    cells[2].textContent = j.score.toPrecision(6);
    cells[3].textContent = decisionText(j.decision);
    cells[3].className = j.decision === null ? "muted" : j.decision ? "anomaly" : "normal";
    results.push({name, score: j.score, decision: j.decision, url});
  } catch (err) {
    failed += 1; cells[2].textContent = "";
    cells[3].textContent = err.message; cells[3].className = "err";
  }
}

async function scoreAll(items) {
  for (const [i, {file, name}] of items.entries()) {
    $("status").textContent = `scoring ${i + 1} of ${items.length}…`;
    await scoreOne(file, name);
  }
  const flagged = results.filter((r) => r.decision === 1).length;
  $("status").textContent = `${results.length} scored, ${flagged} flagged as anomalies, ` +
    `${failed} could not be read.`;
  drawGallery(); drawHistogram();
}

async function walk(entry, out) {
  if (entry.isFile) {
    out.push({file: await new Promise((ok, bad) => entry.file(ok, bad)),
              name: entry.fullPath.replace(/^\\//, "")});
    return;
  }
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) break;
    for (const e of batch) await walk(e, out);
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (ev) => {
  ev.preventDefault(); drop.classList.remove("over");
  const entries = [...ev.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry());
  const plain = [...ev.dataTransfer.files];
  const items = [];
  if (entries.length && entries.every(Boolean)) { for (const e of entries) await walk(e, items); }
  else for (const f of plain) items.push({file: f, name: f.name});
  scoreAll(items);
});
for (const id of ["files", "folder"]) {
  $(id).addEventListener("change", (ev) => {
    const files = [...ev.target.files];
    const items = files.map((f) => ({file: f, name: f.webkitRelativePath || f.name}));
    ev.target.value = "";
    scoreAll(items);
  });
}
$("clear").addEventListener("click", () => {
  results.length = 0; failed = 0; $("results").tBodies[0].replaceChildren();
  $("status").textContent = ""; drawGallery(); drawHistogram();
});
loadInfo();
</script>
</body></html>
"""
