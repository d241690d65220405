"""The Label Studio calls `blip-backend prelabel` makes, each retried on transient errors with backoff.

Retries are ours, not the SDK's (`NO_SDK_RETRIES`): the SDK would repeat a POST blindly, and a
prediction written twice is a duplicate. Reads are safe to repeat; writes are made by the caller
(worker.py), which checks before repeating one.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from backend.prelabel.job import Job, PrelabelError, Unreachable

log = logging.getLogger(__name__)

ID_PAGE = 1000  # task ids per listing request
PAGE = 100  # tasks (with data) per request
RETRY_CAP = 60.0  # longest wait between two attempts, seconds
NO_SDK_RETRIES = {"max_retries": 0}  # retries are ours: the SDK would repeat a POST blindly


def transient(e: BaseException) -> bool:
    """Worth retrying: the request may not have been served (or served late), not refused."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(e, httpx.TransportError):  # connect/read/write timeouts, resets, protocol errors
        return True
    if isinstance(e, ApiError):
        return e.status_code is not None and (e.status_code >= 500 or e.status_code in (408, 429))
    return False


def describe(e: BaseException) -> str:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(e, ApiError):
        body = e.body if isinstance(e.body, str) else json.dumps(e.body, default=str)
        return f"HTTP {e.status_code}: {body[:300]}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Api:
    """The Label Studio calls the command makes, each retried on transient errors with backoff."""

    def __init__(self, job: Job, client: Any = None) -> None:
        from label_studio_sdk.client import LabelStudio

        self.job = job
        self.client = client or LabelStudio(base_url=job.url, api_key=job.api_key, timeout=job.timeout)

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        for attempt in itertools.count():
            try:
                return fn(**kwargs, request_options=NO_SDK_RETRIES)
            except Exception as e:
                if not transient(e):
                    raise
                if attempt >= self.job.retries:
                    raise Unreachable(f"{what}: {describe(e)} (gave up after {attempt + 1} attempts)") from e
                self.wait(what, attempt, e)
        raise AssertionError("not reached")

    def wait(self, what: str, attempt: int, e: BaseException) -> None:
        delay = min(RETRY_CAP, self.job.backoff * 2**attempt) * random.uniform(0.75, 1.25)
        after = _retry_after(e)
        if after is not None:
            delay = min(RETRY_CAP, max(after, 0.0))
        log.warning(
            "%s: %s; retrying in %.1f s (%d/%d)", what, describe(e), delay, attempt + 1, self.job.retries
        )
        time.sleep(delay)

    def project(self, project: int) -> Any:
        return self.call(f"reading project {project}", self.client.projects.get, id=project)

    def view_filters(self, view: int, project: int) -> dict[str, Any]:
        got = self.call(f"reading view {view}", self.client.views.get, id=str(view))
        if got.project is not None and int(got.project) != project:
            raise PrelabelError(f"view {view} belongs to project {got.project}, not {project}")
        return (got.data or {}).get("filters") or {"conjunction": "and", "items": []}

    def task_ids(self, project: int, query: str) -> list[int]:
        """Ids of the tasks in scope, in id order (a snapshot: later writes can't shift the pages)."""
        from label_studio_sdk.core.api_error import ApiError

        ids: list[int] = []
        for page in itertools.count(1):
            try:
                got = self.call(
                    f"listing the tasks of project {project} (page {page})",
                    self.client.tasks.list,
                    project=project,
                    query=query,
                    fields="task_only",
                    include="id",
                    page=page,
                    page_size=ID_PAGE,
                )
            except ApiError as e:
                if e.status_code == 404 and page > 1:  # past the last page
                    break
                raise
            items = got.items or []
            ids.extend(int(t.id) for t in items)
            total = getattr(got.response, "total", None)
            # a server may cap page_size below ID_PAGE: stop on the total, not on a short page
            if not items or (total is not None and len(ids) >= total):
                break
        return list(dict.fromkeys(ids))

    def tasks(self, project: int, ids: list[int], with_data: bool = True) -> dict[int, dict[str, Any]]:
        """{id: {"id", "data", "versions"}} of those of these tasks that still exist, PAGE per request."""
        include = "id,data,predictions_model_versions" if with_data else "id,predictions_model_versions"
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), PAGE):
            chunk = ids[start : start + PAGE]
            got = self.call(
                f"reading {len(chunk)} task(s) of project {project}",
                self.client.tasks.list,
                project=project,
                query=json.dumps({"selectedItems": {"all": False, "included": chunk}}),
                # "all": predictions_model_versions is only filled in then; include keeps the rest out
                fields="all",
                include=include,
                resolve_uri=False,  # as Label Studio sends tasks to /predict: storage URIs unresolved
                page=1,
                page_size=len(chunk),
            )
            for t in got.items or []:
                versions = _versions(t.predictions_model_versions)
                found[int(t.id)] = {"id": int(t.id), "data": t.data, "versions": versions}
        return found

    def prediction_ids(self, task: int, version: str) -> list[int]:
        got = self.call(f"reading task {task}'s predictions", self.client.predictions.list, task=task)
        return sorted(int(p.id) for p in got if p.model_version == version)


def _versions(value: Any) -> set[str]:
    # Label Studio joins the task's distinct prediction versions with commas
    if isinstance(value, str):
        return {v.strip() for v in value.split(",") if v.strip()}
    if isinstance(value, list | tuple | set):
        return {str(v) for v in value}
    return set()


def _retry_after(e: BaseException) -> float | None:
    headers = getattr(e, "headers", None) or {}
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
