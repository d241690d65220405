"""What a prelabel worker is given (`Job`) and returns (`BatchResult`), and how a run can fail.

Both the driver (backend/prelabel/run.py) and the workers (worker.py, ray_actors.py) use these, and the
Label Studio client (api.py) raises the errors: they live here so that none of those imports another
just for a type.
"""

from __future__ import annotations

from dataclasses import dataclass


class PrelabelError(Exception):
    """The run cannot start (bad project, view, filter, config or model directory): exit code 2."""


class Unreachable(Exception):
    """Label Studio kept failing after every retry: the run stops (exit code 3); rerun to resume."""


class Stopped(Exception):
    """The run cannot go on (e.g. every Ray actor died): exit code 3; rerun to resume."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in the middle of a batch; `partial` holds the outcomes of the writes that were made."""

    def __init__(self, partial: BatchResult) -> None:
        super().__init__()
        self.partial = partial


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
    allowed_image_hosts: str = ""  # ALLOWED_IMAGE_HOSTS of the driver, applied by every worker alike
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
class RayOptions:
    address: str
    actors: int | None = None  # default: one per node
    cpus_per_actor: int | None = None  # default: the smallest node's CPUs
