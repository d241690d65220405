"""End to end: a real Label Studio (headless, sqlite, loopback only) and the backend under real gunicorn.

For each supported template a project is created, the backend connected, images uploaded as files (so
tasks hold `/data/upload/...` URLs the backend must fetch with its API key) or imported as JSON, and
"Retrieve predictions" run. The stored predictions are read back: they must be the tiny model's correct
captions and answers, with scores and the backend's model_version, and a second retrieval must not add
duplicates. Label Studio starts once per test session (tests/label_studio_server.py).
"""

from __future__ import annotations

import base64
import json

import pytest
import requests
from label_studio_server import PASSWORD, USER, png, serve_backend, stop_backend, upload, wait_for
from scenes import fully_right
from templates import CAPTIONING, vqa

from model_build.tiny_blip.synthetic import COUNTS, HELD_OUT_SEED, make_scenes

BACKEND_USER, BACKEND_PASS = "ls-backend", "backend-pass-456"
HOW_MANY = "how many objects are there?"

VQA = vqa(2)
FIXED = f"""<View>
  <Image name="image" value="$image"/>
  <Header value="{HOW_MANY}"/>
  <TextArea name="count_text" toName="image" question="{HOW_MANY}" rows="1"/>
  <Choices name="count" toName="image" question="{HOW_MANY}" choice="single">
    <Choice value="one"/><Choice value="two"/><Choice value="three" alias="3"/>
  </Choices>
</View>"""


@pytest.fixture(scope="module")
def backend(label_studio, tiny_dir, tmp_path_factory):
    """URL of the backend with basic auth on, fetching uploads with the legacy API token."""
    ls_url, token = label_studio
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    proc, url = serve_backend(
        tiny_dir,
        log,
        LABEL_STUDIO_URL=ls_url,
        LABEL_STUDIO_API_KEY=token,
        BASIC_AUTH_USER=BACKEND_USER,
        BASIC_AUTH_PASS=BACKEND_PASS,
    )
    try:
        wait_for(f"{url}/health", proc, log, 120, auth=(BACKEND_USER, BACKEND_PASS))
        assert requests.get(f"{url}/health", timeout=5).status_code == 401  # basic auth is on
        yield url
    finally:
        stop_backend(proc, log)


