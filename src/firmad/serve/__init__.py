"""`firmad serve`: a local web page to score images with a detector and browse reports.

Python's own ``http.server``, one HTML page with a little JavaScript, and markdown-it-py for
reports: nothing to install. A web server all the same, hardened as one:

- ``app``: the routes (``App``): the page and its script, ``/api/detector``, ``POST
  /api/score`` (one image file as the body, its name in ``X-Filename``) -> score, p-value and
  decision, ``POST /api/histogram`` (``{"scores": [...]}`` -> PNG), ``/reports/N/PATH`` (a file
  of the N-th report folder, Markdown rendered, a folder listed). Uploads: the image formats
  firmad documents only, capped in bytes and pixels; report files: regular files inside the
  named folders only (no ``..``, no symlink out, no hidden file, no FIFO), plain types only.
- ``pages``: Markdown with raw HTML off and links / images restricted to the report's own
  files; listings whose links are relative ``./`` paths; every name escaped; a strict
  Content-Security-Policy (no script in a report page, no external image anywhere).
- ``server``: the HTTP side: the Host check on a loopback address (by the address bound, any
  loopback form), POSTs only with the page's per-session token and a same-origin ``Origin``,
  socket timeouts, every malformed request a 4xx and a closed connection no traceback.
"""

from firmad.serve.app import MAX_JSON, MAX_PIXELS, MAX_UPLOAD, App, Response
from firmad.serve.server import make_server, serve, url_of

__all__ = [
    "MAX_JSON",
    "MAX_PIXELS",
    "MAX_UPLOAD",
    "App",
    "Response",
    "make_server",
    "serve",
    "url_of",
]
