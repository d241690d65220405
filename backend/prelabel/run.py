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
themselves (ray_actors.py); this process only lists the tasks and hands out batches.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from backend.annotate.labeling import ConfigError, plan
from backend.prelabel.api import PAGE, Api, describe
from backend.prelabel.job import (
    BatchResult,
    Interrupted,
    Job,
    PrelabelError,
    RayOptions,
    Stopped,
    Unreachable,
)
from backend.prelabel.progress import Progress, ProgressLog, duration
from backend.prelabel.worker import BatchWorker
from backend.runtime.manifest import load_manifest

if TYPE_CHECKING:
    from backend.runtime.blip import Blip

EXIT_OK, EXIT_FAILED_TASKS, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3


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
        report.model_version = manifest.model_version(job.precision)
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
            from backend.prelabel.ray_actors import fan_out

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
