"""Expert biases and GPT-OSS's clamped SwiGLU in the GPU expert kernels against the
float64 reference: moe_expert_matmul (cuBLAS per expert, then the bias + activation
pass, which finds each row's expert from the offsets) and moe_ffn on the routed path
and on the every-expert path (batched GEMMs over all experts, rows e*T + t); small odd
shapes and E=128, k=8; fp32 and bf16. Skipped where MAX sees no GPU (CI has none).
On a GPU machine: `pytest tests/test_gpu_expert_epilogues.py`.
"""

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, FP32_TOL, rel_err
from max.driver import Buffer, accelerator_count
from max.dtype import DType
from max.graph import BufferType, Graph, TensorType, ops

import pymoe.ops as mops
from pymoe import reference as R

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")

F32, BF16, I32 = DType.float32, DType.bfloat16, DType.int32
SMALL = dict(alpha=1.0, limit=0.5)  # a small limit: most entries are clamped


def _compile(gpu, name, input_types, forward):
    _, _, session = gpu
    with Graph(name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR]) as g:
        g.output(*forward(*g.inputs))
    return session.load(g)


def _run(gpu, model, *arrays, buffers=()):
    from max.driver import CPU

    dev = gpu[0]
    inputs = [Buffer.from_numpy(np.ascontiguousarray(a)).to(dev) for a in arrays]
    outs = model.execute(*inputs, *buffers)
    return [o.to(CPU()).to_numpy() for o in outs]


def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).to(torch.float32).numpy()


# ------------------------------------------------------------------ expert matmul

E, K = 6, 37
# N = 90: rows of 45 / 90 values, off the 16-byte vectors (the scalar pass);
# N = 128: the vectorised pass, the bias rows aligned.
WIDTHS = (90, 128)
# (activation, gather, bias, alpha, limit)
MM_VARIANTS = [
    ("none", False, True, 1.702, 7.0),  # bias only: the pass runs for "none" too
    ("relu", True, True, 1.702, 7.0),
    ("silu", False, True, 1.702, 7.0),
    ("swiglu", True, True, 1.702, 7.0),
    ("clamped_swiglu", True, True, 1.702, 7.0),
    ("clamped_swiglu", False, True, 1.702, 7.0),
    ("clamped_swiglu", True, False, 1.702, 7.0),
    ("clamped_swiglu", False, True, SMALL["alpha"], SMALL["limit"]),
]


def _mm_model(gpu, dtype, name):
    ref = gpu[1]
    types = [TensorType(F32, ["r", K], ref), TensorType(I32, ["m"], ref), TensorType(I32, [E + 1], ref)]
    for n in WIDTHS:
        types += [TensorType(F32, [E, K, n], ref), TensorType(F32, [E, n], ref)]

    def forward(x, rows, offsets, *weights):
        x, rows, offsets = x.tensor, rows.tensor, offsets.tensor
        x = ops.cast(x, dtype)
        outs = []
        for i in range(len(WIDTHS)):
            w, bias = (ops.cast(v.tensor, dtype) for v in weights[2 * i: 2 * i + 2])
            for act, gather, has_bias, alpha, limit in MM_VARIANTS:
                out = mops.moe_expert_matmul(
                    x, rows, offsets, w, activation=act, gather=gather, bias=bias if has_bias else None,
                    swiglu_alpha=alpha, swiglu_limit=limit,
                )
                outs.append(ops.cast(out, F32))
        return outs

    return _compile(gpu, name, types, forward)


@pytest.fixture(scope="module")
def mm_model(gpu):
    return _mm_model(gpu, F32, "gpu_expert_epilogues")


@pytest.fixture(scope="module")
def mm_model_bf16(gpu):
    return _mm_model(gpu, BF16, "gpu_expert_epilogues_bf16")


def _groups(rng, sizes, total_rows):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    # Three rows past the kept ones (slots dropped by a capacity): zeroed by the op.
    rows = rng.integers(0, total_rows, size=int(offsets[-1]) + 3).astype(np.int32)
    return rows, offsets


