"""An HTTP(S) server on any loopback address that records what reaches it, for the fetch-policy tests.

    with Recorder("127.0.0.2") as server:     # a second loopback address: "another host"
        server.files["/a.png"] = png_bytes
        server.redirects["/r"] = "http://127.0.0.1:8000/x"
        server.seen                            # [(path, Host header, Authorization header), ...]

Linux routes all of 127.0.0.0/8 to loopback, so 127.0.0.2 is a host the policy tells from 127.0.0.1.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OTHER_HOST = "127.0.0.2"


class Recorder:
    """An HTTP(S) server on `host` that serves `files`, answers `redirects` with a 302, and records every
    request's (path, Host header, Authorization header)."""

    def __init__(self, host: str = OTHER_HOST, tls: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.seen: list[tuple[str, str | None, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                recorder.seen.append((self.path, self.headers.get("Host"), self.headers.get("Authorization")))
                if self.path in recorder.redirects:
                    self.send_response(302)
                    self.send_header("Location", recorder.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = recorder.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://{host}:{self.port}"

    def __enter__(self) -> Recorder:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
