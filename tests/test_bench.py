"""The benchmark harness: result files, the reference check before timing, bad options."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from graphs import layer_graphs
from model_layer_cases import TEST_PRESET

from pymoe import reference as R
from pymoe.bench import ceilings, suite, workload
from pymoe.cli import main
from pymoe.config import MoEConfig, Preset, get_preset
from pymoe.weights import DenseWeights, MoEWeights

CEILINGS = {
    "matmul": {"gflops": 100.0},
    "read": {"gbps": 10.0},
}
# What `pymoe bench --impl pymoe` compiles on the test preset, compiled with the suite's other
# graphs (tests/graphs.py).
GRAPHS = [*layer_graphs([TEST_PRESET.config]), ceilings.max_call_graph_spec("cpu")]


def test_bench_writes_a_result_file(tmp_path, basic_preset, small_ceilings):
    args = ["bench", "--preset", basic_preset, "--tokens", "4,2", "--impl", "pymoe", "--impl", "torch_loop",
            "--min-seconds", "0", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "bench" / "cpu").glob("*.json")
    assert path.name.endswith(f"-float32-{basic_preset}@4,2.json")
    data = json.loads(path.read_text())
    assert data["complete"] and [run["tokens"] for run in data["runs"]] == [4, 2]
    assert data["graph"] is False and all("graph" not in row for run in data["runs"] for row in run["rows"])
    assert data["command"].startswith("pymoe") and data["machine"]["cpu_model"]
    assert data["commit"], "run from a pymoe checkout, the file must name its commit"
    assert data["ceilings"]["matmul"]["gflops"] > 0 and data["ceilings"]["read"]["gbps"] > 0
    assert 0 < data["ceilings"]["max_call"]["median_s"] < 1
    assert data["wall_s"] > 0
    run = data["runs"][0]
    assert run["regime"] == "decode" and run["config"]["scoring"] == "softmax"
    assert run["config"]["d_model"] == get_preset(basic_preset).config.d_model
    assert [r["name"] for r in run["rows"]] == ["pymoe", "torch_loop"]
    for row in run["rows"]:
        assert row["status"] == "ok", row
        assert row["reps"] >= 3 and len(row["times_s"]) == row["reps"]
        assert row["check_rel_err"] < row["check_tol"]
        assert 0 < row["floor_s"] and row["pct_of_floor"] > 0
    assert run["rows"][0]["pymoe_speedup"] == 1.0


# The harness tests below run on the test preset's small layer: a real preset's weights
# (small-decode: 134M random floats) take seconds to draw, for the same bookkeeping.
def test_wrong_implementation_is_flagged_and_not_timed(basic_preset):
    w = suite.make_workload(basic_preset, 3, "cpu", "float32")
    bad = suite.Impl("zeros", "returns zeros", "moe", lambda w: ((lambda x: np.zeros_like(x)), 0.0))
    row = suite.run_impl(bad, w, suite.work_model(w), CEILINGS, min_seconds=0)
    assert row["status"] == "wrong" and "times_s" not in row


def test_check_covers_the_timed_batch_not_only_its_first_tokens(basic_preset):
    """Beyond CHECK_TOKENS tokens the check runs the timed batch (the kernels are chosen by its
    size) and compares rows spread over it: a layer wrong only past the first CHECK_TOKENS
    tokens is caught, a right one passes."""
    n = suite.CHECK_TOKENS
    w = suite.make_workload(basic_preset, n + 9, "cpu", "float32")
    right = R.moe_layer(w.x.astype(np.float64), w.moe_weights, w.config).out.astype(np.float32)

    def build_right(_):
        return (lambda x: right[: len(x)]), 0.0

    def build_wrong_tail(_):
        wrong = right.copy()
        wrong[n:] = 0.0  # right on the first CHECK_TOKENS tokens only
        return (lambda x: wrong[: len(x)]), 0.0

    row = suite.run_impl(suite.Impl("right", "the reference", "moe", build_right), w, suite.work_model(w),
                         CEILINGS, min_seconds=0)
    assert row["status"] == "ok", row
    assert row["check_batch_tokens"] == n + 9 and row["check_tokens"] == n
    row = suite.run_impl(suite.Impl("tail", "wrong past the first tokens", "moe", build_wrong_tail), w,
                         suite.work_model(w), CEILINGS, min_seconds=0)
    assert row["status"] == "wrong" and "times_s" not in row


def test_check_of_a_capacity_layer_keeps_its_first_tokens_alone(basic_preset):
    """With a capacity factor a row's output depends on the whole batch (what is dropped), so
    the check runs the first CHECK_TOKENS tokens on their own, as the reference does."""
    n = suite.CHECK_TOKENS
    w = suite.make_workload(basic_preset, n + 9, "cpu", "float32")
    w.preset = dataclasses.replace(w.preset, config=dataclasses.replace(w.config, capacity_factor=1.0))
    batch, rows = suite._check_batch(w)
    assert rows is None and np.array_equal(batch, w.x[:n])


def test_failing_implementation_is_recorded(basic_preset):
    w = suite.make_workload(basic_preset, 3, "cpu", "float32")

    def build(w):
        raise RuntimeError("no kernel for this device")

    row = suite.run_impl(suite.Impl("broken", "raises", "moe", build), w, suite.work_model(w), CEILINGS, 0)
    assert row["status"] == "failed" and "no kernel" in row["error"]


def test_work_model_counts_only_the_experts_used(basic_preset):
    w = suite.make_workload(basic_preset, 1, "cpu", "float32")
    work = suite.work_model(w)
    cfg = w.config
    assert work["experts_used"] == cfg.top_k
    assert work["moe"]["weight_bytes"] == cfg.top_k * cfg.expert_bytes(4) + cfg.d_model * cfg.num_experts * 4
    assert work["dense"]["weight_bytes"] == 4 * 2 * cfg.d_model * cfg.d_ff_dense


def test_bench_rejects_bad_options_before_running(tmp_path):
    for args, match in (
        (["--preset", "huge"], "unknown preset"),
        (["--impl", "vllm"], "unknown implementation"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--tokens", "1,x"], "comma-separated integers"),
        (["--preset", "deepseek-v3", "--device", "cpu", "--dtype", "bfloat16"], "does not fit this machine"),
    ):
        result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and match in result.output, result.output
    assert not any(tmp_path.iterdir())


# -- presets of real layers, their weights, the memory plan and the reference check --------

REAL_PRESETS = ("mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-20b", "gpt-oss-120b", "deepseek-v3")


def test_presets_are_layers_with_their_token_counts():
    assert get_preset("small").tokens == (16384,) and get_preset("large-decode").tokens == (128,)
    for name in REAL_PRESETS:
        assert get_preset(name).tokens == (1, 16, 128, 4096, 16384)
    qwen, oss, ds = (get_preset(n).config for n in ("qwen3-30b-a3b", "gpt-oss-120b", "deepseek-v3"))
    assert (qwen.d_model, qwen.d_ff, qwen.num_experts, qwen.top_k, qwen.activation) == (2048, 768, 128, 8, "swiglu")
    assert oss.router_bias and oss.expert_bias and oss.activation == "clamped_swiglu" and oss.num_experts == 128
    assert (ds.scoring, ds.n_group, ds.topk_group, ds.routed_scaling_factor, ds.shared_d_ff) == ("sigmoid", 8, 4, 2.5,
                                                                                                  2048)
    assert ds.selection_bias and ds.renormalize


def test_bench_file_names_say_which_token_counts_ran():
    assert suite.bench_file_name("float32", ("qwen3-30b-a3b",), None) == "float32-qwen3-30b-a3b"
    assert suite.bench_file_name("float32", ("qwen3-30b-a3b",), (1, 16, 128, 4096, 16384)) == "float32-qwen3-30b-a3b"
    name = suite.bench_file_name("bfloat16", ("small", "gpt-oss-20b"), (1, 16))
    assert name == "bfloat16-small@1,16_gpt-oss-20b@1,16"
    assert suite.bench_file_name("float32", ("small",), (16384,)) == "float32-small"
    assert suite.bench_file_name("bfloat16", ("small",), None, graph=True) == "bfloat16-small-graph"


def test_memory_plan_refuses_what_does_not_fit_and_drops_dense_first():
    ds = workload.memory_plan(get_preset("deepseek-v3").config, "cpu", "bfloat16")
    assert not ds.fits and ds.moe_bytes == 2 * workload.moe_params(get_preset("deepseek-v3").config)
    assert ds.moe_bytes > 22e9  # 256 experts x 3 x 7168 x 2048 in bf16
    with pytest.raises(ValueError, match="does not fit this machine.*--device gpu"):
        workload.check_memory(get_preset("deepseek-v3"), "cpu", "float32")
    small = workload.memory_plan(get_preset("small").config, "cpu", "float32")
    assert small.fits and small.dense_fits
    # A layer that needs half the machine fits; with its dense twin it does not.
    half = workload.MemoryPlan("cpu", "float32", 1, 2**33, 2**33, 2**34)
    assert half.fits and not half.dense_fits


# Variants with every optional weight among them, on odd sizes.
VARIANT_CONFIGS = (
    MoEConfig(d_model=11, d_ff=7, num_experts=6, top_k=3, activation="clamped_swiglu", router_bias=True,
              expert_bias=True, swiglu_limit=0.9),
    MoEConfig(d_model=9, d_ff=5, num_experts=16, top_k=4, activation="swiglu", scoring="sigmoid",
              selection_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, shared_d_ff=6),
    MoEConfig(d_model=10, d_ff=3, num_experts=5, top_k=1, activation="swiglu", scoring="sigmoid", renormalize=False,
              weight_on_input=True, shared_d_ff=4, shared_gate=True),
    MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=4, activation="relu", capacity_factor=0.5),
)


@pytest.mark.parametrize("config", VARIANT_CONFIGS, ids=lambda c: f"{c.activation}-{c.scoring}-k{c.top_k}")
def test_reference_check_matches_the_reference_layer(config, rng):
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    x = rng.standard_normal((23, config.d_model), dtype=np.float32)
    expected = R.moe_layer(x, weights, config).out
    assert R.relative_error(workload.reference_moe(x, weights, config), expected) < 1e-12
    # The same weights as torch tensors (as the GPU benchmark holds them).
    tensors = workload.DeviceMoEWeights(**{f: torch.from_numpy(a) if a is not None else None
                                           for f, a in vars(weights).items()})
    tensors.validate(config)
    assert R.relative_error(workload.reference_moe(x, tensors, config), expected) < 1e-12


@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
def test_blockwise_dense_reference_matches_the_reference(activation, rng):
    config = MoEConfig(d_model=7, d_ff=5, num_experts=3, top_k=1, activation=activation)
    weights = DenseWeights.random(config, seed=int(rng.integers(2**31)))
    x = 3 * rng.standard_normal((4, 7), dtype=np.float32)
    expected = R.dense_ffn(x, weights, activation)
    for w in (weights, DenseWeights(torch.from_numpy(weights.w1), torch.from_numpy(weights.w2))):
        assert R.relative_error(workload.reference_dense(x, w, activation, block=4), expected) < 1e-12


def test_random_weights_fit_the_config_on_cpu_and_round_to_bf16():
    config = VARIANT_CONFIGS[1]
    moe, dense = workload.random_weights(config, "cpu", "bfloat16", seed=3, dense=True)
    moe.validate(config)
    dense.validate(config)
    assert np.array_equal(workload.round_bf16(moe.w1), moe.w1) and moe.w1.std() > 0
    again, _ = workload.random_weights(config, "cpu", "bfloat16", seed=3)
    assert np.array_equal(again.w2, moe.w2), "seeded"
    with pytest.raises(ValueError, match="shape"):
        workload.DeviceMoEWeights(torch.zeros(9, 15), torch.zeros(16, 9, 10), torch.zeros(16, 5, 9),
                                  selection_bias=torch.zeros(16), shared_w1=torch.zeros(9, 12),
                                  shared_w2=torch.zeros(6, 9)).validate(config)


def _cell(config, tokens, seed=0, dense=False):
    preset = Preset("test", config, (tokens,), "a test layer")
    weights = workload.random_weights(config, "cpu", "float32", seed, dense=dense)
    x = workload.random_tokens(tokens, config.d_model, "float32", seed)
    return workload.Workload(preset, tokens, "cpu", "float32", x, *weights)


def test_work_model_reads_the_experts_used_and_the_shared_expert():
    config = MoEConfig(d_model=16, d_ff=8, num_experts=128, top_k=8, activation="swiglu", shared_d_ff=12,
                       expert_bias=True)
    work = suite.work_model(_cell(config, 1))
    assert work["experts_used"] == 8
    expert = config.expert_bytes(4) + 4 * (config.expert_n + config.d_model)
    shared = config.shared_expert.nbytes(4)
    assert work["moe"]["weight_bytes"] == 8 * expert + shared + 4 * 16 * 128
    assert work["moe"]["flops"] == 2 * (8 * config.expert.params + config.shared_expert.params) + 2 * 16 * 128


def test_dense_rows_are_skipped_where_their_floor_is_too_long_and_max_builtin_where_it_lacks_the_router():
    config = MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, activation="clamped_swiglu", router_bias=True,
                       expert_bias=True)
    w = _cell(config, 3, dense=True)
    slow = {"matmul": {"gflops": 1e-9}, "read": {"gbps": 1e3}}
    impl = {i.name: i for i in suite.IMPLEMENTATIONS}
    row = suite.run_impl(impl["torch_dense"], w, suite.work_model(w), slow, 0)
    assert row["status"] == "skipped" and "floor" in row["error"]
    row = suite.run_impl(impl["max_builtin"], w, suite.work_model(w), CEILINGS, 0)
    assert row["status"] == "skipped" and "router_bias" in row["error"]
    no_dense = _cell(config, 3)
    no_dense.dense_skipped = "does not fit"
    assert suite.run_impl(impl["max_dense"], no_dense, suite.work_model(no_dense), CEILINGS, 0)["status"] == "skipped"


def test_torch_rows_of_a_new_router_pass_the_check():
    config = VARIANT_CONFIGS[1]
    w = _cell(config, 5)
    impl = {i.name: i for i in suite.IMPLEMENTATIONS}
    row = suite.run_impl(impl["torch_loop"], w, suite.work_model(w), CEILINGS, 0)
    assert row["status"] == "ok" and row["check_rel_err"] < row["check_tol"], row


# -- scripts/bench_hf_decode.py: its unpatched half on a tiny model ------------------------

def _hf_decode_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_hf_decode.py"
    spec = importlib.util.spec_from_file_location("bench_hf_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_decode_times_the_unpatched_model_and_writes_a_result(tmp_path):
    from pymoe.results import read_result, write_result

    script = _hf_decode_script()
    tiny = dict(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, intermediate_size=64)
    result = script.run("qwen3-30b-a3b", layers=2, vocab=64, new_tokens=4, repeats=2, patched=False,
                        config_overrides=tiny, command="python scripts/bench_hf_decode.py --test")
    (row,) = result["rows"]
    assert row["status"] == "ok" and len(row["generate_n_s"]) == 2 and len(row["tokens"][0]) == 4
    assert result["hf_config"]["num_local_experts"] == 8 and result["hf_config"]["num_hidden_layers"] == 2
    assert result["model_bytes"] > 0 and result["commit"]
    data = read_result(write_result(tmp_path, "float32-qwen3-tiny-decode", result))
    assert data["schema"] == "pymoe.hf_decode/1" and data["command"].startswith("python scripts/bench_hf_decode.py")
    # The real widths: Qwen3-30B-A3B's layer, whatever the tests shrink.
    real = script.hf_config("qwen3-30b-a3b", 2)
    assert (real.hidden_size, real.moe_intermediate_size, real.num_experts, real.num_experts_per_tok) == (2048, 768,
                                                                                                          128, 8)


def test_hf_decode_refuses_a_model_larger_than_the_machine():
    script = _hf_decode_script()
    with pytest.raises(ValueError, match="host memory"):
        script.check_fits(script.hf_config("deepseek-v3", 4), "cpu", "bfloat16", patched=True)
