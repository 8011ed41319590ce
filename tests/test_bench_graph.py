"""`pymoe bench --graph`: what each row times, also as a device graph. The captures need a GPU
(tests/test_gpu_graph.py runs them); here, on the CPU: the option is refused before any work,
the file name and the record say graph, the bookkeeping of a row's `graph` (checked against the
eager function, timed, released; wrong, failed and skipped graphs recorded), and the tables
with and without graph columns, old result files included."""

import copy
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from model_layer_cases import BASIC_CONFIGS
from rich.console import Console

from pymoe.bench import report, runner, suite, workload
from pymoe.cli import main
from pymoe.config import Preset

CONFIG = BASIC_CONFIGS["swiglu-renorm"]
CEILINGS = {"matmul": {"gflops": 100.0}, "read": {"gbps": 10.0}}
RESULTS = Path(__file__).resolve().parents[1] / "results"
# A committed --stack result from before graph mode: it has no "graph" anywhere.
OLD_STACK_RESULT = RESULTS / "bench" / "gpu" / "20261206T184704Z-bfloat16-qwen3-30b-a3b-stack8.json"


def test_graph_is_refused_off_the_gpu_before_any_work(monkeypatch, tmp_path):
    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before graph mode was refused")

    monkeypatch.setattr(runner, "measure_ceilings", must_not_run)
    monkeypatch.setattr(suite, "random_weights", must_not_run)
    cli = CliRunner()
    for args in (["--graph"], ["--graph", "--device", "cpu", "--stack"]):
        result = cli.invoke(main, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and "graph mode times device (CUDA) graphs" in result.output
    result = cli.invoke(main, ["bench", "--ablation", "--graph", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--graph and --stack do not apply" in result.output
    assert not any(tmp_path.iterdir())
    called = []
    monkeypatch.setattr(runner, "run_bench", lambda *a, **kw: called.append(kw))
    # On the GPU the option reaches the run (not started here: run_bench is replaced).
    assert cli.invoke(main, ["bench", "--graph", "--device", "gpu", "--dtype", "bfloat16"]).exit_code == 0
    assert called[-1]["graph"] is True and called[-1]["device"] == "gpu"
    assert cli.invoke(main, ["bench", "--device", "gpu"]).exit_code == 0 and called[-1]["graph"] is False


def test_the_library_refuses_graph_off_the_gpu_before_measuring_or_making_weights(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before graph mode was refused")

    monkeypatch.setattr(runner, "measure_ceilings", must_not_run)
    monkeypatch.setattr(suite, "random_weights", must_not_run)
    with pytest.raises(ValueError, match="GPU only"):
        runner.run_bench(("small-decode",), device="cpu", graph=True, out_dir=None)
    with pytest.raises(ValueError, match="GPU only"):
        suite.run_preset("small-decode", tokens=1, device="cpu", dtype="float32", ceilings=CEILINGS, graph=True)


def test_file_names_say_graph():
    assert suite.bench_file_name("bfloat16", ("qwen3-30b-a3b",), None, graph=True) == "bfloat16-qwen3-30b-a3b-graph"
    assert (suite.bench_file_name("bfloat16", ("qwen3-30b-a3b",), (1, 16), 8, graph=True)
            == "bfloat16-qwen3-30b-a3b@1,16-stack8-graph")
    assert suite.bench_file_name("bfloat16", ("qwen3-30b-a3b",), None, 8) == "bfloat16-qwen3-30b-a3b-stack8"


def test_a_result_written_without_a_name_says_graph(tmp_path):
    result = {"device": "gpu", "dtype": "bfloat16", "date": "2000-01-01T00:00:00+00:00", "stack": 8, "graph": True,
              "runs": [{"preset": "qwen3-30b-a3b", "tokens": t} for t in (1, 16, 128, 4096, 16384)]}
    path = suite.write_bench_result(result, tmp_path)
    assert path.name.endswith("-bfloat16-qwen3-30b-a3b-stack8-graph.json")


# -- a row's graph, with stand-ins for captured graphs (a CPU cannot capture) ----------------


class ReplayedByCalling:
    """Stands in for a captured graph on the CPU: `fn` called, plus `shift` (a wrong graph).
    TEST ONLY: it records when it is released."""

    released = []

    def __init__(self, fn, shift=0.0):
        self.fn, self.shift, self.capture_seconds = fn, shift, 0.0

    def __call__(self, x):
        return self.fn(x) + self.shift

    def release(self):
        ReplayedByCalling.released.append(self)


def _cell():
    preset = Preset("tiny", CONFIG, (4,), "a test layer")
    weights = workload.random_weights(CONFIG, "cpu", "float32", 1)
    x = workload.random_tokens(4, CONFIG.d_model, "float32", 0)
    return workload.Workload(preset, 4, "cpu", "float32", x, *weights)


LOOP = next(impl for impl in suite.IMPLEMENTATIONS if impl.name == "torch_loop")


def _impl(shift=0.0, build_graph=None, **kwargs):
    def replayed(w, layers):
        fn, _ = LOOP.build(w) if layers is None else LOOP.build_stack(w, layers)
        return ReplayedByCalling(fn, shift), 0.0

    kwargs.setdefault("build_stack", LOOP.build_stack)
    return suite.Impl("replayed", "the loop, replayed by calling it", "moe", LOOP.build,
                      build_graph=build_graph or replayed, **kwargs)


@pytest.mark.parametrize("stack", [None, 2])
def test_a_graph_is_checked_against_the_eager_function_timed_and_released(stack):
    w = _cell()
    ReplayedByCalling.released.clear()
    row = suite.run_impl(_impl(), w, suite.work_model(w), CEILINGS, 0, stack=stack, graph=True)
    gr = row["graph"]
    assert row["status"] == "ok" and gr["status"] == "ok" and gr["error"] is None, row
    assert gr["layers"] == (stack or 1) and gr["capture_s"] == 0.0
    assert gr["reps"] >= 3 and len(gr["times_s"]) == gr["reps"] and gr["q25_s"] <= gr["median_s"] <= gr["q75_s"]
    assert gr["per_layer_s"] == gr["median_s"] / gr["layers"]
    assert gr["pct_of_floor"] == pytest.approx(100 * row["floor_s"] / gr["per_layer_s"])
    # The whole timed batch, against what the run times: the stack with --stack, else the call.
    assert gr["check_tokens"] == w.tokens and gr["check_rel_err"] < gr["check_tol"]
    assert len(ReplayedByCalling.released) == 1
    assert "graph" not in suite.run_impl(_impl(), w, suite.work_model(w), CEILINGS, 0, stack=stack)


def test_a_wrong_or_failing_graph_is_recorded_released_and_not_timed():
    w = _cell()
    ReplayedByCalling.released.clear()
    row = suite.run_impl(_impl(shift=1.0), w, suite.work_model(w), CEILINGS, 0, stack=2, graph=True)
    gr = row["graph"]
    assert row["stack"]["status"] == "ok" and gr["status"] == "wrong" and "times_s" not in gr, gr
    assert "the eager 2-layer stack on the timed batch" in gr["error"]
    assert len(ReplayedByCalling.released) == 1

    def capture_fails(w, layers):
        raise RuntimeError("capture recorded a host sync")

    row = suite.run_impl(_impl(build_graph=capture_fails), w, suite.work_model(w), CEILINGS, 0, graph=True)
    assert row["status"] == "ok" and row["graph"]["status"] == "failed" and row["graph"]["phase"] == "build"
    assert "host sync" in row["graph"]["error"]


def test_rows_without_a_graph_say_why():
    w = _cell()
    work = suite.work_model(w)
    row = suite.run_impl(LOOP, w, work, CEILINGS, 0, graph=True)
    assert row["status"] == "ok" and row["graph"]["status"] == "skipped" and ".tolist()" in row["graph"]["error"]
    plain = suite.Impl("plain", "no graph form", "moe", LOOP.build)
    row = suite.run_impl(plain, w, work, CEILINGS, 0, graph=True)
    assert row["graph"] == {"layers": 1, "status": "skipped", "error": "no graph form"}
    # With --stack a graph captures the stack: none to check it against where the row has none.
    row = suite.run_impl(_impl(build_stack=None), w, work, CEILINGS, 0, stack=2, graph=True)
    assert row["stack"]["status"] == "skipped" and row["graph"]["status"] == "skipped"
    assert "the eager stack" in row["graph"]["error"] and row["graph"]["layers"] == 2
    for name in ("max_dense", "max_builtin"):
        impl = next(i for i in suite.IMPLEMENTATIONS if i.name == name)
        assert "no graph form" in impl.graph_unsupported(w, None)
    pymoe = next(i for i in suite.IMPLEMENTATIONS if i.name == "pymoe")
    assert "cuBLAS per expert" in pymoe.graph_unsupported(w, None), "a float32 layer reads back to the host"


# -- the tables ---------------------------------------------------------------------------


def _printed(result) -> str:
    out = io.StringIO()
    report.print_result(result, Console(file=out, width=400))
    return out.getvalue()


def test_results_print_with_and_without_graph_columns():
    old = json.loads(OLD_STACK_RESULT.read_text())
    assert "graph" not in old and not any("graph" in r for run in old["runs"] for r in run["rows"])
    text = _printed(old)
    assert "8-layer stack (IQR)" in text and "device graph" not in text
    # The same file as if it had run with --graph (made-up graph timings: TEST DATA).
    new = copy.deepcopy(old)
    new["graph"] = True
    for run in new["runs"]:
        for row in run["rows"]:
            if row["status"] != "ok":
                continue
            if row["name"] == "torch_grouped":
                row["graph"] = {"layers": 8, "status": "failed", "error": "RuntimeError: capture failed"}
            else:
                row["graph"] = {**row["stack"], "per_layer_s": row["stack"]["per_layer_s"] / 2,
                                "pct_of_floor": 2 * row["stack"]["pct_of_floor"]}
    text = _printed(new)
    assert "ms/layer, 8-layer stack as a device graph (IQR)" in text and "graph pymoe speedup" in text
    assert "torch_grouped as a device graph: RuntimeError: capture failed" in text
    assert "the 8-layer stack captured once as a device graph" in text
    # A single-call graph run: its own heading, no stack columns.
    for run in new["runs"]:
        for row in run["rows"]:
            row.pop("stack", None)
            if "graph" in row:
                row["graph"]["layers"] = 1
    new["stack"] = None
    text = _printed(new)
    assert "ms/layer as a device graph (IQR)" in text and "stack (IQR)" not in text
