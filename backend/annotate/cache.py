"""What the vision encoders made of each image, kept for the next request about it: bounded, LRU.

    cache = EmbeddingCache(mb_from_env() << 20)           # EMBEDDING_CACHE_MB (default 64; 0 turns it off)
    cache.put(model, digest, embeddings)                  # [1, S, E] of one image
    cache.get(model, digest)                              # the same array, or None

An entry is one image's embeddings from one vision encoder (1.8 MB on a full-size model). Entries are keyed
by the model (Blip.encoder_key: the build and precision) and the digest of the image (sha256 of the file's
bytes, or of the data URI), so a changed file is another image, and the cache keeps at most `max_bytes`
of arrays and `max_images` distinct images, dropping the least recently used first.

`sources` remembers, per image URL, the digest it had and how to tell that the file behind the URL is
still the same without downloading it again (images.Source: Label Studio's uploads never change; Local
Storage files read from disk are compared by inode, size and modification time; other URLs are asked
again with If-None-Match / If-Modified-Since, and a 304 is the answer). A URL whose server gives
neither an ETag nor a Last-Modified is downloaded again every time, and only the vision encoder is
skipped when its bytes are the same.

Shared by every request thread of a worker (a lock guards it); each gunicorn worker and each
`prelabel` process or Ray actor has its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.runtime.env import whole

ENV = "EMBEDDING_CACHE_MB"
# a full-size model: ~37 images' embeddings, the tasks annotators have open and more. A worker's RSS
# grows by what the cache holds: with 64 it levelled off at ~960 MiB over six 16-task requests, where
# 256 would add another ~190 MiB (bench/memory.py)
DEFAULT_MB = 64
MAX_IMAGES = 1024  # distinct images, whatever their size (the tiny test model's take a few KB)
MAX_SOURCES = 8192  # URLs remembered with their digest and validators (a few hundred bytes each)

Key = tuple[str, str]  # (model, image digest)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


def mb_from_env() -> int:
    """EMBEDDING_CACHE_MB from the environment: a whole number of MiB, 0 to turn the cache off."""
    return whole(ENV, DEFAULT_MB)


class EmbeddingCache:
    def __init__(self, max_bytes: int = DEFAULT_MB << 20, max_images: int = MAX_IMAGES) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.max_images = max(0, int(max_images))
        self._arrays: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._images: dict[str, int] = {}  # digest -> entries held for it
        self._sources: OrderedDict[Any, Any] = OrderedDict()  # url key -> images.Source
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        """Bytes of arrays held."""
        return self._bytes

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_images > 0

    # -- arrays --------------------------------------------------------------------------------------

    def get(self, model: str, digest: str) -> np.ndarray | None:
        key = (model, digest)
        with self._lock:
            array = self._arrays.get(key)
            if array is None:
                self.stats.misses += 1
                return None
            self._arrays.move_to_end(key)
            self.stats.hits += 1
            return array

    def put(self, model: str, digest: str, array: np.ndarray) -> None:
        """Keeps `array` (not a copy: pass one that owns its memory, not a view of a larger batch)."""
        if not self.enabled or array.nbytes > self.max_bytes:
            return
        key = (model, digest)
        with self._lock:
            old = self._arrays.pop(key, None)
            if old is not None:
                self._forget(key, old)
            self._arrays[key] = array
            self._bytes += array.nbytes
            self._images[digest] = self._images.get(digest, 0) + 1
            while self._bytes > self.max_bytes or len(self._images) > self.max_images:
                oldest, dropped = self._arrays.popitem(last=False)
                self._forget(oldest, dropped)
                self.stats.evictions += 1

    def _forget(self, key: Key, array: np.ndarray) -> None:
        self._bytes -= array.nbytes
        digest = key[1]
        left = self._images.get(digest, 0) - 1
        if left > 0:
            self._images[digest] = left
        else:
            self._images.pop(digest, None)

    # -- sources -------------------------------------------------------------------------------------

    def source(self, key: Any) -> Any:
        with self._lock:
            known = self._sources.get(key)
            if known is not None:
                self._sources.move_to_end(key)
            return known

    def remember(self, key: Any, source: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._sources[key] = source
            self._sources.move_to_end(key)
            while len(self._sources) > MAX_SOURCES:
                self._sources.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        """For /metrics."""
        with self._lock:
            return {
                "max_mb": self.max_bytes >> 20,
                "mb": round(self._bytes / (1 << 20), 2),
                "images": len(self._images),
                "arrays": len(self._arrays),
                "hits": self.stats.hits,
                "misses": self.stats.misses,
                "evictions": self.stats.evictions,
            }
