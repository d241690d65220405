"""`blip-backend prelabel`: predictions for a whole Label Studio project, pushed through its API.

    blip-backend prelabel --project 3 --model-dir models/blip-vqa-base            # one process
    blip-backend prelabel --project 3 --view 12 --ray-address auto                 # a saved view, on Ray

Label Studio's "Retrieve predictions" sends every selected task in one `/predict` call with a 100 s
timeout; this command instead walks the project itself and creates each task's prediction with
`POST /api/predictions`. The predictions are the ones `/predict` returns (the same Predictor, labeling
config conventions, image loading and model_version), so the two paths can be mixed freely.

How a run goes:

1. The ids of the tasks in scope (the project, a saved view's filters, or `--filter`) are listed,
   ordered by id, `ID_PAGE` per request; only ids are held.
2. They are read back `PAGE` at a time with their data and the model versions of their predictions;
   tasks that already hold a prediction of this model_version are skipped, the rest are cut into
   batches of `--batch` tasks.
3. A batch is predicted (images fetched once, one model call per kind of ask), then the tasks'
   prediction versions are read again and only the tasks still without one are written, one
   `POST` per task (`--writers` at a time).

Exactly once: a task gets a prediction only if, right before its POST, it had none of this
model_version. A run killed at any moment leaves every task either written or not; the next run skips
the written ones. A POST whose answer was lost (timeout, reset, 5xx) is not repeated blindly: after the
backoff the task's predictions are read, and the POST is repeated only if none of this version is
there. Tasks whose write needed such a check are checked once more at the end of their batch and any
duplicate (a first POST that Label Studio committed late) is deleted. The one thing not covered is two
runs over the same tasks at the same time.

Transient errors (connection errors, timeouts, 408, 429, 5xx) are retried with exponential backoff
(Retry-After is honoured); when Label Studio stays unreachable the run stops with exit code 3 and the
next run resumes. A task that cannot be predicted (unreadable image, missing field, ...) is reported
at the end with its reason and tried again by the next run.

With `--ray-address` the batches go to Ray actors, each holding one loaded model, that predict and write
themselves (backend/prelabel_ray.py); this process only lists the tasks and hands out batches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TextIO

from backend.label_studio_api import (
    NO_SDK_RETRIES,
    PAGE,
    Api,
    PrelabelError,
    Unreachable,
    describe,
    transient,
)
from backend.progress import Progress, ProgressLog, duration

if TYPE_CHECKING:
    from backend.blip import Blip

log = logging.getLogger(__name__)


EXIT_OK, EXIT_FAILED_TASKS, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3


class Stopped(Exception):
    """The run cannot go on (e.g. every Ray actor died): exit code 3; rerun to resume."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in the middle of a batch; `partial` holds the outcomes of the writes that were made."""

    def __init__(self, partial: BatchResult) -> None:
        super().__init__()
        self.partial = partial


# -- what a worker needs, and what it returns ------------------------------------------------------


@dataclass
class Job:
    """Everything a worker needs to predict and write a batch; picklable (sent to Ray actors)."""

    url: str
    api_key: str
    project: int
    label_config: str
    model_dir: str
    precision: str
    device: str = "CPU"
    threads: int | None = None  # OpenVINO inference threads; None: all cores
    inference_precision: str | None = None  # OpenVINO execution precision; None: Blip's default
    batch: int = 16
    writers: int = 4
    retries: int = 8
    backoff: float = 1.0  # first retry delay, seconds; doubled at every attempt
    timeout: float = 60.0  # per Label Studio request, seconds
    verbose: bool = False


@dataclass
class Outcome:
    task: int
    status: str  # "predicted" | "failed" | "skipped" (had one at the pre-write check) | "gone" (deleted)
    reason: str = ""


@dataclass
class BatchResult:
    outcomes: list[Outcome]
    worker: str  # who did it: "local", or a Ray node and pid
    duplicates_removed: int = 0


