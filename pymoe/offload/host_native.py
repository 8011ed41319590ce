"""The host experts' FFN called directly, without a MAX graph: pymoe_host_ffn, a Python
extension module built from host_ffn.mojo (beside this file) with the Mojo compiler that ships
with the `mojo` package, and cached.

`load()` returns the module, building it on first use (8 s on a 2-core VM:
results/checks/20261207-s23-native-build-cpuvm.log) into
<cache>/host_ffn/<key>/, where <cache> is $PYMOE_CACHE or ~/.cache/pymoe and <key> hashes what
the build depends on: the sources (host_ffn.mojo and pymoe's Mojo kernels), the compiler's
version, this CPU (the build targets it) and this Python environment (the library links the
environment's Mojo runtime), so that a changed kernel, machine or venv gets its own build. Where
no cache can be written it builds into a fresh private temporary folder, once per process.
HostExpertGroup(backend="native") calls it (pymoe/offload/host.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..ops import KERNELS_DIR

SOURCE = Path(__file__).with_name("host_ffn.mojo")
MODULE = "pymoe_host_ffn"
# host_ffn.mojo's codes for ffn's dtype and activation arguments.
DTYPE_CODES = {"float32": 0, "bfloat16": 1}
ACTIVATION_CODES = {"relu": 0, "swiglu": 1, "clamped_swiglu": 2}


class NativeBuildError(RuntimeError):
    pass


def mojo_compiler() -> str:
    """The Mojo compiler: the one installed next to this Python (the `mojo` package), else
    the one on PATH."""
    here = Path(sys.executable).parent / "mojo"
    found = str(here) if here.exists() else shutil.which("mojo")
    if found is None:
        raise NativeBuildError("the native host path needs the Mojo compiler (pip install mojo, pinned in "
                               "pyproject.toml); none was found next to this Python or on PATH")
    return found


def cache_dir() -> Path:
    """$PYMOE_CACHE, else ~/.cache/pymoe if it can be written, else a new private temporary
    folder (mkdtemp: never a predictable shared path another user could fill first)."""
    if os.environ.get("PYMOE_CACHE"):
        return Path(os.environ["PYMOE_CACHE"])
    home = Path.home() / ".cache" / "pymoe"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="pymoe-cache-"))


def _this_cpu() -> str:
    """What the build's CPU target depends on: the architecture and, on Linux, the CPU's
    model and feature flags."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                cpu += "\n" + line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return cpu


def build_key(compiler: str) -> str:
    """A hash of everything the module's build depends on: its source, pymoe's Mojo kernels,
    the compiler (path and version), this CPU and this Python environment."""
    digest = hashlib.sha256()
    for path in [SOURCE, *sorted(KERNELS_DIR.glob("*.mojo"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    for part in (compiler, version.stdout, _this_cpu(), sys.prefix):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


@functools.cache
def load():
    """The pymoe_host_ffn module, built here first if its cached build is missing."""
    compiler = mojo_compiler()
    folder = cache_dir() / "host_ffn" / build_key(compiler)
    library = folder / f"{MODULE}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # Built beside its final name, then renamed: a concurrent or interrupted build never
        # leaves a partial library under that name.
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / f"{MODULE}.so"
            try:
                run = subprocess.run(
                    [compiler, "build", "--emit", "shared-lib", "-I", str(KERNELS_DIR.parent), "-o", str(built),
                     str(SOURCE)],
                    capture_output=True, text=True, timeout=900,
                )
            except subprocess.TimeoutExpired as e:
                raise NativeBuildError(f"building {SOURCE.name} took over {e.timeout:.0f} s; gave up") from e
            if run.returncode != 0 or not built.exists():
                raise NativeBuildError(f"building {SOURCE.name} failed (rc {run.returncode}):\n"
                                       f"{(run.stdout + run.stderr)[-3000:]}")
            os.replace(built, library)
    spec = importlib.util.spec_from_file_location(MODULE, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
