"""The page's routes, apart from the HTTP server: ``get(path)`` and ``post(path, headers,
body)`` return a `Response`; a user's mistake is a 4xx with a message, never a 500."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from firmad.data.sources import pil_array
from firmad.errors import DataError, FirmadError, InputError
from firmad.inputs import decisions
from firmad.metrics import conformal_p_values
from firmad.report_detector import plot_threshold_hist
from firmad.scoring.scales import score_scale
from firmad.serve import pages

MAX_UPLOAD = 32 * 1024 * 1024  # bytes of one uploaded image
MAX_PIXELS = 40_000_000  # pixels of one uploaded image (a decoded 40 MP RGB image is 120 MB)
MAX_JSON = 1024 * 1024  # bytes of a histogram request
MAX_SCORES = 100_000  # scores in a histogram request
MAX_SCORE = 1e15  # larger magnitudes are no anomaly score (and overflow a histogram's bins)
MAX_LISTED = 400  # files shown in a folder listing
MAX_SERVED = 64 * 1024 * 1024  # bytes of one report file
# What uploads may be: the formats firmad documents (never EPS / PostScript, which Pillow
# would hand to Ghostscript), as Pillow names them.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
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
# the report a folder opens with, first found
MAIN_REPORTS = ("report.md", "attack.md", "study.md", "bench.md")
STATIC = {
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode("utf-8"))


def error(message: str, status: int = 400) -> Response:
    return _json({"error": message}, status)


def _html(body: bytes, csp: str = pages.REPORT_CSP) -> Response:
    return Response(200, body, "text/html; charset=utf-8", {"Content-Security-Policy": csp})


class App:
    """The routes. ``token``: the per-session secret the page sends with every POST."""

    def __init__(self, detector, detector_dir: str | Path, reports=(), max_upload=MAX_UPLOAD):
        self.det = detector
        self.max_upload = int(max_upload)
        self.max_pixels = MAX_PIXELS
        self.token = secrets.token_urlsafe(32)
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
            page = pages.static("index.html").replace(b"{{TOKEN}}", self.token.encode())
            return _html(page, pages.PAGE_CSP)
        if route in STATIC:
            name, kind = STATIC[route]
            return Response(200, pages.static(name), kind)
        if route == "/api/detector":
            return _json(self.info())
        if route == "/favicon.ico":  # browsers ask for it; there is none
            return Response(204, b"", "text/plain")
        m = re.fullmatch(r"/reports/([0-9]{1,4})(/.*)?", route)
        if m is None:
            return error("not found", 404)
        if m.group(2) is None:  # relative links need the trailing slash
            return _redirect(f"/reports/{int(m.group(1))}/")
        return self.report_file(int(m.group(1)), m.group(2)[1:], route)

    def post(self, path: str, headers, body: bytes) -> Response:
        route = urlsplit(path).path
        try:
            if route == "/api/score":
                name = unquote(headers.get("X-Filename") or "upload")[:1000]
                return _json(self.score(name, body))
            if route == "/api/histogram":
                return Response(200, self.histogram(body), "image/png")
        except FirmadError as err:
            return error(str(err))
        return error("not found", 404)

    # --- detector ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        det, vs = self.det, self.det.scorer_
        heldout = getattr(det, "heldout_scores_", None)
        c, h, w = det.input_shape_
        cal = getattr(det, "calibration_", None) or {}
        return {
            "scorer": vs.label,
            "scale": score_scale(det),
            "threshold": getattr(det, "threshold_", None),
            "target_fpr": cal.get("target_fpr"),
            "input": f"{'RGB' if c == 3 else 'grey'}, squashed to {h} x {w}",
            "heldout": None if heldout is None else len(heldout),
            "formats": list(UPLOAD_FORMATS),
            "reports": [
                {"id": i, "name": name, "url": self._main_report(i, folder)}
                for i, (name, folder) in enumerate(self.folders)
            ],
        }

    @staticmethod
    def _main_report(i: int, folder: Path) -> str:
        """The report a folder's link opens (its Markdown report), else its listing."""
        for name in MAIN_REPORTS:
            if (folder / name).is_file():
                return f"/reports/{i}/{name}"
        return f"/reports/{i}/"

    def score(self, name: str, data: bytes) -> dict[str, Any]:
        """Score one image file's bytes as `firmad score` does (same decoding and resize)."""
        import torch

        image = self._decode(name, data)
        with self._lock:
            score = float(self.det.score_images(torch.from_numpy(image[None]))[0])
        threshold = getattr(self.det, "threshold_", None)
        decision = decisions(np.array([score]), threshold)[0]  # as `firmad score` decides
        decision = None if decision == "" else int(decision)
        heldout = getattr(self.det, "heldout_scores_", None)
        p = None
        if heldout is not None and len(heldout):
            p = float(conformal_p_values(heldout, [score])[0])
        return {"name": name, "score": score, "p_value": p, "decision": decision,
                "threshold": threshold}  # fmt: skip

    def _decode(self, name: str, data: bytes) -> np.ndarray:
        from PIL import Image

        if not data:
            raise InputError(f"{name}: the file is empty")
        try:
            img = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        except Exception as err:  # Pillow raises many kinds of errors on bad files
            raise InputError(
                f"{name}: not an image firmad can read ({type(err).__name__}); use PNG, JPEG, "
                "BMP, TIFF, WebP or GIF files"
            ) from None
        with img:
            width, height = img.size
            if width * height > self.max_pixels:
                raise InputError(
                    f"{name}: {width} x {height} pixels is more than this page takes "
                    f"({self.max_pixels // 1_000_000} MP); make the image smaller first"
                )
            c = self.det.config_.data
            try:  # as `firmad score` decodes a file (firmad.inputs.load_file)
                return pil_array(img, c.size, c.channels).copy()
            except DataError as err:
                raise InputError(f"{name}: cannot decode this image ({err})") from None

    def histogram(self, body: bytes) -> bytes:
        """PNG: the held-out normal scores, the threshold and the given scores."""
        scores = parse_scores(body)
        heldout = getattr(self.det, "heldout_scores_", None)
        threshold = getattr(self.det, "threshold_", None)
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_threshold_hist(Path(tmp) / "h.png", heldout, threshold, scores)
            return path.read_bytes()

    # --- report folders ---------------------------------------------------------------------

    def resolve(self, folder: int, rel: str) -> Path | None:
        """The file or folder ``rel`` inside report folder ``folder``, or None if it is outside
        it (``..``, a symlink out), hidden, not a regular file or folder, or unreadable."""
        if not 0 <= folder < len(self.folders):
            return None
        rel = unquote(rel)
        if "\x00" in rel or rel.startswith(("/", "\\")):
            return None
        try:
            root = self.folders[folder][1].resolve()
            target = (root / rel).resolve()
            if target != root and root not in target.parents:
                return None
            if any(p.startswith(".") for p in target.relative_to(root).parts):
                return None
            mode = target.stat().st_mode
        except (OSError, ValueError, RuntimeError):  # ENAMETOOLONG, a loop of links...
            return None
        return target if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else None

    def report_file(self, folder: int, rel: str, route: str) -> Response:
        target = self.resolve(folder, rel)
        if target is None:
            return error("not found (only files inside the report folder are served)", 404)
        if target.is_dir():
            if not route.endswith("/"):  # its links are relative to the folder itself
                return _redirect(quote(route + "/"))
            return _html(self.listing(folder, target))
        kind = SERVED.get(target.suffix.lower())
        if kind is None:
            return error("this kind of file is not shown here", 404)
        data = read_regular(target)
        if data is None:
            return error("not found (only regular files are served)", 404)
        if target.suffix.lower() == ".md":
            body = pages.render_markdown(data.decode("utf-8", errors="replace"))
            return _html(pages.report_page(target.name, folder, body))
        return Response(200, data, kind)

    def listing(self, folder: int, directory: Path) -> bytes:
        files, truncated = [], False
        for root, dirs, names in os.walk(directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(root) / name
                rel = path.relative_to(directory).as_posix()
                if path.suffix.lower() in SERVED and self.resolve(folder, _rel(self, folder, path)):
                    files.append(rel)  # inside the folder, not hidden, regular, shown
            if len(files) >= MAX_LISTED:
                files, truncated = files[:MAX_LISTED], True
                break
        files.sort(key=lambda r: (not r.lower().endswith(".md"), r))  # reports first
        body = pages.listing_body(self.folders[folder][0], files, truncated)
        return pages.report_page(self.folders[folder][0], folder, body)


def _rel(app: App, folder: int, path: Path) -> str:
    """``path`` relative to report folder ``folder``'s root (for `App.resolve`)."""
    return os.path.relpath(path, app.folders[folder][1].resolve())


def _redirect(location: str) -> Response:
    return Response(301, b"", "text/plain", {"Location": location})


def read_regular(path: Path) -> bytes | None:
    """A regular file's bytes (at most MAX_SERVED); None for anything else. Opened without
    blocking, so a FIFO that appeared after the check cannot hang the thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SERVED:
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(MAX_SERVED)
    except OSError:
        return None
    finally:
        os.close(fd)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def parse_scores(body: bytes) -> np.ndarray:
    """``{"scores": [numbers]}``: finite numbers of a plausible size, at most MAX_SCORES."""
    problem = InputError(
        f'expected JSON {{"scores": [numbers]}}: at most {MAX_SCORES} finite numbers, each of '
        f"magnitude at most {MAX_SCORE:g}"
    )
    try:
        data = json.loads(body or b"{}", parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise problem from None
    scores = data.get("scores", []) if isinstance(data, dict) else None
    if not isinstance(scores, list) or len(scores) > MAX_SCORES:
        raise problem
    # abs(x) <= MAX_SCORE is False for NaN and infinities, and exact for huge integers
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and abs(x) <= MAX_SCORE
               for x in scores):  # fmt: skip
        raise problem
    return np.asarray(scores, dtype=np.float64).reshape(-1)
