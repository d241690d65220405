"""`blip-backend prelabel --ray-address ...`: the batches go to Ray actors, each holding one loaded model.

The driver (this process) lists the tasks and reads them page by page, exactly as a single-process
run does, and hands each batch to the least busy actor (at most two batches queued per actor, so the
driver never reads far ahead). An actor is a `BatchWorker` like the single-process one: it fetches the
batch's images, predicts, re-checks the tasks' predictions and writes them to Label Studio itself, so
writes scale with the actors and the predictions are the same.

Ray core actors rather than Ray Data: the input is a paginated HTTP API, not files; each item's work
ends in a side effect (a POST) that must happen once; and the driver must know which tasks every batch
held, to report them. Ray Data would need `ray[data]` (pyarrow, pandas) and a custom datasource and
datasink around the same calls, and its task retries re-run batches behind our back; with actors,
Ray restarts a dead actor and re-runs its batch (`max_restarts`, `max_task_retries`), which is safe
because a worker writes only tasks still without a prediction of this model_version.

Every node must be able to read the model directory at the same path (shared storage, or the same
volume on every machine) and import this package with its dependencies; each actor checks that it
loaded the build the driver expects (same model_version).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from backend.prelabel.job import BatchResult, Job, Outcome, PrelabelError, RayOptions, Stopped, Unreachable
from backend.prelabel.worker import BatchWorker

log = logging.getLogger(__name__)

QUEUED_PER_ACTOR = 2  # batches sent to an actor before it finishes one: keeps it busy while it writes
START_TIMEOUT = 600.0  # seconds for the actors to load their models


class _Actor:
    """A Ray actor: one model, one Label Studio client."""

    def __init__(self, job: Job) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        self.name = f"node {node[:8]} pid {os.getpid()}"
        self.worker = BatchWorker(job, name=self.name)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "model_version": self.worker.model_version}

    def process(self, tasks: list[dict[str, Any]]) -> BatchResult:
        return self.worker.process(tasks)


def fan_out(
    job: Job,
    options: RayOptions,
    work: Iterator[list[dict[str, Any]]],
    count: Callable[[BatchResult], None],
    model_version: str,
    begin: Callable[[], None],
    say: Callable[[str], None],
) -> None:
    """Runs `work`'s batches on Ray actors, calling `count` with each batch's result."""
    try:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    except ImportError:
        raise PrelabelError("--ray-address needs Ray: pip install 'blip-openvino-labeler[ray]'") from None

    started_here = not ray.is_initialized()
    if started_here:
        try:
            # actors' logs stay in the cluster's session logs: their per-task lines are in our report
            ray.init(address=options.address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as e:  # ConnectionError, ValueError for a bad address, ...
            raise PrelabelError(f"cannot connect to Ray at {options.address}: {e}") from None
    actors: list[Any] = []
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = sorted(int(n.get("Resources", {}).get("CPU", 0)) for n in nodes) or [1]
        cpus = options.cpus_per_actor or max(1, node_cpus[0])
        n = options.actors or len(nodes) or 1
        remote = ray.remote(_Actor).options(
            num_cpus=cpus,
            max_restarts=2,
            max_task_retries=2,
            scheduling_strategy="SPREAD",
        )
        actors = [remote.remote(replace(job, threads=cpus)) for _ in range(n)]
        t0 = time.monotonic()
        pending = {a.info.remote(): a for a in actors}
        live: list[Any] = []
        names: dict[Any, str] = {}
        while pending:
            left = START_TIMEOUT - (time.monotonic() - t0)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, left))
            if not ready:
                break
            actor = pending.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except RayActorError as e:
                raise PrelabelError(f"a Ray actor could not load the model: {_first_line(e)}") from None
            if info["model_version"] != model_version:
                raise PrelabelError(
                    f"{info['name']} loaded {info['model_version']}, not {model_version}: "
                    f"is {job.model_dir} the same build on every node?"
                )
            live.append(actor)
            names[actor] = info["name"]
        for actor in pending.values():
            ray.kill(actor)
        if not live:
            raise PrelabelError(
                f"no Ray actor started in {START_TIMEOUT:.0f} s: does the cluster have {cpus} free CPU(s) "
                f"per actor (--ray-cpus-per-actor)?"
            )
        if pending:
            log.warning("only %d of %d Ray actors started; going on with them", len(live), n)
        on_nodes = len({name.split(" pid")[0] for name in names.values()})
        say(f"  ray: {len(live)} actor(s) x {cpus} CPU(s) on {on_nodes} node(s) of {options.address}")
        _dispatch(ray, live, names, work, count, begin, RayActorError, RayTaskError, GetTimeoutError)
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(actor)
        if started_here:
            ray.shutdown()


def _dispatch(
    ray: Any,
    live: list[Any],
    names: dict[Any, str],
    work: Iterator[list[dict[str, Any]]],
    count: Callable[[BatchResult], None],
    begin: Callable[[], None],
    RayActorError: type,
    RayTaskError: type,
    GetTimeoutError: type,
) -> None:
    queued: dict[Any, int] = {a: 0 for a in live}
    in_flight: dict[Any, tuple[Any, list[dict[str, Any]]]] = {}  # object ref -> (actor, batch)
    backlog: list[list[dict[str, Any]]] = []  # batches of actors that died, to hand out again
    exhausted = False
    while True:
        while live and len(in_flight) < QUEUED_PER_ACTOR * len(live):
            if backlog:
                batch = backlog.pop()
            elif not exhausted:
                batch = next(work, None)
                if batch is None:
                    exhausted = True
                    continue
            else:
                break
            actor = min(live, key=queued.__getitem__)
            in_flight[actor.process.remote(batch)] = (actor, batch)
            queued[actor] += 1
            begin()
        if not in_flight:
            if not live and (backlog or not exhausted):
                raise Stopped("every Ray actor died")
            return
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, batch = in_flight.pop(ready[0])
        queued[actor] -= 1
        try:
            result = ray.get(ready[0])
        except RayActorError as e:
            # dead even after Ray's restarts: another actor takes the batch (its writes re-check first)
            log.warning("%s died (%s); its batch goes to another actor", names.get(actor), _first_line(e))
            if actor in live:
                live.remove(actor)
            backlog.append(batch)
            continue
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Unreachable):
                raise Unreachable(str(cause)) from None
            why = f"worker error: {_first_line(e)}"
            result = BatchResult([Outcome(t["id"], "failed", why) for t in batch], names.get(actor, "?"))
        count(result)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__
