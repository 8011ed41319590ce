"""MoELayer.capture on the GPU: the layer's graph captured once as a device graph (a CUDA graph,
MAX's Model.capture) and replayed. In bfloat16 at a Qwen3-30B-A3B-like and a GPT-OSS-20B-like
shape (scaled down; widths multiples of 8, so the sync-free grouped GEMM runs): a replay gives
what forward_unchecked gives at 1, 16 and 130 tokens, follows new inputs, and overwrites its
output in place; a 3-layer stack's replay gives stack(3)'s output; a float32 layer is refused;
a replay only enqueues work; and `pymoe bench --graph` times pymoe and torch._grouped_mm as
graphs. Skipped where MAX sees no GPU (CI has none). On a GPU machine:
`pytest tests/test_gpu_graph.py`.
"""

import dataclasses
import time

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, rel_err
from graphs import layer_graphs
from max.driver import accelerator_count

from pymoe import MoEConfig, MoELayer, MoEWeights, runtime
from pymoe.bench import suite
from pymoe.config import PRESETS, Preset
from pymoe.ops import every_expert_token_range

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")

# Qwen3-30B-A3B's layer scaled down: 128 experts, top-8, SwiGLU.
QWEN_LIKE = MoEConfig(d_model=256, d_ff=96, num_experts=128, top_k=8, activation="swiglu")
# GPT-OSS-20B's scaled down: 32 experts, top-4, router bias, expert biases, clamped SwiGLU.
GPT_OSS_LIKE = MoEConfig(d_model=192, d_ff=160, num_experts=32, top_k=4, activation="clamped_swiglu",
                         router_bias=True, expert_bias=True)
CONFIGS = {"qwen3-like": QWEN_LIKE, "gpt-oss-like": GPT_OSS_LIKE}
STACK = 3
# test_a_replay_does_not_wait_for_the_gpu's layer (test_gpu_grouped_gemm.py's): wide enough that
# a long batch runs for milliseconds.
WIDE = MoEConfig(d_model=1024, d_ff=512, num_experts=128, top_k=8, activation="swiglu")


def _stack_spec(config):
    return runtime.moe_graph_spec(config, "gpu", "bfloat16", pooled=True,
                                  every_expert_tokens=every_expert_token_range(config, "gpu", "bfloat16"), stack=STACK)


# Every graph these tests compile, compiled with the suite's other graphs in one compilation
# (tests/graphs.py). None without a GPU: the tests are skipped there, and a GPU compilation
# would fail the suite's.
GRAPHS = [
    *layer_graphs([*CONFIGS.values(), WIDE], device="gpu", dtype="bfloat16"),
    *layer_graphs([QWEN_LIKE], device="gpu", dtype="float32"),
    *(_stack_spec(config) for config in CONFIGS.values()),
] if accelerator_count() else []


def _bf16(a):
    return torch.from_numpy(np.asarray(a, np.float32)).bfloat16().float().numpy()


def _bf16_weights(config, seed):
    weights = MoEWeights.random(config, seed=seed)
    return dataclasses.replace(weights, **{
        f.name: _bf16(getattr(weights, f.name))
        for f in dataclasses.fields(weights) if getattr(weights, f.name) is not None
    })


@pytest.fixture(scope="module", params=list(CONFIGS))
def layer(request):
    config = CONFIGS[request.param]
    return MoELayer(config, _bf16_weights(config, seed=0), device="gpu", dtype="bfloat16")


def _tokens(rng, tokens, d_model):
    return _bf16(rng.standard_normal((tokens, d_model), dtype=np.float32))


@pytest.mark.parametrize("tokens", [1, 16, 130])
def test_a_replay_gives_the_layers_output_and_follows_new_inputs(layer, rng, tokens):
    graph = layer.capture(tokens)
    try:
        outs = []
        for _ in range(2):  # the second replay on a new input
            x = _tokens(rng, tokens, layer.config.d_model)
            eager = layer.forward_unchecked(x)  # NumPy in: float32 NumPy copies out
            replayed = graph(x)
            assert replayed.shape == eager.shape == x.shape and np.linalg.norm(eager) > 0
            err = rel_err(replayed, eager)
            assert err < BF16_TOL, f"replay against the eager call: relative error {err:.2e}"
            outs.append(replayed.copy())
        assert rel_err(outs[0], outs[1]) > BF16_TOL, "the second replay must see its own input"
    finally:
        graph.release()


