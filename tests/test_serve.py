"""`firmad serve`: the page's routes through a real HTTP server on an ephemeral local port."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import quote

import numpy as np
import pytest

from firmad import serve
from firmad.cli import main
from firmad.errors import InputError
from firmad.inputs import load_folder_images
from firmad.report_detector import write_fit_report
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
    (attack / "sub").mkdir()
    (attack / "sub" / "notes.txt").write_text("in a sub-folder")
    os.mkfifo(attack / "pipe.txt")  # a GET of it would block a thread forever
    (attack / "javascript:alert(document.domain).png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (attack / "beacon.md").write_text(
        "# Beacon\n\n![a](https:evil.example?beacon) ![b](http://evil.example/b.png)\n\n"
        "[Download](https:evil.example) <https://evil.example/x> [up](../secret.txt)\n\n"
        "[mine](attack.md) ![plot](sub/p.png) <img src=x onerror=alert(1)>\n"
    )
    app = serve.App(det, tmp / "det", [attack])
    server = serve.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"det": det, "tmp": tmp, "app": app, "port": server.server_address[1], "split": split}
    server.shutdown()
    server.server_close()


def request(site, method, path, body=None, headers=None, token=True):
    """A raw request (http.client sends the path as given: no '..' clean-up on the way); a
    POST carries the page's token unless ``token`` is False."""
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=60)
    headers = dict(headers or {})
    if method == "POST" and token:
        headers.setdefault("X-Firmad-Token", site["app"].token)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def raw(port, data: bytes, host="127.0.0.1") -> bytes:
    """Send bytes as they are; the server's answer (b"" if it closed without one)."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


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
    # a report link opens the report, not a file listing
    assert [r["url"] for r in info["reports"]] == ["/reports/0/report.md", "/reports/1/attack.md"]
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
    from firmad.metrics import conformal_p_values

    assert got["p_value"] == pytest.approx(conformal_p_values(det.heldout_scores_, [expected])[0])


def test_bad_uploads_are_clear_errors_not_500(site, monkeypatch):
    status, got = upload(site, "notes.txt", b"not an image at all")
    assert status == 400 and got["error"].startswith("notes.txt: not an image firmad can read")
    status, got = upload(site, "broken.png", PNG + b"\x00" * 40)
    assert status == 400 and "broken.png" in got["error"]
    status, got = upload(site, "empty.png", b"")
    assert status == 400 and "empty" in got["error"]
    image = (site["tmp"] / "train" / "0.png").read_bytes()
    monkeypatch.setattr(site["app"], "max_pixels", 100)
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
    assert status == 200 and b'href="./report.md"' in listing
    assert b'src="./plots/heldout_hist.png"' in listing and b"weights.safetensors" not in listing
    status, kind, page = request(site, "GET", "/reports/0/report.md")
    assert status == 200 and kind.startswith("text/html")
    assert b"<table>" in page and b'<img src="plots/heldout_hist.png"' in page
    status, kind, png = request(site, "GET", "/reports/0/plots/heldout_hist.png")
    assert status == 200 and kind == "image/png" and png.startswith(PNG)
    status, _, page = request(site, "GET", "/reports/1/attack.md")
    assert status == 200 and b"<td" in page and b"91.5" in page
    status, _, _ = request(site, "GET", "/reports/1")
    assert status == 301


def test_a_sub_folder_without_its_slash_redirects_to_it(site):
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=60)
    conn.request("GET", "/reports/1/sub")
    resp = conn.getresponse()
    assert resp.status == 301 and resp.getheader("Location") == "/reports/1/sub/"
    conn.close()
    status, _, listing = request(site, "GET", "/reports/1/sub/")
    assert status == 200 and b'href="./notes.txt"' in listing


def test_listings_link_files_as_relative_paths_only(site):
    status, _, listing = request(site, "GET", "/reports/1/")
    assert status == 200 and b"javascript:alert" in listing  # the name, shown as text
    assert b'href="javascript' not in listing and b'src="javascript' not in listing
    assert b'href="./javascript%3Aalert%28document.domain%29.png"' in listing


def test_markdown_keeps_only_links_to_the_reports_own_files(site):
    status, _, page = request(site, "GET", "/reports/1/beacon.md")
    assert status == 200
    assert b"evil.example" in page  # as text
    for bad in (b'src="http', b'src="https', b'href="http', b'href="https', b"<img src=x",
                b'href="../'):  # fmt: skip
        assert bad not in page
    assert b'href="attack.md"' in page and b'src="sub/p.png"' in page
    _, _, headers = _head(site, "/reports/1/beacon.md")
    assert "img-src 'self'" in headers["Content-Security-Policy"]
    assert "script-src" not in headers["Content-Security-Policy"]  # no script in a report


def test_a_score_report_of_hostile_file_names_stays_text(site, tmp_path):
    from firmad.report_detector import Scored, write_score_report

    names = ["![a](https:evil.example?beacon).png", "[Download](https:evil.example).png"]
    scores = site["det"].decision_function(site["split"].test_images[:2])
    write_score_report(site["det"], Scored(names, scores), tmp_path / "rep")
    app = serve.App(site["det"], site["tmp"] / "det", [tmp_path / "rep"])
    page = app.get("/reports/1/report.md").body
    assert b"evil.example" in page and b'src="https' not in page and b'href="https' not in page


def _head(site, path):
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Content-Type"), dict(resp.getheaders())
    finally:
        conn.close()


def test_the_page_runs_only_its_own_script(site):
    status, _, headers = _head(site, "/")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    status, kind, js = request(site, "GET", "/page.js")
    assert status == 200 and kind.startswith("text/javascript") and b"X-Firmad-Token" in js
    _, _, page = request(site, "GET", "/")
    assert site["app"].token.encode() in page and b"<script>" not in page


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"Origin": "http://evil.com", "Content-Type": "text/plain"}, False),  # cross-site form
        ({"Content-Type": "text/plain"}, False),  # no token
        ({"X-Firmad-Token": "guess"}, False),
        ({"Origin": "http://evil.com"}, True),  # the token, from another origin
        ({"Origin": "null"}, True),
    ],
)
def test_posts_need_the_page_token_and_its_origin(site, headers, token):
    image = (site["tmp"] / "train" / "0.png").read_bytes()
    status, _, body = request(site, "POST", "/api/score", image, headers, token=token)
    assert status == 403 and b"reload the page" in body
    origin = {"Origin": f"http://127.0.0.1:{site['port']}"}
    status, _, _ = request(site, "POST", "/api/score", image, origin)
    assert status == 200


@pytest.mark.parametrize("host", ["127.1", "127.0.0.2", "::ffff:127.0.0.1", "::1"])
def test_the_host_check_follows_the_address_bound(site, host):
    try:
        server = serve.make_server(site["app"], host, 0)
    except InputError as err:
        pytest.skip(f"cannot listen on {host} here: {err}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bound, port = server.server_address[:2]
        assert server.loopback
        evil = raw(port, b"GET /api/detector HTTP/1.0\r\nHost: evil.example\r\n\r\n", bound)
        assert evil.startswith(b"HTTP/1.0 400")
        good = raw(port, f"GET /api/detector HTTP/1.0\r\nHost: {url_host(bound)}:{port}\r\n\r\n"
                   .encode(), bound)  # fmt: skip
        assert good.startswith(b"HTTP/1.0 200")
    finally:
        server.shutdown()
        server.server_close()


def url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
        ("a.ps", b"%!PS-Adobe-3.0\nshowpage\n"),
        ("a.ppm", b"P6\n2 2\n255\n" + bytes(12)),  # Pillow reads it, firmad does not document it
    ],
)
def test_uploads_take_only_the_documented_image_formats(site, name, data):
    status, got = upload(site, name, data)
    assert status == 400 and "use PNG, JPEG, BMP, TIFF, WebP or GIF" in got["error"]
    assert "Ghostscript" not in got["error"]


def test_a_silent_connection_is_closed(site, monkeypatch):
    monkeypatch.setattr(serve.server._Handler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", site["port"]), timeout=30) as s:
        s.sendall(b"POST /api/score HTTP/1.0\r\n")  # half a request, then nothing
        start = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < 20
    assert request(site, "GET", "/api/detector")[0] == 200


def test_listings_and_gets_serve_regular_files_only(site):
    _, _, listing = request(site, "GET", "/reports/1/")
    assert b"pipe.txt" not in listing
    start = time.monotonic()
    status, _, _ = request(site, "GET", "/reports/1/pipe.txt")
    assert status == 404 and time.monotonic() - start < 10


MALFORMED = {
    "a 5000-digit folder number": b"GET /reports/" + b"9" * 5000 + b"/ HTTP/1.0\r\n\r\n",
    "a name too long": b"GET /reports/1/" + b"a" * 3000 + b".md HTTP/1.0\r\n\r\n",
    "a name with NUL": b"GET /reports/1/a%00.md HTTP/1.0\r\n\r\n",
    "a unicode digit": "GET /reports/\u0663/ HTTP/1.0\r\n\r\n".encode(),
    "Content-Length ²": b"POST /api/histogram HTTP/1.0\r\nContent-Length: \xb2\r\n\r\n",
    "Content-Length -1": b"POST /api/histogram HTTP/1.0\r\nContent-Length: -1\r\n\r\n",
    "no Content-Length": b"POST /api/score HTTP/1.0\r\n\r\n",
    "an unknown route": b"POST /api/nope HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
}
for _text in (b"[Infinity]", b"[NaN]", b"[-Infinity]", b"[1e308]", b"[-1e308]", b"[1e400]",
              b"[true]", b"[" + b"9" * 5000 + b"]", b"[[1]]", b'"abc"'):  # fmt: skip
    MALFORMED[f"histogram {_text[:12]!r}"] = b'{"scores": ' + _text + b"}"
MALFORMED["histogram 100k-deep"] = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_request_is_a_4xx_without_traceback(site, case, caplog):
    data = MALFORMED[case]
    if not data.startswith((b"GET", b"POST")):  # a histogram body
        head = "POST /api/histogram HTTP/1.0\r\nContent-Length: {}\r\n{}: {}\r\n\r\n"
        data = head.format(len(data), "X-Firmad-Token", site["app"].token).encode() + data
    elif data.startswith(b"POST"):
        data = data.replace(b"\r\n", f"\r\nX-Firmad-Token: {site['app'].token}\r\n".encode(), 1)
    with caplog.at_level(logging.DEBUG, logger="firmad.serve"):
        answer = raw(site["port"], data)
    assert answer[9:10] == b"4", answer[:200]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_client_that_goes_away_is_no_traceback(site, caplog, capfd):
    with caplog.at_level(logging.DEBUG, logger="firmad.serve"):
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", site["port"]))
            s.sendall(b"GET /reports/0/plots/heldout_hist.png HTTP/1.0\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            s.close()  # a reset before the answer is read
        head = f"POST /api/score HTTP/1.0\r\nX-Firmad-Token: {site['app'].token}\r\n"
        with socket.create_connection(("127.0.0.1", site["port"])) as s:
            s.sendall(head.encode() + b"Content-Length: 100000\r\n\r\nabc")
        time.sleep(1.0)
        assert request(site, "GET", "/api/detector")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


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


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_ports_out_of_range_are_usage_errors(site, port, capsys):
    assert main(["serve", str(site["tmp"] / "det"), "--port", port]) == 2
    assert "--port" in capsys.readouterr().err
    with pytest.raises(InputError, match="from 1 to 65535"):
        serve.make_server(site["app"], "127.0.0.1", int(port))


def test_serve_command_errors(site, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "none")]) == 2
    assert "not a firmad detector" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", str(site["tmp"] / "det"), "--port", port]) == 2
    assert f"port {port} is in use" in capsys.readouterr().err
