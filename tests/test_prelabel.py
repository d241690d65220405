"""`blip-backend prelabel` against a real Label Studio (tests/label_studio_server.py) and a real Ray cluster.

Projects hold synthetic scenes the tiny model gets entirely right, half uploaded as files (tasks hold
`/data/upload/...` URLs, fetched with the API key) and half imported as JSON with data URIs. The stored
predictions are read back through the API: one per task, the scene's caption and object count, the
same as `/predict` returns for the same tasks. A run killed with SIGKILL (twice) and resumed, lost
responses and transient errors, and a Ray cluster of two nodes must all end with exactly one prediction
per task.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from label_studio_server import data_uri, free_port, png, upload

from backend.__main__ import main
from model_build.tiny_blip.synthetic import COUNTS, HELD_OUT_SEED, make_scenes

REPO = Path(__file__).resolve().parents[1]
HOW_MANY = "how many objects are there?"
PREDICTIONS = "/api/predictions/"
# one data key: direct file uploads are refused for configs reading several task fields
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <TextArea name="caption" toName="image"/>
  <TextArea name="count_text" toName="image" question="{HOW_MANY}" rows="1"/>
  <Choices name="count" toName="image" question="{HOW_MANY}">
    <Choice value="one"/><Choice value="two"/><Choice value="three"/>
  </Choices>
</View>"""


def objects_in(caption: str) -> str:
    """'two red circles and a blue square' -> 'three'."""
    n = sum(
        1 if p.split()[0] == "a" else COUNTS.index(p.split()[0]) + 1 for p in re.split(r", | and ", caption)
    )
    return COUNTS[n - 1]


@pytest.fixture(scope="module")
def scenes(blip):
    """Held-out scenes whose caption and object count (generated and ranked) the tiny model gets right."""
    pool = make_scenes(80, HELD_OUT_SEED)
    images = [s.image for s in pool]
    captions = blip.caption(images)
    answers = blip.answer(images, [[HOW_MANY]] * len(pool))
    ranked = blip.rank(images, HOW_MANY, list(COUNTS))
    good = [
        s
        for s, c, a, r in zip(pool, captions, answers, ranked)
        if c.text == s.caption and a[0].text == r.text == objects_in(s.caption)
    ]
    assert len(good) >= 60, f"only {len(good)} of {len(pool)} held-out scenes right"
    return good


@pytest.fixture(scope="module")
def version(blip):
    return blip.model_version


def make_project(ls, label_studio, scenes, title: str) -> int:
    """A project with scenes[0::2] uploaded as files and scenes[1::2] imported as data URIs."""
    project = ls.projects.create(title=title, label_config=CONFIG)
    upload(label_studio, project.id, {f"s{i}.png": png(s.image) for i, s in enumerate(scenes) if i % 2 == 0})
    tasks = [{"image": data_uri(s.image), "scene": i} for i, s in enumerate(scenes) if i % 2 == 1]
    if tasks:
        ls.projects.import_tasks(id=project.id, request=tasks)
    return project.id


def scene_index(data: dict) -> int:
    if "scene" in data:
        return int(data["scene"])
    return int(re.search(r"-s(\d+)\.png$", data["image"]).group(1))  # uploads are renamed <hash>-<name>


def predictions_by_task(ls, project: int) -> dict[int, list]:
    got: dict[int, list] = {t.id: [] for t in ls.tasks.list(project=project, fields="task_only")}
    for p in ls.predictions.list(project=project):
        got[p.task].append(p)
    return got


def settled_count(ls, project: int) -> int:
    """The number of predictions once it stops changing."""
    last = -1
    while (now := len(ls.predictions.list(project=project))) != last:
        last = now
        time.sleep(1)
    return now


def check_correct(ls, project: int, scenes, version: str) -> dict[int, object]:
    """Every task holds exactly one prediction, of this version, with its scene's caption and count."""
    data = {t.id: t.data for t in ls.tasks.list(project=project, fields="task_only")}
    by_task = predictions_by_task(ls, project)
    assert sorted(by_task) == sorted(data)
    counts = {task: len(ps) for task, ps in by_task.items() if len(ps) != 1}
    assert not counts, f"tasks without exactly one prediction: {counts}"
    by_scene = {}
    for task, (prediction,) in by_task.items():
        scene = scenes[scene_index(data[task])]
        assert prediction.model_version == version
        results = {r["from_name"]: r for r in prediction.result}
        assert results["caption"]["value"] == {"text": [scene.caption]}
        assert results["count_text"]["value"] == {"text": [objects_in(scene.caption)]}
        assert results["count"]["value"] == {"choices": [objects_in(scene.caption)]}
        assert all(0 < r["score"] <= 1 for r in prediction.result) and 0 < prediction.score <= 1
        by_scene[scene_index(data[task])] = prediction
    return by_scene


