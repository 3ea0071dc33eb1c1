"""The HTTP side of the page: who may ask, how long a connection may take, what every request
gets back (a reply, never a traceback)."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import re
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from firmad.detector import OneClassDetector
from firmad.errors import InputError
from firmad.serve.app import MAX_JSON, App, Response, error

log = logging.getLogger("firmad.serve")

TIMEOUT_S = 30  # a connection silent this long is closed (half-open clients hold no thread)
TOKEN_HEADER = "X-Firmad-Token"
# A closed or silent connection: the client went away, nothing to report.
_GONE = (ConnectionError, TimeoutError)


def is_loopback(address: str) -> bool:
    """Whether an IP address is this computer (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def host_name(header: str | None) -> str:
    """The host of a Host header, without port or brackets, lower case."""
    host = (header or "").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Handler(BaseHTTPRequestHandler):
    server_version = "firmad"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive
    timeout = TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self._host_ok():
            self._reply(self._call(self.server.app.get, self.path))

    def do_POST(self) -> None:  # noqa: N802
        if not (self._host_ok() and self._same_origin()):
            return
        length = self.headers.get("Content-Length") or ""
        if not re.fullmatch(r"[0-9]{1,15}", length):  # ASCII digits only ("²" is a digit too)
            self._reply(error("send the file with a Content-Length", 411))
            return
        cap = MAX_JSON if self.path.startswith("/api/histogram") else self.server.app.max_upload
        if int(length) > cap:
            self._drain(int(length))  # read it so the client sees the answer, not a reset
            self._reply(error(f"the upload is larger than this page takes ({_size(cap)})", 413))
            return
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            return  # the client went away mid-upload
        self._reply(self._call(self.server.app.post, self.path, self.headers, body))

    def _host_ok(self) -> bool:
        """On a loopback address, answer only requests addressed to this computer (by name or
        by a loopback address): a page of another site renamed to 127.0.0.1 (DNS rebinding)
        carries its own name."""
        if not self.server.loopback:
            return True
        host = host_name(self.headers.get("Host"))
        if host == "localhost" or is_loopback(host):
            return True
        self._reply(error("requests must be addressed to 127.0.0.1 or localhost", 400))
        return False

    def _same_origin(self) -> bool:
        """A POST comes from the page itself: it carries the page's per-session token (no other
        site can read it) and, when the browser names an Origin, this server's own."""
        token = self.headers.get(TOKEN_HEADER) or ""
        origin = self.headers.get("Origin")
        own = f"http://{self.headers.get('Host') or ''}".lower()
        if hmac.compare_digest(token.encode(), self.server.app.token.encode()) and (
            origin is None or origin.lower() == own
        ):
            return True
        self._reply(error("this page's requests only: reload the page and try again", 403))
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
            log.error("internal error on %s:\n%s", self.path[:200], traceback.format_exc())
            return error("internal error; the server's terminal shows the traceback", 500)

    def _reply(self, r: Response) -> None:
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
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
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, _Handler)
        # the address bound decides (127.1, 127.0.0.2, ::ffff:127.0.0.1 and ::1 are this
        # computer too), not how --host was written
        self.loopback = is_loopback(self.server_address[0])

    def handle_error(self, request, client_address) -> None:
        """A client that went away is no error; anything else is logged, not printed."""
        err = sys.exc_info()[1]
        if isinstance(err, _GONE):
            log.debug("connection from %s closed: %s", client_address, err)
        else:
            log.error("error on a connection from %s:\n%s", client_address,
                      traceback.format_exc())  # fmt: skip


def make_server(app: App, host: str = "127.0.0.1", port: int = 8765) -> _Server:
    """An HTTP server for the page (not yet serving); port 0 picks a free port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port {port!r}: give a port from 1 to 65535 (0 picks a free one)")
    try:
        return _Server((host, port), app)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} is in use; choose another with --port (0 picks a free one)"
            ) from None
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    except (OverflowError, ValueError, UnicodeError) as err:
        raise InputError(f"cannot listen on {host}:{port} ({err})") from None


def url_of(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(detector_dir, host="127.0.0.1", port=8765, reports=(), open_browser=False, say=print):
    """Serve the page until Ctrl-C."""
    app = App(OneClassDetector.load(detector_dir), Path(detector_dir), reports)
    server = make_server(app, host, port)
    url = url_of(server)
    if not server.loopback:
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
