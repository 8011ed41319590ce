"""MoELayer.capture's refusals, which need no GPU: bad counts and a layer off the GPU are
refused before anything runs, and pymoe.ops.gpu_capture_refusal (the one statement of which
GPU paths read back to the host) refuses exactly those. runtime.DeviceGraph's own plumbing
(the input copy, the captured buffers, the output, release) runs here on a CPU layer with a
stand-in for MAX's capture, which MAX has for GPUs only. The real replays run in
tests/test_gpu_graph.py."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import FP32_TOL, rel_err
from graphs import layer_graphs
from model_layer_cases import TEST_PRESET

import pymoe.ops as mops
from pymoe import MoEConfig, MoELayer, MoEWeights, runtime

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
    assert mops.gpu_capture_refusal(MIXTRAL_LIKE, "bfloat16", 2047, architecture="sm_80") is None


def test_the_paths_that_read_back_to_the_host_are_refused():
    refusal = mops.gpu_capture_refusal
    # cuBLAS per expert reads the expert offsets back: float32, widths off multiples of 8,
    # too many experts for the grouped GEMM's schedule.
    assert "cuBLAS per expert" in refusal(QWEN_LIKE, "float32", 130)
    assert "cuBLAS per expert" in refusal(dataclasses.replace(QWEN_LIKE, d_ff=100), "bfloat16", 16)
    assert "cuBLAS per expert" in refusal(dataclasses.replace(QWEN_LIKE, d_model=252), "bfloat16", 16)
    many = dataclasses.replace(QWEN_LIKE, num_experts=mops.GROUPED_GEMM_MAX_EXPERTS + 8)
    assert "cuBLAS per expert" in refusal(many, "bfloat16", 16)
    # ... and the cells where it beats the grouped GEMM off Hopper: 512 rows per expert on average.
    assert "512 or more per expert" in refusal(MIXTRAL_LIKE, "bfloat16", 2048, architecture="sm_80")
    assert mops.cublas_is_faster(8, 4096, "sm_80") and not mops.cublas_is_faster(8, 4095, "sm_80")
    assert not mops.cublas_is_faster(64, 10**6, "sm_80"), "more than 32 experts always take the grouped GEMM"


def test_hopper_runs_the_grouped_gemm_at_every_batch_size():
    """On Hopper the wgmma tile replaced cuBLAS per expert (kernels/gpu_grouped_gemm.mojo's
    cublas_is_faster): few large experts with many rows each are capture-safe there."""
    for architecture in ("sm_90a", "sm_90"):
        assert not mops.cublas_is_faster(8, 10**6, architecture)
        for tokens in (2048, 16384):
            assert mops.gpu_capture_refusal(MIXTRAL_LIKE, "bfloat16", tokens, architecture=architecture) is None
    # float32 still takes cuBLAS per expert there.
    assert "cuBLAS per expert" in mops.gpu_capture_refusal(MIXTRAL_LIKE, "float32", 2, architecture="sm_90a")


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
    # ... and its Hopper exception (MAX's H100 device info is sm_90a, H100 and H200)
    rule = source[source.index("def cublas_is_faster"):source.index("def _tensor_core_dtype")]
    assert "comptime if ctx.default_device_info == H100:\n        return False" in rule
    assert constant("CUBLAS_MIN_ROWS_PER_EXPERT") == mops.CUBLAS_MIN_ROWS_PER_EXPERT
    assert constant("MAX_EXPERTS") == mops.GROUPED_GEMM_MAX_EXPERTS


class CapturedByExecuting:
    """Stands in for a MAX model's capture on the CPU (TEST ONLY): capture runs the model and
    keeps its output buffers and inputs; replay insists on the very input buffers captured,
    runs the model and writes the results into the captured outputs, in place, as a device
    graph's replay does."""

    def __init__(self, model):
        self.model, self.captured, self.released, self.executed = model, {}, [], 0

    def execute(self, *inputs):
        self.executed += 1
        return self.model.execute(*inputs)

    def capture(self, key, *inputs):
        assert key not in self.captured, "a key must not be captured twice"
        outputs = self.model.execute(*inputs)
        self.captured[key] = (inputs, outputs)
        return outputs

    def replay(self, key, *inputs):
        captured_inputs, outputs = self.captured[key]
        assert len(inputs) == len(captured_inputs) and all(a is b for a, b in zip(inputs, captured_inputs))
        # Copies are queued on the device, but this fake runs the graph right away: on a GPU
        # the captured replay follows the copy of x on the same stream. So wait for the copy
        # into x first, and for the copies out before the caller reads the outputs (keeping
        # their sources alive until then). Without these waits the test failed now and then:
        # an output computed from the previous x, or whose first 8 bytes were zero.
        inputs[0].device.synchronize()
        new_outputs = self.model.execute(*inputs)
        for out, new in zip(outputs, new_outputs):
            out.inplace_copy_from(new)
        outputs[0].device.synchronize()

    def release_captured_graph(self, key):
        self.released.append(key)


class CaptureFails(CapturedByExecuting):
    """A model whose capture fails partway, as MAX's does when it cannot map its memory."""

    def capture(self, key, *inputs):
        raise RuntimeError("Failed to capture graph: preBackForCapture vmmCreate failed")


def test_a_failed_capture_hands_back_what_it_recorded_and_raises():
    config = TEST_PRESET.config
    layer = MoELayer(config, MoEWeights.random(config, seed=1), device="cpu")
    model = CaptureFails(layer._model)
    with pytest.raises(RuntimeError, match="vmmCreate failed"):
        runtime.DeviceGraph(model, (5, config.d_model), "float32", layer._device, layer._inputs_after_x(5))
    assert len(model.released) == 1 and not model.captured, "the failed capture's key is released"


def test_a_device_graph_copies_x_in_replays_the_captured_buffers_and_releases(rng):
    config = TEST_PRESET.config
    layer = MoELayer(config, MoEWeights.random(config, seed=1), device="cpu")
    model = CapturedByExecuting(layer._model)
    graphs = [runtime.DeviceGraph(model, (5, config.d_model), "float32", layer._device, layer._inputs_after_x(5))
              for _ in range(2)]
    graph = graphs[0]
    assert graphs[1].key != graph.key, "each capture takes its own key"
    assert model.executed == 2, "each capture runs the graph once before capturing"
    outs = []
    for _ in range(2):
        x = rng.standard_normal((5, config.d_model), dtype=np.float32)
        out = graph(x)
        assert rel_err(out, layer.forward_unchecked(x)) < FP32_TOL
        outs.append(out.copy())  # a host output buffer is shared: the next call overwrites it
    assert rel_err(outs[0], outs[1]) > FP32_TOL, "the second call must see its own input"
    x = torch.from_numpy(rng.standard_normal((5, config.d_model), dtype=np.float32))
    assert rel_err(graph(x).numpy(), layer.forward_unchecked(x.numpy())) < FP32_TOL
    with pytest.raises(ValueError, match=r"captured for x of shape \[tokens, d_model\] = \[5, 27\], got \[4, 27\]"):
        graph(x[:4])
    graph.release()
    graph.release()  # a second release does nothing
    assert model.released == [graph.key]
    with pytest.raises(RuntimeError, match="released"):
        graph(x)
