"""Which image sources the backend may read, and a requests transport that connects only where it checked.

Anyone who can import a task into a Label Studio project chooses the URLs this backend downloads. Left
alone, they could point it at what only the backend can reach (loopback services, the cloud metadata
endpoint 169.254.169.254, the private network) and read the answer back as a caption. So:

- data URIs: always (nothing is fetched);
- Label Studio's own file routes (uploads, the storage proxy, Local Storage, cloud presign, token
  refresh) on the Label Studio host (LABEL_STUDIO_URL, or /setup's hostname): always. These are the
  only requests that carry the API token;
- Local Storage files from disk: only under LOCAL_FILES_DOCUMENT_ROOT, symlinks and ".." resolved;
- any other http(s) URL: when every address its host resolves to is public, or when ALLOWED_IMAGE_HOSTS
  lists the host name, or IPs / CIDRs holding its addresses;
- file://, bare paths and other schemes: never.

`PinnedAdapter` applies this to every request requests sends, each redirect hop included (the presign
route answers 302 to the file), and connects to the address it vetted while the Host header, TLS SNI and
the certificate check keep the host name: a DNS answer that changes between the check and the
connection (DNS rebinding) cannot move it. HTTP(S)_PROXY is not used, for the same reason.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils import io as sdk_io
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

ENV = "ALLOWED_IMAGE_HOSTS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


class Refused(Exception):
    """The fetch policy does not let the backend read this URL; the message says why and how to allow it."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(reason)
        self.url, self.reason = url, reason


# -- which addresses are public ------------------------------------------------------------------------

# IANA's special-purpose ranges, most specific first, with the word the messages use. Written out rather
# than taken from ipaddress's is_global/is_private, whose tables changed between Python patch releases.
_V4 = [
    ("0.0.0.0/32", "unspecified"),
    ("0.0.0.0/8", "reserved"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "private"),  # carrier-grade NAT
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "reserved"),  # documentation
    ("192.88.99.0/24", "reserved"),  # 6to4 relay anycast, retired
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "reserved"),  # benchmarking
    ("198.51.100.0/24", "reserved"),
    ("203.0.113.0/24", "reserved"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # includes the broadcast address
]
_V6 = [
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "private"),  # local-use NAT64
    ("100::/64", "reserved"),  # discard-only
    ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo
    ("2001:db8::/32", "reserved"),  # documentation
    ("3fff::/20", "reserved"),  # documentation
    ("5f00::/16", "reserved"),  # segment routing
    ("fc00::/7", "private"),  # unique local
    ("fe80::/10", "link-local"),
    ("fec0::/10", "private"),  # site-local, deprecated
    ("ff00::/8", "multicast"),
]
_SPECIAL = [(ipaddress.ip_network(net), kind) for net, kind in _V4 + _V6]
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
# IPv6 forms that reach an IPv4 address: judged by that address
_EMBEDDING = [
    (ipaddress.ip_network("::ffff:0:0/96"), "an IPv4-mapped", lambda a: a.ipv4_mapped),
    (
        ipaddress.ip_network("::/96"),
        "an IPv4-compatible",
        lambda a: ipaddress.IPv4Address(int(a) & 0xFFFFFFFF),
    ),
    (ipaddress.ip_network("64:ff9b::/96"), "a NAT64", lambda a: ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)),
    (ipaddress.ip_network("2002::/16"), "a 6to4", lambda a: a.sixtofour),
]
_METADATA = ipaddress.ip_address("169.254.169.254")


