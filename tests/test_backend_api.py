"""The ML backend protocol through Flask's test client, as Label Studio's example backends are tested.

Images are held-out synthetic scenes the bundled tiny BLIP captions and answers correctly, sent as data
URIs or served from a local HTTP server that imitates Label Studio's file routes (tests/fake_files.py).
"""

from __future__ import annotations

import base64
import logging
import threading
import time

import pytest
from fake_files import FileServer, bomb_png
from label_studio_server import data_uri
from scenes import fully_right
from templates import CAPTIONING, vqa

from backend.annotate.labeling import DEFAULT_THRESHOLD
from backend.server.app import Settings, create_app
from model_build.tiny_blip.synthetic import COLOURS, COUNTS, HELD_OUT_SEED, make_scenes

# Label Studio's "Visual Question Answering" template, unchanged, plus a control the backend leaves alone
VQA = vqa(
    3, extra='\n  <Labels name="aspect" toName="q1"><Label value="Color"/><Label value="Count"/></Labels>'
)
HOW_MANY = "how many objects are there?"
# the test file server's host: loopback, refused by default (tests/test_fetch_policy.py shows that)
SERVER_HOST = "127.0.0.1"
FIXED = f"""<View>
  <Image name="image" value="$image"/>
  <TextArea name="count_text" toName="image" question="{HOW_MANY}"/>
  <Choices name="count" toName="image" question="{HOW_MANY}">
    <Choice value="one" alias="1"/><Choice value="two" alias="2"/><Choice value="three" alias="3"/>
  </Choices>
  <Choices name="colour" toName="image" question="$colour_q">
    {"".join(f'<Choice value="{c}"/>' for c in COLOURS)}
  </Choices>
  <TextArea name="caption" toName="image"/>
  <TextArea name="notes" toName="image" predict="false"/>
</View>"""


@pytest.fixture(scope="module")
def scenes(blip):
    """Held-out scenes the model gets entirely right (caption, every answer, every ranked answer)."""
    pool = make_scenes(60, HELD_OUT_SEED)
    good = fully_right(blip, pool)
    # ~10 exact checks per scene: a model at the 95% target still gets most scenes entirely right
    assert len(good) >= len(pool) // 2, f"only {len(good)} of {len(pool)} held-out scenes fully right"
    return good


@pytest.fixture(scope="module")
def app(blip):
    return create_app(blip=blip, settings=Settings(allowed_image_hosts=SERVER_HOST))


@pytest.fixture
def client(app):
    return app.test_client()


def predict(client, config: str, tasks: list[dict]) -> list:
    response = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert response.status_code == 200, response.data
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    return results


def one(entry: dict, from_name: str) -> dict:
    matches = [r for r in entry["result"] if r["from_name"] == from_name]
    assert len(matches) == 1, entry
    return matches[0]


def qa_of(scene, kind: str):
    return next(qa for qa in scene.qa if qa.kind == kind)


# -- routes ------------------------------------------------------------------------------------------


def test_health_setup_webhook_metrics(blip):
    client = create_app(blip=blip, settings=Settings()).test_client()  # /setup's hostname stays in this app
    health = client.get("/health").get_json()
    assert health["status"] == "UP"
    assert health["precision"] == blip.precision and health["device"] == "CPU"
    version = health["model_version"]
    assert version.endswith(f"-{blip.precision}-{blip.manifest.fingerprint}")
    setup = client.post(
        "/setup", json={"project": "1.1", "schema": CAPTIONING, "hostname": "http://x", "access_token": "t"}
    )
    assert setup.status_code == 200 and setup.get_json() == {"model_version": version}
    hook = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": [], "project": {"id": 1}})
    assert hook.status_code == 200
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200
    before = client.get("/metrics").get_json()
    predict(
        client,
        CAPTIONING,
        [{"id": 1, "data": {"captioning": data_uri(make_scenes(1, HELD_OUT_SEED)[0].image)}}],
    )
    predict(client, CAPTIONING, [{"id": 2, "data": {}}])
    after = client.get("/metrics").get_json()
    assert after["tasks_predicted"] == before["tasks_predicted"] + 1
    assert after["tasks_failed"] == before["tasks_failed"] + 1
    assert after["predict_calls"] == before["predict_calls"] + 2
    assert after["requests"]["/predict"] == before["requests"].get("/predict", 0) + 2
    assert after["predict_mean_latency_s"] > 0 and after["model_version"] == version


