"""What a result depends on besides its config: the CPU (model and the flags that decide torch's kernels), the
thread count, and the versions of the packages that train and record it. The benchmarks print these; every MLflow
run records them as tags (run.py), so a replay can say where it differs from the original.

Needs only torch and the standard library (the GPU machine has no Optuna or MLflow).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
               "asimd", "sve")  # the /proc/cpuinfo flags that decide which kernels torch runs on a CPU
NOT_INSTALLED = "not installed"


def _cpuinfo_value(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `keys` (Linux); None elsewhere."""
    try:
        return next(line.split(":", 1)[1].strip() for line in CPUINFO.read_text().splitlines()
                    if line.startswith(keys))
    except (OSError, StopIteration, IndexError):
        return None


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 7B13' (Linux), else what the platform module says."""
    return _cpuinfo_value("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Of SPEED_FLAGS, those this CPU has (Linux; elsewhere none is listed)."""
    line = _cpuinfo_value("flags", "Features")
    have = set(line.split()) if line else set()
    return [f for f in SPEED_FLAGS if f in have]


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """{distribution name: installed version}, NOT_INSTALLED for one that is missing."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def summary() -> dict[str, str | int]:
    """The machine as the benchmarks describe it."""
    info = {"cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()), "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
