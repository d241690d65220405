"""Interactive mode: what an annotator types while labeling -> BLIP's answer in the right control, fast.

Through Flask's test client: the conventions (a question box answered into a TextArea and a Choices, a
caption continued from typed text, a question typed into a TextArea of the stock VQA template), every
malformed context answered 200 with an empty reply and a log line, and the embedding cache: a follow-up
question about a task neither downloads its image again nor runs the vision encoder (counted), while a
changed file behind the same URL is read and encoded again. Then through a real Label Studio
(`/api/ml/{id}/interactive-annotating`) and the backend under gunicorn. The browser drives the same in
tests/test_browser.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from fake_files import FileServer
from label_studio_server import data_uri, png, served_backend, upload
from scenes import fully_right
from templates import CAPTIONING, vqa

from backend.annotate.cache import EmbeddingCache, mb_from_env
from backend.annotate.fetch import FetchPolicy
from backend.annotate.images import ImageLoader
from backend.annotate.labeling import plan
from backend.annotate.predict import Predictor
from backend.server.app import Settings, create_app
from model_build.tiny_blip.synthetic import COLOURS, HELD_OUT_SEED, make_scenes

# a question box (`ask`), the two controls it answers into, a caption, and a control left alone
ASKING = f"""<View>
  <Image name="image" value="$image"/>
  <TextArea name="caption" toName="image" rows="2"/>
  <TextArea name="ask" toName="image" rows="2" placeholder="Ask BLIP, then Shift+Enter"/>
  <TextArea name="answer" toName="image" question="#ask" smart="false"/>
  <Choices name="colour" toName="image" question="#ask" smart="false">
    {"".join(f'<Choice value="{c}"/>' for c in COLOURS)}
  </Choices>
  <TextArea name="notes" toName="image" predict="false"/>
</View>"""


@pytest.fixture(scope="module")
def scenes(blip):
    """Held-out scenes the model gets entirely right (caption, answers, ranked answers)."""
    good = fully_right(blip, make_scenes(30, HELD_OUT_SEED))
    assert len(good) >= 8
    return good


def qa(scene, kind: str):
    return next(q for q in scene.qa if q.kind == kind)


def typed(name: str, *texts: str, to_name: str = "image", origin: str = "manual") -> dict:
    """A TextArea's result as Label Studio's labeling screen sends it in `context.result`."""
    return {
        "id": f"id-{name}",
        "from_name": name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": list(texts)},
        "origin": origin,
    }


def ask(client, config: str, task: dict, result, context: dict | None = None) -> dict:
    """One interactive /predict; returns the reply's only entry."""
    body = {
        "tasks": [task],
        "label_config": config,
        "project": "1.1",
        "params": {"login": None, "password": None, "context": context or {"result": result}},
    }
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.data
    (entry,) = response.get_json()["results"]
    return entry


def by_name(entry: dict) -> dict[str, dict]:
    return {r["from_name"]: r for r in entry["result"]}


@pytest.fixture
def counted(monkeypatch):
    """Images through a vision encoder, counted where Blip runs it."""
    import backend.runtime.blip as runtime

    seen = {"vision": 0}
    encode = runtime.encode_images

    def counting(vision, images, *args):
        seen["vision"] += len(images)
        return encode(vision, images, *args)

    monkeypatch.setattr(runtime, "encode_images", counting)
    return seen