def test_bad_request_bodies(client):
    assert client.post("/predict", data="not json", content_type="application/json").status_code == 400
    assert client.post("/predict", json={"label_config": CAPTIONING}).status_code == 400
    assert predict(client, CAPTIONING, []) == []


# -- what gets predicted -------------------------------------------------------------------------------


def test_stock_image_captioning_template(client, scenes, blip):
    batch = scenes[:6]
    tasks = [{"id": 100 + i, "data": {"captioning": data_uri(s.image)}} for i, s in enumerate(batch)]
    results = predict(client, CAPTIONING, tasks)
    version = client.get("/health").get_json()["model_version"]
    for scene, entry in zip(batch, results):
        assert entry["model_version"] == version
        (result,) = entry["result"]
        assert {k: result[k] for k in ("from_name", "to_name", "type", "value")} == {
            "from_name": "caption",
            "to_name": "image",
            "type": "textarea",
            "value": {"text": [scene.caption]},
        }
        assert 0 < result["score"] <= 1 and entry["score"] == pytest.approx(result["score"])


def test_stock_vqa_template_with_questions_in_task_data(client, scenes):
    batch = scenes[:5]
    with FileServer() as server:
        tasks = []
        for i, scene in enumerate(batch):
            server.files[f"/s{i}.png"] = base64.b64decode(data_uri(scene.image).split(",")[1])
            data = {"image": server.url(f"/s{i}.png")}
            # a task may fill fewer questions than the template has; the rest stay unpredicted
            for n, qa in enumerate(scene.qa[: 3 if i % 2 else 2], 1):
                data[f"q{n}"] = qa.question
            tasks.append({"id": i, "data": data})
        results = predict(client, VQA, tasks)
    for task, scene, entry in zip(tasks, batch, results):
        asked = [k for k in ("q1", "q2", "q3") if k in task["data"]]
        assert [r["from_name"] for r in entry["result"]] == [f"answer{k[1]}" for k in asked]
        for k, result in zip(asked, entry["result"]):
            qa = scene.qa[int(k[1]) - 1]
            assert result["to_name"] == k and result["type"] == "textarea"
            assert result["value"] == {"text": [qa.answer]}, qa.question
            assert 0 < result["score"] <= 1


def test_fixed_questions_choices_with_aliases_and_questions_from_data(client, scenes):
    batch = [s for s in scenes if any(qa.question == HOW_MANY for qa in s.qa)][:4]
    assert batch, "no held-out scene asks how many objects there are"
    tasks = [
        {"id": i, "data": {"image": data_uri(s.image), "colour_q": qa_of(s, "colour").question}}
        for i, s in enumerate(batch)
    ]
    for scene, entry in zip(batch, predict(client, FIXED, tasks)):
        count = next(qa.answer for qa in scene.qa if qa.question == HOW_MANY)
        assert one(entry, "count_text")["value"] == {"text": [count]}
        choice = one(entry, "count")
        assert choice["type"] == "choices" and choice["to_name"] == "image"
        assert choice["value"] == {"choices": [str(COUNTS.index(count) + 1)]}  # the alias is stored
        assert one(entry, "colour")["value"] == {"choices": [qa_of(scene, "colour").answer]}
        assert one(entry, "caption")["value"] == {"text": [scene.caption]}
        assert not [r for r in entry["result"] if r["from_name"] == "notes"]  # opted out
        assert [r["from_name"] for r in entry["result"]] == ["count_text", "count", "colour", "caption"]
        assert entry["score"] == pytest.approx(sum(r["score"] for r in entry["result"]) / 4, abs=1e-3)


@pytest.mark.parametrize("threshold", [None, "0.0", "0.999"])
def test_multiple_choice_threshold(client, scenes, blip, threshold):
    scene = scenes[0]
    qa = qa_of(scene, "colour")
    attr = f' threshold="{threshold}"' if threshold else ""
    choices = "".join(f'<Choice value="{c}"/>' for c in COLOURS)
    config = (
        f'<View><Image name="image" value="$image"/><Choices name="c" toName="image" choice="multiple" '
        f'question="{qa.question}"{attr}>{choices}</Choices></View>'
    )
    (entry,) = predict(client, config, [{"id": 1, "data": {"image": data_uri(scene.image)}}])
    shares = blip.rank([scene.image], qa.question, COLOURS)[0].scores
    limit = float(threshold) if threshold else DEFAULT_THRESHOLD
    expected = [c for c in COLOURS if shares[c] >= limit or c == qa.answer]
    picked = one(entry, "c")
    assert picked["value"]["choices"] == expected
    assert qa.answer in expected and (threshold != "0.999" or expected == [qa.answer])
    assert picked["score"] == pytest.approx(min(1.0, sum(shares[c] for c in expected)), abs=1e-3)