def _check_mm(gpu, model, rng, sizes, rounding, tol):
    rows, offsets = _groups(rng, sizes, total_rows=50)
    # One x for both: gathered rows index it, and its first len(rows) rows are the sorted ones.
    x = rounding(rng.standard_normal((max(len(rows), 50), K), dtype=np.float32))
    arrays = []
    for n in WIDTHS:
        # |h| ~ sqrt(K) ~ 6 plus the bias: the limit 7 clamps a good share, 0.5 most.
        arrays += [rounding(rng.standard_normal((E, K, n), dtype=np.float32)),
                   rounding(3 * rng.standard_normal((E, n), dtype=np.float32))]
    outs = iter(_run(gpu, model, x, rows, offsets, *arrays))
    for i, n in enumerate(WIDTHS):
        w, bias = arrays[2 * i: 2 * i + 2]
        for act, gather, has_bias, alpha, limit in MM_VARIANTS:
            out = next(outs)
            ref = R.moe_expert_matmul(x, rows, offsets, w, act, gather, bias=bias if has_bias else None,
                                      alpha=alpha, limit=limit)
            assert out.shape == ref.shape
            assert rel_err(out, ref) < tol, (n, act, gather, has_bias, alpha, limit)
            assert (out[offsets[-1]:] == 0).all(), "rows past the kept ones must be zero"


MM_SIZES = [
    [1, 0, 0, 0, 0, 0],  # one row
    [3, 0, 4, 0, 0, 2],  # empty experts, the last one not
    [0, 0, 7, 7, 7, 5],  # leading empty experts
    [500, 1, 0, 299, 200, 0],  # big ragged groups
]


@pytest.mark.parametrize("sizes", MM_SIZES)
def test_gpu_expert_matmul_epilogues(gpu, mm_model, rng, sizes):
    _check_mm(gpu, mm_model, rng, sizes, lambda a: a, FP32_TOL)


@pytest.mark.parametrize("sizes", MM_SIZES[1:])
def test_gpu_expert_matmul_epilogues_bfloat16(gpu, mm_model_bf16, rng, sizes):
    _check_mm(gpu, mm_model_bf16, rng, sizes, _bf16, BF16_TOL)


# -------------------------------------------------------------------------- moe_ffn

# (activation, every_expert, b1, b2, alpha, limit); every_expert forces the every-expert
# path for every batch size, else the routed path.
FFN_VARIANTS = [
    ("clamped_swiglu", False, True, True, 1.702, 7.0),
    ("clamped_swiglu", True, True, True, 1.702, 7.0),
    ("clamped_swiglu", True, False, True, SMALL["alpha"], SMALL["limit"]),
    ("swiglu", False, True, False, 1.702, 7.0),
    ("swiglu", True, False, True, 1.702, 7.0),
]
FORCE_EVERY_EXPERT = (1, 10**6)


class FFNShape:
    def __init__(self, experts, top_k, d_model, d_ff):
        self.e, self.k, self.d, self.f = experts, top_k, d_model, d_ff
        self.n = 2 * d_ff


SHAPES = {
    "small": FFNShape(5, 2, 37, 45),
    "e128-k8": FFNShape(128, 8, 64, 48),
}


