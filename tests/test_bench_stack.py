"""`pymoe bench --stack`: L layers in one call, the time per layer beside the single call's."""

import json

import pytest
from click.testing import CliRunner
from graphs import layer_graphs
from model_layer_cases import BASIC_CONFIGS

from pymoe import runtime
from pymoe.bench import ceilings, runner, suite, workload
from pymoe.cli import main
from pymoe.config import PRESETS, Preset

# test_layer.py's "swiglu-renorm" layer, whose single-call graph the session may have compiled
# already: the stacked graph is then the one compile these tests add. SwiGLU is the activation
# whose output would shrink to nothing over a stack without the norm between layers.
CONFIG = BASIC_CONFIGS["swiglu-renorm"]
CEILINGS = {"matmul": {"gflops": 100.0}, "read": {"gbps": 10.0}}
# The single-call layer, its 2-layer stack and the MAX-call floor's graph, compiled with the
# suite's other graphs (tests/graphs.py).
GRAPHS = [*layer_graphs([CONFIG]), runtime.moe_graph_spec(CONFIG, "cpu", "float32", pooled=True, stack=2),
          ceilings.max_call_graph_spec("cpu")]


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", Preset("tiny", CONFIG, (3,), "a test layer"))
    return "tiny"


def test_stack_records_the_time_per_layer_beside_the_single_call(tmp_path, tiny_preset, small_ceilings):
    # torch_grouped is left out: PyTorch's CPU _grouped_mm takes widths that are multiples of 4 only.
    args = ["bench", "--preset", tiny_preset, "--impl", "pymoe", "--impl", "torch_loop", "--stack", "2",
            "--min-seconds", "0", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "ms/layer in 2-layer stack" in result.output
    (path,) = (tmp_path / "bench" / "cpu").glob("*.json")
    assert path.name.endswith("-float32-tiny-stack2.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "pymoe.bench/1" and data["stack"] == 2 and data["complete"]
    (run,) = data["runs"]
    assert [r["name"] for r in run["rows"]] == ["pymoe", "torch_loop"]
    for row in run["rows"]:
        assert row["status"] == "ok" and row["median_s"] > 0, row  # the single call, as without --stack
        st = row["stack"]
        assert st["status"] == "ok" and st["layers"] == 2, st
        assert st["reps"] >= 3 and len(st["times_s"]) == st["reps"] and st["q25_s"] <= st["median_s"] <= st["q75_s"]
        assert st["per_layer_s"] == st["median_s"] / 2
        assert st["pct_of_floor"] == pytest.approx(100 * row["floor_s"] / st["per_layer_s"])
        # Checked against two single calls with the norm between them.
        assert st["check_tokens"] == 3 and st["check_rel_err"] < st["check_tol"]
    assert run["rows"][0]["stack"]["pymoe_speedup"] == 1.0 and run["rows"][1]["stack"]["pymoe_speedup"] > 0


def _cell():
    preset = Preset("tiny", CONFIG, (4,), "a test layer")
    weights = workload.random_weights(CONFIG, "cpu", "float32", 1)
    x = workload.random_tokens(4, CONFIG.d_model, "float32", 0)
    return workload.Workload(preset, 4, "cpu", "float32", x, *weights)


def test_a_wrong_stack_is_flagged_and_a_row_without_one_says_so():
    w = _cell()
    loop = next(impl for impl in suite.IMPLEMENTATIONS if impl.name == "torch_loop").build

    def without_norm(w, layers):
        fn, _ = loop(w)

        def stack(x):
            for _ in range(layers):
                x = fn(x)
            return x

        return stack, 0.0

    no_norm = suite.Impl("no_norm", "layers without the norm between them", "moe", loop, build_stack=without_norm)
    row = suite.run_impl(no_norm, w, suite.work_model(w), CEILINGS, 0, stack=2)
    assert row["status"] == "ok" and row["stack"]["status"] == "wrong" and "times_s" not in row["stack"], row
    assert "2 single calls" in row["stack"]["error"]
    row = suite.run_impl(suite.Impl("single", "no stacked form", "moe", loop), w, suite.work_model(w), CEILINGS, 0,
                         stack=2)
    assert row["status"] == "ok" and row["stack"]["status"] == "skipped" and "no stacked form" in row["stack"]["error"]
    assert "stack" not in suite.run_impl(no_norm, w, suite.work_model(w), CEILINGS, 0)


def test_stack_alone_means_eight_layers_and_bad_depths_are_refused(monkeypatch, tmp_path):
    asked = {}
    monkeypatch.setattr(runner, "run_bench", lambda *a, **kw: asked.update(kw))
    cli = CliRunner()
    assert cli.invoke(main, ["bench", "--stack", "--impl", "pymoe"]).exit_code == 0
    assert asked["stack"] == 8 and asked["impls"] == ("pymoe",)
    assert cli.invoke(main, ["bench"]).exit_code == 0 and asked["stack"] is None
    for args, match in ((["--stack", "0"], "0 is not in the range"),
                        (["--ablation", "--stack"], "--stack do not apply")):
        result = cli.invoke(main, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and match in result.output, result.output
    with pytest.raises(ValueError, match="stack must be a number of layers >= 1"):
        suite.run_preset("small-decode", tokens=1, device="cpu", dtype="float32", ceilings=CEILINGS, stack=0)