def test_caption_prompt(client, scenes, blip):
    config = (
        '<View><Image name="i" value="$img"/><TextArea name="t" toName="i" prompt="a picture of"/></View>'
    )
    (entry,) = predict(client, config, [{"id": 1, "data": {"img": data_uri(scenes[0].image)}}])
    expected = blip.caption([scenes[0].image], "a picture of")[0].text
    assert one(entry, "t")["value"] == {"text": [expected]}
    assert expected.startswith("a picture of")


def test_nothing_to_predict_logs_one_line(client, scenes, caplog):
    config = (
        '<View><Image name="image" value="$image"/><TextArea name="t" toName="image" predict="false"/>'
        '<RectangleLabels name="box" toName="image"><Label value="thing"/></RectangleLabels></View>'
    )
    tasks = [{"id": i, "data": {"image": data_uri(s.image)}} for i, s in enumerate(scenes[:3])]
    with caplog.at_level(logging.INFO, logger="backend"):
        assert predict(client, config, tasks) == [[], [], []]
    lines = [r.getMessage() for r in caplog.records if "nothing to predict" in r.getMessage()]
    assert len(lines) == 1 and 'predict="false"' in lines[0] and "RectangleLabels" in lines[0]


@pytest.mark.parametrize(
    "config",
    [
        "<View><Image name='image' value='$image'",  # not XML
        "<View><Text name='t' value='$text'/><Choices name='c' toName='t'><Choice value='a'/></Choices>"
        "</View>",  # no Image
        "<View><Image name='image' value='$image'/><Choices name='c' toName='image'><Choice value='a'/>"
        "</Choices></View>",  # Choices without a question
    ],
    ids=["invalid-xml", "no-image", "choices-without-question"],
)
def test_unsupported_configs_give_empty_entries(client, scenes, config, caplog):
    tasks = [{"id": 1, "data": {"image": data_uri(scenes[0].image), "text": "hi"}}, {"id": 2, "data": {}}]
    with caplog.at_level(logging.WARNING, logger="backend"):
        assert predict(client, config, tasks) == [[], []]
    assert len([r for r in caplog.records if "no prediction" in r.getMessage()]) == 1


def test_overlong_question_is_truncated_with_a_warning(client, scenes, blip, caplog):
    scene = scenes[0]
    qa = qa_of(scene, "colour")
    long_question = qa.question + " and" * (blip.text_codec.max_length + 20)
    assert blip.text_codec.too_long(long_question)
    config = (
        '<View><Image name="image" value="$image"/><TextArea name="a" toName="image" question="$q"/></View>'
    )
    with caplog.at_level(logging.WARNING, logger="backend"):
        (entry,) = predict(
            client, config, [{"id": 9, "data": {"image": data_uri(scene.image), "q": long_question}}]
        )
    assert one(entry, "a")["value"]["text"][0]  # still answered (from the question's head)
    assert any("task 9" in r.getMessage() and "longer than" in r.getMessage() for r in caplog.records)


# -- bad inputs: one broken task never breaks the batch -------------------------------------------------


