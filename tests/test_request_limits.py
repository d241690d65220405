"""Bounded requests: MAX_REQUEST_MB answered with 413 before the body is read (real gunicorn, raw sockets,
the worker's memory watched), labeling configs parsed without entities or network access (XML bombs
refused in milliseconds), and the caps on questions per task and question length."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
from pathlib import Path

import pytest
import requests
from label_studio_server import data_uri, serve_backend, stop_backend, wait_for
from recording_server import Recorder

from backend.annotate.labeling import MAX_CONFIG_CHARS, MAX_QUESTION_CHARS, MAX_QUESTIONS, ConfigError, plan
from backend.server.app import MAX_REQUEST_MB, Settings, create_app
from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

CAPTIONING = '<View><Image name="image" value="$captioning"/><TextArea name="caption" toName="image"/></View>'
# a config that uses an entity &e; (declared, or not, by what precedes it)
ENTITY_USER = (
    '<View><Image name="image" value="$i"/><TextArea name="t" toName="image" placeholder="&e;"/></View>'
)
TEST_LIMIT_MB = 4  # the gunicorn backend below: small, so a chunked body can cross it quickly


def billion_laughs(levels: int = 10) -> str:
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels)
    )
    return (
        f'<?xml version="1.0"?><!DOCTYPE View [{entities}]><View><Image name="image" value="$captioning"/>'
        f'<TextArea name="caption" toName="image" placeholder="&lol{levels - 1};"/></View>'
    )


def quadratic_blowup() -> str:
    """One large entity referenced many times: below libxml2's amplification guard per reference."""
    return (
        f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY a "{"x" * 50_000}">]><View>'
        f'<Image name="image" value="$captioning"/><TextArea name="c" toName="image" placeholder="'
        + "&a;" * 2_000
        + '"/></View>'
    )


# -- labeling configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [billion_laughs(), quadratic_blowup()], ids=["billion-laughs", "quadratic"]
)
def test_entity_bombs_are_refused_in_milliseconds(config):
    t0 = time.perf_counter()
    with pytest.raises(
        ConfigError, match=r"has a <!DOCTYPE> \(entity declarations\); labeling configs need none"
    ):
        plan(config)
    assert time.perf_counter() - t0 < 0.1


def test_external_entities_and_dtds_are_never_fetched_or_read(tmp_path):
    with Recorder() as server:
        server.files["/evil.dtd"] = b'<!ENTITY e "from the network">'
        for doctype in (
            f'<!DOCTYPE View SYSTEM "{server.base}/evil.dtd">',
            f'<!DOCTYPE View [<!ENTITY % d SYSTEM "{server.base}/evil.dtd"> %d;]>',
            '<!DOCTYPE View [<!ENTITY e SYSTEM "file:///etc/hostname">]>',
        ):
            config = doctype + ENTITY_USER
            with pytest.raises(ConfigError, match="<!DOCTYPE>"):
                plan(config)
    assert server.seen == []
    # undeclared entities are a syntax error, and nothing is looked up for them either
    with pytest.raises(ConfigError, match="cannot parse the labeling config"):
        plan(ENTITY_USER)


def test_oversized_configs_are_refused():
    padding = "<!--" + "x" * MAX_CONFIG_CHARS + "-->"
    with pytest.raises(ConfigError, match=f"characters long, more than the {MAX_CONFIG_CHARS} allowed"):
        plan(f"<View>{padding}{CAPTIONING}</View>")


def test_questions_per_task_are_capped_with_one_log_line(caplog):
    fields = [f"q{i}" for i in range(MAX_QUESTIONS + 4)]
    config = (
        '<View><Image name="image" value="$image"/><TextArea name="caption" toName="image"/>'
        + "".join(f'<TextArea name="a_{f}" toName="image" question="${f}"/>' for f in fields)
        + "</View>"
    )
    with caplog.at_level(logging.WARNING, logger="backend"):
        asks = plan(config)
        plan(config)  # cached: logged once per config, not per request
    assert [a.from_name for a in asks.asks] == ["caption"] + [f"a_{f}" for f in fields[:MAX_QUESTIONS]]
    assert asks.skipped == tuple(
        f"TextArea 'a_{f}': more than {MAX_QUESTIONS} questions per task" for f in fields[MAX_QUESTIONS:]
    )
    lines = [r.getMessage() for r in caplog.records if "questions per task" in r.getMessage()]
    assert lines == [
        f"the labeling config asks {MAX_QUESTIONS + 4} questions per task; only the first {MAX_QUESTIONS} "
        f"are predicted, not: {', '.join(f'a_{f}' for f in fields[MAX_QUESTIONS:])}"
    ]


def test_long_questions_are_cut_with_a_log_line(blip, caplog):
    scene = make_scenes(1, HELD_OUT_SEED)[0]
    fixed = "what colour is the circle? " * 100
    config = (
        '<View><Image name="image" value="$image"/>'
        f'<TextArea name="fixed" toName="image" question="{fixed}"/>'
        '<TextArea name="asked" toName="image" question="$q"/></View>'
    )
    huge = "how many objects are there? " * 200_000  # 5.6 MB of question in a task
    app = create_app(blip=blip, settings=Settings())
    with caplog.at_level(logging.WARNING, logger="backend"):
        asks = plan(config)
        assert len(asks.asks[0].question) == MAX_QUESTION_CHARS
        t0 = time.perf_counter()
        reply = app.test_client().post(
            "/predict",
            json={
                "tasks": [{"id": 5, "data": {"image": data_uri(scene.image), "q": huge}}],
                "label_config": config,
            },
        )
        elapsed = time.perf_counter() - t0
    (entry,) = reply.get_json()["results"]
    assert [r["from_name"] for r in entry["result"]] == ["fixed", "asked"]  # both still answered
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(
            f"fixed's question is {len(fixed.strip())} characters long; only its first {MAX_QUESTION_CHARS}"
        )
        for m in messages
    )
    assert any(
        m.startswith(
            f"asked's question (task data 'q') is {len(huge.strip())} characters long; only its first"
        )
        for m in messages
    )
    assert elapsed < 30


