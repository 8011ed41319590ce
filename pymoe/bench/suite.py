"""The side-by-side benchmark: every implementation on the same inputs and weights.

For one preset (layer shape + token count) on one device, each implementation
is built (compile time kept apart), checked against the float64 reference on
the first tokens of the batch, then timed (warm-up, repetitions, median and
spread), with the roofline floor from the machine's measured ceilings beside
it. Data flows one way: this module measures and returns plain dicts; the CLI
prints them (report.py) and writes them to results/ (write_bench_result).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import reference as R
from .. import results
from ..baselines import TorchDenseFFN, TorchMoE
from ..config import MoEConfig, Preset, get_preset
from ..dtypes import itemsize, torch_dtype
from ..layer import DenseFFN, MoELayer
from ..routing import route
from ..weights import DenseWeights, MoEWeights
from .report import error_summary
from .timing import device_sync, measure, peak_rss_during, summarize

# Tokens of the batch checked against the float64 reference before timing.
CHECK_TOKENS = 32
# Pass criteria of that check: relative Frobenius error (fp32), median
# per-token relative error (bf16, where a few tokens may legitimately route
# differently after rounding).
CHECK_TOL = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclass
class Workload:
    preset: Preset
    tokens: int
    device: str
    dtype: str
    x: np.ndarray  # [tokens, d_model] float32 (bf16-representable when dtype is bf16)
    moe_weights: MoEWeights
    dense_weights: DenseWeights

    @property
    def config(self) -> MoEConfig:
        return self.preset.config


@dataclass(frozen=True)
class Impl:
    name: str
    label: str
    kind: str  # "moe" or "dense": which FLOPs/bytes and which reference apply
    build: Callable[[Workload], tuple[Callable, float]]  # -> (fn(x) -> out, compile seconds)


def _torch_in(fn, device: str, dtype: str):
    tdev = "cuda" if device == "gpu" else "cpu"

    def call(x):
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(x).to(device=tdev, dtype=torch_dtype(dtype))
        return fn(x)

    return call


# Timed calls skip pymoe's input validation (a NaN scan), as the PyTorch
# baselines do none; the reference check before timing goes through it.
def _build_pymoe(w: Workload):
    layer = MoELayer(w.config, w.moe_weights, device=w.device, dtype=w.dtype)
    return layer.forward_unchecked, layer.compile_seconds


def _build_max_dense(w: Workload):
    dense = DenseFFN(w.config, w.dense_weights, device=w.device, dtype=w.dtype)
    return dense.forward_unchecked, dense.compile_seconds


def _build_torch(style: str):
    def build(w: Workload):
        moe = TorchMoE(w.config, w.moe_weights, "cuda" if w.device == "gpu" else "cpu", torch_dtype(w.dtype), style)
        return _torch_in(moe, w.device, w.dtype), 0.0

    return build


def _build_torch_dense(w: Workload):
    dense = TorchDenseFFN(w.config, w.dense_weights, "cuda" if w.device == "gpu" else "cpu", torch_dtype(w.dtype))
    return _torch_in(dense, w.device, w.dtype), 0.0


def _build_max_builtin(w: Workload):
    from .max_builtin import MaxBuiltinMoE

    moe = MaxBuiltinMoE(w.config, w.moe_weights, device=w.device, dtype=w.dtype)
    return moe, moe.compile_seconds


IMPLEMENTATIONS = (
    Impl("pymoe", "pymoe MoE (Mojo kernels in a MAX graph)", "moe", _build_pymoe),
    Impl("max_dense", "dense FFN in MAX (ops.matmul)", "dense", _build_max_dense),
    Impl("torch_loop", "PyTorch MoE, HF-style expert loop", "moe", _build_torch("loop")),
    Impl("torch_grouped", "PyTorch MoE, torch._grouped_mm", "moe", _build_torch("grouped")),
    Impl("torch_dense", "dense FFN in PyTorch", "dense", _build_torch_dense),
    Impl("max_builtin", "MAX built-in MoE kernels (max.nn.kernels)", "moe", _build_max_builtin),
)
IMPL_NAMES = tuple(i.name for i in IMPLEMENTATIONS)


def _to_numpy(out) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


def _round_bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).to(torch.float32).numpy()


def make_workload(preset_name: str, tokens: int | None, device: str, dtype: str, seed: int = 0) -> Workload:
    preset = get_preset(preset_name)
    tokens = preset.tokens if tokens is None else tokens
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, preset.config.d_model), dtype=np.float32)
    moe_w = MoEWeights.random(preset.config, seed=seed + 1)
    dense_w = DenseWeights.random(preset.config, seed=seed + 2)
    if dtype == "bfloat16":  # the reference then sees exactly what the kernels see
        x = _round_bf16(x)
        moe_w = MoEWeights(*(_round_bf16(a) for a in (moe_w.router, moe_w.w1, moe_w.w2)))
        dense_w = DenseWeights(*(_round_bf16(a) for a in (dense_w.w1, dense_w.w2)))
    return Workload(preset, tokens, device, dtype, x, moe_w, dense_w)


def _reference(w: Workload, kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "moe":
        return R.moe_layer(x, w.moe_weights, w.config).out
    return R.dense_ffn(x, w.dense_weights, w.config.activation)


def _check(out: np.ndarray, ref: np.ndarray, dtype: str) -> tuple[float, bool]:
    if dtype == "float32":
        err = R.relative_error(out, ref)
    else:
        per_token = np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
        err = float(np.median(per_token))
    return err, err < CHECK_TOL[dtype]


def work_model(w: Workload) -> dict:
    """FLOPs and weight bytes each kind of implementation must at least spend."""
    cfg, size = w.config, itemsize(w.dtype)
    ids = route(w.x.astype(np.float64) @ w.moe_weights.router, cfg.top_k, cfg.renormalize).ids
    used = int(np.unique(ids).size)
    router_bytes = cfg.d_model * cfg.num_experts * size
    router_flops = 2 * w.tokens * cfg.d_model * cfg.num_experts
    return {
        "experts_used": used,
        "moe": {
            "flops": cfg.active_flops(w.tokens) + router_flops,
            "weight_bytes": used * cfg.expert_bytes(size) + router_bytes,
        },
        "dense": {
            "flops": 2 * w.tokens * cfg.dense_shape.params,
            "weight_bytes": cfg.dense_shape.nbytes(size),
        },
    }


def _roofline(row: dict, work: dict, ceilings: dict) -> None:
    """Add achieved rates, the floor time and the fraction of it reached."""
    flops, nbytes, t = work["flops"], work["weight_bytes"], row["median_s"]
    peak = ceilings["matmul"]["gflops"] * 1e9
    bw = ceilings["read"]["gbps"] * 1e9
    floor = max(flops / peak, nbytes / bw)
    row.update(
        flops=flops,
        weight_bytes=nbytes,
        gflops=flops / t / 1e9,
        pct_peak=100 * flops / t / peak,
        gbps=nbytes / t / 1e9,
        pct_bw=100 * nbytes / t / bw,
        floor_s=floor,
        floor_bound="compute" if flops / peak >= nbytes / bw else "memory",
        pct_of_floor=100 * floor / t,
    )


def run_impl(impl: Impl, w: Workload, work: dict, ceilings: dict, min_seconds: float, sync=None) -> dict:
    row = {"name": impl.name, "label": impl.label, "kind": impl.kind, "status": "ok", "error": None}
    try:
        fn, compile_s = impl.build(w)
    except Exception as exc:  # recorded, not raised: a failing baseline is a result
        row.update(status="failed", error=error_summary(exc), phase="build")
        return row
    row["compile_s"] = compile_s
    try:
        n = min(CHECK_TOKENS, w.tokens)
        out = _to_numpy(fn(w.x[:n]))
        err, ok = _check(out, _reference(w, impl.kind, w.x[:n]), w.dtype)
        row.update(check_tokens=n, check_rel_err=err, check_tol=CHECK_TOL[w.dtype])
        if not ok:
            row.update(status="wrong", error=f"relative error {err:.3g} against the float64 reference")
            return row
        # On the GPU every implementation gets the batch already on the device.
        x = w.x if w.device == "cpu" else torch.from_numpy(w.x).to("cuda", torch_dtype(w.dtype))
        times = measure(lambda: fn(x), min_seconds=min_seconds, sync=sync)
        row.update(summarize(times))
        if w.device == "cpu":
            row["peak_rss_delta_mib"] = peak_rss_during(lambda: fn(x))
    except Exception as exc:
        row.update(status="failed", error=error_summary(exc), phase="run")
        return row
    _roofline(row, work[impl.kind], ceilings)
    return row


def run_preset(
    preset_name: str,
    *,
    tokens: int | None,
    device: str,
    dtype: str,
    ceilings: dict,
    impls: tuple[str, ...] = IMPL_NAMES,
    min_seconds: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark every implementation in `impls` on one preset; returns the run dict."""
    unknown = set(impls) - set(IMPL_NAMES)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}; choose from {IMPL_NAMES}")
    w = make_workload(preset_name, tokens, device, dtype)
    work = work_model(w)
    sync = device_sync(device)
    chosen = [impl for impl in IMPLEMENTATIONS if impl.name in impls]
    if device == "gpu":
        # MAX keeps the device memory its graphs used for later graphs, so
        # PyTorch (which can hand its cache back) runs first: at the large
        # preset, MAX's pools would otherwise leave PyTorch too little.
        chosen.sort(key=lambda impl: not impl.name.startswith("torch"))
    by_name = {}
    for impl in chosen:
        if progress:
            progress(impl.name)
        by_name[impl.name] = run_impl(impl, w, work, ceilings, min_seconds, sync)
        if device == "gpu":
            gc.collect()
            torch.cuda.empty_cache()
    rows = [by_name[impl.name] for impl in IMPLEMENTATIONS if impl.name in by_name]
    pymoe = next((r for r in rows if r["name"] == "pymoe" and r["status"] == "ok"), None)
    for r in rows:
        if pymoe and r["status"] == "ok":
            r["pymoe_speedup"] = r["median_s"] / pymoe["median_s"]
    cfg = w.config
    return {
        "preset": preset_name,
        "tokens": w.tokens,
        "regime": "decode" if preset_name.endswith("-decode") else "prefill",
        "config": {
            "d_model": cfg.d_model, "d_ff": cfg.d_ff, "num_experts": cfg.num_experts,
            "top_k": cfg.top_k, "activation": cfg.activation, "renormalize": cfg.renormalize,
            "capacity_factor": cfg.capacity_factor,
        },
        "work": work,
        "rows": rows,
    }


def write_bench_result(result: dict, out_dir: Path) -> Path:
    """Write one result file: results/bench/<device>/<stamp>-<dtype>-<presets>.json, stamped
    with the run's start."""
    presets = "_".join(r["preset"] + (f"@{r['tokens']}" if r["tokens"] != get_preset(r["preset"]).tokens else "")
                       for r in result["runs"])
    return results.write_result(Path(out_dir) / "bench" / result["device"], f"{result['dtype']}-{presets}", result,
                                stamp=results.file_stamp(result["date"]))