def embedded_ipv4(address: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """(form, IPv4 address) for an IPv6 address that reaches an IPv4 one, else None."""
    if address.version == 6 and address not in (ipaddress.ip_address("::"), ipaddress.ip_address("::1")):
        for net, form, extract in _EMBEDDING:
            if address in net:
                return form, extract(address)
    return None


def kind_of(address: IPAddress) -> str | None:
    """'loopback', 'private', 'link-local', 'multicast', 'reserved' or 'unspecified'; None when public."""
    embedded = embedded_ipv4(address)
    if embedded is not None:
        return kind_of(embedded[1])
    address = ipaddress.ip_address(str(address).split("%")[0])  # an IPv6 scope id is not part of the address
    for net, kind in _SPECIAL:
        if address.version == net.version and address in net:
            return kind
    if address.version == 6 and address not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None


def _describe(address: IPAddress) -> str:
    """'127.0.0.1 is a loopback address', with the IPv4 address an IPv6 form reaches."""
    embedded = embedded_ipv4(address)
    if embedded is not None:
        form, v4 = embedded
        return f"{address} is {form} form of {_describe(v4).replace(' is ', ', ', 1)}"
    kind = kind_of(address)
    article = "an" if kind[0] in "aeiou" else "a"
    metadata = " (the cloud metadata endpoint)" if address == _METADATA else ""
    return f"{address} is {article} {kind} address{metadata}"


# -- Label Studio's own routes -------------------------------------------------------------------------

# what label-studio-sdk's get_local_path asks Label Studio for (paths after the base URL), and our token
# exchange; anything else on that host is judged like any other host, without the token
_LABEL_STUDIO_ROUTES = re.compile(
    r"/(data/upload/|storage-data/uploaded/?$|data/local-files/?$|tasks/\d+/presign/?$|api/token/refresh/?$)"
)


@dataclass(frozen=True)
class LabelStudioHost:
    """The Label Studio the backend works for: its origin and the path it is served under."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, hostname: str | None) -> LabelStudioHost | None:
        if not hostname:
            return None
        try:
            url = urllib.parse.urlsplit(hostname.strip())
            port = _port(url)
        except ValueError:
            return None  # label-studio-sdk refuses such a hostname with its own message
        if url.scheme not in ("http", "https") or not url.hostname:
            return None
        return cls(url.scheme, _host_name(url.hostname), port, url.path.rstrip("/"))

    def serves(self, url: str) -> bool:
        """Whether `url` is one of Label Studio's file routes on this host."""
        parts = urllib.parse.urlsplit(url)
        if (parts.scheme, _host_name(parts.hostname or ""), _port(parts)) != (
            self.scheme,
            self.host,
            self.port,
        ):
            return False
        path = posixpath.normpath(urllib.parse.unquote(parts.path) or "/")
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return False
            path = path[len(self.prefix) :]
        # normpath drops a trailing slash: the routes match with or without it
        return bool(_LABEL_STUDIO_ROUTES.match(path + ("/" if parts.path.endswith("/") else "")))


def is_data_uri(url: str) -> bool:
    """An image inline in the task (`data:image/png;base64,...`): read in place, never fetched."""
    return url.startswith("data:")


def is_label_studio_path(url: str) -> bool:
    """A relative URL label-studio-sdk resolves against the Label Studio host (uploads, Local Storage)."""
    return url.startswith(
        ("upload", "/upload", "/data/upload", "/storage-data/uploaded", "storage-data/uploaded")
    ) or (url.startswith("/data/") and "?d=" in url)


# -- the policy -----------------------------------------------------------------------------------------


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _default_root() -> Path | None:
    # label-studio-sdk reads LOCAL_FILES_DOCUMENT_ROOT once, at import, and ignores "/": use the same
    # value, so that what it would read from disk itself and what we let it read never differ
    root = sdk_io.LOCAL_FILES_DOCUMENT_ROOT
    if not root or os.path.abspath(root) == os.path.abspath(os.sep):
        return None
    return Path(root)


@dataclass(frozen=True)
class Target:
    """Where one request may go: the vetted addresses to connect to (none: connect by host name, which
    is trusted as such), and whether it may carry the Label Studio token."""

    addresses: tuple[str, ...] = ()
    token: bool = False


@dataclass(frozen=True)
class FetchPolicy:
    """What image sources may be read; see the module docstring. `FetchPolicy.parse("minio, 10.0.0.0/8")`."""

    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    local_files_root: Path | None = field(default_factory=_default_root)
    resolve: Resolver = field(default=_resolve, compare=False, repr=False)  # tests give their own DNS

    @classmethod
    def parse(cls, allowed: str | Iterable[str] = "", **kwargs: Any) -> FetchPolicy:
        """From ALLOWED_IMAGE_HOSTS' format: host names, IP addresses and CIDRs, comma-separated."""
        entries = allowed.split(",") if isinstance(allowed, str) else list(allowed)
        names, networks = set(), []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if (
                "/" in entry
                or ":" in entry
                or not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?", entry)
            ):
                raise ValueError(
                    f"{ENV}: {entry!r} is not a host name, an IP address or a CIDR "
                    "(e.g. minio.internal, 10.0.0.5, 10.0.0.0/8; no ports or URLs)"
                )
            names.add(_host_name(entry))
        return cls(frozenset(names), tuple(networks), **kwargs)

    @classmethod
    def from_env(cls) -> FetchPolicy:
        return cls.parse(os.environ.get(ENV, ""))

    def describe(self) -> str:
        allowed = sorted(self.allowed_names) + [str(n) for n in self.allowed_networks]
        listed = f"also {', '.join(allowed)} ({ENV})" if allowed else f"nothing else ({ENV} is empty)"
        local = (
            f"from disk under {self.local_files_root}" if self.local_files_root else "through Label Studio"
        )
        return f"images from data URIs, Label Studio, public http(s) hosts, Local Storage {local}; {listed}"

    def check_source(self, url: str) -> None:
        """Refuses, before anything is fetched, what is never read: file://, bare paths, other schemes."""
        if is_data_uri(url):
            # not through urlsplit: since Python 3.11 it keeps the last 128 URLs it split, and the parts of
            # each, which for a data URI is the image's base64 twice (a full-size request of 16: +20 MB)
            return
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError as e:  # e.g. an unclosed IPv6 bracket
            raise Refused(url, f"not a valid URL: {e}") from None
        if (
            scheme in ("http", "https", "data")
            or sdk_io.is_cloud_storage_uri(url)
            or is_label_studio_path(url)
        ):
            return
        if scheme == "file":
            raise Refused(
                url, "file:// URLs are never read (Local Storage files are /data/local-files/?d=... URLs)"
            )
        if scheme:
            raise Refused(
                url, f"{scheme}: URLs are not read (only http(s), data URIs and Label Studio's files)"
            )
        raise Refused(
            url,
            "a bare path is never read; images come from http(s) URLs, data URIs and Label Studio "
            "(/data/upload/..., /data/local-files/?d=..., s3://...)",
        )

    def vet(self, url: str, label_studio: LabelStudioHost | None = None) -> Target:
        """Where one request to `url` may connect, or Refused. Resolves the host name once."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = _port(parts)
        except ValueError as e:  # an unclosed IPv6 bracket, a port out of range
            raise Refused(url, f"not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise Refused(url, f"{parts.scheme or 'a bare'}: URLs are not read over the network")
        if not parts.hostname:
            raise Refused(url, "the URL has no host")
        if label_studio is not None and label_studio.serves(url):
            return Target(token=True)
        host = _host_name(parts.hostname)
        if host in self.allowed_names:
            return Target()
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        try:
            addresses = self.resolve(parts.hostname, port)
        except (OSError, UnicodeError) as e:
            raise requests.ConnectionError(f"cannot resolve {parts.hostname}: {e}") from None
        if not addresses:
            raise requests.ConnectionError(f"cannot resolve {parts.hostname}: no address")
        for text in addresses:
            address = ipaddress.ip_address(text.split("%")[0])
            if kind_of(address) is None or self._listed(address):
                continue
            if literal is not None and literal == address:
                raise Refused(url, f"{_describe(address)}; add it to {ENV} to allow it")
            what = _describe(address).replace(" is ", ", ", 1)
            raise Refused(
                url, f"{parts.hostname} resolves to {what}; add {host} or {address} to {ENV} to allow it"
            )
        return Target(tuple(addresses))

    def _listed(self, address: IPAddress) -> bool:
        embedded = embedded_ipv4(address)
        candidates = [address] if embedded is None else [address, embedded[1]]
        return any(a.version == n.version and a in n for a in candidates for n in self.allowed_networks)

    def local_file(self, relative: str) -> Path:
        """Where a Local Storage URL's `?d=` path is on disk: under local_files_root once symlinks and ".."
        are resolved, or Refused. (The file may not exist: label-studio-sdk then downloads it from Label
        Studio.)"""
        if self.local_files_root is None:
            raise Refused(
                relative, "Local Storage files are read from disk only under LOCAL_FILES_DOCUMENT_ROOT"
            )
        root = self.local_files_root.resolve()
        # as Label Studio's /data/local-files/ view: ?d= is always relative to the root
        path = (root / posixpath.normpath(relative).lstrip("/")).resolve()
        if not path.is_relative_to(root):
            raise Refused(
                relative, f"{relative!r} leads outside LOCAL_FILES_DOCUMENT_ROOT ({root}) to {path}"
            )
        return path


def _host_name(host: str) -> str:
    return host.rstrip(".").lower()


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


# -- the transport ----------------------------------------------------------------------------------------


class PinnedAdapter(HTTPAdapter):
    """A requests transport that sends a request (each redirect hop comes through here too) only where
    `policy` allows, connected to the address it vetted, with the token only for Label Studio."""

    def __init__(self, policy: FetchPolicy, label_studio: str | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.label_studio = LabelStudioHost.parse(label_studio)
        self._pinned: dict[int, str] = {}  # id(request) -> the address it connects to

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        target = self.policy.vet(request.url or "", self.label_studio)
        request = request.copy()  # what is set here must not follow the request to its next redirect hop
        if not target.token:
            request.headers.pop("Authorization", None)
        request.headers.pop("Proxy-Authorization", None)  # requests adds it on redirects when a proxy is set
        # proxies=None: a proxy would resolve the name again, elsewhere
        if not target.addresses:
            return super().send(request, stream, timeout, verify, cert, None)
        request.headers["Host"] = _host_header(request.url or "")
        error: requests.ConnectionError | None = None
        for address in target.addresses:  # in the resolver's order, as a plain connection would try them
            self._pinned[id(request)] = address
            try:
                return super().send(request, stream, timeout, verify, cert, None)
            except requests.ConnectionError as e:
                if not _not_connected(e):
                    raise
                error = e
            finally:
                self._pinned.pop(id(request), None)
        assert error is not None
        raise error

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        address = self._pinned.get(id(request))
        if address is not None:
            if host_params["scheme"] == "https":  # SNI and the certificate check stay on the host name
                pool_kwargs["server_hostname"] = pool_kwargs["assert_hostname"] = host_params["host"]
            host_params["host"] = address
        return host_params, pool_kwargs


def _host_header(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def _not_connected(error: requests.ConnectionError) -> bool:
    """The connection could not be made (so another address may be tried); nothing was sent."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(error, requests.ConnectTimeout) or isinstance(reason, NewConnectionError)
