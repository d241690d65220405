"""Task images from wherever Label Studio keeps them, as bounded, upright RGB PIL images.

    loader = ImageLoader(hostname="http://ls:8080", access_token="...")
    image = loader.load(task["data"]["image"], task_id=task["id"])

Label Studio's SDK (`get_local_path`) knows every URL kind a task can hold: uploads
(`/data/upload/...`, tried through the storage proxy first), Local Storage (`/data/local-files/?d=...`,
read from disk when `LOCAL_FILES_DOCUMENT_ROOT` is set), cloud storage (`s3://`, `gs://`,
`azure-blob://` through the task's presign endpoint) and plain http(s) URLs. We add what it lacks: data
URIs, personal access tokens (exchanged for short-lived access tokens), limits on download size, time and
decoded pixels, and the fetch policy (backend/annotate/fetch.py): every request it makes, each redirect
hop included, goes through a transport that refuses what the policy refuses and sends the token to the
Label Studio host only; Local Storage files are read from disk only under LOCAL_FILES_DOCUMENT_ROOT.

`ImageLoader.fetch` also says what the file was (`Source`: the digest of its bytes and how to tell,
next time, that the URL still holds it) and, given what it was last time, skips the download when it
can prove nothing changed: data URIs are their own content, Label Studio's uploads never change (it
names every upload anew), Local Storage files read from disk keep their inode, size and modification
time, and other URLs answer a conditional GET (If-None-Match / If-Modified-Since) with 304.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import requests
import urllib3
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    get_local_path,
    http_session,
    local_files_resolver,
)
from PIL import Image, ImageOps

from backend.annotate.fetch import FetchPolicy, PinnedAdapter, Refused, is_data_uri

log = logging.getLogger(__name__)

MAX_BYTES = 50 << 20  # an encoded image file
MAX_PIXELS = 50_000_000  # decoded width x height; below PIL's own 89 MP bomb warning
TIMEOUT = 30.0  # seconds for one download, connection to last byte


class ImageError(Exception):
    """This task's image cannot be used; the message says why (logged with the task id)."""


@dataclass(frozen=True)
class Source:
    """What an image URL held when it was read, and how to tell later that it still holds that."""

    digest: str  # sha256 of the file's bytes (of the whole URI for a data URI)
    etag: str | None = None  # the server's validators, for a conditional GET
    last_modified: str | None = None
    stat: tuple[int, int, int, int] | None = None  # a file read from disk: device, inode, size, mtime_ns
    immutable: bool = False  # a data URI or a Label Studio upload: the URL always means these bytes


@dataclass(frozen=True)
class Fetched:
    """`data` is None when the URL still holds what `source` (the caller's `known`) describes."""

    data: bytes | None
    source: Source


class _NotModified(Exception):
    """A conditional GET was answered 304."""


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class _LimitedSession(requests.Session):
    """A session that enforces the fetch policy and our byte and time limits on the downloads the SDK
    makes through it.

    The SDK streams the response and then reads `response.content` whole; we read it first, in
    chunks, so an endless or huge body is cut off at MAX_BYTES / TIMEOUT instead of filling memory.
    """

    def __init__(
        self,
        max_bytes: int,
        timeout: float,
        policy: FetchPolicy,
        label_studio: str | None,
        known: Source | None = None,
    ) -> None:
        super().__init__()
        self.max_bytes, self.timeout = max_bytes, timeout
        adapter = PinnedAdapter(policy, label_studio)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        # a GET asks for the file only if it changed since `known` was read (kept across redirects)
        self.conditional: dict[str, str] = {}
        if known is not None and known.etag:
            self.conditional["If-None-Match"] = known.etag
        if known is not None and known.last_modified:
            self.conditional["If-Modified-Since"] = known.last_modified
        self.validators: tuple[str | None, str | None] = (None, None)  # the downloaded file's

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        kwargs["stream"] = True
        if self.conditional and method.upper() == "GET":
            kwargs["headers"] = {**(kwargs.get("headers") or {}), **self.conditional}
        response = super().request(method, url, *args, **kwargs)
        if response.status_code == 304 and self.conditional:
            response.close()
            raise _NotModified()
        if not response.ok:
            return response  # the caller's raise_for_status reports it
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            response.close()
            raise ImageError(f"{_short(url)}: {int(declared)} bytes, more than the {self.max_bytes} allowed")
        deadline = time.monotonic() + self.timeout
        too_slow = ImageError(f"{_short(url)}: download took longer than {self.timeout:g} s")
        # a read blocks until its chunk is full and every arriving byte restarts the socket's timeout: a
        # body trickled a byte at a time would hold the request for hours. Each read may only wait as long
        # as the deadline leaves.
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        body = bytearray()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise too_slow
                if sock is not None:
                    sock.settimeout(left)
                chunk = response.raw.read1(1 << 16, decode_content=True)  # what one recv brings
                if not chunk:
                    break
                body += chunk
                if len(body) > self.max_bytes:
                    raise ImageError(f"{_short(url)}: more than the {self.max_bytes} bytes allowed")
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError, OSError) as e:
            response.close()
            if time.monotonic() >= deadline:
                raise too_slow from None
            raise requests.ConnectionError(e) from None
        except ImageError:
            response.close()
            raise
        response._content = bytes(body)  # what `response.content` returns to the SDK
        self.validators = (response.headers.get("ETag"), response.headers.get("Last-Modified"))
        return response