class EtagServer:
    """Files with ETags on 127.0.0.1, answering If-None-Match with 304 (as S3, nginx and Label Studio's
    Local Storage route do); counts what it sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.sent = {200: 0, 304: 0}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                status = 304 if self.headers.get("If-None-Match") == etag else 200
                server.sent[status] += 1
                self.send_response(status)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data) if status == 200 else 0))
                self.end_headers()
                if status == 200:
                    self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> EtagServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- conventions -------------------------------------------------------------------------------------


def test_a_question_box_is_answered_into_a_textarea_and_a_choices(blip, scenes):
    client = create_app(blip=blip, settings=Settings()).test_client()
    scene = scenes[0]
    task = {"id": 1, "data": {"image": data_uri(scene.image)}}
    colour = qa(scene, "colour")
    box = typed("ask", colour.question)
    entry = ask(client, ASKING, task, [box, typed("caption", scene.caption, origin="prediction")])
    got = by_name(entry)
    assert got["ask"] == box  # the annotator's question comes back unchanged
    assert got["answer"]["value"] == {"text": [colour.answer]}
    assert got["colour"]["value"] == {"choices": [colour.answer]}
    assert set(got) == {"ask", "answer", "colour"}  # the caption BLIP wrote is left alone
    for name in ("answer", "colour"):
        assert got[name]["origin"] == "prediction" and got[name]["to_name"] == "image"
        assert 0.5 < got[name]["score"] <= 1
    assert entry["score"] == pytest.approx((got["answer"]["score"] + got["colour"]["score"]) / 2, abs=1e-4)
    assert entry["model_version"] == blip.model_version
    # a second question in the same box (a TextArea keeps every text): the last one is asked
    count = qa(scene, "count")
    got = by_name(ask(client, ASKING, task, [typed("ask", colour.question, count.question)]))
    assert got["answer"]["value"] == {"text": [count.answer]}
    # retrievals leave the box alone and its receivers empty: only the caption is predicted
    response = client.post("/predict", json={"tasks": [task], "label_config": ASKING})
    (entry,) = response.get_json()["results"]
    assert [r["from_name"] for r in entry["result"]] == ["caption"]
    assert entry["result"][0]["value"] == {"text": [scene.caption]} and "origin" not in entry["result"][0]


def test_a_question_is_not_asked_again_when_another_control_is_submitted(blip, scenes, caplog):
    client = create_app(blip=blip, settings=Settings()).test_client()
    scene = scenes[1]
    task = {"id": 2, "data": {"image": data_uri(scene.image)}}
    question = qa(scene, "colour").question
    first = by_name(ask(client, ASKING, task, [typed("ask", question)]))
    # the annotator picks another colour (Label Studio keeps origin "prediction" on a Choices), then
    # submits a note: the context still holds the question, which must not reset their choice
    changed = {**first["colour"], "value": {"choices": ["green"]}}
    with caplog.at_level(logging.INFO, logger="backend"):
        entry = ask(
            client, ASKING, task, [typed("ask", question), first["answer"], changed, typed("notes", "x")]
        )
    assert entry["result"] == []
    assert any("was answered already" in r.getMessage() for r in caplog.records)
    # with a receiver emptied, the same question is answered again
    again = by_name(ask(client, ASKING, task, [typed("ask", question), changed]))
    assert again["answer"]["value"] == first["answer"]["value"]


def test_a_caption_continues_what_the_annotator_typed(blip, scenes):
    client = create_app(blip=blip, settings=Settings()).test_client()
    scene = scenes[2]
    task = {"id": 3, "data": {"captioning": data_uri(scene.image)}}
    words = scene.caption.split()
    for prompt in (" ".join(words[:2]), "two"):
        expected = blip.caption([scene.image], prompt=prompt)[0]
        got = by_name(ask(client, CAPTIONING, task, [typed("caption", prompt)]))["caption"]
        assert got["value"] == {"text": [expected.text]} and expected.text.startswith(prompt)
        assert got["score"] == pytest.approx(expected.score, abs=1e-4) and got["origin"] == "prediction"
    # a caption BLIP wrote is not continued again
    assert (
        ask(client, CAPTIONING, task, [typed("caption", scene.caption, origin="prediction")])["result"] == []
    )
    # earlier texts of a multi-text TextArea are kept, the last one is continued
    got = by_name(ask(client, CAPTIONING, task, [typed("caption", "first text", words[0])]))["caption"]
    assert got["value"]["text"][0] == "first text" and got["value"]["text"][1].startswith(words[0])


def test_the_stock_vqa_template_answers_a_question_typed_into_an_answer_field(blip, scenes):
    """Label Studio's template, no attribute added: a typed text ending in "?" is asked, and the answer
    follows it in the same field; other typed text is the annotator's own answer."""
    client = create_app(blip=blip, settings=Settings()).test_client()
    scene = scenes[3]
    task = {"id": 4, "data": {"image": data_uri(scene.image), "q1": qa(scene, "count").question}}
    shape = qa(scene, "shape")
    got = by_name(ask(client, vqa(2), task, [typed("answer2", shape.question, to_name="q2")]))
    assert got["answer2"]["value"] == {"text": [shape.question, shape.answer]}
    assert got["answer2"]["to_name"] == "q2" and set(got) == {"answer2"}
    # the annotator's own answer to q1 is left alone
    assert ask(client, vqa(2), task, [typed("answer1", "three", to_name="q1")])["result"] == []
    # and the captioning template takes a question too
    captioning = {"id": 5, "data": {"captioning": data_uri(scene.image)}}
    got = by_name(ask(client, CAPTIONING, captioning, [typed("caption", shape.question)]))
    assert got["caption"]["value"] == {"text": [shape.question, shape.answer]}