def same_results(a: list[dict], b: list[dict]) -> None:
    """Equal results; scores may differ in the last digits (batch composition, thread count)."""
    assert [{k: v for k, v in r.items() if k != "score"} for r in a] == [
        {k: v for k, v in r.items() if k != "score"} for r in b
    ]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-3)


def cli(label_studio, project: int, tiny_dir: Path, *more: str) -> list[str]:
    url, token = label_studio
    base = ["prelabel", "--project", str(project), "--model-dir", str(tiny_dir), "--url", url]
    return [*base, "--api-key", token, *more]


def test_every_task_predicted_once_as_predict_would(
    ls, label_studio, tiny_dir, blip, scenes, version, capsys
):
    from backend.server.app import Settings, create_app

    batch = scenes[:60]
    project = make_project(ls, label_studio, batch, "prelabel")
    assert main(cli(label_studio, project, tiny_dir, "--batch", "16", "--progress-every", "0")) == 0
    out, err = capsys.readouterr()
    assert "predicted 60, failed 0, already predicted 0 (of 60 tasks" in out
    assert re.search(r"60/60 tasks \(100%\)\s+[\d.]+ tasks/s\s+ETA 0s", err), err  # plain progress lines
    stored = check_correct(ls, project, batch, version)

    # the same entries as Label Studio gets from /predict for these tasks (scores up to batch rounding)
    url, token = label_studio
    app = create_app(blip=blip, settings=Settings(label_studio_url=url, api_key=token))
    tasks = [{"id": t.id, "data": t.data} for t in ls.tasks.list(project=project, fields="task_only")]
    reply = app.test_client().post("/predict", json={"tasks": tasks, "label_config": CONFIG}).get_json()
    for task, entry in zip(tasks, reply["results"]):
        prediction = stored[scene_index(task["data"])]
        assert entry["model_version"] == prediction.model_version
        assert entry["score"] == pytest.approx(prediction.score, abs=1e-3)
        same_results(prediction.result, entry["result"])

    # idempotent: a second run finds nothing to do and writes nothing
    ids = sorted(p.id for p in ls.predictions.list(project=project))
    assert main(cli(label_studio, project, tiny_dir)) == 0
    assert "predicted 0, failed 0, already predicted 60 (of 60 tasks" in capsys.readouterr().out
    assert sorted(p.id for p in ls.predictions.list(project=project)) == ids


def test_killed_and_resumed_predicts_each_task_once(ls, label_studio, tiny_dir, scenes, version, tmp_path):
    batch = scenes[:60]
    project = make_project(ls, label_studio, batch, "prelabel, killed")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # small batches, one writer: many writes, so the kills land mid-run (often mid-POST)
    argv = [
        sys.executable,
        "-m",
        "backend",
        *cli(label_studio, project, tiny_dir, "--batch", "2", "--writers", "1"),
    ]
    seen = []
    for run, kill_at in enumerate((5, 25)):
        log = tmp_path / f"run{run}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            while len(ls.predictions.list(project=project)) < kill_at:
                assert proc.poll() is None, f"run {run} ended before it was killed:\n{log.read_text()}"
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        seen.append(settled_count(ls, project))  # a POST in flight when the process died may still land
        assert kill_at <= seen[-1] < len(batch), log.read_text()
        assert "done in" not in log.read_text()
    # after two kills: no task has two predictions
    by_task = predictions_by_task(ls, project)
    assert all(len(ps) <= 1 for ps in by_task.values())
    completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    done = len(batch) - seen[-1]
    assert f"predicted {done}, failed 0, already predicted {seen[-1]} (of 60 tasks" in completed.stdout
    check_correct(ls, project, batch, version)


