"""`firmad serve`: the page's routes through a real HTTP server on an ephemeral local port."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from urllib.parse import quote

import numpy as np
import pytest

from firmad import serve
from firmad.cli import main
from firmad.inputs import load_folder_images
from firmad.report import write_fit_report
from tests.conftest import folder_detector
from tests.test_detector import TRAIN

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A detector fitted on a folder (as `firmad fit` does), its report, an attack-like report
    folder with a secret beside it, and the page served on 127.0.0.1:<free port>."""
    tmp = tmp_path_factory.mktemp("serve")
    det, split = folder_detector(tmp, TRAIN)
    det.save(tmp / "det")
    held = load_folder_images(tmp / "held", det.config_.data.size, det.config_.data.channels)
    write_fit_report(det, tmp / "det", heldout_images=held)
    attack = tmp / "audit"
    attack.mkdir()
    (attack / "attack.md").write_text("# Attack\n\n| eps | AUROC |\n|---|---:|\n| 0 | 91.5 |\n")
    (attack / ".hidden.txt").write_text("hidden")
    (tmp / "secret.txt").write_text("SECRET")
    (attack / "link.txt").symlink_to(tmp / "secret.txt")
    app = serve.App(det, tmp / "det", [attack])
    server = serve.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"det": det, "tmp": tmp, "app": app, "port": server.server_address[1], "split": split}
    server.shutdown()
    server.server_close()


def request(site, method, path, body=None, headers=None):
    """A raw request (http.client sends the path as given: no '..' clean-up on the way)."""
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def upload(site, name, data):
    status, _, body = request(site, "POST", "/api/score", data, {"X-Filename": quote(name)})
    return status, json.loads(body)


def test_page_and_detector_info(site):
    status, kind, body = request(site, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b'id="drop"' in body
    status, _, body = request(site, "GET", "/api/detector")
    info = json.loads(body)
    assert info["threshold"] == pytest.approx(site["det"].threshold_)
    assert info["scorer"] == "knn_cos:k=5 (plain)" and "cosine similarity" in info["scale"]
    assert [r["name"] for r in info["reports"]] == ["detector", "audit"]
    assert info["heldout"] is None or info["heldout"] == len(site["det"].heldout_scores_)


def test_held_out_scores_reach_the_page(site, monkeypatch):
    monkeypatch.setattr(site["det"], "heldout_scores_", np.linspace(-1, -0.5, 30), raising=False)
    status, _, body = request(site, "GET", "/api/detector")
    assert json.loads(body)["heldout"] == 30
    status, kind, png = request(site, "POST", "/api/histogram", b'{"scores": [-0.7]}')
    assert status == 200 and png.startswith(PNG)


def test_upload_scores_as_the_detector_does(site, tmp_path):
    from PIL import Image

    grey = site["split"].test_images[5][0].numpy()
    colour = np.stack([grey, 255 - grey, grey // 3], axis=-1)
    path = tmp_path / "one" / "odd size.jpg"
    path.parent.mkdir()
    Image.fromarray(colour).resize((41, 27)).save(path)
    status, got = upload(site, "folder/odd size.jpg", path.read_bytes())
    assert status == 200 and got["name"] == "folder/odd size.jpg"
    det = site["det"]
    expected = det.decision_function(path.parent)[0]  # the same file, read from its folder
    assert got["score"] == pytest.approx(expected, abs=1e-6)
    assert got["decision"] == int(expected > det.threshold_)


def test_bad_uploads_are_clear_errors_not_500(site, monkeypatch):
    status, got = upload(site, "notes.txt", b"not an image at all")
    assert status == 400 and got["error"].startswith("notes.txt: not an image firmad can read")
    status, got = upload(site, "broken.png", PNG + b"\x00" * 40)
    assert status == 400 and "broken.png" in got["error"]
    status, got = upload(site, "empty.png", b"")
    assert status == 400 and "empty" in got["error"]
    image = (site["tmp"] / "train" / "0.png").read_bytes()
    monkeypatch.setattr(serve, "MAX_PIXELS", 100)
    status, got = upload(site, "big.png", image)
    assert status == 400 and "pixels" in got["error"]
    monkeypatch.setattr(site["app"], "max_upload", 64)
    status, got = upload(site, "large.png", image)
    assert status == 413 and "larger than this page takes" in got["error"]


def test_histogram_of_scores_against_the_held_out_ones(site):
    body = json.dumps({"scores": [-0.9, -0.5, 0.1]}).encode()
    status, kind, png = request(site, "POST", "/api/histogram", body)
    assert status == 200 and kind == "image/png" and png.startswith(PNG)
    status, _, err = request(site, "POST", "/api/histogram", b"[1, 2")
    assert status == 400 and b"scores" in err


def test_reports_are_browsable(site):
    status, _, listing = request(site, "GET", "/reports/0/")
    assert status == 200 and b'href="report.md"' in listing
    assert b'src="plots/heldout_hist.png"' in listing and b"weights.safetensors" not in listing
    status, kind, page = request(site, "GET", "/reports/0/report.md")
    assert status == 200 and kind.startswith("text/html")
    assert b"<table>" in page and b'<img src="plots/heldout_hist.png"' in page
    status, kind, png = request(site, "GET", "/reports/0/plots/heldout_hist.png")
    assert status == 200 and kind == "image/png" and png.startswith(PNG)
    status, _, page = request(site, "GET", "/reports/1/attack.md")
    assert status == 200 and b"<td" in page and b"91.5" in page
    status, _, _ = request(site, "GET", "/reports/1")
    assert status == 301


@pytest.mark.parametrize(
    "path",
    [
        "/reports/1/../secret.txt",
        "/reports/1/%2e%2e/secret.txt",
        "/reports/1/..%2fsecret.txt",
        "/reports/1/%2e%2e%2fsecret.txt",
        "/reports/1/link.txt",  # a symlink out of the folder
        "/reports/1/.hidden.txt",
        "/reports/1//etc/hostname",
        "/reports/1/%2fetc%2fhostname",
        "/reports/0/weights.safetensors",  # inside, but not a type the page shows
        "/reports/7/",
    ],
)
def test_paths_outside_a_report_folder_are_refused(site, path):
    status, _, body = request(site, "GET", path)
    assert status == 404 and b"SECRET" not in body and b"hidden" not in body


def test_requests_for_another_host_name_are_refused(site):
    status, _, _ = request(site, "GET", "/api/detector", headers={"Host": "evil.example:80"})
    assert status == 400


def test_serve_command_errors(site, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "none")]) == 2
    assert "not a firmad detector" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", str(site["tmp"] / "det"), "--port", port]) == 2
    assert f"port {port} is in use" in capsys.readouterr().err
