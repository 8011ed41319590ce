"""The GPU kernels compile for an NVIDIA Hopper target, and the GPU graphs stage, on any
machine (no GPU needed).

MAX compiles an op's GPU code only when a graph loads on a GPU, so a kernel that cannot be
instantiated for some dtype hides until then. Since the grouped GEMM landed, a float32 GPU
graph with expert matmuls could not compile: grouped_gemm_gpu[float32] reached the
tensor-core tiles' 16-bit assert (the likely cause of tests/test_gpu.py's errors on the H100
on 2026-12-06 and -07; with the fix, its 12 tests that ran on an H100 in session 22
passed). This builds tests/gpu_kernels_compile.mojo, the grouped GEMM entries for float32 and
bfloat16, for Hopper (sm_90a) and Ampere (sm_80).

Staging a graph checks each custom op's operands (count, dtype, rank, mutability) against its
Mojo registration, so the GPU layer graphs of every model preset are staged here: a Python op
wrapper and its Mojo op that disagree (the fused decode op's extra scratch, a new bias) fail
on the CPU, not first on a GPU machine; so are pymoe.parallel's graphs of a rank.
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


def _gpu_layer_graphs():
    from pymoe import ops, runtime
    from pymoe.config import MODEL_LAYERS

    for name, (config, _) in MODEL_LAYERS.items():
        for dtype in ("bfloat16", "float32"):
            fused = ops.fused_decode_tokens(config, "gpu", dtype)
            yield f"{name}-{dtype}", runtime.moe_graph_spec(config, "gpu", dtype, True, fused_decode_tokens=fused)
    config = MODEL_LAYERS["qwen3-30b-a3b"][0]
    fused = ops.fused_decode_tokens(config, "gpu", "bfloat16")
    yield "qwen3-30b-a3b-stack-2", runtime.moe_graph_spec(config, "gpu", "bfloat16", True, stack=2,
                                                            fused_decode_tokens=fused)
    yield "qwen3-30b-a3b-unpooled", runtime.moe_graph_spec(config, "gpu", "bfloat16", False)
    # pymoe.parallel's graphs of a rank holding half the experts (routing, shared expert,
    # experts; its public compile_graphs opens the GPU first)
    from pymoe.parallel import _graph_specs

    for name in ("deepseek-v3", "gpt-oss-20b"):
        config = MODEL_LAYERS[name][0]
        for i, spec in enumerate(_graph_specs(config, config.num_experts // 2, "gpu", "bfloat16", 0)):
            yield f"{name}-expert-parallel-{i}", spec


def test_every_presets_gpu_graphs_stage_against_the_kernels():
    from max.graph import Module

    staged = {}
    for i, (name, spec) in enumerate(_gpu_layer_graphs()):
        text = str(spec.build(f"gpu_stage_{i}", Module())._module)
        staged[name] = {op for op in ("pymoe_moe_ffn_decode", "pymoe_moe_ffn") if f'"{op}"' in text}
    assert staged["qwen3-30b-a3b-bfloat16"] == {"pymoe_moe_ffn_decode"}, staged  # the fused op (with its fallback)
    assert staged["qwen3-30b-a3b-float32"] == {"pymoe_moe_ffn"}, staged
    assert staged["qwen3-30b-a3b-stack-2"] == {"pymoe_moe_ffn_decode"}, staged