class ImageLoader:
    """Fetches and decodes task images. `hostname`/`access_token` default to LABEL_STUDIO_URL/_API_KEY,
    `policy` to ALLOWED_IMAGE_HOSTS and LOCAL_FILES_DOCUMENT_ROOT."""

    def __init__(
        self,
        hostname: str | None = None,
        access_token: str | None = None,
        max_bytes: int = MAX_BYTES,
        max_pixels: int = MAX_PIXELS,
        timeout: float = TIMEOUT,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.hostname = (hostname or "").rstrip("/") or None
        self.access_token = access_token or None
        self.max_bytes, self.max_pixels, self.timeout = max_bytes, max_pixels, timeout
        self.policy = policy if policy is not None else FetchPolicy.from_env()

    def load(self, url: Any, task_id: int | None = None) -> Image.Image:
        data = self.fetch(url, task_id).data
        assert data is not None
        return self.decode(data)

    def decode(self, data: bytes) -> Image.Image:
        return decode(data, self.max_pixels)

    def key(self, url: Any) -> tuple[str, str]:
        """What identifies an image URL for the cache's `sources` (relative URLs mean this Label Studio's).
        A data URI is its digest: the cache remembers thousands of sources, and the URI is the image."""
        if isinstance(url, str) and is_data_uri(url.strip()):
            return ("", digest(url.strip()))
        return (self.hostname or "", url.strip() if isinstance(url, str) else repr(url))

    def fetch(self, url: Any, task_id: int | None = None, known: Source | None = None) -> Fetched:
        """The file's bytes and what they are; with `known` (what this URL held last time), `data` is None
        when the URL provably still holds that, found without downloading it again where possible."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"the image field holds {url!r}, not a URL")
        url = url.strip()
        try:
            self.policy.check_source(url)
        except Refused as e:
            raise ImageError(_refusal(url, e)) from None
        if is_data_uri(url):
            source = Source(digest(url), immutable=True)
            if known is not None and known.digest == source.digest:
                return Fetched(None, known)
            return Fetched(self._data_uri(url), source)
        upload = self._is_upload(url)
        if known is not None and known.immutable and upload:
            return Fetched(None, known)
        stat = self._local_stat(url)
        if known is not None and stat is not None and known.stat == stat:
            return Fetched(None, known)
        # a file read from disk is not asked for conditionally: its stat says whether it changed
        ask = known if known is not None and stat is None and not upload else None
        try:
            data, (etag, modified) = self._fetch(url, task_id, ask)
        except _NotModified:
            assert known is not None
            return Fetched(None, known)
        return Fetched(data, Source(digest(data), etag, modified, stat, immutable=upload))

    def _is_upload(self, url: str) -> bool:
        """A Label Studio upload: it names every uploaded file anew and never replaces one."""
        path = url
        if self.hostname and url.startswith(self.hostname + "/"):
            path = url[len(self.hostname) :]
        return path.startswith(("upload/", "/upload/", "/data/upload/")) or (
            path.startswith(("/storage-data/uploaded", "storage-data/uploaded"))
            and "filepath=upload/" in path
        )

    def _local_stat(self, url: str) -> tuple[int, int, int, int] | None:
        """For a Local Storage file read from disk (LOCAL_FILES_DOCUMENT_ROOT), what identifies its bytes."""
        if not (self.policy.local_files_root and url.startswith("/data/") and "?d=" in url):
            return None
        relative = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("d", [""])[0]
        try:
            st = os.stat(self.policy.local_file(relative))
        except (Refused, OSError, ValueError):
            return None  # the fetch itself reports it
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageError("malformed data URI (no comma)")
        # base64 grows data by 4/3: refuse before decoding anything too large
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise ImageError(f"data URI larger than the {self.max_bytes} bytes allowed")
        if header.endswith(";base64"):
            try:
                return base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError) as e:
                raise ImageError(f"data URI is not valid base64: {e}") from None
        return urllib.parse.unquote_to_bytes(payload)

    def _fetch(
        self, url: str, task_id: int | None, known: Source | None = None
    ) -> tuple[bytes, tuple[str | None, str | None]]:
        """The file's bytes and its (ETag, Last-Modified); _NotModified when it is still `known`."""
        # a fresh folder per image: the SDK caches by URL forever otherwise, and a changed file
        # behind the same URL would never be seen again
        with (
            tempfile.TemporaryDirectory(prefix="blip-img-") as cache,
            _LimitedSession(self.max_bytes, self.timeout, self.policy, self.hostname, known) as session,
            http_session(session),
            local_files_resolver(self._local_file if self.policy.local_files_root else None),
        ):
            try:
                token = _TOKENS.usable(self.hostname, self.access_token, self.timeout, session)
                path = Path(
                    get_local_path(
                        url,
                        cache_dir=cache,
                        hostname=self.hostname,
                        access_token=token,
                        task_id=task_id,
                        # a folder that does not exist: uploads are always downloaded from Label Studio,
                        # which checks the token's access, never read from its data folder on this machine
                        image_dir=str(Path(cache) / "no-local-uploads"),
                    )
                )
            except (ImageError, _NotModified):
                raise
            except Refused as e:
                raise ImageError(_refusal(url, e)) from None
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else "?"
                hint = _HTTP_HINTS.get(status, "")
                raise ImageError(f"{_short(url)}: HTTP {status}{hint}") from None
            except requests.RequestException as e:
                raise ImageError(f"{_short(url)}: download failed: {type(e).__name__}: {e}") from None
            except Exception as e:  # the SDK raises bare Exception/ValueError/FileNotFoundError
                raise ImageError(f"{_short(url)}: {type(e).__name__}: {e}") from None
            try:
                size = path.stat().st_size
                if size > self.max_bytes:  # Local Storage files are read from disk, unlimited by the session
                    raise ImageError(f"{_short(url)}: {size} bytes, more than the {self.max_bytes} allowed")
                return path.read_bytes(), session.validators
            except OSError as e:
                raise ImageError(f"{_short(url)}: {e.strerror or e}") from None

    def _local_file(self, relative: str) -> str:
        """label-studio-sdk's Local Storage hook: the path a `?d=` value may be read from."""
        path = self.policy.local_file(relative)
        # refused here, before the SDK copies it: a FIFO would block, a huge file fill the disk
        if path.exists() and not path.is_file():
            raise ImageError(f"Local Storage file {relative!r} is not a regular file")
        if path.is_file() and path.stat().st_size > self.max_bytes:
            size = path.stat().st_size
            raise ImageError(
                f"Local Storage file {relative!r}: {size} bytes, more than the {self.max_bytes} allowed"
            )
        return str(path)


def _refusal(url: str, refused: Refused) -> str:
    """'<task URL>: <why>', naming the redirect hop or rewritten URL when that is what was refused."""
    hop = f" -> {_short(refused.url)}" if refused.url not in (url, "") and "://" in refused.url else ""
    return f"{_short(url)}{hop}: refused: {refused.reason}"


# Label Studio answers 401 to a bad token, and 403 to a good one asking for a missing upload
_HTTP_HINTS = {
    401: " (is LABEL_STUDIO_API_KEY right?)",
    403: " (the file may be missing, or LABEL_STUDIO_API_KEY's user may not see it)",
    404: " (no such file)",
}


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> an upright RGB image, refusing non-images, truncated files and pixel bombs."""
    try:
        image = Image.open(io.BytesIO(data))
        # `open` only reads the header: check the declared size before decoding a single pixel
        if image.width * image.height > max_pixels:
            raise ImageError(
                f"image is {image.width}x{image.height} pixels, more than the {max_pixels} allowed"
            )
        image.load()
        # in place: without an orientation to apply, exif_transpose would return a copy (36 MB more per
        # 12 MP photo while it is decoded)
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image file ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"unreadable image: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, as Label Studio shows it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("L") clips at 255 instead of scaling, giving white images
        x = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or x.max(initial=0) > 255 else 255.0
        if image.mode == "F" and x.max(initial=0) <= 1.0:
            peak = 1.0
        image = Image.fromarray(np.clip(x * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "L" and "transparency" in image.info:
        return to_rgb(image.convert("LA"))
    return image if image.mode == "RGB" else image.convert("RGB")


class _AccessTokens:
    """Label Studio personal access tokens are JWT refresh tokens: downloads need the access token
    they are exchanged for (valid ~5 min). Legacy tokens are used as they are."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}

    def usable(
        self, hostname: str | None, token: str | None, timeout: float, session: requests.Session
    ) -> str | None:
        """The token to download with; `session` (with the fetch policy) makes the exchange."""
        if not token or not hostname or _jwt_type(token) != "refresh":
            return token
        key = (hostname, token)
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[1] > time.time() + 30:
                return cached[0]
            try:
                r = session.post(f"{hostname}/api/token/refresh/", json={"refresh": token}, timeout=timeout)
                r.raise_for_status()
                access = r.json()["access"]
            except (requests.RequestException, ValueError, KeyError) as e:
                raise ImageError(f"cannot exchange the personal access token at {hostname}: {e}") from None
            expires = jwt.decode(access, options={"verify_signature": False}).get("exp", time.time() + 60)
            self._cache[key] = (access, float(expires))
            return access


_TOKENS = _AccessTokens()  # shared: loaders are made per request, access tokens live for minutes


def _jwt_type(token: str) -> str | None:
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("token_type")
    except jwt.PyJWTError:
        return None


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