def test_broken_tasks_get_empty_entries_and_the_rest_is_right(client, scenes, caplog):
    good = scenes[:3]
    png = base64.b64decode(data_uri(good[0].image).split(",")[1])
    with FileServer() as server:
        server.files["/ok.png"] = png
        server.files["/corrupt.png"] = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
        server.files["/truncated.png"] = png[: len(png) // 2]
        server.files["/notes.txt"] = b"just text\n"
        server.files["/bomb.png"] = bomb_png()
        server.status["/secret.png"] = 401
        bad = {
            11: {},  # missing data field
            12: {"captioning": server.url("/missing.png")},  # 404
            13: {"captioning": server.url("/secret.png")},  # 401
            14: {"captioning": server.url("/corrupt.png")},
            15: {"captioning": server.url("/truncated.png")},
            16: {"captioning": server.url("/notes.txt")},
            17: {"captioning": server.url("/bomb.png")},
            18: {"captioning": "/data/upload/1/x.png"},  # relative upload URL, no LABEL_STUDIO_URL
            19: {"captioning": 42},
            20: {"captioning": "data:image/png;base64,@@@not base64@@@"},
        }
        tasks = [{"id": 1, "data": {"captioning": data_uri(good[0].image)}}]
        tasks += [{"id": tid, "data": data} for tid, data in bad.items()]
        tasks += [{"id": 2, "data": {"captioning": server.url("/ok.png")}}]
        tasks += [{"id": 3, "data": {"captioning": data_uri(good[1].image)}}, "not a task"]
        with caplog.at_level(logging.WARNING, logger="backend"):
            results = predict(client, CAPTIONING, tasks)
    assert results[1 : 1 + len(bad)] == [[]] * len(bad) and results[-1] == []
    assert results[0]["result"][0]["value"]["text"] == [good[0].caption]
    assert results[-3]["result"][0]["value"]["text"] == [good[0].caption]
    assert results[-2]["result"][0]["value"]["text"] == [good[1].caption]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for tid in bad:
        assert f"task {tid}: no prediction" in logged
    assert "404" in logged and "401" in logged and "not an image" in logged and "pixels" in logged


def test_label_studio_file_routes_with_env_token_or_setup_fallback(blip, scenes):
    scene = scenes[0]
    png = base64.b64decode(data_uri(scene.image).split(",")[1])
    with FileServer() as server:
        server.files["/data/upload/5/a.png"] = png
        server.files["/data/local-files/?d=dir/a.png"] = png
        server.files["/bucket/bucket/a.png"] = png
        tasks = [
            {"id": 1, "data": {"captioning": "/data/upload/5/a.png"}},
            {"id": 2, "data": {"captioning": "/data/local-files/?d=dir/a.png"}},
            {"id": 3, "data": {"captioning": "s3://bucket/a.png"}},
        ]
        # allow-listed for the presign route's redirect to /bucket/..., which a real Label Studio sends to S3
        for settings in (
            Settings(
                label_studio_url=server.base, api_key=server.legacy_token, allowed_image_hosts=SERVER_HOST
            ),
            # personal access token
            Settings(label_studio_url=server.base, api_key=server.pat, allowed_image_hosts=SERVER_HOST),
            Settings(allowed_image_hosts=SERVER_HOST),  # credentials only from /setup
        ):
            client = create_app(blip=blip, settings=settings).test_client()
            if not settings.label_studio_url:
                assert predict(client, CAPTIONING, tasks[:1]) == [[]]  # no host known yet
                client.post(
                    "/setup",
                    json={
                        "project": "5.1",
                        "schema": CAPTIONING,
                        "hostname": server.base,
                        "access_token": server.legacy_token,
                    },
                )
            for entry in predict(client, CAPTIONING, tasks):
                assert entry["result"][0]["value"]["text"] == [scene.caption]


# -- batching, isolation, serialisation ---------------------------------------------------------------


class Spy:
    """Wraps Blip, counting calls and concurrent entries, optionally failing on a question."""

    def __init__(self, blip, fail_on: str | None = None, delay: float = 0.0) -> None:
        self._blip, self.fail_on, self.delay = blip, fail_on, delay
        self.calls: dict[str, int] = {}
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self._blip, name)
        if name == "captioner" and attr is self._blip:  # captions from the model itself: spied on too
            return self
        if name not in ("encode", "caption", "answer", "rank"):
            return attr

        def wrapped(*args, **kw):
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                time.sleep(self.delay)
                if self.fail_on and name == "answer" and any(self.fail_on in q for qs in args[1] for q in qs):
                    raise RuntimeError("boom")
                return attr(*args, **kw)
            finally:
                with self._lock:
                    self.active -= 1

        return wrapped


def test_one_call_per_kind_per_chunk_and_order_kept(blip, scenes):
    spy = Spy(blip)
    app = create_app(blip=spy, settings=Settings())
    app.config["predictor"].chunk = 4
    batch = (scenes * 2)[:10]
    tasks = [
        {"id": i, "data": {"image": data_uri(s.image), "colour_q": qa_of(s, "colour").question}}
        for i, s in enumerate(batch)
    ]
    config = FIXED.replace('<TextArea name="caption" toName="image"/>', "")
    results = predict(app.test_client(), config, tasks)
    chunks = 3
    # per chunk: one encode, one answer call (the fixed question), one rank per (question, choices)
    assert spy.calls["encode"] == chunks and spy.calls["answer"] == chunks
    assert "caption" not in spy.calls
    ranks_expected = sum(1 + len({qa_of(s, "colour").question for s in batch[c : c + 4]}) for c in (0, 4, 8))
    assert spy.calls["rank"] == ranks_expected
    for scene, entry in zip(batch, results):
        assert one(entry, "colour")["value"] == {"choices": [qa_of(scene, "colour").answer]}


