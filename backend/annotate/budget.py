"""MEMORY_BUDGET_MB: the batch sizes and embedding cache a worker can afford once its model is loaded.

    cache_mb = fit(blip, budget_mb=1200, cache_mb=256)   # after blip.warm_up(); sets blip's batches

What a worker holds after loading (weights, libraries, buffers at batch 1: measured, not estimated)
plus what a request adds on top, estimated from the model's shapes: the request's own arrays at batch 1,
photos being decoded, and each image a batch takes beyond the first. The fastest batch sizes whose
estimate fits are used, and what is left goes to the embedding cache (at most `cache_mb`). A budget below
what the model needs at batch 1 is logged as a warning, and the worker runs at the smallest batches
without a cache: it does not refuse to start.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from backend.annotate.predict import FETCH_THREADS
from backend.runtime.blip import Batches, Blip
from backend.runtime.env import positive_int
from backend.runtime.memory import status_mib

log = logging.getLogger(__name__)

ENV = "MEMORY_BUDGET_MB"
# fastest first. Measured on 2 cores, full-size INT8, 16 images: captions four at a time take 1.16x as
# long as eight, one at a time 2.3x.
CHOICES = (
    Batches(),
    Batches(caption=4),
    Batches(caption=1),
)
# In units of one image's embeddings (Blip.embeds_bytes, 1.69 MiB full-size), measured on the full-size
# INT8 model (bench/memory.py over three 16-task /predict requests): a request at batch 1 peaked 262 MiB
# (155 units) over the RSS after loading in format 6, 242 in format 5 (its embeddings, 20-token caption
# decoding, the question encoder, the request body, the libraries it loads, and pages of the weight files
# read again, which vary from run to run by tens of MiB); one more image per vision call adds 16.6
# units (29 MiB, format 4's measurement: the vision part is the same), per caption call at most 2.4 (eight
# captions at a time peaked within 2 MiB of one at a time).
REQUEST = 155.0
PER_IMAGE = {"vision": 16.6, "caption": 2.4}
PHOTO_MB = 36  # a 12-MP photo while it is decoded, before it is resized; FETCH_THREADS decode at once


@dataclass(frozen=True)
class Fit:
    batches: Batches
    cache_mb: int
    peak_mb: int  # the estimated peak with these batches and a full cache
    fits: bool


def from_env() -> int | None:
    """MEMORY_BUDGET_MB from the environment: a positive whole number of MiB, or None (no budget)."""
    return positive_int(ENV)


def choose(loaded_mb: float, unit_mb: float, budget_mb: int, cache_mb: int) -> Fit:
    """The fastest batches whose estimated peak stays within `budget_mb`, and the cache that still fits."""
    base = loaded_mb + REQUEST * unit_mb + FETCH_THREADS * PHOTO_MB
    for batches in CHOICES:
        extra = sum(PER_IMAGE[name] * (getattr(batches, name) - 1) for name in PER_IMAGE) * unit_mb
        need = math.ceil(base + extra)  # whole MiB, so that the cache and the peak add up exactly
        if need <= budget_mb:
            cache = max(0, min(cache_mb, budget_mb - need))
            return Fit(batches, cache, need + cache, True)
    return Fit(CHOICES[-1], 0, need, False)


def fit(blip: Blip, budget_mb: int | None, cache_mb: int) -> int:
    """Sets `blip`'s batch sizes for `budget_mb` (None: no budget, the fastest) and returns the embedding
    cache's MiB. Call it once the model is loaded and warmed up: the RSS then is what it holds for good."""
    if budget_mb is None:
        return cache_mb
    loaded = status_mib("VmRSS")
    if loaded is None:
        log.warning("%s=%d is ignored: this system does not report the process's memory", ENV, budget_mb)
        return cache_mb
    unit_mb = max(blip.embeds_bytes, blip.captioner.embeds_bytes) / (1 << 20)
    chosen = choose(loaded, unit_mb, budget_mb, cache_mb)
    blip.use(chosen.batches)
    b = chosen.batches
    sizes = f"vision {b.vision}, captions {b.caption}, answers {b.answer}"
    if chosen.fits:
        log.info(
            "%s=%d: %.0f MiB after loading; per call: %s; embedding cache %d MiB (%d asked); peak ~%d MiB",
            ENV, budget_mb, loaded, sizes, chosen.cache_mb, cache_mb, chosen.peak_mb,
        )  # fmt: skip
    else:
        log.warning(
            "%s=%d is less than this model needs: %.0f MiB after loading, ~%d MiB at a request's peak with "
            "one image per call; running with one image per call and no embedding cache",
            ENV, budget_mb, loaded, chosen.peak_mb,
        )  # fmt: skip
    return chosen.cache_mb