def test_cuda_tensors_in_share_the_captured_output_which_the_next_replay_overwrites(layer, rng):
    d = layer.config.d_model
    x1, x2 = (torch.from_numpy(_tokens(rng, 16, d)).to("cuda", torch.bfloat16) for _ in range(2))
    expected = [torch.from_numpy(layer.forward_unchecked(x.float().cpu().numpy())) for x in (x1, x2)]
    graph = layer.capture(16)
    try:
        torch.cuda.synchronize()
        y1 = graph(x1)
        torch.cuda.synchronize()
        assert y1.is_cuda and y1.dtype == torch.bfloat16 and y1.shape == (16, d)
        assert rel_err(y1.float().cpu().numpy(), expected[0].numpy()) < BF16_TOL
        kept = y1.clone()
        y2 = graph(x2)
        torch.cuda.synchronize()
        assert y2.data_ptr() == y1.data_ptr(), "a replay writes the one captured output buffer"
        assert rel_err(y1.float().cpu().numpy(), expected[1].numpy()) < BF16_TOL, "y1 now holds x2's output"
        assert rel_err(kept.float().cpu().numpy(), expected[0].numpy()) < BF16_TOL
        with pytest.raises(ValueError, match="captured for x of shape"):
            graph(x1[:15])
    finally:
        graph.release()
    with pytest.raises(RuntimeError, match="released"):
        graph(x1)


def test_a_stacks_replay_gives_the_stacks_output(layer, rng):
    stack, _ = layer.stack(STACK)
    graph = layer.capture(16, layers=STACK)
    try:
        for _ in range(2):
            x = _tokens(rng, 16, layer.config.d_model)
            eager = stack(x)
            err = rel_err(graph(x), eager)
            assert np.linalg.norm(eager) > 0 and err < BF16_TOL, f"relative error {err:.2e}"
    finally:
        graph.release()


def test_a_float32_layer_is_refused_before_anything_runs():
    layer = MoELayer(QWEN_LIKE, MoEWeights.random(QWEN_LIKE, seed=0), device="gpu", dtype="float32")
    with pytest.raises(ValueError, match="cannot be captured as a device graph at 16 tokens: .*cuBLAS per expert"):
        layer.capture(16)
    lo, _ = layer.every_expert_tokens
    with pytest.raises(ValueError, match="every expert on every token"):
        layer.capture(lo)
    assert layer.pool.allocations == 0


def test_a_replay_does_not_wait_for_the_gpu():
    """As test_gpu_grouped_gemm.py's test_layer_call_does_not_wait_for_the_gpu, for replays:
    queued behind a long replay, a replay returns long before the long one's kernels end (a
    host sync inside, in the input copy or the replay, would wait)."""
    layer = MoELayer(WIDE, MoEWeights.random(WIDE, seed=0), device="gpu", dtype="bfloat16")
    # 65536 tokens: about 7 ms on an H100 (test_gpu_grouped_gemm.py's measure).
    big = torch.randn(65536, WIDE.d_model, device="cuda", dtype=torch.bfloat16)
    small = big[:16].clone()
    long_graph, short_graph = layer.capture(65536), layer.capture(16)
    try:
        torch.cuda.synchronize()

        def gpu_seconds():
            start = time.perf_counter()
            long_graph(big)
            torch.cuda.synchronize()
            return time.perf_counter() - start

        long_call = min(gpu_seconds() for _ in range(3))
        assert long_call > 2e-3, "the long replay is too short for this test to mean anything"
        start = time.perf_counter()
        long_graph(big)
        short_graph(small)
        enqueued = time.perf_counter() - start
        torch.cuda.synchronize()
        assert enqueued < 0.5 * long_call, f"enqueueing two replays took {enqueued * 1e3:.2f} ms, the first runs " \
            f"{long_call * 1e3:.2f} ms on the GPU: a replay waited for the GPU"
    finally:
        long_graph.release()
        short_graph.release()


def test_bench_graph_times_pymoe_and_torch_grouped_as_device_graphs(monkeypatch):
    monkeypatch.setitem(PRESETS, "qwen3-like", Preset("qwen3-like", QWEN_LIKE, (16,), "tests/test_gpu_graph.py"))
    ceilings = {"matmul": {"gflops": 1e5}, "read": {"gbps": 1e3}}
    (run,) = suite.run_preset("qwen3-like", tokens=16, device="gpu", dtype="bfloat16", ceilings=ceilings,
                              impls=("pymoe", "torch_loop", "torch_grouped"), min_seconds=0, stack=STACK, graph=True)
    rows = {r["name"]: r for r in run["rows"]}
    for name in ("pymoe", "torch_grouped"):
        row, gr = rows[name], rows[name]["graph"]
        assert row["status"] == "ok" and row["stack"]["status"] == "ok", row
        assert gr["status"] == "ok" and gr["layers"] == STACK, gr
        # Checked on the whole timed batch against the eager stack, then timed.
        assert gr["check_tokens"] == 16 and gr["check_rel_err"] < gr["check_tol"]
        assert gr["per_layer_s"] == gr["median_s"] / STACK and gr["capture_s"] > 0
    assert rows["pymoe"]["graph"]["pymoe_speedup"] == 1.0 and rows["torch_grouped"]["graph"]["pymoe_speedup"] > 0
    assert rows["torch_loop"]["graph"]["status"] == "skipped" and ".tolist()" in rows["torch_loop"]["graph"]["error"]