@pytest.mark.parametrize(
    "context, why",
    [
        ({}, "no result list"),
        ({"result": "what colour?"}, "no result list"),
        ({"result": [1, None, "x", {"from_name": 5}]}, "nothing to ask"),
        ({"result": [{"from_name": "ask", "value": {"text": "  "}}]}, "empty question"),
        ({"result": [{"from_name": "ask", "value": {"text": ["?"]}}]}, "empty question"),
        ({"result": [{"from_name": "ask", "value": {"text": [7]}}]}, "not a list of texts"),
        ({"result": [{"from_name": "ask", "value": None}]}, "not a list of texts"),
        ({"result": [{"from_name": "ask", "value": {"text": ["why" * 400 + "?"]}}]}, "characters"),
        ({"result": [{"from_name": "caption", "value": {"text": [""]}}]}, "nothing to ask"),
        ({"result": [{"from_name": "nobody", "value": {"text": ["what?"]}}]}, "nothing to ask"),
        ({"result": [{"from_name": "notes", "value": {"text": ["what colour?"]}}]}, "nothing to ask"),
    ],
)
def test_bad_or_empty_input_gets_an_empty_reply_and_a_log_line(blip, scenes, caplog, context, why):
    client = create_app(blip=blip, settings=Settings()).test_client()
    task = {"id": 6, "data": {"image": data_uri(scenes[0].image)}}
    with caplog.at_level(logging.INFO, logger="backend"):
        entry = ask(client, ASKING, task, None, context=context)
    assert entry == {"result": [], "score": 0.0, "model_version": blip.model_version}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task 6: interactive")]
    assert any(why in line for line in lines), lines


def test_an_unreadable_image_or_config_gets_an_empty_reply(blip, caplog):
    client = create_app(blip=blip, settings=Settings()).test_client()
    question = [typed("ask", "what colour is the circle?")]
    with caplog.at_level(logging.INFO, logger="backend"):
        refused = ask(client, ASKING, {"id": 8, "data": {"image": "http://127.0.0.1:9/x.png"}}, question)
        broken = ask(client, ASKING, {"id": 9, "data": {"image": "data:image/png;base64,AAAA"}}, question)
        missing = ask(client, ASKING, {"id": 10, "data": {}}, question)
        no_config = ask(client, "<View", {"id": 11, "data": {}}, question)
    for entry in (refused, broken, missing, no_config):
        assert entry["result"] == []
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "task 8: interactive: no answer: image $image" in text and "loopback" in text
    assert "task 9: interactive: no answer" in text and "task 10: interactive: no answer" in text
    assert "cannot parse the labeling config" in text


