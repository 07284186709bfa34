"""What the edge's handlers share: reading a request safely and answering with a page.

Used by the tracking service (:mod:`nurture.engagement.tracking`) and the capture
endpoints (:mod:`nurture.engagement.capture`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
import json
from functools import lru_cache
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse

NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
STYLE = (
    "body{margin:0;background:#f4f5f7;color:#1f2328;"
    "font:16px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif}"
    "main{max-width:34rem;margin:4rem auto;padding:2rem 2.25rem;background:#fff;"
    "border-radius:10px;box-shadow:0 1px 4px rgba(0,0,0,.08)}"
    "h1{font-size:1.35rem;margin:0 0 1rem}p{margin:.75rem 0}"
    "fieldset{border:1px solid #d0d7de;border-radius:8px;margin:1.25rem 0;padding:.75rem 1rem}"
    "legend{padding:0 .35rem;color:#57606a;font-size:.9rem}"
    "button{font:inherit;padding:.6rem 1.3rem;border:0;border-radius:6px;"
    "background:#0969da;color:#fff;cursor:pointer}button:hover{background:#0550ae}"
    ".muted{color:#57606a;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
PAGE_HEADERS = {
    **NO_CACHE,
    # No script can run, nothing loads from elsewhere, the form posts only to us.
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@lru_cache(maxsize=4096)
def _internal(host: str) -> bool:
    """Whether a peer address is loopback or private (a reverse proxy of ours)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private


def client_ip(request: Request, forwarded: str) -> str:
    """The client address: the first X-Forwarded-For hop when the direct peer is a local
    proxy (loopback or private address), else the peer itself (a header is not trusted)."""
    peer = request.client.host if request.client else ""
    if forwarded and peer and _internal(peer):
        first = forwarded.split(",", 1)[0].strip()
        try:
            return str(ipaddress.ip_address(first))
        except ValueError:
            pass
    return peer


PURPOSE_HEADERS = frozenset({b"purpose", b"sec-purpose", b"x-purpose", b"x-moz"})


def request_meta(request: Request) -> dict[str, Any]:
    """What the classifier weighs: user agent, client address, method, prefetch hint.

    One pass over the raw headers (this runs on every open and click).
    """
    agent = b""
    forwarded = b""
    prefetch = False
    for name, value in request.scope["headers"]:
        if name == b"user-agent":
            agent = value
        elif name == b"x-forwarded-for":
            forwarded = forwarded or value
        elif name in PURPOSE_HEADERS:
            lowered = value.lower()
            prefetch = prefetch or b"prefetch" in lowered or b"preview" in lowered
    return {
        "user_agent": storable(agent[:255].decode("latin-1")),
        "ip": client_ip(request, forwarded.decode("latin-1")),
        "method": request.method,
        "prefetch": prefetch,
    }


def storable(value: str) -> str:
    """``value`` without NUL characters, which a database refuses."""
    # Headers are latin-1 decoded, so no surrogates; NUL is the only thing a database refuses.
    return value.replace("\x00", "") if "\x00" in value else value


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body in chunks, refusing with 413 as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "bad Content-Length")
        if int(declared) > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(raw: bytes) -> Any:
    """The parsed JSON of a body, or a 400 that says what is wrong with it."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise HTTPException(400, "body JSON is nested too deeply") from exc


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    """A small self-contained HTML page: inline style under a strict CSP, no script."""
    doc = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
    return HTMLResponse(doc, status_code=status, headers=PAGE_HEADERS)


def invalid_link_page() -> HTMLResponse:
    """The 404 page for a link whose token does not verify."""
    return page(
        "Link not valid",
        "<h1>This link is not valid</h1><p>It may have been copied incompletely. "
        "Please use the unsubscribe link in the email you received.</p>",
        status=404,
    )
