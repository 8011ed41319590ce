"""Expert parallelism (pymoe/parallel.py): two processes over gloo on the CPU.

One pair of worker processes (this file run as a script, one per rank, on a free localhost
port) runs every case, so that each process compiles each graph once: bad set-ups first
(they must fail before anything compiles), then the layers against the float64 reference of
one layer over all ranks' tokens (and, for one config, against the single-device MoELayer),
then a rank that hangs (a group with a short timeout) and a rank that is killed. Each worker
writes what it saw to a pickle; the tests below check those. Seeds are fixed, so a failure
replays; the workers' logs are printed when one fails.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORLD = 2
D, F, E = 32, 48, 8
TOL = 1e-5  # float32 against the float64 reference (docs/DESIGN.md, "Semantics")
PROBE_SECONDS = 3.0
HANG_TIMEOUT_S = 3.0
NEVER_CHOSEN = 6  # an expert (on rank 1) that the base router never picks: it gets no tokens


def _configs():
    from pymoe import MoEConfig

    base = dict(d_model=D, d_ff=F, num_experts=E, activation="swiglu")
    return {
        "top2": MoEConfig(**base, top_k=2),
        "capacity": MoEConfig(**base, top_k=2, capacity_factor=0.5),
        "top-E": MoEConfig(**base, top_k=E),
        "sigmoid-grouped-shared": MoEConfig(**base, top_k=3, scoring="sigmoid", selection_bias=True, n_group=4,
                                            topk_group=2, routed_scaling_factor=2.5, shared_d_ff=24,
                                            shared_gate=True),
        # k = 1 with the rest of the options: Llama-4's input scaling, GPT-OSS's biases and activation
        "top1-biases-weight-on-input": MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=1,
                                                 activation="clamped_swiglu", scoring="sigmoid", renormalize=False,
                                                 router_bias=True, expert_bias=True, weight_on_input=True),
    }


# case -> (config name, tokens per rank, seed)
CASES = {
    "top2": ("top2", (13, 7), 1),
    "top2-rank0-has-no-tokens": ("top2", (0, 9), 2),
    "top2-no-tokens-anywhere": ("top2", (0, 0), 3),
    "capacity-drops": ("capacity", (13, 7), 4),
    "top-E": ("top-E", (6, 11), 5),
    "sigmoid-grouped-shared": ("sigmoid-grouped-shared", (12, 5), 6),
    "sigmoid-grouped-shared-rank1-has-no-tokens": ("sigmoid-grouped-shared", (7, 0), 7),
    "top1-biases-weight-on-input": ("top1-biases-weight-on-input", (5, 11), 8),
}


def _weights(config):
    from pymoe import MoEWeights

    w = MoEWeights.random(config, seed=0)
    if config.scoring == "softmax":
        # Feature 0 of every token is 1 (see _tokens): a large negative router weight there
        # keeps NEVER_CHOSEN out of every token's top k (but the top-E case, which takes all).
        w.router[0, NEVER_CHOSEN] = -50.0
    return w


def _tokens(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, D), dtype=np.float32)
    x[:, 0] = 1.0
    return x


# ----------------------------------------------------------------- the workers


def _expect_error(fn):
    """(error type name, message, its `ranks` or None) of what fn() raised; Nones if nothing."""
    try:
        fn()
    except Exception as err:
        return type(err).__name__, str(err), getattr(err, "ranks", None)
    return None, None, None


def _worker(rank: int, port: int, out_dir: Path) -> None:
    import datetime

    import torch.distributed as dist
    from conftest import build_mojo_packages_once

    import pymoe
    from pymoe import MoEConfig, MoELayer, MoEWeights, runtime
    from pymoe import reference as R
    from pymoe.parallel import ExpertParallelMoE, compile_graphs, expert_shard

    build_mojo_packages_once()
    seen: dict = {"pymoe_file": pymoe.__file__}
    began = time.monotonic()

    def log(what):  # progress in the worker's log, which the fixture prints
        print(f"rank {rank} {time.monotonic() - began:6.1f} s: {what}", flush=True)
    out = out_dir / f"rank{rank}.pkl"

    def save():
        out.write_bytes(pickle.dumps(seen))

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    configs = _configs()
    base, base_w = configs["top2"], _weights(configs["top2"])

    def layer(config, weights, **kw):
        return ExpertParallelMoE(config, weights, probe_seconds=PROBE_SECONDS, **kw)

    # Bad set-ups: each fails before anything compiles.
    compiled_before = len(runtime._COMPILED)
    odd = MoEConfig(d_model=D, d_ff=F, num_experts=3, top_k=1)
    seen["indivisible"] = _expect_error(lambda: layer(odd, MoEWeights.random(odd, seed=0)))
    wrong = MoEWeights(base_w.router, base_w.w1[:3], base_w.w2[:3])
    seen["wrong_experts"] = _expect_error(lambda: layer(base, wrong))
    mine = base if rank == 0 else MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=1, activation="swiglu")
    seen["config_mismatch"] = _expect_error(lambda: layer(mine, base_w))
    other_router = base_w if rank == 0 else MoEWeights(base_w.router + 1e-3, base_w.w1, base_w.w2)
    seen["router_mismatch"] = _expect_error(lambda: layer(base, other_router))
    seen["compiled_by_bad_setups"] = len(runtime._COMPILED) - compiled_before
    log("bad set-ups checked")

    # Rank 0 compiles every config's graphs first (in one MAX compilation: each has a large
    # fixed cost) and rank 1 then reads them from MAX's disk cache, one step behind, rather
    # than both compiling the same graphs on the same cores at the same time.
    store = dist.distributed_c10d._get_default_store()
    steps = [lambda: compile_graphs(configs.values(), WORLD),
             lambda: MoELayer(base, base_w)]  # the single-device layer (and the CPU's weight-packing graphs)
    for i, step in enumerate(steps):
        if rank == 1:
            store.wait([f"test_parallel/compiled/{i}"], datetime.timedelta(minutes=10))
        single = step()
        if rank == 0:
            store.set(f"test_parallel/compiled/{i}", "1")
    log("graphs compiled")

    # The layers. For one config each rank is given only its shard of the experts; the
    # others are built from all experts and keep their share.
    layers = {}
    for name, config in configs.items():
        w = _weights(config)
        given = expert_shard(w, config, rank, WORLD) if name == "sigmoid-grouped-shared" else w
        layers[name] = (layer(config, given), w)
    log("layers built")
    seen["cases"] = {}
    for case, (name, counts, seed) in CASES.items():
        ep, w = layers[name]
        config = ep.config
        x = _tokens(sum(counts), seed)
        lo = sum(counts[:rank])
        mine = x[lo:lo + counts[rank]]
        res = ep.run(mine)
        rec = {"out_shape": res.out.shape, "counts": res.expert_counts, "dropped": res.dropped_slots,
               "tokens_total": res.tokens_total, "rows_sent": res.rows_sent, "rows_received": res.rows_received,
               "times": res.times.as_dict()}
        if len(x):
            ref = R.moe_layer(x, w, config)
            rec["ref_counts"], rec["ref_dropped"] = ref.gate.expert_counts, ref.dropped_slots
            rec["err"] = R.relative_error(res.out, ref.out[lo:lo + counts[rank]]) if len(mine) else 0.0
            # What deduplicated dispatch sends: each token once to each rank holding one of its experts.
            dest = ref.gate.topk_ids[lo:lo + counts[rank]] // (E // WORLD)
            rec["expected_rows_sent"] = [int((dest == r).any(axis=1).sum()) for r in range(WORLD)]
            if name == "top2" and len(mine):
                rec["err_vs_layer"] = R.relative_error(res.out, single(x)[lo:lo + counts[rank]])
        seen["cases"][case] = rec
        save()

    log("cases run")

    # A rank that hangs: a group whose timeout is short; rank 1 builds the layer but never calls it.
    hang_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
    hang = layer(base, base_w, group=hang_group, timeout=120)
    dist.barrier()
    if rank == 0:
        start = time.monotonic()
        seen["hang"] = _expect_error(lambda: hang(_tokens(4, 9)))
        seen["hang_seconds"] = time.monotonic() - start
    dist.barrier()  # rank 1 waits here, outside the hung group, until rank 0 is done

    log("hang checked")

    # A rank that is killed: rank 1 kills itself between two calls; rank 0's next call must
    # stop with an error naming it, within the probe time (gloo sees the closed connection).
    ep, _ = layers["top2"]
    ep(_tokens(3, 10)[rank:rank + 1 + rank])
    save()
    dist.barrier()
    if rank == 1:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    start = time.monotonic()
    seen["killed"] = _expect_error(lambda: ep(_tokens(3, 10)))
    seen["killed_seconds"] = time.monotonic() - start
    log("kill checked")
    save()


# ----------------------------------------------------------------- the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """What each rank saw: {rank: dict}, from one run of the two workers."""
    out = tmp_path_factory.mktemp("parallel")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    logs = [out / f"rank{r}.log" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(out)], env=env,
                              stdout=logs[r].open("w"), stderr=subprocess.STDOUT) for r in range(WORLD)]
    try:
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    got = {}
    for r in range(WORLD):
        path = out / f"rank{r}.pkl"
        got[r] = pickle.loads(path.read_bytes()) if path.exists() else {}
    # The workers' logs, for any test that fails.
    for r, log in enumerate(logs):
        print(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read_text()[-4000:]}")
    return got


def test_workers_ran_this_checkout(seen):
    for r in range(WORLD):
        assert seen[r].get("pymoe_file", "").startswith(str(Path(__file__).resolve().parents[1])), seen[r]


def test_bad_setups_fail_before_anything_compiles(seen):
    for r in range(WORLD):
        kind, msg, _ = seen[r]["indivisible"]
        assert kind == "ValueError" and "num_experts=3" in msg and "world size 2" in msg
        kind, msg, _ = seen[r]["wrong_experts"]
        assert kind == "ValueError" and "all 8 experts or this rank's 4" in msg
        assert seen[r]["compiled_by_bad_setups"] == 0


def test_mismatched_configs_name_the_other_rank(seen):
    for r in range(WORLD):
        kind, msg, ranks = seen[r]["config_mismatch"]
        assert kind == "ConfigMismatch", msg
        assert ranks == [1 - r] and f"rank(s) {1 - r}" in msg and "config.top_k: " in msg
        kind, msg, ranks = seen[r]["router_mismatch"]
        assert kind == "ConfigMismatch" and ranks == [1 - r] and "routing_weights_sha256" in msg


@pytest.mark.parametrize("case", [c for c, (_, counts, _) in CASES.items() if sum(counts)])
def test_outputs_equal_one_layer_over_all_tokens(seen, case):
    for r in range(WORLD):
        rec = seen[r]["cases"][case]
        assert rec["out_shape"] == (CASES[case][1][r], D)
        assert rec["err"] < TOL, (r, rec["err"])
        if "err_vs_layer" in rec:
            assert rec["err_vs_layer"] < TOL, (r, rec["err_vs_layer"])
    # This rank's statistics over its tokens add up to the single layer's over all of them.
    counts = sum(seen[r]["cases"][case]["counts"] for r in range(WORLD))
    np.testing.assert_array_equal(counts, seen[0]["cases"][case]["ref_counts"])
    assert all(seen[r]["cases"][case]["tokens_total"] == sum(CASES[case][1]) for r in range(WORLD))


def test_the_single_device_layer_was_compared(seen):
    assert all("err_vs_layer" in seen[r]["cases"]["top2"] for r in range(WORLD))


@pytest.mark.parametrize("case", [c for c, (_, counts, _) in CASES.items() if sum(counts)])
def test_dispatch_sends_each_token_once_to_each_rank_of_its_experts(seen, case):
    for r in range(WORLD):
        rec = seen[r]["cases"][case]
        assert rec["rows_sent"] == rec["expected_rows_sent"]
        # What a rank receives is what the others sent it.
        assert rec["rows_received"] == [seen[s]["cases"][case]["rows_sent"][r] for s in range(WORLD)]
    if CASES[case][0] == "top-E":  # every token goes to both ranks, once
        assert all(seen[r]["cases"][case]["rows_sent"] == [CASES[case][1][r]] * WORLD for r in range(WORLD))


def test_an_expert_with_no_tokens(seen):
    rec = seen[0]["cases"]["top2"]
    assert rec["ref_counts"][NEVER_CHOSEN] == 0 and (rec["ref_counts"] > 0).sum() == E - 1


def test_capacity_drops_what_the_single_device_layer_drops(seen):
    recs = [seen[r]["cases"]["capacity-drops"] for r in range(WORLD)]
    assert recs[0]["ref_dropped"] > 0
    assert sum(rec["dropped"] for rec in recs) == recs[0]["ref_dropped"]
    assert all(rec["dropped"] == 0 for r in range(WORLD) for c, rec in seen[r]["cases"].items()
               if not c.startswith("capacity"))


def test_no_tokens_anywhere(seen):
    for r in range(WORLD):
        rec = seen[r]["cases"]["top2-no-tokens-anywhere"]
        assert rec["out_shape"] == (0, D) and rec["rows_sent"] == [0, 0] and rec["rows_received"] == [0, 0]


def test_phase_times_add_up(seen):
    for r in range(WORLD):
        for case, rec in seen[r]["cases"].items():
            t = rec["times"]
            parts = t["routing_s"] + t["dispatch_s"] + t["shared_s"] + t["experts_s"] + t["combine_s"]
            assert all(v >= 0 for v in t.values()), (case, t)
            assert parts == pytest.approx(t["total_s"], rel=1e-6, abs=1e-9)
        assert rec["times"]["experts_s"] > 0
        assert seen[r]["cases"]["sigmoid-grouped-shared"]["times"]["shared_s"] > 0


def test_a_rank_that_hangs_is_named_after_the_timeout(seen):
    kind, msg, ranks = seen[0]["hang"]
    assert kind == "RankFailure", msg
    assert ranks == [1] and "rank(s) 1 stopped" in msg
    # the group's timeout, then the probe; never a hang
    assert seen[0]["hang_seconds"] < HANG_TIMEOUT_S + PROBE_SECONDS + 20


def test_a_killed_rank_is_named(seen):
    kind, msg, ranks = seen[0]["killed"]
    assert kind == "RankFailure", msg
    assert ranks == [1] and "rank(s) 1 stopped" in msg
    assert seen[0]["killed_seconds"] < PROBE_SECONDS + 20


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
