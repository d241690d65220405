"""A prelabel worker: one loaded model and a Label Studio client; predicts a batch of tasks and writes
each prediction exactly once (`BatchWorker.process`). Used in-process and inside each Ray actor."""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backend.annotate import budget, cache
from backend.annotate.cache import EmbeddingCache
from backend.annotate.fetch import FetchPolicy
from backend.annotate.images import ImageLoader
from backend.annotate.labeling import plan
from backend.annotate.predict import Predictor
from backend.annotate.predict import log as predict_log
from backend.prelabel.api import NO_SDK_RETRIES, Api, describe, transient
from backend.prelabel.job import BatchResult, Interrupted, Job, Outcome, Unreachable
from backend.runtime.blip import Blip

log = logging.getLogger(__name__)


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
        if blip is None:
            blip = Blip(
                job.model_dir,
                device=job.device,
                precision=job.precision,
                threads=job.threads,
                inference_precision=job.inference_precision,
            )
            blip.warm_up()  # one copy of the weights in memory, not two (backend/runtime/memory.py)
        self.job, self.name = job, name
        # images shared by tasks of different batches (VQA projects: many questions, one image) are
        # fetched and encoded once while their embeddings stay in the cache (EMBEDDING_CACHE_MB)
        cache_mb = budget.fit(blip, budget.from_env(), cache.mb_from_env())
        self.predictor = Predictor(blip, chunk=job.batch, cache=EmbeddingCache(cache_mb << 20))
        self.model_version = self.predictor.model_version
        self.plan = plan(job.label_config, tuple(blip.tasks))
        self.loader = ImageLoader(
            hostname=job.url, access_token=job.api_key, policy=FetchPolicy.parse(job.allowed_image_hosts)
        )
        self.api = api or Api(job)
        self.reasons = _Reasons()
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
        predict_log.removeHandler(self.reasons)

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
