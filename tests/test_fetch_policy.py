"""The fetch policy (backend/annotate/fetch.py): what image sources the backend reads, shown address by
address, through ImageLoader, through /predict (Flask's test client and real gunicorn) and through
`blip-backend prelabel` against a real Label Studio.

Every server here listens on loopback: the file server imitating Label Studio on 127.0.0.1 (its file
routes are allowed as the Label Studio host), and an "other host" on 127.0.0.2, allow-listed where a test
needs a host the policy lets through. 127.0.0.1 is allow-listed only by the few tests that show what
allowing it changes; everywhere else its refusal is part of what is tested.
"""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import time

import pytest
import requests
from fake_files import FileServer
from PIL import Image
from recording_server import OTHER_HOST, Recorder

from backend.annotate.fetch import ENV, FetchPolicy, LabelStudioHost, PinnedAdapter, Refused, kind_of
from backend.annotate.images import ImageError, ImageLoader


def png(colour=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def ls_files():
    """The file server playing Label Studio (127.0.0.1), with an upload and a plain file."""
    with FileServer() as server:
        server.files["/data/upload/3/up.png"] = png((10, 200, 10))
        server.files["/img.png"] = png()
        server.files["/internal/admin.png"] = png((0, 0, 0))
        yield server


@pytest.fixture(scope="module")
def other():
    """An allow-listable host on 127.0.0.2 that serves an image and redirects elsewhere on request."""
    with Recorder() as server:
        server.files["/pic.png"] = png((10, 10, 200))
        yield server


# -- which addresses are public ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_address_kinds(address, kind):
    assert kind_of(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://127.0.0.1:8000/x.png",
            "127.0.0.1 is a loopback address; add it to ALLOWED_IMAGE_HOSTS to allow it",
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254 is a link-local address (the cloud metadata endpoint); add it to "
            "ALLOWED_IMAGE_HOSTS",
        ),
        ("http://10.0.0.1/x.png", "10.0.0.1 is a private address; add it to ALLOWED_IMAGE_HOSTS to allow it"),
        ("https://[::1]/x.png", "::1 is a loopback address; add it to ALLOWED_IMAGE_HOSTS to allow it"),
        (
            "http://[::ffff:127.0.0.1]/x.png",
            "::ffff:7f00:1 is an IPv4-mapped form of 127.0.0.1, a loopback address; add it to "
            "ALLOWED_IMAGE_HOSTS",
        ),
        ("http://0.0.0.0:9090/x.png", "0.0.0.0 is an unspecified address"),
        (
            "http://2130706433/x.png",
            "2130706433 resolves to 127.0.0.1, a loopback address",
        ),  # 127.0.0.1 in decimal
    ],
)
def test_refusals_say_why_and_how_to_allow(url, message):
    with pytest.raises(Refused, match=re.escape(message)):
        FetchPolicy().vet(url)


def test_a_name_resolving_to_loopback_is_refused_by_its_addresses():
    with pytest.raises(
        Refused,
        match=r"localhost resolves to (127\.0\.0\.1|::1), a loopback address; "
        r"add localhost or \S+ to ALLOWED_IMAGE_HOSTS",
    ):
        FetchPolicy().vet("http://localhost:8080/x.png")
    # every address counts: one public answer does not carry a private one
    mixed = FetchPolicy(resolve=lambda host, port: ["8.8.8.8", "10.1.2.3"])
    with pytest.raises(Refused, match=re.escape("images.test resolves to 10.1.2.3, a private address")):
        mixed.vet("http://images.test/x.png")
    assert FetchPolicy(resolve=lambda host, port: ["8.8.8.8"]).vet("http://images.test/x.png").addresses == (
        "8.8.8.8",
    )


