"""What a result file records about where and how it was produced."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS_OF_INTEREST if f in flags]


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import torch

    model, flags = _cpuinfo()
    info = {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for package in ("pymoe", "max", "mojo", "torch", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def git_commit() -> dict:
    """The commit of the pymoe checkout the code ran from: the source tree itself,
    or, for an installed package (pip install .), the checkout in the current
    directory. None outside a pymoe git checkout. A copy of a clean commit whose .git is
    stale or missing (as on a lent GPU machine) names it in PYMOE_SOURCE_COMMIT."""
    if os.environ.get("PYMOE_SOURCE_COMMIT"):
        return {"commit": os.environ["PYMOE_SOURCE_COMMIT"], "dirty": False, "commit_source": "PYMOE_SOURCE_COMMIT"}
    for root in (REPO_ROOT, Path.cwd()):
        if not (root / "kernels" / "moe_gate.mojo").is_file():
            continue

        def git(*args, root=root):
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        try:
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
            return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": None, "dirty": None}


def provenance(command: str) -> dict:
    """The header every result file starts with."""
    return {
        "command": command,
        **git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
    }
