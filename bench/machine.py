"""The machine a bench result belongs to: absolute times move 2x between machines of the same CPU name, so
every results file records the CPU, its flags, the load when the run started and the package versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("openvino", "nncf", "torch", "transformers")


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, object]:
    """The CPU model and its flags (what OpenVINO's kernels choose from: avx512_vnni, avx512_bf16,
    amx_*, ...), core count, load average at the start and package versions."""
    info = cpuinfo()
    return {
        "cpu": info.get("model name") or platform.processor(),
        "cpu_flags": info.get("flags") or info.get("Features") or "",  # x86 / ARM
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        **{p: _version(p) for p in PACKAGES},
    }
