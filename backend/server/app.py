"""The Label Studio ML backend protocol on Flask: /setup, /predict, /health, /metrics, /webhook.

    app = create_app()          # MODEL_DIR, DEVICE, ... from the environment (see backend/server/wsgi.py)

The model is loaded once, when the app is created (one per gunicorn worker), never per request:
Label Studio gives /setup 3 s and /health 1 s. A request body larger than MAX_REQUEST_MB is answered
413 before it is read (from Content-Length; a chunked body is cut off one byte past the limit).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from backend.annotate import budget, interactive
from backend.annotate.cache import DEFAULT_MB as EMBEDDING_CACHE_MB
from backend.annotate.cache import EmbeddingCache, mb_from_env
from backend.annotate.fetch import ENV as ALLOWED_IMAGE_HOSTS
from backend.annotate.fetch import FetchPolicy
from backend.annotate.images import ImageLoader
from backend.annotate.labeling import ConfigError, plan
from backend.annotate.predict import Predictor
from backend.runtime.blip import Blip
from backend.runtime.env import positive_int

log = logging.getLogger(__name__)

# Label Studio sends a whole selection in one /predict. 256 MB holds a few hundred tasks of data-URI
# photos (300 x ~600 KB of base64) and matches Label Studio's own import limit
# (DATA_UPLOAD_MAX_MEMORY_SIZE, 250 MB); tasks with URLs take ~1 KB each. The body is held in memory and
# parsed, so each request in flight may cost a few times this.
MAX_REQUEST_MB = 256


@dataclass
class Settings:
    """Everything read from the environment, in one place (same names as Label Studio's backends)."""

    model_dir: str | None = None
    device: str = "CPU"
    precision: str | None = None  # None: int8 when the model directory has it and its gate passed, else fp16
    threads: int | None = None  # OpenVINO inference threads (None: OpenVINO's choice)
    inference_precision: str | None = None  # OpenVINO execution precision (None: Blip's default)
    label_studio_url: str | None = None
    api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    allowed_image_hosts: str = ""  # ALLOWED_IMAGE_HOSTS: host names, IPs and CIDRs, comma-separated
    max_request_mb: int = MAX_REQUEST_MB
    embedding_cache_mb: int = EMBEDDING_CACHE_MB  # EMBEDDING_CACHE_MB: kept image embeddings (0: none)
    memory_budget_mb: int | None = None  # MEMORY_BUDGET_MB: batch sizes and cache fitted to it (None: none)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            model_dir=env("MODEL_DIR") or None,
            device=env("DEVICE") or "CPU",
            precision=env("PRECISION") or None,
            threads=positive_int("INFERENCE_THREADS"),
            inference_precision=env("INFERENCE_PRECISION") or None,
            label_studio_url=env("LABEL_STUDIO_URL") or env("LABEL_STUDIO_HOST") or None,
            api_key=env("LABEL_STUDIO_API_KEY") or env("LABEL_STUDIO_ACCESS_TOKEN") or None,
            basic_auth_user=env("BASIC_AUTH_USER") or None,
            basic_auth_pass=env("BASIC_AUTH_PASS") or None,
            allowed_image_hosts=env(ALLOWED_IMAGE_HOSTS) or "",
            max_request_mb=positive_int("MAX_REQUEST_MB") or MAX_REQUEST_MB,
            embedding_cache_mb=mb_from_env(),
            memory_budget_mb=budget.from_env(),
        )


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)
    tasks_predicted: int = 0
    tasks_failed: int = 0
    predict_calls: int = 0
    predict_seconds: float = 0.0
    errors: int = 0
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            mean = self.predict_seconds / self.predict_calls if self.predict_calls else 0.0
            return {
                "requests": dict(self.requests),
                "tasks_predicted": self.tasks_predicted,
                "tasks_failed": self.tasks_failed,
                "predict_calls": self.predict_calls,
                "predict_mean_latency_s": round(mean, 4),
                "errors": self.errors,
                "uptime_s": round(time.time() - self.started, 1),
            }