@dataclass
class Report:
    project: int
    model_version: str = ""
    total: int = 0  # tasks in scope
    predicted: int = 0
    skipped: int = 0  # already held a prediction of this model_version
    gone: int = 0  # deleted while the run went on
    failed: dict[int, str] = field(default_factory=dict)  # task id -> why
    duplicates_removed: int = 0
    workers: dict[str, int] = field(default_factory=dict)  # worker -> tasks it predicted or failed
    seconds: float = 0.0
    aborted: str | None = None

    def add(self, result: BatchResult) -> tuple[int, int, int]:
        """Counts one batch in; returns its (predicted, failed, skipped or gone)."""
        counts = {"predicted": 0, "failed": 0, "skipped": 0, "gone": 0}
        for o in result.outcomes:
            counts[o.status] += 1
            if o.status == "failed":
                self.failed[o.task] = o.reason
            else:
                self.failed.pop(o.task, None)
        self.predicted += counts["predicted"]
        self.skipped += counts["skipped"]
        self.gone += counts["gone"]
        self.duplicates_removed += result.duplicates_removed
        done = counts["predicted"] + counts["failed"]
        if done:
            self.workers[result.worker] = self.workers.get(result.worker, 0) + done
        return counts["predicted"], counts["failed"], counts["skipped"] + counts["gone"]

    @property
    def exit_code(self) -> int:
        if self.aborted:
            return EXIT_ABORTED
        return EXIT_FAILED_TASKS if self.failed else EXIT_OK


# -- a worker: predicts a batch and writes it --------------------------------------------------------


def resolve_precision(model_dir: str | Path, precision: str | None) -> str:
    """What `serve` serves without PRECISION: INT8 if built and its agreement gate passed, else FP16."""
    from backend.manifest import load_manifest

    return precision or load_manifest(model_dir, verify_hashes=False).served_precision


def version_of(model_dir: str | Path, precision: str) -> str:
    """The model_version predictions of this build get, without compiling the model."""
    from backend.manifest import load_manifest
    from backend.predict import model_version

    return model_version(
        SimpleNamespace(manifest=load_manifest(model_dir, verify_hashes=False), precision=precision)
    )