def personal_access_token(url: str) -> str:
    """Log in like a browser and create the user's personal access token (a JWT refresh token)."""
    session = requests.Session()
    session.get(f"{url}/user/login/", timeout=10)
    login = session.post(
        f"{url}/user/login/",
        data={"email": USER, "password": PASSWORD, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": f"{url}/user/login/"},
        allow_redirects=False,
        timeout=10,
    )
    assert login.status_code == 302, login.text[:500]
    response = session.post(
        f"{url}/api/token/",
        headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": f"{url}/"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["token"]


@pytest.fixture(scope="module")
def pat_backend(label_studio, tiny_dir, tmp_path_factory):
    """URL of a backend without basic auth that fetches uploads with a personal access token."""
    ls_url, _ = label_studio
    pat = personal_access_token(ls_url)
    # Label Studio refuses the refresh token itself as a Bearer token: the backend must exchange it
    bare = requests.get(
        f"{ls_url}/api/current-user/whoami", headers={"Authorization": f"Bearer {pat}"}, timeout=10
    )
    assert bare.status_code == 401
    log = tmp_path_factory.mktemp("pat-backend") / "backend.log"
    proc, url = serve_backend(tiny_dir, log, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=pat)
    try:
        wait_for(f"{url}/health", proc, log, 120)
        yield url
    finally:
        stop_backend(proc, log)


@pytest.fixture(scope="module")
def health(backend):
    return requests.get(f"{backend}/health", auth=(BACKEND_USER, BACKEND_PASS), timeout=5).json()


@pytest.fixture(scope="module")
def version(health):
    return health["model_version"]


@pytest.fixture(scope="module")
def scenes(health, tiny_dir):
    """Held-out scenes the served model (same precision) gets entirely right, as in test_backend_api."""
    from backend.runtime.blip import Blip

    pool = make_scenes(60, HELD_OUT_SEED)
    good = fully_right(Blip(tiny_dir, precision=health["precision"]), pool)
    assert len(good) >= 12, f"only {len(good)} of {len(pool)} held-out scenes fully right"
    return good


def project_with_backend(ls, backend: str, title: str, config: str, basic_auth: bool = True):
    project = ls.projects.create(title=title, label_config=config)
    auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": BACKEND_USER, "basic_auth_pass": BACKEND_PASS}
    ls.ml.create(project=project.id, url=backend, title="BLIP", **(auth if basic_auth else {}))
    return project


def retrieve(ls, project_id: int) -> list:
    ls.actions.create(
        id="retrieve_tasks_predictions", project=project_id, selected_items={"all": True, "excluded": []}
    )
    return ls.predictions.list(project=project_id)


def by_task(ls, project_id: int, predictions: list) -> dict[int, tuple[dict, object]]:
    tasks = {t.id: t.data for t in ls.tasks.list(project=project_id)}
    return {p.task: (tasks[p.task], p) for p in predictions}


def check_no_duplicates(ls, project_id: int, first: list) -> None:
    again = retrieve(ls, project_id)
    assert sorted(p.id for p in again) == sorted(p.id for p in first)


def scene_of(data_url: str, names: dict[str, object]):
    # uploads are renamed <hash>-<name>: find the scene by its original file name
    return next(scene for name, scene in names.items() if data_url.endswith("-" + name))


def test_image_captioning_template_with_uploaded_files(ls, label_studio, backend, version, scenes):
    project = project_with_backend(ls, backend, "captioning", CAPTIONING)
    names = {f"scene{i}.png": s for i, s in enumerate(scenes[:4])}
    upload(label_studio, project.id, {name: png(s.image) for name, s in names.items()})
    predictions = retrieve(ls, project.id)
    assert len(predictions) == len(names)
    for data, prediction in by_task(ls, project.id, predictions).values():
        assert data["captioning"].startswith("/data/upload/")
        scene = scene_of(data["captioning"], names)
        (result,) = prediction.result
        assert result["from_name"] == "caption" and result["to_name"] == "image"
        assert result["type"] == "textarea" and result["value"] == {"text": [scene.caption]}
        assert 0 < result["score"] <= 1 and 0 < prediction.score <= 1
        assert prediction.model_version == version
    check_no_duplicates(ls, project.id, predictions)


def test_vqa_template_with_questions_in_task_data(ls, backend, version, scenes):
    project = project_with_backend(ls, backend, "vqa", VQA)
    batch = scenes[4:8]
    tasks = [
        {
            "image": "data:image/png;base64," + base64.b64encode(png(s.image)).decode(),
            "q1": s.qa[0].question,
            "q2": s.qa[1].question,
            "scene": i,
        }
        for i, s in enumerate(batch)
    ]
    ls.projects.import_tasks(id=project.id, request=tasks)
    predictions = retrieve(ls, project.id)
    assert len(predictions) == len(batch)
    for data, prediction in by_task(ls, project.id, predictions).values():
        scene = batch[data["scene"]]
        got = {r["from_name"]: (r["to_name"], r["value"]["text"], r["score"]) for r in prediction.result}
        assert set(got) == {"answer1", "answer2"}
        for n in (1, 2):
            to_name, text, score = got[f"answer{n}"]
            assert to_name == f"q{n}" and text == [scene.qa[n - 1].answer] and 0 < score <= 1
        assert prediction.model_version == version
    check_no_duplicates(ls, project.id, predictions)


def test_fixed_question_textarea_and_choices(ls, label_studio, backend, version, scenes):
    project = project_with_backend(ls, backend, "fixed questions", FIXED)
    chosen = [s for s in scenes if any(qa.question == HOW_MANY for qa in s.qa)][:3]
    assert chosen
    names = {f"count{i}.png": s for i, s in enumerate(chosen)}
    upload(label_studio, project.id, {name: png(s.image) for name, s in names.items()})
    predictions = retrieve(ls, project.id)
    assert len(predictions) == len(names)
    for data, prediction in by_task(ls, project.id, predictions).values():
        scene = scene_of(data["image"], names)
        count = next(qa.answer for qa in scene.qa if qa.question == HOW_MANY)
        results = {r["from_name"]: r for r in prediction.result}
        assert results["count_text"]["value"] == {"text": [count]}
        assert results["count"]["type"] == "choices"
        assert results["count"]["value"] == {"choices": ["3" if count == "three" else count]}
        assert count in COUNTS and all(0 < r["score"] <= 1 for r in results.values())
        assert prediction.model_version == version
    check_no_duplicates(ls, project.id, predictions)


def test_uploads_fetched_with_a_personal_access_token(ls, label_studio, pat_backend, version, scenes):
    project = project_with_backend(ls, pat_backend, "captioning, PAT", CAPTIONING, basic_auth=False)
    names = {f"pat{i}.png": s for i, s in enumerate(scenes[8:10])}
    upload(label_studio, project.id, {name: png(s.image) for name, s in names.items()})
    predictions = retrieve(ls, project.id)
    assert len(predictions) == len(names)
    for data, prediction in by_task(ls, project.id, predictions).values():
        scene = scene_of(data["captioning"], names)
        assert prediction.result[0]["value"] == {"text": [scene.caption]}
        assert prediction.model_version == version


def test_int8_calibrated_on_a_live_project(ls, label_studio, tmp_path):
    """`blip-build --project`: the uploaded images and the fixed question of a live project calibrate INT8."""
    from model_build.__main__ import main as build

    url, token = label_studio
    project = ls.projects.create(title="calibration", label_config=FIXED)
    # + 1 broken task = 28 = --subset-size 20 + 4 for accuracy control + 4 held out: all are read
    pool = make_scenes(27, seed=79)
    upload(label_studio, project.id, {f"cal{i}.png": png(s.image) for i, s in enumerate(pool)})
    ls.projects.import_tasks(id=project.id, request=[{"image": "http://127.0.0.1:9/gone.png"}])
    gone = next(t.id for t in ls.tasks.list(project=project.id) if t.data["image"].startswith("http"))
    out = tmp_path / "model"
    args = ["tiny", "-o", str(out), "--subset-size", "20", "--project", str(project.id)]
    args += ["--label-studio-url", url, "--label-studio-api-key", token, "--min-agreement", "0.95"]
    assert build(args) == 0
    report = json.loads((out / "report.json").read_text())
    calibration = report["calibration"]
    assert calibration["source"] == f"Label Studio project {project.id} at {url}"
    assert (calibration["samples"], calibration["validation"], calibration["held_out"]) == (19, 4, 4)
    assert list(calibration["skipped"]) == [f"task {gone}"]
    assert report["agreement"]["answer_agreement"] >= 0.95
    assert json.loads((out / "manifest.json").read_text())["int8"]["serve"] is True