def test_retrievals_of_a_config_that_only_answers_typed_questions_say_so_once(blip, scenes, caplog):
    client = create_app(blip=blip, settings=Settings()).test_client()
    config = ASKING.replace('<TextArea name="caption" toName="image" rows="2"/>', "")
    tasks = [{"id": i, "data": {"image": data_uri(s.image)}} for i, s in enumerate(scenes[:3])]
    with caplog.at_level(logging.INFO, logger="backend"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert response.get_json()["results"] == [[], [], []]
    lines = [r.getMessage() for r in caplog.records if "typed while labeling" in r.getMessage()]
    assert len(lines) == 1 and "question boxes ask" in lines[0]


# -- follow-up questions: the cache ------------------------------------------------------------------


def test_a_follow_up_question_skips_the_download_and_the_vision_encoder(blip, scenes, counted):
    scene, other = scenes[4], scenes[5]
    with EtagServer() as files:
        files.files["/scene.png"] = png(scene.image)
        app = create_app(blip=blip, settings=Settings(allowed_image_hosts="127.0.0.1"))
        client, predictor = app.test_client(), app.config["predictor"]
        task = {"id": 12, "data": {"image": files.base + "/scene.png"}}
        first = by_name(ask(client, ASKING, task, [typed("ask", qa(scene, "colour").question)]))
        assert first["answer"]["value"] == {"text": [qa(scene, "colour").answer]}
        assert counted["vision"] == 1 and files.sent == {200: 1, 304: 0}
        for kind in ("count", "shape", "position"):
            got = by_name(ask(client, ASKING, task, [typed("ask", qa(scene, kind).question)]))
            assert got["answer"]["value"] == {"text": [qa(scene, kind).answer]}
        # three follow-ups: a 304 each, no image bytes, no vision encoder
        assert counted["vision"] == 1 and files.sent == {200: 1, 304: 3}
        assert predictor.counts["images_kept"] == 3
        # another file behind the same URL: downloaded and encoded again, and answered from the new image
        files.files["/scene.png"] = png(other.image)
        got = by_name(ask(client, ASKING, task, [typed("ask", qa(other, "colour").question)]))
        assert got["answer"]["value"] == {"text": [qa(other, "colour").answer]}
        assert counted["vision"] == 2 and files.sent == {200: 2, 304: 3}
        metrics = client.get("/metrics").get_json()
        assert metrics["images_encoded"] == 2 and metrics["embedding_cache"]["images"] == 2


def test_label_studio_uploads_and_data_uris_are_not_fetched_again(blip, scenes, counted):
    scene = scenes[6]
    with FileServer() as ls_files:
        ls_files.files["/data/upload/5/ab12cd34-scene.png"] = png(scene.image)
        app = create_app(
            blip=blip, settings=Settings(label_studio_url=ls_files.base, api_key=ls_files.legacy_token)
        )
        client = app.test_client()
        for image in ("/data/upload/5/ab12cd34-scene.png", data_uri(scene.image)):
            task = {"id": 13, "data": {"image": image}}
            before, seen = len(ls_files.requests), counted["vision"]
            for kind in ("colour", "count", "shape"):
                got = by_name(ask(client, ASKING, task, [typed("ask", qa(scene, kind).question)]))
                assert got["answer"]["value"] == {"text": [qa(scene, kind).answer]}
            # one download (an upload: the storage proxy first) and one vision call for three questions
            assert counted["vision"] == seen + 1
            assert len(ls_files.requests) - before == (1 if image.startswith("/data/") else 0)


def test_retrievals_keep_embeddings_for_the_first_question(blip, scenes, counted):
    """Opening an unpredicted task makes Label Studio retrieve its prediction: the question asked next
    finds the image encoded already. (The question encoder's K/V is kept for interactive requests only.)"""
    client = create_app(blip=blip, settings=Settings()).test_client()
    scene = scenes[7]
    task = {"id": 14, "data": {"image": data_uri(scene.image)}}
    client.post("/predict", json={"tasks": [task], "label_config": ASKING})
    assert counted["vision"] == 1
    got = by_name(ask(client, ASKING, task, [typed("ask", qa(scene, "count").question)]))
    assert got["answer"]["value"] == {"text": [qa(scene, "count").answer]} and counted["vision"] == 1


def test_a_changed_local_storage_file_is_read_again(blip, scenes, counted, tmp_path: Path):
    scene, other = scenes[0], scenes[1]
    root = tmp_path / "files"
    root.mkdir()
    (root / "a.png").write_bytes(png(scene.image))
    predictor = Predictor(blip, cache=EmbeddingCache())
    loader = ImageLoader(policy=FetchPolicy.parse("", local_files_root=root))
    config = plan(ASKING, tuple(blip.tasks))
    task = {"id": 15, "data": {"image": "/data/local-files/?d=a.png"}}

    def colour(scene) -> str:
        entry = predictor.interactive(
            [task], config, {"result": [typed("ask", qa(scene, "colour").question)]}, loader
        )
        return by_name(entry.entries[0])["answer"]["value"]["text"][0]

    assert colour(scene) == qa(scene, "colour").answer and counted["vision"] == 1
    assert colour(scene) == qa(scene, "colour").answer and counted["vision"] == 1  # same inode, size, mtime
    (root / "a.png").write_bytes(png(other.image))
    os.utime(root / "a.png", ns=(1, 1))  # even with an older modification time
    assert colour(other) == qa(other, "colour").answer and counted["vision"] == 2


def test_the_cache_is_bounded_by_bytes_and_by_images():
    import numpy as np

    cache = EmbeddingCache(max_bytes=10 * 1024, max_images=3)
    block = np.zeros(256, np.float32)  # 1 KiB
    for i in range(6):
        cache.put("m", f"image{i}", block.copy())
    assert cache.snapshot()["images"] == 3 and cache.get("m", "image0") is None
    cache.get("m", "image3")  # used: kept over image4, the least recently used
    cache.put("m", "image6", block.copy())
    assert cache.get("m", "image3") is not None and cache.get("m", "image4") is None
    cache.put("m", "big", np.zeros(9 * 256, np.float32))  # 9 KiB: everything else goes
    assert cache.nbytes <= 10 * 1024 and cache.get("m", "big") is not None
    cache.put("m", "huge", np.zeros(11 * 256, np.float32))  # over the whole budget: not kept
    assert cache.get("m", "huge") is None
    off = EmbeddingCache(0)
    off.put("m", "x", block)
    assert not off.enabled and off.get("m", "x") is None


def test_embedding_cache_mb_from_the_environment(monkeypatch, blip, scenes, counted):
    monkeypatch.setenv("EMBEDDING_CACHE_MB", "0")
    assert Settings.from_env().embedding_cache_mb == 0 and not EmbeddingCache(mb_from_env() << 20).enabled
    client = create_app(blip=blip, settings=Settings.from_env()).test_client()
    task = {"id": 16, "data": {"image": data_uri(scenes[2].image)}}
    for kind in ("colour", "count"):
        ask(client, ASKING, task, [typed("ask", qa(scenes[2], kind).question)])
    assert counted["vision"] == 2  # no cache: every question encodes the image
    monkeypatch.setenv("EMBEDDING_CACHE_MB", "64")
    assert Settings.from_env().embedding_cache_mb == 64 and mb_from_env() == 64
    monkeypatch.setenv("EMBEDDING_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="EMBEDDING_CACHE_MB"):
        Settings.from_env()


# -- through a real Label Studio ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(label_studio, tiny_dir, tmp_path_factory):
    """The backend under gunicorn, downloading uploads from the test Label Studio."""
    ls_url, token = label_studio
    log = tmp_path_factory.mktemp("interactive") / "backend.log"
    with served_backend(tiny_dir, log, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=token) as url:
        yield url


def interactive_project(ls, label_studio, backend: str, title: str, config: str, images: dict[str, bytes]):
    """A project with the backend connected for interactive pre-annotations, and its uploaded tasks."""
    project = ls.projects.create(title=title, label_config=config)
    ml = ls.ml.create(project=project.id, url=backend, title="BLIP", is_interactive=True)
    upload(label_studio, project.id, images)
    return ml, list(ls.tasks.list(project=project.id))


def interactive_annotating(label_studio, ml_id: int, task_id: int, result: list) -> dict:
    """`POST /api/ml/{id}/interactive-annotating`, as the labeling screen calls it (the SDK's
    predict_interactive returns nothing)."""
    url, token = label_studio
    response = requests.post(
        f"{url}/api/ml/{ml_id}/interactive-annotating",
        json={"task": task_id, "context": {"result": result}},
        headers={"Authorization": f"Token {token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def test_interactive_requests_through_label_studio(ls, label_studio, served, scenes):
    scene = scenes[3]
    ml, (task,) = interactive_project(
        ls, label_studio, served, "interactive", ASKING, {"scene.png": png(scene.image)}
    )
    assert task.data["image"].startswith("/data/upload/")
    before = requests.get(f"{served}/metrics", timeout=5).json()
    for kind in ("colour", "count", "shape"):
        data = interactive_annotating(label_studio, ml.id, task.id, [typed("ask", qa(scene, kind).question)])
        got = by_name(data)
        assert got["ask"]["value"] == {"text": [qa(scene, kind).question]}
        assert got["answer"]["value"] == {"text": [qa(scene, kind).answer]}
        if kind == "colour":
            assert got["colour"]["value"] == {"choices": [qa(scene, kind).answer]}
    data = interactive_annotating(label_studio, ml.id, task.id, [typed("caption", scene.caption.split()[0])])
    assert by_name(data)["caption"]["value"] == {"text": [scene.caption]}
    after = requests.get(f"{served}/metrics", timeout=5).json()
    # four requests about one task: one download, one pass through the vision encoder
    assert after["images_fetched"] - before["images_fetched"] == 1
    assert after["images_encoded"] - before["images_encoded"] == 1
    # nothing is stored as a prediction
    assert ls.predictions.list(task=task.id) == []
