"""The gunicorn worker `blip-backend serve` runs: gunicorn's threaded worker (gthread), with two changes.

1. **A lane of its own for the quick routes.** gthread hands every request to one pool of THREADS
   threads, first come first served. /predict holds its thread until the whole batch is done, and
   inference is serialised by the Predictor's lock, so with more /predict requests than threads every
   other request waits in the queue behind them: under 50 concurrent /predict, /health took longer than
   Label Studio's 1 s. Here the request line is peeked at (MSG_PEEK: nothing is consumed) before a
   request is queued, and the routes that never touch the model (`GET /health`, `GET /`,
   `GET /metrics`, `POST /setup`, `POST /webhook`) go to a small pool of their own. Anything else, and
   anything not recognised (an incomplete request line, TLS), goes to the THREADS pool as before.
2. **New connections refused as soon as shutdown begins.** On SIGTERM gunicorn stops accepting but keeps
   the listening socket open until the in-flight requests have finished (up to --graceful-timeout), so
   a client connecting meanwhile is accepted by the kernel and then left hanging until it is reset.
   This worker closes its listening sockets when it stops accepting: a new connection is refused at
   once (Label Studio reports the backend down and retries later), the requests in flight finish.

Imported by the gunicorn master (`--worker-class backend.server.worker.Worker`): this module must not
import the app or the model.
"""

from __future__ import annotations

import selectors
import socket
import time
from concurrent import futures
from functools import partial

from gunicorn.workers import gthread
from gunicorn.workers.gthread import ThreadWorker

QUICK_THREADS = 2
# (method, path) of the routes that answer without the model (see backend/server/app.py)
QUICK_ROUTES = {
    (b"GET", b"/"),
    (b"GET", b"/health"),
    (b"GET", b"/metrics"),
    (b"HEAD", b"/"),
    (b"HEAD", b"/health"),
    (b"POST", b"/setup"),
    (b"POST", b"/webhook"),
}
_PEEK = 512  # bytes of the request looked at: the request line
_NOT_YET = object()  # no byte of the request has arrived yet
# how long a new connection may take to send its first byte: what gthread allows (a thread waits this
# long, then the poller its keepalive)
_FIRST_BYTE_S = getattr(gthread, "DEFAULT_WORKER_DATA_TIMEOUT", 5.0)


def is_quick(head: bytes) -> bool:
    """Whether `head`, the start of an HTTP/1 request, is a complete request line for a quick route."""
    line, sep, _ = head.partition(b"\r\n")
    if not sep:
        line, sep, _ = head.partition(b"\n")
    parts = line.split(b" ")
    if not sep or len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return False
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    return (method, target) in QUICK_ROUTES


class Worker(ThreadWorker):
    def init_process(self) -> None:
        self.quick_pool = futures.ThreadPoolExecutor(QUICK_THREADS, thread_name_prefix="quick")
        super().init_process()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.quick_pool.shutdown(wait=False)

    def enqueue_req(self, conn) -> None:
        head = self._peek(conn)
        if head is _NOT_YET and hasattr(self, "pending_conns"):
            self._wait_for_data(conn)
            return
        # b"": the client closed the connection, nothing to wait for
        if not isinstance(head, bytes) or (head and not is_quick(head)):
            super().enqueue_req(conn)
            return
        # gthread submits to self.tpool; swapping it for the call keeps gthread's own bookkeeping
        # (the done-callback that returns the connection to the poller) whatever its version does
        main, self.tpool = self.tpool, self.quick_pool
        try:
            super().enqueue_req(conn)
        finally:
            self.tpool = main

    def _peek(self, conn) -> bytes | object | None:
        """The start of the connection's next request; b"" at its end; _NOT_YET; None: do not look."""
        if self.cfg.is_ssl or getattr(conn, "is_http2", False):
            return None  # encrypted or multiplexed: the THREADS pool, as before
        parser = getattr(conn, "parser", None)
        try:
            buffered = parser.unreader.buf.getvalue() if parser is not None else b""
        except AttributeError:
            buffered = b""
        if buffered:  # a pipelined request read ahead with the previous one
            return buffered[:_PEEK]
        try:
            return conn.sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return _NOT_YET
        except OSError:
            return None  # the THREADS pool reports it as gthread does

    def _wait_for_data(self, conn) -> None:
        """A connection accepted before its first bytes arrived: the poller calls enqueue_req again when
        they do (gthread's own path for connections deferred by a worker thread)."""
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + _FIRST_BYTE_S + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            # shutting down: close the listeners now, not after the graceful wait, so that new
            # connections are refused rather than queued where nobody will accept them
            for listener in self.sockets:
                listener.close()
