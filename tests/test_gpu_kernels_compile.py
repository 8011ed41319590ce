"""The GPU kernels compile for an NVIDIA Hopper target on any machine (no GPU needed).

MAX compiles an op's GPU code only when a graph loads on a GPU, so a kernel that cannot be
instantiated for some dtype hides until then. Since the grouped GEMM landed, a float32 GPU
graph with expert matmuls could not compile: grouped_gemm_gpu[float32] reached the
tensor-core tiles' 16-bit assert (the likely cause of tests/test_gpu.py's errors on the H100
on 2026-12-06 and -07; with the fix, its 12 tests that ran on an H100 in session 22
passed). This builds tests/gpu_kernels_compile.mojo, the grouped GEMM entries for float32 and
bfloat16, for Hopper (sm_90a) and Ampere (sm_80).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _mojo() -> str | None:
    here = Path(sys.executable).parent / "mojo"  # the venv's, installed with the mojo package
    return str(here) if here.exists() else shutil.which("mojo")


@pytest.mark.skipif(_mojo() is None, reason="no mojo compiler on this machine")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])  # Hopper (wgmma, larger tiles) and Ampere
def test_grouped_gemm_entries_compile_for_every_layer_dtype(tmp_path, arch):
    run = subprocess.run(
        [_mojo(), "build", "-I", str(REPO), f"--target-accelerator={arch}", "-o", str(tmp_path / "probe"),
         str(REPO / "tests" / "gpu_kernels_compile.mojo")],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
