"""The HTTP edge of the ingress: body-size cap and bearer-key auth (one ASGI middleware), and exception
handlers that give every error OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`.

A bad request is always a 4xx naming the field; nothing a client sends may produce a 5xx. Auth is default
deny: every path needs the key except the few public ones (`PUBLIC_PATHS`: health, the playground page
and its assets, the API docs), wherever the app is mounted. Every message leaving the server goes through
`public_message`, which removes server paths, object reprs and tensor dumps that a library may have put
in an exception. Never imports ray (the ingress deployment maps Ray's errors onto `RequestError` before
they get here).
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffray.errors import RequestError
from diffray.serve.schemas import error_body

PUBLIC_PATHS = ("/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json")
PUBLIC_PREFIXES = ("/playground/",)  # the page's static assets
SINGLE_HEADERS = ("authorization", "content-length", "content-type")  # a second copy is refused
MAX_MESSAGE_CHARS = 400
_SCRUB = [  # (pattern, replacement): what a library's exception text may carry that a client must not see
    (re.compile(r"tensor\((?:[^()]|\([^()]*\))*\)", re.S), "<tensor>"),
    (re.compile(r"<[^<>]{0,200}? at 0x[0-9a-fA-F]+>"), "<object>"),
    (re.compile(r"0x[0-9a-fA-F]{6,}"), "<address>"),
]
_TOKEN = re.compile(r"[^\s'\"`(),;]+")
_API_PATH = re.compile(r"/(?:v1/[A-Za-z0-9/._-]*|healthz|docs|openapi\.json|playground/[a-z.]*)[.:]?")


def _looks_like_path(token: str) -> bool:
    """A filesystem path or URL in a message (but not one of our own API routes)."""
    if _API_PATH.fullmatch(token):
        return False
    seps = token.count("/") + token.count("\\")
    return seps >= 2 or (seps >= 1 and token.startswith(("/", "~", "./", "../"))) \
        or re.match(r"[A-Za-z]:\\", token) is not None


def public_message(message: str) -> str:
    """A message safe to show a client: no server paths, object reprs, addresses or tensors; bounded."""
    for pattern, repl in _SCRUB:
        message = pattern.sub(repl, message)
    message = _TOKEN.sub(lambda m: "<path>" if _looks_like_path(m.group()) else m.group(), message)
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@dataclass
class EdgePolicy:
    """What the middleware enforces; set by the ingress replica from its args."""

    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 4_000_000
    body_bytes_by_path: dict[str, int] = field(default_factory=dict)  # another cap for these app paths

    def body_cap(self, scope) -> int:
        return self.body_bytes_by_path.get(app_path(scope), self.max_body_bytes)


def json_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
               headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(public_message(message), param, kind), status_code=status, headers=headers)


def app_path(scope) -> str:
    """The request path inside the app: without the mount point (`root_path`) when the server includes it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def key_ok(header: str | None, keys: list[str]) -> bool:
    """A `Bearer <key>` header matching one of `keys` (constant-time compare)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    token_b = token.strip().encode()
    return any(hmac.compare_digest(token_b, k.encode()) for k in keys)


class EdgeMiddleware:
    """ASGI middleware: 413 above the body cap (Content-Length or counted), 401 without a valid key."""

    def __init__(self, app, policy: EdgePolicy):
        self.app, self.policy = app, policy

    def refusal(self, scope, pairs: list[tuple[str, str]]) -> JSONResponse | None:
        """The answer to a request refused on its headers alone (None: let it through)."""
        repeated = next((h for h in SINGLE_HEADERS if sum(k == h for k, _ in pairs) > 1), None)
        if repeated is not None:  # which copy would a proxy or the app believe? refuse to guess
            return json_error(400, f"the {repeated} header appears more than once", repeated)
        if self.policy.api_keys and not is_public(app_path(scope)) \
                and not key_ok(dict(pairs).get("authorization"), self.policy.api_keys):
            return json_error(401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                              "authorization", "invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        refused = self.refusal(scope, pairs)
        if refused is not None:
            return await refused(scope, receive, send)
        headers = dict(pairs)
        cap = self.policy.body_cap(scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return await self._too_large(scope, receive, send, int(declared))
        if declared in ("", "0") and "transfer-encoding" not in headers:  # HTTP/1.1: no body (a GET)
            # Nothing to cap, so the body is never asked for: under Serve every receive() is an actor call
            # back to the proxy (2.5 ms per GET here, BENCHMARKS.md)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # buffer the (capped) body so an undeclared oversize body is refused too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return await self._too_large(scope, receive, send, size)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size: int):
        resp = json_error(413, f"request body of {size} bytes exceeds the limit of {self.policy.body_cap(scope)}",
                          "body", "request_too_large")
        await resp(scope, receive, send)


def _param(loc: tuple) -> str | None:
    parts = [str(x) for x in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_message(err: dict) -> str:
    if err.get("type") == "json_invalid":
        return f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    if err.get("type") == "missing":
        return "field required"
    msg = str(err.get("msg", "invalid value"))
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def install_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON shape; validation errors as 400 naming the first bad field."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
        first = errors[0]
        param = "body" if first.get("type") == "json_invalid" else _param(tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return json_error(400, validation_message(first) + more, param)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        headers = {"Retry-After": str(exc.retry_after)} if getattr(exc, "retry_after", None) is not None else None
        return json_error(exc.status, exc.message, exc.param, exc.kind, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return json_error(exc.status_code, detail, "body" if exc.status_code == 400 else None, kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug, never the client's input
        return json_error(500, f"internal error: {type(exc).__name__}", None, "server_error")