def _ffn_model(gpu, shape, dtype, name):
    """gate -> dispatch -> moe_ffn per variant, on workspaces of E*T rows (the every-expert
    path's need); outputs the gate's weights and ids (the reference routes with them:
    near ties are the gate's tests' business) and each variant's output."""
    ref = gpu[1]
    s = shape
    types = [
        TensorType(F32, ["t", s.d], ref),
        TensorType(F32, [s.d, s.e], ref),
        TensorType(F32, [s.e, s.d, s.n], ref),
        TensorType(F32, [s.e, s.f, s.d], ref),
        TensorType(F32, [s.e, s.n], ref),
        TensorType(F32, [s.e, s.d], ref),
        BufferType(dtype, ["rows", s.n], ref),
        BufferType(dtype, ["rows", s.d], ref),
    ]

    def forward(*inputs):
        x, router, w1, w2, b1, b2 = (ops.cast(v.tensor, dtype) for v in inputs[:6])
        workspaces = (inputs[6].buffer, inputs[7].buffer)
        gate = mops.moe_gate(x, router, top_k=s.k)
        disp = mops.moe_dispatch(gate.topk_ids, num_experts=s.e)
        outs = [gate.topk_weights, gate.topk_ids]
        for act, every, has_b1, has_b2, alpha, limit in FFN_VARIANTS:
            out = mops.moe_ffn(
                x, gate, disp, w1, w2, workspaces, activation=act,
                every_expert_tokens=FORCE_EVERY_EXPERT if every else (1, 0),
                b1=b1 if has_b1 else None, b2=b2 if has_b2 else None, swiglu_alpha=alpha, swiglu_limit=limit,
            )
            outs.append(ops.cast(out, F32))
        return outs

    return _compile(gpu, name, types, forward)


@pytest.fixture(scope="module")
def ffn_models(gpu):
    cache = {}

    def get(shape_name, dtype):
        if (shape_name, dtype) not in cache:
            cache[shape_name, dtype] = _ffn_model(gpu, SHAPES[shape_name], dtype, f"gpu_ffn_{shape_name}_{dtype}")
        return cache[shape_name, dtype]

    return get


def _check_ffn(gpu, model, shape, rng, tokens, dtype, rounding, tol):
    s = shape
    x = rounding(rng.standard_normal((tokens, s.d), dtype=np.float32))
    router = rounding(rng.standard_normal((s.d, s.e), dtype=np.float32))
    w1 = rounding((rng.standard_normal((s.e, s.d, s.n)) * 6 / np.sqrt(s.d)).astype(np.float32))
    w2 = rounding((rng.standard_normal((s.e, s.f, s.d)) / np.sqrt(s.f)).astype(np.float32))
    b1 = rounding(3 * rng.standard_normal((s.e, s.n), dtype=np.float32))
    b2 = rounding(rng.standard_normal((s.e, s.d), dtype=np.float32))
    rows = s.e * tokens + 3  # more than either path needs, as the layer's pool has
    workspaces = [Buffer.zeros([rows, width], dtype, gpu[0]) for width in (s.n, s.d)]
    weights, ids, *outs = _run(gpu, model, x, router, w1, w2, b1, b2, buffers=workspaces)
    disp = R.moe_dispatch(ids, s.e)
    for (act, every, has_b1, has_b2, alpha, limit), out in zip(FFN_VARIANTS, outs):
        ref = R.moe_ffn(x, weights, disp, w1, w2, act, b1 if has_b1 else None, b2 if has_b2 else None,
                        alpha, limit)
        assert out.shape == (tokens, s.d)
        assert rel_err(out, ref) < tol, (act, every, has_b1, has_b2, alpha, limit, tokens)


@pytest.mark.parametrize("shape_name,tokens", [
    ("small", 1), ("small", 7), ("small", 300), ("e128-k8", 1), ("e128-k8", 16), ("e128-k8", 130),
])
def test_gpu_moe_ffn_biases_and_clamped_swiglu(gpu, ffn_models, rng, shape_name, tokens):
    model = ffn_models(shape_name, F32)
    _check_ffn(gpu, model, SHAPES[shape_name], rng, tokens, F32, lambda a: a, FP32_TOL)


@pytest.mark.parametrize("tokens", [1, 16, 130])
def test_gpu_moe_ffn_biases_and_clamped_swiglu_bfloat16(gpu, ffn_models, rng, tokens):
    model = ffn_models("e128-k8", BF16)
    _check_ffn(gpu, model, SHAPES["e128-k8"], rng, tokens, BF16, _bf16, BF16_TOL)
