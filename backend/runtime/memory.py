"""Keeping a process that runs BLIP small: what it frees goes back to the system, and the weights are
held once, not twice. Linux only (glibc, /proc); elsewhere both calls do nothing.

- `return_freed_memory()`: glibc keeps freed blocks below its mmap threshold in its heaps for reuse,
  and that threshold grows up to 32 MB as large blocks are freed. A /predict frees arrays of 2-170 MB
  (image embeddings, cross-attention keys/values, logits) between OpenVINO calls, so the heaps grew to
  hold them all: a full-size worker's peak was 1369 MiB with glibc's defaults and 1252 MiB with the
  threshold held at 1 MiB, at the same speed (bench/memory.py, 16 tasks, 2 cores).
- `release_mapped_files()`: OpenVINO maps each part's `.bin` (ENABLE_MMAP, its default) and, for a model
  with dynamic shapes, repacks the weights into its own buffers at the part's first inference. From
  then on it reads little of the mapped file (a full-size INT8 build: 17 of 363 MB over requests of
  other batch sizes, the embedding rows it looks up), yet every page the repacking read stays in RSS:
  ~350 MiB for that build. The
  mappings are read-only and shared with the file, so telling the kernel they are not needed
  (madvise MADV_DONTNEED) is safe: a page read again is read again from the file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # the same on every Linux architecture
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also stops the threshold from growing
MMAP_THRESHOLD = 1 << 20


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mallopt  # noqa: B018 - musl has madvise but no mallopt: fail here, not later
    except (OSError, AttributeError) as e:
        log.debug("no glibc: memory stays as the allocator leaves it (%s)", e)
        return None
    return libc


def return_freed_memory() -> None:
    """Allocations of 1 MiB and more get pages of their own, given back to the system when freed (for
    the whole process, from now on)."""
    libc = _libc()
    if libc is not None and not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def release_mapped_files(files: Iterable[str | Path]) -> int:
    """Drops this process's resident pages of read-only mappings of `files`; returns the bytes of the
    mappings released."""
    wanted = {str(Path(f).resolve()) for f in files}
    libc = _libc()
    if libc is None or not wanted:
        return 0
    released = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] not in wanted or "w" in fields[1]:
            continue  # a writable mapping could hold changes of its own: never dropped
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
        else:
            log.debug("madvise on %s failed: errno %d", fields[5], ctypes.get_errno())
    return released


def status_mib(field: str = "VmRSS") -> float | None:
    """A memory figure of this process from /proc/self/status, MiB (VmRSS: resident now; VmHWM: its peak);
    None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