def test_broken_images_reported_and_skipped(ls, label_studio, tiny_dir, scenes, version, tmp_path, capsys):
    project = ls.projects.create(title="prelabel, broken", label_config=CONFIG)
    good = scenes[:5]
    ls.projects.import_tasks(
        id=project.id,
        request=[
            *({"image": data_uri(s.image), "scene": i} for i, s in enumerate(good)),
            {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode(), "what": "garbage"},
            {"image": "http://127.0.0.1:9/gone.png", "what": "unreachable"},
            {"image": f"/data/upload/{project.id}/missing.png", "what": "missing upload"},
        ],
    )
    broken = {t.data["what"]: t.id for t in ls.tasks.list(project=project.id) if "what" in t.data}
    report = tmp_path / "report.json"
    assert main(cli(label_studio, project.id, tiny_dir, "--report", str(report))) == 1  # some tasks failed
    out = capsys.readouterr().out
    assert "predicted 5, failed 3, already predicted 0 (of 8 tasks" in out
    failed = json.loads(report.read_text())["failed"]
    assert sorted(failed) == sorted(str(i) for i in broken.values())
    assert "not an image file" in failed[str(broken["garbage"])]
    assert "127.0.0.1:9/gone.png" in failed[str(broken["unreachable"])]
    # Label Studio answers 403 to a valid token asking for a missing upload: the hint says so
    assert "missing.png: HTTP 403 (the file may be missing" in failed[str(broken["missing upload"])]
    for reason in failed.values():
        assert reason in out  # listed in the summary too
    by_task = predictions_by_task(ls, project.id)
    assert sorted(t for t, ps in by_task.items() if not ps) == sorted(broken.values())
    assert all(len(ps) == 1 for t, ps in by_task.items() if t not in broken.values())
    # the next run tries the broken tasks again and leaves the others alone
    assert main(cli(label_studio, project.id, tiny_dir)) == 1
    assert "predicted 0, failed 3, already predicted 5 (of 8 tasks" in capsys.readouterr().out
    assert sum(len(ps) for ps in predictions_by_task(ls, project.id).values()) == 5


def test_view_and_filter_limit_the_scope(ls, label_studio, tiny_dir, scenes, capsys):
    project = ls.projects.create(title="prelabel, views", label_config=CONFIG)
    ls.projects.import_tasks(id=project.id, request=[{"image": data_uri(s.image)} for s in scenes[:6]])
    ids = sorted(t.id for t in ls.tasks.list(project=project.id, fields="task_only"))
    upto = {"filter": "filter:tasks:id", "operator": "less_or_equal", "type": "Number", "value": ids[2]}
    view = ls.views.create(
        project=project.id, data={"title": "first three", "filters": {"conjunction": "and", "items": [upto]}}
    )
    assert main(cli(label_studio, project.id, tiny_dir, "--view", str(view.id))) == 0
    assert "predicted 3, failed 0, already predicted 0 (of 3 tasks" in capsys.readouterr().out
    last = {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": ids[4]}
    flt = json.dumps({"conjunction": "and", "items": [last]})
    assert main(cli(label_studio, project.id, tiny_dir, "--filter", flt)) == 0
    assert "predicted 1, failed 0, already predicted 0 (of 1 tasks" in capsys.readouterr().out
    assert sorted(predictions_by_task(ls, project.id)[i] != [] for i in ids) == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]
    assert main(cli(label_studio, project.id, tiny_dir)) == 0
    assert "predicted 2, failed 0, already predicted 4 (of 6 tasks" in capsys.readouterr().out


class Faults(httpx.BaseTransport):
    """Real HTTP to Label Studio, except for the injected faults, consumed in order per (method, path)."""

    def __init__(self, faults: list[tuple[str, str, str]]) -> None:
        self.inner = httpx.HTTPTransport()
        self.faults = list(faults)
        self.lock = threading.Lock()
        self.injected: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            match = next(
                (
                    i
                    for i, (method, path, _) in enumerate(self.faults)
                    if request.method == method and request.url.path == path
                ),
                None,
            )
            fault = self.faults.pop(match)[2] if match is not None else "pass"
            if fault != "pass":
                self.injected.append(f"{request.method} {request.url.path}: {fault}")
        if fault == "lost":  # served, and the answer never arrives
            self.inner.handle_request(request).close()
            raise httpx.ReadTimeout("injected: answer lost", request=request)
        if fault == "saved-502":  # served, and a proxy answers 502
            self.inner.handle_request(request).close()
            return httpx.Response(502, text="<html>bad gateway</html>", request=request)
        if fault == "refused":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if fault in ("500", "503"):
            return httpx.Response(int(fault), json={"detail": "injected"}, request=request)
        if fault == "429":
            return httpx.Response(
                429, headers={"Retry-After": "0"}, json={"detail": "slow down"}, request=request
            )
        if fault == "not-yet":  # a read that doesn't see a prediction saved a moment ago
            return httpx.Response(200, json=[], request=request)
        return self.inner.handle_request(request)