def test_allow_list_of_names_addresses_and_networks():
    policy = FetchPolicy.parse(" minio.internal, 10.0.0.0/8,[::1] , 192.168.1.5,, Images.Test. ")
    assert policy.allowed_names == {"minio.internal", "images.test"}
    assert [str(n) for n in policy.allowed_networks] == ["10.0.0.0/8", "::1/128", "192.168.1.5/32"]
    assert policy.vet("http://10.200.0.1/x.png").addresses == ("10.200.0.1",)
    assert policy.vet("http://[::1]:9000/x.png").addresses == ("::1",)
    with pytest.raises(Refused, match=re.escape("192.168.1.6 is a private address")):
        policy.vet("http://192.168.1.6/x.png")
    # a listed name is trusted whatever it resolves to, and connected to by name
    assert policy.vet("http://MINIO.internal:9000/b/x.png").addresses == ()
    # listing an IPv4 address covers its IPv6 forms too
    assert FetchPolicy.parse("127.0.0.1").vet("http://[::ffff:127.0.0.1]/x").addresses == (
        "::ffff:127.0.0.1",
    )
    for bad in ("http://minio:9000", "minio:9000", "10.0.0.0/33", "two words", "*.example.com"):
        with pytest.raises(
            ValueError, match=f"{ENV}: {re.escape(repr(bad))} is not a host name, an IP address"
        ):
            FetchPolicy.parse(bad)


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("file:///etc/hostname", "file:// URLs are never read"),
        ("FILE:///etc/hostname", "file:// URLs are never read"),
        ("/etc/hostname", "a bare path is never read"),
        ("etc/hostname", "a bare path is never read"),
        ("../../etc/hostname", "a bare path is never read"),
        ("//evil.example/x.png", "a bare path is never read"),
        ("ftp://example.com/x.png", "ftp: URLs are not read"),
        ("gopher://127.0.0.1:6379/_INFO", "gopher: URLs are not read"),
    ],
)
def test_sources_that_are_never_read(source, why):
    with pytest.raises(Refused, match=re.escape(why)):
        FetchPolicy().check_source(source)
    with pytest.raises(ImageError, match=f"{re.escape(source)}: refused: {re.escape(why)}"):
        ImageLoader(hostname="http://ls.example:8080", access_token="t").load(source)


def test_sources_that_may_be_read():
    for source in (
        "http://example.com/x.png",
        "https://example.com/x.png",
        "data:image/png;base64,AAAA",
        "s3://bucket/x.png",
        "gs://bucket/x.png",
        "azure-blob://container/x.png",
        "/data/upload/3/x.png",
        "upload/3/x.png",
        "/data/local-files/?d=dir/x.png",
        "/storage-data/uploaded/?filepath=upload/3/x.png",
    ):
        FetchPolicy().check_source(source)


def test_label_studio_host_serves_only_its_file_routes():
    ls = LabelStudioHost.parse("http://ls.example:8080")
    for path in (
        "/data/upload/3/x.png",
        "/storage-data/uploaded/?filepath=upload/3/x.png",
        "/data/local-files/?d=dir/x.png",
        "/tasks/7/presign/?fileuri=czM6Ly9i",
        "/api/token/refresh/",
    ):
        assert ls.serves("http://ls.example:8080" + path), path
    for url in (
        "http://ls.example:8080/api/projects/",  # the API: not an image route, no token
        "http://ls.example:8080/data/upload/../../api/projects/",
        "http://ls.example:8080/data/upload/%2e%2e/%2e%2e/api/projects/",
        "http://ls.example:9999/data/upload/3/x.png",  # another port: another host
        "https://ls.example:8080/data/upload/3/x.png",
        "http://ls.example.evil.com:8080/data/upload/3/x.png",
    ):
        assert not ls.serves(url), url
    under = LabelStudioHost.parse("https://example.com/label-studio/")
    assert under.serves("https://example.com:443/label-studio/data/upload/1/x.png")
    assert not under.serves("https://example.com/data/upload/1/x.png")


# -- ImageLoader: each refused source, each allowed one ------------------------------------------------


