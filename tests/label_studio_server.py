"""A real Label Studio for the end-to-end tests (headless, sqlite, loopback only), and helpers around it.

The `label_studio` and `ls` fixtures are session-wide (registered through conftest.py): a fresh sqlite
database migrates for ~25 s, so every test module that needs Label Studio shares one server and keeps
to its own projects.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

USER, PASSWORD = "admin@example.com", "admin-pass-123"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float, **kw) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=2, **kw).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {seconds} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the process group we created: server + its children
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """(base URL, legacy API token) of a Label Studio started for this test session."""
    root = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    token = secrets.token_hex(20)
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "LABEL_STUDIO_BASE_DATA_DIR": str(root / "data"),
        "LABEL_STUDIO_USERNAME": USER,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_SENTRY_DSN": "",
        "SENTRY_DSN": "",
    }
    (root / "home").mkdir()
    exe = Path(sys.executable).with_name("label-studio")
    exe = str(exe) if exe.exists() else shutil.which("label-studio")
    assert exe, "the label-studio command is not installed (pip install -e '.[test]')"
    log = root / "label-studio.log"
    url = f"http://127.0.0.1:{port}"
    cmd = [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port), "--host", url]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"{url}/health", proc, log, 240)
        # Label Studio silently moves to another port when ours is taken: make sure this one is ours
        who = requests.get(
            f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {token}"}, timeout=10
        )
        assert who.status_code == 200 and who.json()["email"] == USER, who.text
        yield url, token
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def ls(label_studio):
    """A label-studio-sdk client of that Label Studio."""
    from label_studio_sdk.client import LabelStudio

    url, token = label_studio
    return LabelStudio(base_url=url, api_key=token)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(image) -> str:
    """An image inline in a task, as imported JSON tasks may carry it."""
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def upload(label_studio, project_id: int, files: dict[str, bytes]) -> None:
    """Image files as tasks (multipart import: the SDK's import_tasks takes JSON only)."""
    url, token = label_studio
    response = requests.post(
        f"{url}/api/projects/{project_id}/import",
        headers={"Authorization": f"Token {token}"},
        # one form field per file: Label Studio keeps only the last file of a repeated field name
        files=[(name, (name, data, "image/png")) for name, data in files.items()],
        timeout=60,
    )
    assert response.status_code == 201, response.text


def serve_backend(tiny_dir: Path, log: Path, **env_vars: str):
    """Start `blip-backend serve` (gunicorn) on 127.0.0.1; returns (process, URL)."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(tiny_dir),
        "WORKERS": "1",
        "THREADS": "2",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **env_vars,
    }
    cmd = [sys.executable, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}"


def stop_backend(proc: subprocess.Popen, log: Path) -> None:
    stop(proc)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


@contextmanager
def served_backend(tiny_dir: Path, log: Path, **env_vars: str) -> Iterator[str]:
    """`blip-backend serve` on 127.0.0.1 until the block ends; yields its URL once /health answers."""
    proc, url = serve_backend(tiny_dir, log, **env_vars)
    try:
        wait_for(f"{url}/health", proc, log, 120)
        yield url
    finally:
        stop_backend(proc, log)
