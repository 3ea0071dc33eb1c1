"""HTML the server builds: rendered Markdown reports and folder listings, safe by construction.

Markdown is rendered by markdown-it-py with raw HTML off; a link or image is kept only when it
points to a file of the report itself (a relative path: no scheme, no host, no leading ``/``,
no ``..``, no ``\\``, no ``:``), so a report cannot load an external image (a beacon) or link
anywhere else; anything else stays text. Listings link each file as ``./NAME`` percent-encoded,
so a file named ``javascript:alert(1).png`` is a file, not a script. Every name is escaped.
"""

from __future__ import annotations

import html
from importlib import resources
from urllib.parse import quote, unquote, urlsplit

# Content-Security-Policy of the scoring page (its script and style are files of the server)
# and of report pages (no script at all); images only from the server itself.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
REPORT_CSP = (
    # inline styles: markdown-it aligns table columns with style attributes (no url can load:
    # img-src and default-src allow nothing outside)
    "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")


def static(name: str) -> bytes:
    """A file of the page (index.html, page.js, page.css), shipped with the package."""
    return resources.files("firmad.serve").joinpath("static", name).read_bytes()


def local_link(url: str) -> bool:
    """Whether a Markdown link or image URL points inside the report's own folder."""
    if not url or url.startswith(("/", "\\")) or "\\" in url or ":" in url:
        return False
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        return False
    path = unquote(parts.path)
    return ".." not in path.split("/") and "\\" not in path and ":" not in path


def render_markdown(text: str) -> str:
    """Markdown to HTML: tables, raw HTML off, links and images to the report's files only."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.validateLink = local_link  # others are rendered as the text they are
    return md.render(text)


def report_page(title: str, folder: int, body: str) -> bytes:
    """A report page: the navigation, then ``body`` (HTML built from escaped parts)."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><link rel='stylesheet' href='/page.css'></head>"
        f"<body class='report'><nav><a href='/'>scoring page</a> · "
        f"<a href='/reports/{int(folder)}/'>folder</a></nav>{body}</body></html>"
    ).encode()


def href(rel: str) -> str:
    """A link to a file below the current folder: ``./`` and percent-encoded, escaped."""
    return html.escape("./" + quote(rel, safe="/"))


def listing_body(name: str, rel_paths: list[str], truncated: bool) -> str:
    """A folder listing: reports first, then every file, then the images shown."""
    items = [f'<li><a href="{href(r)}">{html.escape(r)}</a></li>' for r in rel_paths]
    images = [
        f'<figure><img src="{href(r)}" alt="{html.escape(r)}">'
        f"<figcaption>{html.escape(r)}</figcaption></figure>"
        for r in rel_paths
        if r.lower().endswith(IMAGE_TYPES)
    ]
    more = "<p>(only the first files are listed)</p>" if truncated else ""
    return (
        f"<h1>{html.escape(name)}</h1><ul>{''.join(items)}</ul>{more}"
        f'<div class="plots">{"".join(images)}</div>'
    )