def test_the_default_refuses_the_test_servers(ls_files, other):
    """What the other tests allow-list: by default the loopback file servers are refused."""
    for url in (ls_files.url("/img.png"), other.base + "/pic.png"):
        with pytest.raises(ImageError, match=r"refused: 127\.0\.0\.[12] is a loopback address; add it to"):
            ImageLoader().load(url)


def test_refused_addresses_are_never_connected_to(monkeypatch):
    connects: list = []

    def connect(self, address):
        connects.append(address)
        raise OSError("no connections in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    loader = ImageLoader()
    t0 = time.monotonic()
    for url, why in [
        ("http://10.0.0.1/x.png", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/iam/", "cloud metadata endpoint"),
        ("http://[::1]:9090/x.png", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/x.png", "IPv4-mapped form of 127.0.0.1"),
        ("http://[fe80::1]/x.png", "fe80::1 is a link-local address"),
        ("http://localhost/x.png", "localhost resolves to"),
    ]:
        with pytest.raises(ImageError, match=re.escape(why)):
            loader.load(url)
    assert connects == []
    assert time.monotonic() - t0 < 2  # no connection timeout waited for


def test_label_studio_uploads_carry_the_token_and_nothing_else_does(ls_files, other):
    loader = ImageLoader(
        hostname=ls_files.base, access_token=ls_files.legacy_token, policy=FetchPolicy.parse(OTHER_HOST)
    )
    assert loader.load("/data/upload/3/up.png").getpixel((0, 0)) == (10, 200, 10)
    assert ls_files.requests[-1][1] == f"Token {ls_files.legacy_token}"
    assert loader.load(other.base + "/pic.png").getpixel((0, 0)) == (10, 10, 200)
    assert other.seen[-1] == ("/pic.png", f"{OTHER_HOST}:{other.port}", None)
    # the Label Studio host outside its file routes is an ordinary (here loopback) host: refused
    with pytest.raises(
        ImageError, match=r"/internal/admin\.png: refused: 127\.0\.0\.1 is a loopback address"
    ):
        loader.load(ls_files.url("/internal/admin.png"))
    # and when allowed, it gets no token there
    both = ImageLoader(
        hostname=ls_files.base, access_token=ls_files.legacy_token, policy=FetchPolicy.parse("127.0.0.1")
    )
    both.load(ls_files.url("/img.png"))
    assert ls_files.requests[-1] == ("/img.png", None)


def test_the_token_does_not_follow_a_redirect_to_another_host(other):
    with Recorder("127.0.0.1") as ls:  # a Label Studio whose presign route sends the file from elsewhere
        ls.redirects["/tasks/7/presign/?fileuri=" + base64.urlsafe_b64encode(b"s3://b/pic.png").decode()] = (
            other.base + "/pic.png"
        )
        loader = ImageLoader(
            hostname=ls.base, access_token="legacy-token-123", policy=FetchPolicy.parse(OTHER_HOST)
        )
        assert loader.load("s3://b/pic.png", task_id=7).size == (8, 6)
    assert ls.seen[-1][2] == "Token legacy-token-123"
    assert other.seen[-1] == ("/pic.png", f"{OTHER_HOST}:{other.port}", None)


def test_every_redirect_hop_is_checked(ls_files, other):
    other.redirects["/to-loopback.png"] = ls_files.url("/internal/admin.png")
    other.redirects["/to-metadata"] = "http://169.254.169.254/latest/meta-data/"
    before = len(ls_files.requests)
    loader = ImageLoader(policy=FetchPolicy.parse(OTHER_HOST))
    with pytest.raises(
        ImageError,
        match=re.escape(
            f"{other.base}/to-loopback.png -> {ls_files.url('/internal/admin.png')}: refused: "
            "127.0.0.1 is a loopback address; add it to ALLOWED_IMAGE_HOSTS to allow it"
        ),
    ):
        loader.load(other.base + "/to-loopback.png")
    with pytest.raises(ImageError, match=re.escape("-> http://169.254.169.254/latest/meta-data/: refused")):
        loader.load(other.base + "/to-metadata")
    assert len(ls_files.requests) == before  # the loopback server was never asked
    # the same redirect, with its target allowed too, is followed
    other.redirects["/to-img.png"] = ls_files.url("/img.png")
    assert ImageLoader(policy=FetchPolicy.parse(f"{OTHER_HOST}, 127.0.0.1")).load(other.base + "/to-img.png")


def test_the_connection_goes_to_the_vetted_address(other):
    """DNS rebinding: the name is resolved once, checked, and that address is connected to. The system
    resolver never sees `images.test` (it could not resolve it anyway), and a second answer pointing at
    a forbidden address would never be asked for."""
    answers = iter([[OTHER_HOST], ["127.0.0.1"]])
    calls = []

    def resolve(host, port):
        calls.append((host, port))
        return next(answers)

    policy = FetchPolicy.parse(OTHER_HOST, resolve=resolve)
    url = f"http://images.test:{other.port}/pic.png"
    assert ImageLoader(policy=policy).load(url).getpixel((0, 0)) == (10, 10, 200)
    assert calls == [("images.test", other.port)]
    assert other.seen[-1] == ("/pic.png", f"images.test:{other.port}", None)  # Host header: the name


def test_the_next_vetted_address_is_tried_when_one_refuses_the_connection(other):
    # nothing listens on 127.0.0.3: the connection is refused there, then made to the next vetted address
    policy = FetchPolicy.parse("127.0.0.0/8", resolve=lambda host, port: ["127.0.0.3", OTHER_HOST])
    assert ImageLoader(policy=policy).load(f"http://two.test:{other.port}/pic.png").size == (8, 6)
    assert other.seen[-1][:2] == ("/pic.png", f"two.test:{other.port}")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose certificate (from a test CA) names only images.test."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("images.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "leaf.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "leaf.pem")
    sni: list[str] = []
    context.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    with Recorder("127.0.0.1", tls=context) as server:
        server.files["/pic.png"] = png((1, 2, 3))
        yield server, str(folder / "ca.pem"), sni


def test_tls_keeps_sni_and_the_certificate_check_on_the_host_name(tls_files):
    server, ca, sni = tls_files
    policy = FetchPolicy.parse("127.0.0.1", resolve=lambda host, port: ["127.0.0.1"])
    session = requests.Session()
    session.mount("https://", PinnedAdapter(policy))
    response = session.get(f"https://images.test:{server.port}/pic.png", verify=ca, timeout=10)
    assert response.status_code == 200 and response.content == server.files["/pic.png"]
    assert sni[-1] == "images.test" and server.seen[-1][1] == f"images.test:{server.port}"
    # same address, another name: the certificate does not match it, and the connection is refused
    with pytest.raises(requests.exceptions.SSLError, match=r"other\.test|match|hostname"):
        session.get(f"https://other.test:{server.port}/pic.png", verify=ca, timeout=10)


# -- Local Storage from disk ---------------------------------------------------------------------------


def test_local_storage_is_read_only_under_the_document_root(tmp_path, ls_files):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "pics").mkdir(parents=True)
    outside.mkdir()
    (root / "pics" / "a.png").write_bytes(png((5, 5, 5)))
    (outside / "secret.png").write_bytes(png((9, 9, 9)))
    (root / "pics" / "inside-link.png").symlink_to(root / "pics" / "a.png")
    (root / "pics" / "escape.png").symlink_to(outside / "secret.png")
    (root / "etc").symlink_to("/etc")
    os.mkfifo(root / "pics" / "pipe.png")
    (root / "pics" / "big.png").write_bytes(b"\0" * 20_000)
    loader = ImageLoader(
        hostname=ls_files.base,
        access_token=ls_files.legacy_token,
        max_bytes=10_000,
        policy=FetchPolicy(local_files_root=root),
    )
    assert loader.load("/data/local-files/?d=pics/a.png").getpixel((0, 0)) == (5, 5, 5)
    assert loader.load("/data/local-files/?d=/pics/inside-link.png").getpixel((0, 0)) == (5, 5, 5)
    before = len(ls_files.requests)
    for d, why in [
        ("pics/escape.png", "leads outside LOCAL_FILES_DOCUMENT_ROOT"),
        ("../outside/secret.png", "leads outside LOCAL_FILES_DOCUMENT_ROOT"),
        ("pics/../../outside/secret.png", "leads outside LOCAL_FILES_DOCUMENT_ROOT"),
        ("etc/hostname", "leads outside LOCAL_FILES_DOCUMENT_ROOT"),
        ("pics/pipe.png", "is not a regular file"),
        ("pics/big.png", "20000 bytes, more than the 10000 allowed"),
    ]:
        with pytest.raises(ImageError, match=re.escape(why)):
            loader.load(f"/data/local-files/?d={d}")
    assert len(ls_files.requests) == before  # refused, not downloaded from Label Studio instead
    # a file that is not on this disk is downloaded from Label Studio, as label-studio-sdk does
    ls_files.files["/data/local-files/?d=pics/elsewhere.png"] = png((7, 7, 7))
    assert loader.load("/data/local-files/?d=pics/elsewhere.png").getpixel((0, 0)) == (7, 7, 7)


# -- calibration downloads (blip-build --calibration-export / --project) --------------------------------


def test_calibration_applies_the_same_policy(tmp_path, ls_files, other, monkeypatch):
    import json

    from model_build.calibration import from_label_studio_export

    outside = tmp_path / "outside.png"
    outside.write_bytes(png((9, 9, 9)))
    export = tmp_path / "export"
    export.mkdir()
    (export / "next-to-it.png").write_bytes(png((5, 5, 5)))
    (export / "link.png").symlink_to(outside)
    tasks = {
        1: "next-to-it.png",  # a file next to the export: read
        2: data_uri(png()),
        3: other.base + "/pic.png",  # allow-listed below
        4: ls_files.url("/img.png"),
        5: "http://169.254.169.254/latest/meta-data/",
        6: "../outside.png",
        7: "link.png",
        8: str(outside),
        9: "file://" + str(outside),
    }
    (export / "export.json").write_text(
        json.dumps([{"id": i, "data": {"image": u}} for i, u in tasks.items()])
    )
    monkeypatch.setenv(ENV, OTHER_HOST)
    config = '<View><Image name="image" value="$image"/><TextArea name="c" toName="image"/></View>'
    calibration = from_label_studio_export(export / "export.json", n=100, label_config=config)
    assert sorted(s.origin for s in calibration.samples) == ["task 1", "task 2", "task 3"]
    skipped = calibration.skipped
    assert sorted(skipped) == [f"task {i}" for i in range(4, 10)]
    assert "127.0.0.1 is a loopback address" in skipped["task 4"]
    assert "cloud metadata endpoint" in skipped["task 5"]
    for i in (6, 7, 8):
        assert "a bare path is never read" in skipped[f"task {i}"], skipped[f"task {i}"]
    assert "file:// URLs are never read" in skipped["task 9"]
    monkeypatch.setenv(ENV, "not a host")
    from model_build.calibration import CalibrationError

    with pytest.raises(CalibrationError, match="ALLOWED_IMAGE_HOSTS: 'not a host' is not a host name"):
        from_label_studio_export(export / "export.json", n=100, label_config=config)


# -- through /predict ---------------------------------------------------------------------------------

CAPTIONING = '<View><Image name="image" value="$captioning"/><TextArea name="caption" toName="image"/></View>'


def refused_and_allowed(ls_files, other, scene_png: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> refused image URL, name -> allowed image URL), for tasks."""
    ls_files.files["/data/upload/4/scene.png"] = scene_png
    other.files["/scene.png"] = scene_png
    other.redirects["/redirect.png"] = ls_files.url("/internal/admin.png")
    port = ls_files.base.rsplit(":", 1)[1]
    refused = {
        "loopback": ls_files.url("/internal/admin.png"),
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.0.0.1/x.png",
        "localhost": f"http://localhost:{port}/internal/admin.png",
        "redirect": other.base + "/redirect.png",
        "ipv6-loopback": f"http://[::1]:{port}/internal/admin.png",
        "ipv4-mapped": f"http://[::ffff:127.0.0.1]:{port}/internal/admin.png",
        "file": "file:///etc/hostname",
        "bare-path": "/etc/hostname",
    }
    allowed = {
        "upload": "/data/upload/4/scene.png",
        "data-uri": data_uri(scene_png),
        "allow-listed": other.base + "/scene.png",
    }
    return refused, allowed


REASONS = {
    "loopback": "127.0.0.1 is a loopback address; add it to ALLOWED_IMAGE_HOSTS to allow it",
    "metadata": "169.254.169.254 is a link-local address (the cloud metadata endpoint)",
    "private": "10.0.0.1 is a private address",
    "localhost": "localhost resolves to",
    "redirect": "/redirect.png -> http://127.0.0.1:",
    "ipv6-loopback": "::1 is a loopback address",
    "ipv4-mapped": "IPv4-mapped form of 127.0.0.1, a loopback address",
    "file": "file:// URLs are never read",
    "bare-path": "a bare path is never read",
}


@pytest.fixture(scope="module")
def scene(blip):
    from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

    image = make_scenes(1, HELD_OUT_SEED)[0].image
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue(), blip.caption([image])[0].text


def test_predict_refuses_each_source_and_predicts_the_allowed_ones(blip, ls_files, other, scene, caplog):
    from backend.server.app import Settings, create_app

    scene_png, caption = scene
    refused, allowed = refused_and_allowed(ls_files, other, scene_png)
    settings = Settings(
        label_studio_url=ls_files.base, api_key=ls_files.legacy_token, allowed_image_hosts=OTHER_HOST
    )
    client = create_app(blip=blip, settings=settings).test_client()
    names = [*refused, *allowed]
    tasks = [{"id": i, "data": {"captioning": (refused | allowed)[n]}} for i, n in enumerate(names)]
    admin_before = sum(p == "/internal/admin.png" for p, _ in ls_files.requests)
    with caplog.at_level(logging.WARNING, logger="backend"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": CAPTIONING})
    assert response.status_code == 200
    results = dict(zip(names, response.get_json()["results"]))
    for name in refused:
        assert results[name] == [], name
        line = next(
            r.getMessage() for r in caplog.records if r.getMessage().startswith(f"task {names.index(name)}:")
        )
        assert "refused: " in line and REASONS[name] in line, line
    for name in allowed:
        assert results[name]["result"][0]["value"] == {"text": [caption]}, name
    assert sum(p == "/internal/admin.png" for p, _ in ls_files.requests) == admin_before
    upload = [a for p, a in ls_files.requests if "upload/4/scene.png" in p]
    assert upload and all(a == f"Token {ls_files.legacy_token}" for a in upload)
    assert all(auth is None for _, _, auth in other.seen)


def test_a_bad_allow_list_stops_the_start(blip):
    from backend.server.app import Settings, create_app

    with pytest.raises(ValueError, match="ALLOWED_IMAGE_HOSTS: 'minio:9000' is not a host name"):
        create_app(blip=blip, settings=Settings(allowed_image_hosts="minio:9000"))


def test_predict_under_gunicorn_refuses_and_allows_the_same(tiny_dir, ls_files, other, scene, tmp_path):
    from label_studio_server import serve_backend, stop_backend, wait_for

    scene_png, caption = scene
    refused, allowed = refused_and_allowed(ls_files, other, scene_png)
    log = tmp_path / "backend.log"
    proc, url = serve_backend(
        tiny_dir,
        log,
        LABEL_STUDIO_URL=ls_files.base,
        LABEL_STUDIO_API_KEY=ls_files.legacy_token,
        ALLOWED_IMAGE_HOSTS=OTHER_HOST,
    )
    try:
        wait_for(f"{url}/health", proc, log, 120)
        names = [*refused, *allowed]
        tasks = [{"id": 100 + i, "data": {"captioning": (refused | allowed)[n]}} for i, n in enumerate(names)]
        t0 = time.monotonic()
        response = requests.post(
            f"{url}/predict", json={"tasks": tasks, "label_config": CAPTIONING}, timeout=60
        )
        assert response.status_code == 200 and time.monotonic() - t0 < 30
        results = dict(zip(names, response.json()["results"]))
    finally:
        stop_backend(proc, log)
    text = log.read_text()
    for i, name in enumerate(names):
        if name in refused:
            assert results[name] == [], name
            line = next(x for x in text.splitlines() if f"task {100 + i}: no prediction" in x)
            assert REASONS[name] in line, line
        else:
            assert results[name]["result"][0]["value"] == {"text": [caption]}, name
    assert "fetch policy: " in text and OTHER_HOST in text


# -- through blip-backend prelabel ---------------------------------------------------------------------


def test_prelabel_refuses_each_source_and_predicts_the_allowed_ones(
    ls, label_studio, tiny_dir, other, scene, tmp_path, monkeypatch, capsys
):
    import json

    from label_studio_server import upload

    from backend.__main__ import main

    url, token = label_studio
    scene_png, caption = scene
    project = ls.projects.create(title="fetch policy", label_config=CAPTIONING)
    upload(label_studio, project.id, {"scene.png": scene_png})
    other.files["/scene.png"] = scene_png
    # Label Studio itself serves /internal/... nowhere: a loopback URL that would be fetched if allowed
    ls_port = url.rsplit(":", 1)[1]
    other.redirects["/redirect.png"] = f"{url}/static/images/logo.png"
    refused = {
        "loopback": f"{url}/static/images/logo.png",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.0.0.1/x.png",
        "localhost": f"http://localhost:{ls_port}/static/images/logo.png",
        "redirect": other.base + "/redirect.png",
        "ipv6-loopback": f"http://[::1]:{ls_port}/x.png",
        "ipv4-mapped": f"http://[::ffff:127.0.0.1]:{ls_port}/x.png",
        "file": "file:///etc/hostname",
        "bare-path": "/etc/hostname",
    }
    allowed = {"data-uri": data_uri(scene_png), "allow-listed": other.base + "/scene.png"}
    ls.projects.import_tasks(
        id=project.id, request=[{"captioning": u, "what": n} for n, u in (refused | allowed).items()]
    )
    what = {t.id: t.data.get("what", "upload") for t in ls.tasks.list(project=project.id, fields="task_only")}
    report = tmp_path / "report.json"
    monkeypatch.setenv(ENV, OTHER_HOST)
    argv = ["prelabel", "--project", str(project.id), "--model-dir", str(tiny_dir), "--url", url]
    assert main([*argv, "--api-key", token, "--report", str(report)]) == 1  # some tasks failed
    assert f"predicted 3, failed {len(refused)}, already predicted 0" in capsys.readouterr().out
    failed = {what[int(k)]: v for k, v in json.loads(report.read_text())["failed"].items()}
    assert sorted(failed) == sorted(refused)
    for name, reason in failed.items():
        expected = REASONS[name].replace("/redirect.png -> http://127.0.0.1:", "/redirect.png -> " + url)
        assert "refused: " in reason and expected in reason, (name, reason)
    stored = {what[p.task]: p.result[0]["value"]["text"] for p in ls.predictions.list(project=project.id)}
    assert stored == {"upload": [caption], "data-uri": [caption], "allow-listed": [caption]}
    assert all(auth is None for _, _, auth in other.seen)
    # the allow list is checked before anything runs
    monkeypatch.setenv(ENV, "http://minio:9000")
    assert main([*argv, "--api-key", token]) == 2
    assert "ALLOWED_IMAGE_HOSTS: 'http://minio:9000' is not a host name" in capsys.readouterr().err