def load_blip(settings: Settings) -> Blip:
    if not settings.model_dir:
        raise RuntimeError("MODEL_DIR is not set: point it at a model directory built by `blip-build`")
    blip = Blip(
        Path(settings.model_dir),
        device=settings.device,
        precision=settings.precision or "auto",  # auto: INT8 only if the build's agreement gate passed
        threads=settings.threads,
        inference_precision=settings.inference_precision,
    )
    t0 = time.perf_counter()
    released = blip.warm_up()
    log.info(
        "warmed up in %.1f s; gave back %d MiB of weight-file pages", time.perf_counter() - t0, released >> 20
    )
    return blip


def create_app(
    model_dir: str | Path | None = None, blip: Blip | None = None, settings: Settings | None = None
) -> Flask:
    """The Flask app; loads the model from `model_dir` (or $MODEL_DIR) unless a loaded `blip` is given."""
    settings = settings or Settings.from_env()
    if model_dir is not None:
        settings.model_dir = str(model_dir)
    policy = FetchPolicy.parse(settings.allowed_image_hosts)  # a bad entry stops the start, not a task
    if blip is None:
        t0 = time.perf_counter()
        blip = load_blip(settings)
        log.info(
            "loaded %s (%s on %s) in %.1f s",
            settings.model_dir,
            blip.precision,
            blip.device,
            time.perf_counter() - t0,
        )
    # image embeddings kept across requests: a follow-up question about a task runs neither the download
    # nor the vision encoder
    cache_mb = budget.fit(blip, settings.memory_budget_mb, settings.embedding_cache_mb)
    predictor = Predictor(blip, cache=EmbeddingCache(cache_mb << 20))
    metrics = Metrics()
    # /setup's hostname and access token: used when LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are unset
    from_setup: dict[str, str | None] = {"hostname": None, "access_token": None}
    schemas: dict[str, str] = {}  # project id -> label config from /setup, if /predict lacks one

    app = Flask("blip-backend")
    app.config["predictor"] = predictor
    app.config["metrics"] = metrics
    max_bytes = settings.max_request_mb << 20
    # werkzeug stops reading a chunked body at MAX_CONTENT_LENGTH without an error: one byte more than
    # allowed is how bound_body tells a body at the limit from a longer one
    app.config["MAX_CONTENT_LENGTH"] = max_bytes + 1
    log.info("fetch policy: %s", policy.describe())

    def loader() -> ImageLoader:
        return ImageLoader(
            hostname=settings.label_studio_url or from_setup["hostname"],
            access_token=settings.api_key or from_setup["access_token"],
            policy=policy,
        )

    @app.before_request
    def check_auth() -> Response | None:
        with metrics.lock:
            route = request.url_rule.rule if request.url_rule else "other"  # bounded: no key per 404 path
            metrics.requests[route] = metrics.requests.get(route, 0) + 1
        if not settings.basic_auth_user:
            return None
        auth = request.authorization
        ok = (
            auth is not None
            and auth.type == "basic"
            # bytes: compare_digest refuses non-ASCII str
            and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
            and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode())
        )
        if ok:
            return None
        response = jsonify({"status": "error", "detail": "basic authentication required"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="blip-backend"'
        return response

    @app.before_request
    def bound_body() -> None:
        """413 for a body over MAX_REQUEST_MB: from Content-Length before reading anything, and for a
        chunked body as soon as one byte too many has arrived (the rest is never read)."""
        if request.content_length is not None:
            if request.content_length > max_bytes:
                raise RequestEntityTooLarge()
        elif request.method == "POST" and len(request.get_data(cache=True)) > max_bytes:
            raise RequestEntityTooLarge()

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify(
            {
                "status": "UP",
                "model_class": "BLIP",
                "model_version": predictor.model_version,
                "precision": blip.precision,
                "device": blip.device,
                "tasks": blip.tasks,
            }
        )

    @app.post("/setup")
    def setup() -> Response:
        body = request.get_json(silent=True) or {}
        if body.get("hostname"):
            from_setup["hostname"] = str(body["hostname"])
        if body.get("access_token"):
            from_setup["access_token"] = str(body["access_token"])
        project, schema = str(body.get("project")), body.get("schema")
        if isinstance(schema, str) and schema and schemas.get(project) != schema:
            schemas[project] = schema
            _describe(project, schema, blip.tasks)  # once per config, not at every /setup
        return jsonify({"model_version": predictor.model_version})

    @app.post("/predict")
    def predict() -> Response | tuple[Response, int]:
        t0 = time.perf_counter()
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            return jsonify(
                {"status": "error", "detail": 'expected JSON {"tasks": [...], "label_config"}'}
            ), 400
        tasks = body["tasks"]
        config = body.get("label_config") or schemas.get(str(body.get("project")))
        if not tasks:
            return jsonify({"results": []})
        params = body.get("params")
        asked = interactive.is_interactive(params)
        # a task without a prediction: `[]` for a retrieval (Label Studio stores nothing and tries it again
        # next time); an empty reply for an interactive request (nothing to show)
        nothing = predictor.empty_reply() if asked else []
        try:
            if not config:
                raise ConfigError("the request has no label_config")
            asks = plan(config, tuple(blip.tasks))
        except ConfigError as e:
            log.warning("%d task(s) get no prediction: %s", len(tasks), e)
            _count(metrics, t0, 0, len(tasks))
            return jsonify({"results": [nothing for _ in tasks]})
        try:
            if asked:
                # an annotator waiting in the labeling screen: what they typed -> BLIP's answers
                outcome = predictor.interactive(tasks, asks, params["context"], loader())
                _count(metrics, t0, outcome.predicted, outcome.failed)
                log.info(
                    "interactive: %d of %d task(s) answered in %.3f s",
                    outcome.predicted,
                    len(tasks),
                    time.perf_counter() - t0,
                )
                return jsonify({"results": outcome.entries, "model_version": predictor.model_version})
            outcome = predictor.predict(tasks, asks, loader())
        except Exception:
            # still one entry per task, or Label Studio drops or retries the whole batch
            log.exception("%d task(s) get no prediction: unexpected error", len(tasks))
            _count(metrics, t0, 0, len(tasks))
            return jsonify({"results": [nothing for _ in tasks]})
        _count(metrics, t0, outcome.predicted, outcome.failed)
        log.info(
            "predicted %d of %d task(s) in %.2f s", outcome.predicted, len(tasks), time.perf_counter() - t0
        )
        return jsonify({"results": outcome.entries, "model_version": predictor.model_version})

    @app.post("/webhook")
    def webhook() -> Response:
        # this backend does not train: annotation and project events are acknowledged and ignored
        body = request.get_json(silent=True) or {}
        return jsonify(
            {"status": "ignored", "action": body.get("action") if isinstance(body, dict) else None}
        )

    @app.get("/metrics")
    def get_metrics() -> Response:
        return jsonify(
            {
                **metrics.snapshot(),
                **predictor.counts,
                "embedding_cache": predictor.cache.snapshot(),
                "model_version": predictor.model_version,
            }
        )

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e: RequestEntityTooLarge) -> tuple[Response, int]:
        size = f"{request.content_length} bytes" if request.content_length else "a chunked body"
        detail = f"request body larger than MAX_REQUEST_MB ({settings.max_request_mb} MB)"
        log.warning("%s %s refused: %s, %s", request.method, request.path, size, detail)
        return jsonify({"status": "error", "detail": detail}), 413

    @app.errorhandler(Exception)
    def on_error(e: Exception) -> tuple[Response, int]:
        from werkzeug.exceptions import HTTPException

        if isinstance(e, HTTPException):
            return jsonify({"status": "error", "detail": e.description}), e.code or 500
        with metrics.lock:
            metrics.errors += 1
        log.exception("%s %s failed", request.method, request.path)
        return jsonify({"status": "error", "detail": f"{type(e).__name__}: {e}"}), 500

    return app


def _count(metrics: Metrics, t0: float, predicted: int, failed: int) -> None:
    with metrics.lock:
        metrics.predict_calls += 1
        metrics.predict_seconds += time.perf_counter() - t0
        metrics.tasks_predicted += predicted
        metrics.tasks_failed += failed


def _describe(project: str, schema: str, tasks: list[str]) -> None:
    try:
        asks = plan(schema, tuple(tasks))
    except ConfigError as e:
        log.warning("project %s: %s", project, e)
        return
    predicted = ", ".join(
        f"{a.from_name} ({a.kind}{f' of #{a.question_box}' if a.question_box else ''})" for a in asks.asks
    )
    boxes = f"; question boxes (interactive): {', '.join(asks.boxes)}" if asks.boxes else ""
    skipped = f"; not predicted: {'; '.join(asks.skipped)}" if asks.skipped else ""
    log.info("project %s: predicting %s%s%s", project, predicted or "nothing", boxes, skipped)