# -- MAX_REQUEST_MB ------------------------------------------------------------------------------------------


def test_max_request_mb_from_the_environment(monkeypatch):
    monkeypatch.delenv("MAX_REQUEST_MB", raising=False)
    assert Settings.from_env().max_request_mb == MAX_REQUEST_MB == 256
    monkeypatch.setenv("MAX_REQUEST_MB", "8")
    assert Settings.from_env().max_request_mb == 8
    monkeypatch.setenv("MAX_REQUEST_MB", "lots")
    with pytest.raises(ValueError, match="MAX_REQUEST_MB must be a positive whole number, got 'lots'"):
        Settings.from_env()


def test_the_default_limit_refuses_a_declared_2_gb_body(blip, caplog):
    client = create_app(blip=blip, settings=Settings()).test_client()
    with caplog.at_level(logging.WARNING, logger="backend"):
        for path in ("/predict", "/setup"):
            response = client.post(
                path,
                data=b'{"tasks": [',
                content_type="application/json",
                environ_overrides={"CONTENT_LENGTH": str(2 << 30)},
            )
            assert response.status_code == 413
            assert response.get_json() == {
                "status": "error",
                "detail": f"request body larger than MAX_REQUEST_MB ({MAX_REQUEST_MB} MB)",
            }
    assert any("POST /predict refused: 2147483648 bytes" in r.getMessage() for r in caplog.records)
    # at the limit, still served
    body = json.dumps({"tasks": [], "label_config": CAPTIONING}).encode()
    assert client.post("/predict", data=body, content_type="application/json").status_code == 200


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def gunicorn_worker(master: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of gunicorn {master}")


@pytest.fixture(scope="module")
def backend(tiny_dir, tmp_path_factory):
    """(URL, worker pid, log) of `blip-backend serve` with MAX_REQUEST_MB=4."""
    log = tmp_path_factory.mktemp("limits") / "backend.log"
    proc, url = serve_backend(tiny_dir, log, MAX_REQUEST_MB=str(TEST_LIMIT_MB))
    try:
        wait_for(f"{url}/health", proc, log, 120)
        yield url, gunicorn_worker(proc.pid), log
    finally:
        stop_backend(proc, log)


def raw_request(url: str, head: str, body: bytes) -> tuple[int, bytes, float]:
    """Sends the request line and headers and `body` (not necessarily all Content-Length says), then reads
    the answer: (status, body, seconds from the last byte sent to the answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        t0 = time.monotonic()
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read(), time.monotonic() - t0


def test_a_2_gb_body_is_refused_before_it_is_read(backend):
    url, worker, log = backend
    requests.get(f"{url}/health", timeout=5)
    before = rss_kib(worker)
    head = (
        "POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\n"
        f"Content-Length: {2 << 30}\r\n\r\n"
    )
    status, body, seconds = raw_request(url, head, b'{"tasks": [{"id": 1, "data": {"captioning": "')
    assert status == 413 and seconds < 1, (status, seconds)
    assert json.loads(body)["detail"] == f"request body larger than MAX_REQUEST_MB ({TEST_LIMIT_MB} MB)"
    assert rss_kib(worker) - before < 10 * 1024  # KiB: nothing of the body was buffered
    assert requests.get(f"{url}/health", timeout=5).status_code == 200  # the worker serves on
    assert f"POST /predict refused: {2 << 30} bytes" in log.read_text()


def test_a_chunked_body_is_cut_off_at_the_limit(backend):
    url, worker, log = backend
    before = rss_kib(worker)
    head = (
        "POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * (64 << 10)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    # past the limit, and no end: the body could go on forever. (Past the limit by less than what gunicorn
    # drains from a connection before closing it: a close with unread data resets the connection, and
    # the client may lose the answer.)
    tail = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
    status, body, seconds = raw_request(url, head, chunk * (TEST_LIMIT_MB * 16) + tail)
    assert status == 413 and seconds < 2, (status, seconds)
    assert "MAX_REQUEST_MB" in json.loads(body)["detail"]
    assert rss_kib(worker) - before < 3 * TEST_LIMIT_MB * 1024
    assert "POST /predict refused: a chunked body" in log.read_text()
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    # a chunked body within the limit is served as before
    tasks = [{"id": 1, "data": {"captioning": data_uri(make_scenes(1, HELD_OUT_SEED)[0].image)}}]
    request = json.dumps({"tasks": tasks, "label_config": CAPTIONING}).encode()
    pieces = [request[i : i + 1000] for i in range(0, len(request), 1000)]
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    status, answer, _ = raw_request(url, head, body)
    assert status == 200 and json.loads(answer)["results"][0]["result"], answer


def test_an_xml_bomb_through_predict_is_refused_fast(backend):
    url, _, log = backend
    tasks = [{"id": 7, "data": {"captioning": data_uri(make_scenes(1, HELD_OUT_SEED)[0].image)}}]
    for config in (billion_laughs(), quadratic_blowup()):
        t0 = time.monotonic()
        response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": config}, timeout=30)
        assert time.monotonic() - t0 < 0.5
        assert response.status_code == 200 and response.json()["results"] == [[]]
    assert "1 task(s) get no prediction: the labeling config has a <!DOCTYPE>" in log.read_text()