def test_lost_answers_and_transient_errors_leave_one_prediction(
    ls, label_studio, tiny_dir, blip, scenes, version
):
    from label_studio_sdk.client import LabelStudio

    from backend.prelabel.api import Api
    from backend.prelabel.job import Job
    from backend.prelabel.run import Scope, run

    url, token = label_studio
    project = ls.projects.create(title="prelabel, faults", label_config=CONFIG)
    batch = scenes[:8]
    ls.projects.import_tasks(
        id=project.id, request=[{"image": data_uri(s.image), "scene": i} for i, s in enumerate(batch)]
    )
    faults = Faults(
        [
            ("GET", "/api/tasks/", "500"),  # listing the tasks: retried
            ("POST", PREDICTIONS, "lost"),  # 1st task: saved, answer lost -> found by the check
            ("POST", PREDICTIONS, "503"),  # 2nd task: not saved ...
            ("POST", PREDICTIONS, "429"),  # ... not saved ...
            ("POST", PREDICTIONS, "refused"),  # ... not saved ...
            ("POST", PREDICTIONS, "saved-502"),  # ... saved behind a 502 -> found by the check
            ("POST", PREDICTIONS, "lost"),  # 3rd task: saved, answer lost, and ...
            *[("GET", PREDICTIONS, "pass")] * 5,
            ("GET", PREDICTIONS, "not-yet"),  # ... the check misses it: posted again, duplicate deleted
        ]
    )
    client = LabelStudio(base_url=url, api_key=token, httpx_client=httpx.Client(transport=faults, timeout=30))
    job = Job(url, token, project.id, "", str(tiny_dir), blip.precision, batch=8, writers=1, backoff=0.01)
    report = run(job, Scope(), api=Api(job, client), blip=blip)
    assert not faults.faults, f"faults not reached: {faults.faults}"
    assert (report.predicted, report.failed, report.aborted) == (8, {}, None), report
    assert report.duplicates_removed == 1
    check_correct(ls, project.id, batch, version)


def test_label_studio_unreachable_is_a_clear_error(tiny_dir, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["prelabel", "--project", "1", "--model-dir", str(tiny_dir), "--url", url, "--api-key", "t" * 40]
    assert main([*args, "--retries", "1", "--backoff", "0.01"]) == 2
    err = capsys.readouterr().err
    assert f"Label Studio at {url}: reading project 1: ConnectError" in err, err


# -- Ray ---------------------------------------------------------------------------------------------


def _session_members(sid: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s in (line.split() for line in ps.splitlines()) if int(s) == sid]


def _stop_ray(proc: subprocess.Popen) -> None:
    """`ray start --block` in its own session: stop it and everything of that session (a head's GCS and
    raylet hang on SIGTERM once its worker node is gone, so they get SIGKILL after a short grace)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    for pid in _session_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster():
    """Address of a two-node Ray cluster on 127.0.0.1 (head + one worker node, one CPU each)."""
    pytest.importorskip("ray")
    ray_exe = str(Path(sys.executable).with_name("ray"))
    # a short temp dir: Ray's unix sockets live under it (108-byte path limit)
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    common += ["--object-store-memory", str(100 << 20)]
    head = [ray_exe, "start", "--head", "--port", str(port), *common, "--temp-dir", str(temp)]
    head += ["--include-dashboard=false", "--dashboard-port", str(free_port())]
    head += ["--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    node = [ray_exe, "start", "--address", f"127.0.0.1:{port}", *common]
    node += ["--dashboard-agent-listen-port", str(free_port())]
    procs = []
    logs = [temp / "head.log", temp / "node.log"]
    try:
        for cmd, log in zip((head, node), logs):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            deadline = time.monotonic() + 120
            while True:
                status = subprocess.run(
                    [ray_exe, "status", "--address", f"127.0.0.1:{port}"],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                active = status.stdout.split("Active:")[-1].split("Pending:")[0]
                if status.returncode == 0 and active.count("node_") == len(procs):
                    break
                assert all(p.poll() is None for p in procs), "\n".join(
                    log.read_text()[-3000:] for log in logs
                )
                assert time.monotonic() < deadline, status.stdout + status.stderr
                time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            _stop_ray(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_of_two_nodes_gives_the_same_predictions(
    ls, label_studio, tiny_dir, scenes, version, ray_cluster, tmp_path
):
    batch = scenes[:24]
    single = make_project(ls, label_studio, batch, "prelabel, one process")
    assert main(cli(label_studio, single, tiny_dir, "--batch", "4")) == 0
    expected = check_correct(ls, single, batch, version)

    project = make_project(ls, label_studio, batch, "prelabel, ray")
    report = tmp_path / "report.json"
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("RAY_ADDRESS", None)
    argv = cli(
        label_studio, project, tiny_dir, "--batch", "4", "--ray-address", ray_cluster, "--report", str(report)
    )
    completed = subprocess.run(
        [sys.executable, "-m", "backend", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "ray: 2 actor(s) x 1 CPU(s) on 2 node(s)" in completed.stderr
    workers = json.loads(report.read_text())["workers"]
    assert len({w.split(" pid")[0] for w in workers}) == 2 and sum(workers.values()) == len(batch), workers
    got = check_correct(ls, project, batch, version)
    assert sorted(got) == sorted(expected)
    for i, prediction in got.items():
        same_results(prediction.result, expected[i].result)
        assert prediction.score == pytest.approx(expected[i].score, abs=1e-3)
