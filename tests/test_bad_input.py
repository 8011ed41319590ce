"""Bad input gets a clear Python error before any graph is built or run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import REF
from max.dtype import DType
from max.graph import BufferType, DeviceRef, Graph, TensorType

import pymoe.ops as mops
from pymoe import MoEConfig, MoELayer, MoEWeights, get_preset, runtime

CFG = MoEConfig(d_model=8, d_ff=12, num_experts=4, top_k=2)


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if anything tries to compile a graph."""

    def refuse(*args, **kwargs):
        raise AssertionError("a graph was compiled for bad input")

    # Every compile goes through these, even of a graph compiled earlier in the process.
    monkeypatch.setattr(runtime, "compiled", refuse)
    monkeypatch.setattr(runtime, "compile_together", refuse)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 5}, "top_k must be in"),
        ({"top_k": 0}, "top_k must be in"),
        ({"num_experts": 0, "top_k": 0}, "num_experts"),
        ({"activation": "gelu"}, "activation"),
        ({"d_model": 0}, "d_model"),
        ({"capacity_factor": float("nan")}, "capacity_factor"),
        ({"capacity_factor": 1.2345}, "3 decimals"),
        ({"d_ff": 2.5}, "d_ff"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"d_model": 8, "d_ff": 12, "num_experts": 4, "top_k": 2, **kwargs})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_fused_decode_is_refused_where_it_does_not_apply(no_compile):
    """MoELayer(fused_decode=True) says so before compiling where the kernel cannot run: off the
    GPU here (pymoe.ops.fused_decode_tokens is 0)."""
    w = MoEWeights.random(CFG, seed=0)
    with pytest.raises(ValueError, match="fused_decode applies to pooled 16-bit GPU layers"):
        MoELayer(CFG, w, fused_decode=True)


def test_unknown_device_and_dtype(no_compile):
    w = MoEWeights.random(CFG, seed=0)
    with pytest.raises(ValueError, match="device"):
        MoELayer(CFG, w, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        MoELayer(CFG, w, dtype="float16")


@pytest.mark.parametrize(
    "field,array,match",
    [
        ("router", np.zeros((8, 5), np.float32), "router weights has shape"),
        ("w1", np.zeros((4, 9, 12), np.float32), "w1 has shape"),
        ("w2", np.zeros((4, 12, 8), np.int32), "float32 or float64"),
    ],
)
def test_weight_shape_and_dtype_mismatch(no_compile, field, array, match):
    w = MoEWeights.random(CFG, seed=0)
    bad = MoEWeights(**{**w.__dict__, field: array})
    with pytest.raises((ValueError, TypeError), match=match):
        MoELayer(CFG, bad)


def test_non_finite_router_weights(no_compile):
    w = MoEWeights.random(CFG, seed=0)
    router = w.router.copy()
    router[3, 1] = np.nan
    with pytest.raises(ValueError, match="router weights contains NaN"):
        MoELayer(CFG, MoEWeights(router, w.w1, w.w2))


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (np.zeros((0, 8), np.float32), ValueError, "empty batch"),
        (np.zeros((3, 7), np.float32), ValueError, "columns but d_model is 8"),
        (np.zeros((3,), np.float32), ValueError, "must have shape"),
        (np.array([[np.nan] * 8], np.float32), ValueError, "NaN"),
        (np.zeros((3, 8), np.int64), TypeError, "floating-point"),
        (torch.zeros((2, 8), dtype=torch.int32), TypeError, "floating-point"),
        ([[0.0] * 8], TypeError, "numpy array or torch tensor"),
    ],
)
def test_bad_inputs_rejected_before_running(x, exc, match):
    layer = object.__new__(MoELayer)  # a layer with no graph: running one would fail otherwise
    layer.config = CFG
    with pytest.raises(exc, match=match):
        layer.run(x)


def test_missing_kernels_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mops.check_kernels_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a Mojo package"):
        mops.check_kernels_dir(tmp_path)
    assert mops.check_kernels_dir(mops.KERNELS_DIR) == mops.KERNELS_DIR
    assert (Path(mops.KERNELS_DIR) / "moe_gate.mojo").is_file()


