"""MoELayer.capture's refusals, which need no GPU: bad counts and a layer off the GPU are
refused before anything runs, and pymoe.ops.gpu_capture_refusal (the one statement of which
GPU paths read back to the host) refuses exactly those. The replays themselves run in
tests/test_gpu_graph.py."""

import dataclasses
import re

import pytest
from graphs import layer_graphs
from model_layer_cases import TEST_PRESET

import pymoe.ops as mops
from pymoe import MoEConfig, MoELayer, MoEWeights

# The CPU layer of the refusal test, compiled with the suite's other graphs (tests/graphs.py).
GRAPHS = layer_graphs([TEST_PRESET.config])

# Qwen3-30B-A3B's layer scaled down (128 experts, top-8, widths multiples of 8): the grouped GEMM's.
QWEN_LIKE = MoEConfig(d_model=256, d_ff=96, num_experts=128, top_k=8, activation="swiglu")
# Mixtral's scaled down: 8 experts, top-2, where cuBLAS per expert takes over at 512 rows per expert.
MIXTRAL_LIKE = MoEConfig(d_model=64, d_ff=32, num_experts=8, top_k=2, activation="swiglu")


def test_capture_refuses_bad_counts_and_a_layer_off_the_gpu_before_anything_runs():
    config = TEST_PRESET.config
    layer = MoELayer(config, MoEWeights.random(config, seed=0), device="cpu")
    for bad in (0, -3, 1.5, "4", True, None):
        with pytest.raises(ValueError, match="tokens must be an int >= 1"):
            layer.capture(bad)
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="layers must be an int >= 1"):
            layer.capture(1, layers=bad)
    with pytest.raises(ValueError, match="capture needs a layer on device='gpu'"):
        layer.capture(1)
    with pytest.raises(ValueError, match="capture needs a layer on device='gpu'"):
        layer.capture(4, layers=2)
    assert layer.pool.allocations == 0, "a refused capture must not have run the layer"


def test_the_grouped_gemm_layers_are_capture_safe_at_every_batch_size():
    for tokens in (1, 16, 130, 4096, 16384):
        assert mops.gpu_capture_refusal(QWEN_LIKE, "bfloat16", tokens) is None, tokens
    # Few large experts: the grouped GEMM below 512 routed rows per expert on average.
    assert mops.gpu_capture_refusal(MIXTRAL_LIKE, "bfloat16", 2047) is None


def test_the_paths_that_read_back_to_the_host_are_refused():
    refusal = mops.gpu_capture_refusal
    # cuBLAS per expert reads the expert offsets back: float32, widths off multiples of 8,
    # too many experts for the grouped GEMM's schedule.
    assert "cuBLAS per expert" in refusal(QWEN_LIKE, "float32", 130)
    assert "cuBLAS per expert" in refusal(dataclasses.replace(QWEN_LIKE, d_ff=100), "bfloat16", 16)
    assert "cuBLAS per expert" in refusal(dataclasses.replace(QWEN_LIKE, d_model=252), "bfloat16", 16)
    many = dataclasses.replace(QWEN_LIKE, num_experts=mops.GROUPED_GEMM_MAX_EXPERTS + 8)
    assert "cuBLAS per expert" in refusal(many, "bfloat16", 16)
    # ... and the cells where it beats the grouped GEMM: 512 rows per expert on average.
    assert "512 or more per expert" in refusal(MIXTRAL_LIKE, "bfloat16", 2048)
    assert mops.cublas_is_faster(8, 4096) and not mops.cublas_is_faster(8, 4095)
    assert not mops.cublas_is_faster(64, 10**6), "more than 32 experts always take the grouped GEMM"


def test_the_every_expert_path_is_refused_where_the_layer_takes_it():
    lo, hi = mops.every_expert_token_range(QWEN_LIKE, "gpu", "float32")
    assert lo <= hi, "a float32 layer of 128 experts has an every-expert range"
    assert "every expert on every token" in mops.gpu_capture_refusal(QWEN_LIKE, "float32", lo)
    # A range forced on a bf16 layer (MoELayer's every_expert_tokens) is refused inside it only,
    # and only with the pool: without it the layer never takes that path.
    assert "every expert on every token" in mops.gpu_capture_refusal(QWEN_LIKE, "bfloat16", 4, (1, 8))
    assert mops.gpu_capture_refusal(QWEN_LIKE, "bfloat16", 9, (1, 8)) is None
    assert mops.gpu_capture_refusal(QWEN_LIKE, "bfloat16", 4, (1, 8), pooled=False) is None


def test_the_python_rule_has_the_kernels_constants():
    """ops.cublas_is_faster and GROUPED_GEMM_MAX_EXPERTS mirror kernels/gpu_grouped_gemm.mojo:
    a change to one side alone would let capture record a host sync or refuse a safe layer."""
    source = (mops.KERNELS_DIR / "gpu_grouped_gemm.mojo").read_text()

    def constant(name):
        return int(re.search(rf"^comptime {name} = (\d+)", source, re.M).group(1))

    assert constant("CUBLAS_MAX_EXPERTS") == mops.CUBLAS_MAX_EXPERTS
    assert constant("CUBLAS_MIN_ROWS_PER_EXPERT") == mops.CUBLAS_MIN_ROWS_PER_EXPERT
    assert constant("MAX_EXPERTS") == mops.GROUPED_GEMM_MAX_EXPERTS
