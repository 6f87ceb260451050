"""The playground page's static files (HTML, JS, CSS shipped in the package under `playground/`, no
build step, no CDN) as HTTP responses with a strict Content-Security-Policy: scripts and styles only from
this server, no inline script, images only from this server or `data:`/`blob:` URLs, no framing (a
preference click must not be clickjacked). Only the files listed in `ASSETS` are served: the name in the
URL never reaches the filesystem. Never imports ray.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi.responses import Response

from diffray.errors import RequestError

ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return resources.files("diffray.serve").joinpath("playground", name).read_bytes()


def asset(name: str) -> Response:
    """One playground file. Raises RequestError 404 for any other name."""
    if name not in ASSETS:
        raise RequestError("no such playground file", status=404, kind="not_found_error")
    return Response(_read(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)
