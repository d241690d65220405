"""A tiny HTTP server on 127.0.0.1 that serves files the way Label Studio and the web do, for tests.

    with FileServer() as server:
        server.files["/a.png"] = png_bytes             # any path, optionally with a query
        server.url("/a.png")                            # http://127.0.0.1:<port>/a.png

Label Studio's routes are imitated closely enough for the SDK's `get_local_path`: uploads through
`/storage-data/uploaded/?filepath=upload/<p>/<f>` (the SDK tries that first) and `/data/upload/...`,
Local Storage `/data/local-files/?d=...`, cloud presign `/tasks/<id>/presign/?fileuri=<b64>` (a 302 to
the file) and `/api/token/refresh/` for personal access tokens. Paths under those routes need
`Authorization: Token <legacy>` or `Bearer <access>`, like the real thing.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt

PROTECTED = ("/data/", "/storage-data/", "/tasks/")


def make_jwt(token_type: str, lifetime: float = 300) -> str:
    claims = {"token_type": token_type, "exp": int(time.time() + lifetime), "user_id": 1}
    return jwt.encode(claims, "a-test-secret-long-enough-for-hs256!", algorithm="HS256")


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height pixels (a few hundred bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class FileServer:
    def __init__(self, legacy_token: str = "legacy-token-123", pat: str | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}  # path -> forced status (e.g. 404)
        self.slow: dict[str, float] = {}  # path -> seconds to stall between chunks
        self.legacy_token = legacy_token
        self.pat = pat or make_jwt("refresh", 3600)
        self.access_tokens: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path with query, Authorization header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/api/token/refresh"):
                    refresh = json.loads(body or b"{}").get("refresh")
                    if refresh != server.pat:
                        return self._send(401, b'{"detail": "bad refresh token"}')
                    access = make_jwt("access")
                    server.access_tokens.add(access)
                    return self._send(200, json.dumps({"access": access}).encode())
                self._send(404, b"")

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                server.requests.append((self.path, auth))
                parsed = urlparse(self.path)
                query = parse_qs(parsed.query)
                if parsed.path.startswith(PROTECTED) and not server.authorised(auth):
                    return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                key = self.path
                if parsed.path.startswith("/storage-data/uploaded"):
                    key = "/data/" + query.get("filepath", [""])[0]
                elif parsed.path.startswith("/tasks/") and parsed.path.endswith("/presign/"):
                    uri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
                    target = "/bucket/" + uri.split("://", 1)[1]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if key in server.status:
                    return self._send(server.status[key], b"nope")
                if key not in server.files:
                    return self._send(404, b"not found")
                data = server.files[key]
                if key in server.slow:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for i in range(0, len(data), 1024):
                        self.wfile.write(data[i : i + 1024])
                        self.wfile.flush()
                        time.sleep(server.slow[key])
                    return None
                return self._send(200, data)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def authorised(self, auth: str | None) -> bool:
        if not auth:
            return False
        kind, _, token = auth.partition(" ")
        return (kind == "Token" and token == self.legacy_token) or (
            kind == "Bearer" and token in self.access_tokens
        )

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> FileServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