def test_graph_level_checks():
    """The graph API checks shapes and dtypes while the graph is built."""
    types = [
        TensorType(DType.float32, ["t", 8], REF),
        TensorType(DType.float32, [9, 4], REF),
        TensorType(DType.bfloat16, [4, 8, 12], REF),
        TensorType(DType.int32, ["t", 2], REF),
    ]
    with Graph("bad", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, router, w1, ids = (v.tensor for v in g.inputs)
        with pytest.raises(ValueError, match="d_model"):
            mops.moe_gate(x, router, top_k=2)
        with pytest.raises(ValueError, match="top_k"):
            mops.moe_gate(x, router[:8, :], top_k=5)
        with pytest.raises(TypeError, match="dtype"):
            mops.moe_expert_matmul(x, ids[:, 0], ids[:5, 0], w1)
        with pytest.raises(TypeError, match="topk_ids"):
            mops.moe_dispatch(x, num_experts=4)
        with pytest.raises(ValueError, match="activation"):
            mops.moe_expert_matmul(x, ids[:, 0], ids[:5, 0], w1, activation="gelu")


def test_moe_ffn_workspace_checks():
    """moe_ffn's workspaces must be mutable buffers of the right dtype and width."""
    types = [
        TensorType(DType.float32, ["t", 8], REF),
        TensorType(DType.float32, [8, 4], REF),
        TensorType(DType.float32, [4, 8, 12], REF),
        TensorType(DType.float32, [4, 12, 8], REF),
        BufferType(DType.float32, ["rows", 12], REF),
        BufferType(DType.float32, ["rows", 7], REF),
        TensorType(DType.float32, [4, 8, 24], REF),  # SwiGLU w1 = [Wg | Wu]
    ]
    with Graph("bad_ws", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, router, w1, w2 = (v.tensor for v in g.inputs[:4])
        h_ws, bad_ws = g.inputs[4].buffer, g.inputs[5].buffer
        w1_swiglu = g.inputs[6].tensor
        gate = mops.moe_gate(x, router, top_k=2)
        disp = mops.moe_dispatch(gate.topk_ids, num_experts=4)
        with pytest.raises(ValueError, match="y workspace"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, bad_ws), activation="relu")
        with pytest.raises(TypeError, match="BufferValue"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, x), activation="relu")
        with pytest.raises(ValueError, match="activation"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, h_ws), activation="gelu")
        with pytest.raises(ValueError, match="every_expert_tokens"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, bad_ws), activation="relu", every_expert_tokens=(0, 8))
        # h must hold both SwiGLU halves: as wide as w1 (2*d_ff), not d_ff.
        with pytest.raises(ValueError, match=r"h workspace must be .*\[rows, 24\]"):
            mops.moe_ffn(x, gate, disp, w1_swiglu, w2, (h_ws, bad_ws), activation="swiglu")
        # The fused decode kernel's scratch: a third workspace, float32 and rank 1.
        with pytest.raises(ValueError, match="workspaces must be"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, bad_ws, h_ws, h_ws), activation="relu")
        with pytest.raises(ValueError, match="decode scratch must be a float32 rank-1"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, bad_ws, h_ws), activation="relu")
        with pytest.raises(ValueError, match="needs the decode scratch"):
            mops.moe_ffn(x, gate, disp, w1, w2, (h_ws, bad_ws), activation="relu", fused_decode_max_tokens=4)



def test_missing_cublas_is_a_clear_error(monkeypatch, tmp_path):
    """Without cuBLAS the GPU path says what it needs and where it looked."""
    import sys

    monkeypatch.setattr(runtime, "CUBLAS_SONAMES", ("libcublas_not_installed.so.99",))
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(RuntimeError, match="needs cuBLAS.*nvidia/cublas/lib"):
        runtime.load_cublas()


def test_packed_weights_checks():
    """Packed expert weights are a CPU layout, and SwiGLU packing needs gate and up halves."""
    gpu = DeviceRef.GPU()
    types = [
        TensorType(DType.float32, ["t", 8], gpu),
        TensorType(DType.int32, ["m"], gpu),
        TensorType(DType.int32, [5], gpu),
        TensorType(DType.float32, [4, 8, 12], gpu),
        TensorType(DType.float32, [4, 8, 13], REF),
    ]
    with Graph("bad_packed", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, rows, offsets, w, w_odd = (v.tensor for v in g.inputs)
        with pytest.raises(ValueError, match="CPU layout"):
            mops.pack_expert_weights(w)
        with pytest.raises(ValueError, match="CPU layout"):
            mops.moe_expert_matmul(x, rows, offsets, w, packed=True)
        with pytest.raises(ValueError, match="even number of columns"):
            mops.pack_expert_weights(w_odd, swiglu=True)
