"""Requests from this server's own site only: a ``Host`` check against DNS rebinding and an ``Origin`` check
against cross-site posts from the pages a user visits."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def _host_name(host: str) -> str:
    """The name or address of a ``Host`` header without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host


class SameSiteOnly:
    """ASGI middleware answering 403 to requests whose ``Host`` is not this server's (DNS rebinding) or whose
    ``Origin`` is another site's (cross-site posts from pages the user visits).

    Allowed hosts: the address the connection reached, ``localhost``, ``127.0.0.1``, ``::1`` (any port) and
    ``allowed_hosts`` (a name, or ``name:port``; ``*`` allows any). An ``Origin``, when sent, must be the
    server's own (``scheme://Host``) or one of ``allowed_origins`` (``*`` allows any).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = {"localhost", "127.0.0.1", "::1"} | {_host_name(h) if h.startswith("[") else h.strip().lower()
                                                          for h in allowed_hosts}  # fmt: skip
        self.origins = {o.strip().lower().rstrip("/") for o in allowed_origins}

    def refusal(self, scope: Scope) -> str | None:
        """Why the request is refused, or None."""
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host = headers.get("host", "").strip().lower()
        bound = (scope.get("server") or ("",))[0] or ""
        if "*" not in self.hosts and not ({_host_name(host), host} & (self.hosts | {str(bound).lower()})):
            return f"Host {host or '(none)'!r} is not this server's; start it with --allowed-host to serve that name"
        origin = headers.get("origin")
        if origin is not None and "*" not in self.origins:
            origin = origin.strip().lower().rstrip("/")
            if origin != f"{scope.get('scheme', 'http')}://{host}" and origin not in self.origins:
                return f"cross-site request from {origin!r} refused; start the server with --allowed-origin to allow it"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.refusal(scope)
            if problem is not None:
                await JSONResponse({"detail": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