class _Reasons(logging.Handler):
    """Collects why the Predictor gave a task no prediction (it logs `task <id>: ...` lines)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_task: dict[Any, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and record.msg.startswith("task %s")):
            return
        if not isinstance(record.args, tuple) or not record.args:
            return
        task = record.args[0]
        text = record.getMessage().removeprefix(f"task {task}: ").removeprefix("no prediction: ")
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {describe(record.exc_info[1])}"
        self.by_task[task] = text


class BatchWorker:
    """One loaded model + a Label Studio client: `process(tasks)` predicts and writes a batch."""

    def __init__(
        self, job: Job, blip: Blip | None = None, api: Api | None = None, name: str = "local"
    ) -> None:
        from backend.images import ImageLoader
        from backend.labeling import plan
        from backend.predict import Predictor

        if blip is None:
            from backend.blip import Blip

            blip = Blip(
                job.model_dir,
                device=job.device,
                precision=job.precision,
                threads=job.threads,
                inference_precision=job.inference_precision,
            )
        self.job, self.name = job, name
        self.predictor = Predictor(blip, chunk=job.batch)
        self.model_version = self.predictor.model_version
        self.plan = plan(job.label_config, tuple(blip.tasks))
        self.loader = ImageLoader(hostname=job.url, access_token=job.api_key)
        self.api = api or Api(job)
        self.reasons = _Reasons()
        predict_log = logging.getLogger("backend.predict")
        if self.reasons not in predict_log.handlers:
            predict_log.addHandler(self.reasons)

    def process(self, tasks: list[dict[str, Any]]) -> BatchResult:
        """Predicts `tasks` ({"id", "data"}) and writes the predictions of those still without one."""
        tasks = [{"id": t["id"], "data": t["data"]} for t in tasks]
        self.reasons.by_task.clear()
        try:
            entries = self.predictor.predict(tasks, self.plan, self.loader).entries
        except Exception as e:  # the Predictor isolates per-task failures; this is a bug, not a task
            log.exception("predicting a batch of %d tasks failed", len(tasks))
            return BatchResult(
                [Outcome(t["id"], "failed", f"prediction failed: {describe(e)}") for t in tasks], self.name
            )
        outcomes: list[Outcome] = []
        ready: list[tuple[int, dict[str, Any]]] = []
        for task, entry in zip(tasks, entries):
            if entry == []:
                why = self.reasons.by_task.get(task["id"], "no prediction (see the log)")
                outcomes.append(Outcome(task["id"], "failed", why))
            else:
                ready.append((task["id"], entry))
        if not ready:
            return BatchResult(outcomes, self.name)
        # the exactly-once check, right before writing: a run killed after a POST went out (or another
        # run) may have written some of them since they were listed
        now = self.api.tasks(self.job.project, [i for i, _ in ready], with_data=False)
        todo = []
        for task_id, entry in ready:
            if task_id not in now:
                outcomes.append(Outcome(task_id, "gone", "deleted during the run"))
            elif self.model_version in now[task_id]["versions"]:
                outcomes.append(Outcome(task_id, "skipped"))
            else:
                todo.append((task_id, entry))
        pool = ThreadPoolExecutor(max(1, min(self.job.writers, len(todo) or 1)))
        futures = [pool.submit(self._write, *item) for item in todo]
        try:
            written = [f.result() for f in futures]
        except KeyboardInterrupt:
            # Ctrl-C: let the POSTs under way finish, send no more, and count what was written
            pool.shutdown(wait=True, cancel_futures=True)
            outcomes += [
                f.result()[0] for f in futures if f.done() and not f.cancelled() and not f.exception()
            ]
            raise Interrupted(BatchResult(outcomes, self.name)) from None
        finally:
            pool.shutdown(wait=True)
        removed = 0
        for outcome, uncertain in written:
            outcomes.append(outcome)
            if uncertain and outcome.status == "predicted":
                removed += self._dedupe(outcome.task)
        return BatchResult(outcomes, self.name, removed)

    def close(self) -> None:
        logging.getLogger("backend.predict").removeHandler(self.reasons)

    def _write(self, task_id: int, entry: dict[str, Any]) -> tuple[Outcome, bool]:
        """POSTs one prediction; (outcome, whether an earlier attempt's fate was unknown)."""
        uncertain = False
        for attempt in itertools.count():
            try:
                self.api.client.predictions.create(
                    task=task_id,
                    result=entry["result"],
                    score=entry["score"],
                    model_version=entry["model_version"],
                    request_options=NO_SDK_RETRIES,
                )
                return Outcome(task_id, "predicted"), uncertain
            except Exception as e:
                if not transient(e):
                    why = f"Label Studio refused the prediction: {describe(e)}"
                    return Outcome(task_id, "failed", why), uncertain
                what = f"saving task {task_id}'s prediction"
                if attempt >= self.job.retries:
                    raise Unreachable(f"{what}: {describe(e)} (gave up after {attempt + 1} attempts)") from e
                self.api.wait(what, attempt, e)
                uncertain = True
                # the POST may have been saved and only its answer lost: look before posting again
                if self.api.prediction_ids(task_id, self.model_version):
                    return Outcome(task_id, "predicted"), True
        raise AssertionError("not reached")

    def _dedupe(self, task_id: int) -> int:
        """Deletes all but the first prediction of this version (a lost POST that was saved late)."""
        ids = self.api.prediction_ids(task_id, self.model_version)
        for extra in ids[1:]:
            log.warning("task %s: deleting duplicate prediction %s", task_id, extra)
            self.api.call(f"deleting prediction {extra}", self.api.client.predictions.delete, id=extra)
        return max(0, len(ids) - 1)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Scope:
    view: int | None = None
    filter: str | None = None  # JSON: Data Manager filters, or a query {"filters": ...}

    def query(self, api: Api, project: int) -> str:
        filters: dict[str, Any] | None = None
        if self.view is not None:
            filters = api.view_filters(self.view, project)
        elif self.filter:
            try:
                given = json.loads(self.filter)
            except ValueError as e:
                raise PrelabelError(f"--filter is not JSON: {e}") from None
            if not isinstance(given, dict):
                raise PrelabelError("--filter must be a JSON object")
            filters = given.get("filters", given)
            if not isinstance(filters, dict) or not isinstance(filters.get("items", []), list):
                raise PrelabelError('--filter: expected {"conjunction": "and", "items": [...]}')
        # by id, whatever the view's ordering: stable pages
        query: dict[str, Any] = {"ordering": ["tasks:id"]}
        if filters and filters.get("items"):
            query["filters"] = {"conjunction": filters.get("conjunction", "and"), "items": filters["items"]}
        return json.dumps(query)


@dataclass
class RayOptions:
    address: str
    actors: int | None = None  # default: one per node
    cpus_per_actor: int | None = None  # default: the smallest node's CPUs


def batches(
    api: Api, job: Job, ids: list[int], version: str, progress: Progress, report: Report
) -> Iterator[list[dict[str, Any]]]:
    """Batches of the tasks without a prediction of `version`, read PAGE at a time."""
    pending: list[dict[str, Any]] = []
    for start in range(0, len(ids), PAGE):
        chunk = ids[start : start + PAGE]
        got = api.tasks(job.project, chunk)
        done = [i for i in chunk if i in got and version in got[i]["versions"]]
        report.skipped += len(done)
        report.gone += len(chunk) - len(got)
        progress.update(skipped=len(chunk) - len(got) + len(done))
        for i in chunk:
            if i in got and version not in got[i]["versions"]:
                pending.append(got[i])
                if len(pending) == job.batch:
                    yield pending
                    pending = []
    if pending:
        yield pending


def run(
    job: Job,
    scope: Scope,
    ray: RayOptions | None = None,
    stream: TextIO | None = None,
    progress_every: float = 10.0,
    api: Api | None = None,
    blip: Blip | None = None,
) -> Report:
    """Predicts every task in scope that lacks a prediction of this model.

    Raises PrelabelError (or the SDK's ApiError: 401, 404, ...) when the run cannot start (bad project,
    view, config, Ray cluster); once it has started, Label Studio failing for good or an interrupt end it
    with `report.aborted` set instead, after the work done so far is counted.
    """
    from label_studio_sdk.core.api_error import ApiError

    from backend.labeling import ConfigError, plan
    from backend.manifest import load_manifest

    t0 = time.monotonic()
    stream = stream or sys.stderr
    api = api or Api(job)
    report = Report(job.project)
    manifest = load_manifest(job.model_dir, verify_hashes=False)
    try:
        project = api.project(job.project)
        job.label_config = project.label_config or ""
        try:
            asks = plan(job.label_config, tuple(manifest.tasks))
        except ConfigError as e:
            raise PrelabelError(f"project {job.project}: {e}") from None
        if not asks.asks:
            raise PrelabelError(f"project {job.project}: {asks.why_nothing()}")
        report.model_version = version_of(job.model_dir, job.precision)
        ids = api.task_ids(job.project, scope.query(api, job.project))
    except Unreachable as e:
        raise PrelabelError(f"Label Studio at {job.url}: {e}") from None
    report.total = len(ids)
    where = f"view {scope.view}" if scope.view is not None else "filtered" if scope.filter else "all tasks"
    stream.write(
        f"prelabel: project {job.project} {project.title!r} at {job.url} ({where}): {len(ids)} tasks\n"
        f"  model {report.model_version} on {job.device}; predicting "
        f"{', '.join(f'{a.from_name} ({a.kind})' for a in asks.asks)}; batches of {job.batch}\n"
    )
    stream.flush()
    progress = Progress(len(ids), stream, progress_every)
    root = logging.getLogger()
    handler = ProgressLog(progress, job.verbose)
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(min(previous_level or logging.WARNING, handler.level))
    worker: BatchWorker | None = None

    def count(result: BatchResult) -> None:
        predicted, failed, skipped = report.add(result)
        progress.update(predicted, failed, skipped)

    try:
        work = batches(api, job, ids, report.model_version, progress, report)
        if ray is not None:
            from backend.prelabel_ray import fan_out

            fan_out(job, ray, work, count, report.model_version, progress.begin, progress.write)
        else:
            worker = BatchWorker(job, blip=blip, api=api)
            report.model_version = worker.model_version  # differs only for a Blip passed in
            for batch in work:
                progress.begin()
                count(worker.process(batch))
    except Unreachable as e:
        report.aborted = f"Label Studio unreachable: {e}"
    except Stopped as e:
        report.aborted = str(e)
    except ApiError as e:
        report.aborted = f"Label Studio refused a request: {describe(e)}"
    except Interrupted as e:
        count(e.partial)
        report.aborted = "interrupted"
    except KeyboardInterrupt:
        report.aborted = "interrupted"
    finally:
        if worker is not None:
            worker.close()
        progress.close()
        root.removeHandler(handler)
        root.setLevel(previous_level)
        report.seconds = time.monotonic() - t0
    return report


def summary(report: Report, limit: int = 20) -> str:
    lines = [
        f"{'stopped' if report.aborted else 'done'} in {duration(report.seconds)}: "
        f"predicted {report.predicted}, failed {len(report.failed)}, already predicted {report.skipped}"
        + (f", deleted meanwhile {report.gone}" if report.gone else "")
        + f" (of {report.total} tasks; model_version {report.model_version})"
    ]
    if len(report.workers) > 1 or any(w != "local" for w in report.workers):
        lines.append("workers: " + ", ".join(f"{w} {n}" for w, n in sorted(report.workers.items())))
    if report.duplicates_removed:
        lines.append(f"removed {report.duplicates_removed} duplicate prediction(s) of late-saved retries")
    if report.failed:
        lines.append("failed tasks (tried again by the next run):")
        for task, why in itertools.islice(sorted(report.failed.items()), limit):
            lines.append(f"  task {task}: {why}")
        if len(report.failed) > limit:
            lines.append(f"  ... and {len(report.failed) - limit} more (--report FILE lists all)")
    if report.aborted:
        lines.append(f"{report.aborted}; run the same command again to resume")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--view", type=int, help="only the tasks of this saved Data Manager view (tab) id")
    scope.add_argument(
        "--filter",
        help="only tasks matching these Data Manager filters (JSON), e.g. "
        '\'{"conjunction": "and", "items": [{"filter": "filter:tasks:total_annotations", '
        '"operator": "equal", "type": "Number", "value": 0}]}\'',
    )
    p.add_argument("--model-dir", default=env("MODEL_DIR"), help="model directory [$MODEL_DIR]")
    p.add_argument("--precision", default=env("PRECISION"), help="fp16 or int8 [$PRECISION, else as `serve`]")
    p.add_argument("--device", default=env("DEVICE", "CPU"), help="OpenVINO device [$DEVICE or CPU]")
    p.add_argument(
        "--url",
        default=env("LABEL_STUDIO_URL") or env("LABEL_STUDIO_HOST"),
        help="Label Studio URL [$LABEL_STUDIO_URL]",
    )
    p.add_argument(
        "--api-key",
        default=env("LABEL_STUDIO_API_KEY") or env("LABEL_STUDIO_ACCESS_TOKEN"),
        help="legacy token or personal access token [$LABEL_STUDIO_API_KEY]",
    )
    p.add_argument("--batch", type=int, default=16, help="tasks predicted together (default 16)")
    p.add_argument("--writers", type=int, default=4, help="parallel POSTs per worker (default 4)")
    p.add_argument("--retries", type=int, default=8, help="attempts per request after the first (default 8)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s, doubled each time (1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per Label Studio request (60)")
    p.add_argument(
        "--progress-every", type=float, default=10.0, help="s between progress lines off a TTY (10)"
    )
    p.add_argument("--report", type=Path, help="write the counts and all failed tasks here (JSON)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every task failure as it happens")
    ray = p.add_argument_group("Ray (pip install 'blip-openvino-labeler[ray]')")
    ray.add_argument(
        "--ray-address",
        default=None,
        help="fan out over this Ray cluster (host:port of the head, ray://..., or 'auto' for the local one)",
    )
    ray.add_argument("--ray-actors", type=int, help="model copies (default: one per node)")
    ray.add_argument("--ray-cpus-per-actor", type=int, help="CPUs per actor (default: the smallest node's)")


def main(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"blip-backend prelabel: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    if not args.model_dir:
        return fail("no model directory: pass --model-dir or set MODEL_DIR")
    if not args.url:
        return fail("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
    if not args.api_key:
        return fail("no API key: pass --api-key or set LABEL_STUDIO_API_KEY")
    if args.batch < 1 or args.writers < 1 or args.retries < 0:
        return fail("--batch and --writers must be at least 1, --retries at least 0")
    from backend.manifest import ModelDirError

    model_dir = str(Path(args.model_dir).resolve())  # Ray workers run elsewhere
    try:
        precision = resolve_precision(model_dir, args.precision)
    except ModelDirError as e:
        return fail(str(e))
    job = Job(
        url=args.url.rstrip("/"),
        api_key=args.api_key,
        project=args.project,
        label_config="",
        model_dir=model_dir,
        precision=precision,
        device=args.device,
        threads=int(os.environ["INFERENCE_THREADS"]) if os.environ.get("INFERENCE_THREADS") else None,
        inference_precision=os.environ.get("INFERENCE_PRECISION") or None,
        batch=args.batch,
        writers=args.writers,
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
        verbose=args.verbose,
    )
    ray = None
    if args.ray_address:
        ray = RayOptions(args.ray_address, args.ray_actors, args.ray_cpus_per_actor)
    try:
        report = run(job, Scope(args.view, args.filter), ray, progress_every=args.progress_every)
    except (PrelabelError, ModelDirError) as e:
        return fail(str(e))
    except Exception as e:
        from label_studio_sdk.core.api_error import ApiError

        if isinstance(e, ApiError):  # not transient: 401, 403, 404 ...
            return fail(f"Label Studio at {job.url}: {describe(e)}")
        raise
    print(summary(report))
    if args.report:
        data = asdict(report)
        data["failed"] = {str(k): v for k, v in report.failed.items()}
        args.report.write_text(json.dumps(data, indent=2) + "\n")
    return report.exit_code
