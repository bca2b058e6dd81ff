"""The server's connections (``make_server``): the deadlines uvicorn lacks (a request head within
``header_timeout_s``, a body within ``body_timeout_s``), a cap on open connections (the oldest one still
waiting for a request head makes room), a listen backlog that bounds a flood's burst, and a log that a flood
of broken connections cannot grow (one summary at most once a minute)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from perceive.serve.limits import Limits

BODY_GRACE_S = 2.0  # the connection-level body deadline trails the API's 408 so that the 408 is seen first
FILE_HANDLE_RESERVE = 128  # file handles kept for the model, logs and temporary files beside the connections
LOG_EVERY_S = 60.0
# asyncio accepts up to the listen backlog per loop tick, and a few ticks pass before a connection can be refused
# or make room: the backlog bounds that burst (uvicorn's default, 2048, would let thousands of handles through)
ACCEPT_BACKLOG = 128
ACCEPT_BURST = 4 * ACCEPT_BACKLOG  # file handles a connection flood holds beyond the cap, as measured
log = logging.getLogger("perceive.serve")


class _ConnectionGuard:
    """What a server's connections share: those waiting for a request head (oldest first), and the count of
    connections closed for being slow or over the cap, logged as one summary at most once a minute."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.waiting: OrderedDict[GuardedH11Protocol, None] = OrderedDict()
        self.closed: Counter[str] = Counter()
        self.last_report = -LOG_EVERY_S
        self.report_due: asyncio.TimerHandle | None = None

    def count(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        self.closed[reason] += 1
        if self.report_due is None:
            delay = max(0.0, self.last_report + LOG_EVERY_S - time.monotonic())
            self.report_due = loop.call_later(delay, self.report)

    def report(self) -> None:
        self.report_due, self.last_report = None, time.monotonic()
        what = ", ".join(f"{reason}: {n}" for reason, n in self.closed.most_common())
        log.warning("closed %d connection(s) since the last report (%s)", sum(self.closed.values()), what)
        self.closed.clear()


_REFUSED_BODY = b'{"detail": "too many open connections; try again shortly"}'
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
           b"content-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))  # fmt: skip


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the deadlines uvicorn lacks: the request head within
    ``header_timeout_s`` of the connection (or of the previous response), the body within ``body_timeout_s``
    of the head; and at most ``max_connections`` open, the oldest one waiting for a request head closed to
    make room for a new one. Subclassed per server by :func:`guarded_protocol`, which sets ``guard``."""

    guard: _ConnectionGuard
    _phase: str | None = None  # "head": waiting for a request head; "body": for the rest of a body; None: neither
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.limits.max_connections:
            if self.guard.waiting:
                oldest, _ = self.guard.waiting.popitem(last=False)
                oldest.drop("over the connection cap (the oldest waiting for a request head)")
            else:  # every connection is in a request: this one is refused
                transport.write(REFUSED)
                self.drop("over the connection cap (refused with 503)")
                return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def drop(self, reason: str) -> None:
        """Closes the connection and counts it, without a log line of its own."""
        self._enter(None)
        if not self.transport.is_closing():
            self.transport.close()
            self.guard.count(reason, self.loop)

    def _watch(self) -> None:
        """Sets the deadline of the phase the client is in; a phase keeps the deadline it started with."""
        if self.transport.is_closing():
            self._enter(None)
        elif self.conn.their_state is h11.IDLE:
            self._enter("head")
        elif self.conn.their_state is h11.SEND_BODY:
            self._enter("body")
        else:  # the request is complete: the app's own time limit applies
            self._enter(None)

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.waiting.pop(self, None)
        self._phase = phase
        limits = self.guard.limits
        if phase == "head":
            self.guard.waiting[self] = None
            self._deadline = self.loop.call_later(limits.header_timeout_s, self.drop, "slow request head")
        elif phase == "body":
            self._deadline = self.loop.call_later(limits.body_timeout_s + BODY_GRACE_S, self.drop, "slow request body")


def guarded_protocol(limits: Limits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class of its own for one server (its connections share one guard)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": _ConnectionGuard(limits)})


class _OncePerMinute(logging.Filter):
    """Lets each distinct message through at most once a minute, saying how many like it were held back:
    a flood of broken connections must not grow the log."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}
        self.held: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key, now = str(record.msg), time.monotonic()
        if now - self.last.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
            self.held[key] += 1
            return False
        self.last[key] = now
        if self.held[key]:
            record.msg, record.args = f"{record.getMessage()} ({self.held.pop(key)} more like it not logged)", ()
        return True


def _file_handles_for(max_connections: int) -> int:
    """The connection cap that the process's file-handle limit allows, raising the soft limit if it is lower.

    A server holds up to the cap plus ``ACCEPT_BURST``: a connection flood's newest connections are accepted a
    backlog at a time before the cap can close the oldest ones."""
    try:
        import resource
    except ImportError:  # not on Unix: nothing to check
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + ACCEPT_BURST + FILE_HANDLE_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        allowed = max(1, soft - ACCEPT_BURST - FILE_HANDLE_RESERVE)
        log.warning("the process may open %d files: serving at most %d connections, not %d", soft, allowed,
                    max_connections)  # fmt: skip
        return allowed
    return max_connections


def make_server(app: Any, host: str, port: int, limits: Limits, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of ``app`` with the connection limits of ``limits`` and a log that floods cannot grow."""
    limits = dataclasses.replace(limits, max_connections=_file_handles_for(limits.max_connections))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(limits),
                            backlog=ACCEPT_BACKLOG)  # fmt: skip
    for name in ("uvicorn.error", "asyncio"):  # uvicorn's per-connection warnings, asyncio's accept errors
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
            logger.addFilter(_OncePerMinute())
    return uvicorn.Server(config)