def test_a_task_that_breaks_inference_is_isolated(blip, scenes, caplog):
    app = create_app(blip=Spy(blip, fail_on="boom"), settings=Settings())
    config = (
        '<View><Image name="image" value="$image"/><TextArea name="a" toName="image" question="$q"/></View>'
    )
    tasks = [
        {"id": i, "data": {"image": data_uri(s.image), "q": qa_of(s, "count").question}}
        for i, s in enumerate(scenes[:3])
    ]
    tasks[1]["data"]["q"] = "boom?"
    with caplog.at_level(logging.WARNING, logger="backend"):
        results = predict(app.test_client(), config, tasks)
    assert results[1] == []
    for i in (0, 2):
        assert one(results[i], "a")["value"] == {"text": [qa_of(scenes[i], "count").answer]}
    assert any("task 1: inference failed" in r.getMessage() for r in caplog.records)


def test_inference_is_serialised_across_threads(blip, scenes):
    spy = Spy(blip, delay=0.05)
    app = create_app(blip=spy, settings=Settings())
    tasks = [{"id": 1, "data": {"captioning": data_uri(scenes[0].image)}}]
    out = []
    threads = [
        threading.Thread(target=lambda: out.append(predict(app.test_client(), CAPTIONING, tasks)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and spy.max_active == 1


# -- basic auth ---------------------------------------------------------------------------------------


def test_basic_auth_on_every_route(blip):
    app = create_app(blip=blip, settings=Settings(basic_auth_user="ls", basic_auth_pass="s3cret"))
    client = app.test_client()
    routes = [
        ("get", "/health"),
        ("get", "/"),
        ("get", "/metrics"),
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
    ]
    good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"ls:wrong").decode()
    body = {"tasks": [], "label_config": CAPTIONING}
    for method, path in routes:
        for headers in ({}, {"Authorization": wrong}, {"Authorization": "Bearer s3cret"}):
            response = getattr(client, method)(path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert getattr(client, method)(path, json=body, headers={"Authorization": good}).status_code == 200


# -- blip-backend serve ---------------------------------------------------------------------------------


def test_serve_runs_gunicorn_with_the_environment(monkeypatch, tmp_path, capsys):
    from backend.__main__ import gunicorn_argv, main, parser

    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("THREADS", "5")
    monkeypatch.setenv("PORT", "9191")
    argv = gunicorn_argv(parser().parse_args(["serve"]))
    flags = dict(zip(argv[3:-1:2], argv[4::2]))
    assert argv[1:3] == ["-m", "gunicorn"] and argv[-1] == "backend.server.wsgi:app"
    assert flags["--bind"] == "0.0.0.0:9191" and flags["--workers"] == "3" and flags["--threads"] == "5"
    assert "--preload" not in argv  # OpenVINO does not survive fork
    # a threaded worker (--timeout is its main loop's heartbeat, so a long /predict is not cut short:
    # tests/test_load.py), whose quick lane answers /health while /predict requests queue
    assert flags["--worker-class"] == "backend.server.worker.Worker"
    assert flags["--timeout"] == "60" and flags["--graceful-timeout"] == "100"
    argv = gunicorn_argv(parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "8000"]))
    assert "127.0.0.1:8000" in argv
    monkeypatch.delenv("MODEL_DIR", raising=False)
    assert main(["serve"]) == 2 and "MODEL_DIR" in capsys.readouterr().err
    assert main(["serve", "--model-dir", str(tmp_path)]) == 2 and "manifest.json" in capsys.readouterr().err


def test_openvino_threads_and_precision_from_the_environment(monkeypatch, tiny_dir):
    monkeypatch.setenv("INFERENCE_THREADS", "1")
    import openvino as ov

    # bf16, not the default f32, so the assertion below can only hold if the variable was read
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    monkeypatch.setenv("INFERENCE_PRECISION", "bf16" if bf16 else "f32")
    app = create_app(tiny_dir)
    predictor = app.config["predictor"]
    assert predictor.blip.threads == 1
    compiled = predictor.blip._parts["vision"]
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == ("bf16" if bf16 else "f32")
    monkeypatch.setenv("INFERENCE_THREADS", "two")
    with pytest.raises(ValueError, match="INFERENCE_THREADS must be a positive whole number, got 'two'"):
        Settings.from_env()
