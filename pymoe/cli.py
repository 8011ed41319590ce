"""The `pymoe` command line. Commands only parse arguments and call library functions."""

from __future__ import annotations

from pathlib import Path

import click

from .dtypes import LAYER_DTYPES
from .offload.strategies import EVICTIONS

# Layers in one call of `pymoe bench --stack` without a count: the 8-layer stack of issue 22's goals.
DEFAULT_STACK = 8
READBACK_HELP = ("Read each layer's routing back to the host before deciding its misses, as a server that "
                 "decides on the host must (the calibrated gap per layer, `pymoe calibrate`). Off: the host "
                 "knows the routing from the trace and runs ahead of the GPU, which only a server that "
                 "decides on the GPU could.")


@click.group()
@click.version_option(package_name="pymoe")
def main() -> None:
    """pymoe: Mixture-of-Experts layers as Mojo custom ops in MAX graphs."""


@main.command()
@click.option("--preset", default="small-decode", show_default=True, help="Layer shape and token count.")
@click.option("--tokens", type=int, default=None, help="Override the preset's token count.")
@click.option("--dtype", type=click.Choice(LAYER_DTYPES), default="float32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def check(preset: str, tokens: int | None, dtype: str, seed: int) -> None:
    """Build a MoE layer on CPU, run it, and compare it with the float64 reference."""
    from .check import check_preset

    try:
        ok = check_preset(preset, tokens=tokens, dtype=dtype, seed=seed)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if not ok:
        raise SystemExit(1)


def _token_counts(text: str | None) -> tuple[int, ...] | None:
    """--tokens "1,16,128" as (1, 16, 128); a UsageError for anything but integers >= 1."""
    if text is None:
        return None
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise click.UsageError(f"--tokens takes comma-separated integers, got {text!r}") from None
    if min(counts) < 1:
        raise click.UsageError(f"--tokens must be >= 1, got {text}")
    return counts


@main.command()
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="Preset to run (repeatable): small, medium, large (+ -decode), or a real model's layer: "
                   "mixtral-8x7b, qwen3-30b-a3b, qwen3-235b-a22b, gpt-oss-20b, gpt-oss-120b, deepseek-v3 "
                   "(at 1,16,128,4096,16384 tokens). Default: small-decode and small.")
@click.option("--tokens", default=None, metavar="N[,N...]",
              help="Token counts to run each preset at, comma-separated (e.g. 1,16,128,4096,16384). "
                   "Default: the preset's own.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(LAYER_DTYPES), default="float32", show_default=True)
@click.option("--impl", "impls", multiple=True, metavar="NAME",
              help="Only these implementations (repeatable): pymoe, max_dense, torch_loop, torch_grouped, "
                   "torch_dense, max_builtin; pymoe_fused_decode (GPU, <= 4 tokens) runs only when named.")
@click.option("--min-seconds", type=float, default=1.0, show_default=True,
              help="Keep repeating each timing (3 at least) until this much time is spent.")
@click.option("--stack", type=click.IntRange(min=1), is_flag=False, flag_value=DEFAULT_STACK, default=None,
              metavar="[L]",
              help=f"Also time each implementation as L layers in sequence in one call (--stack alone: "
                   f"{DEFAULT_STACK}), each layer after an RMS norm, as in a model: pymoe as one MAX graph, PyTorch "
                   "as one Python call, all layers on one set of weights. Prints and records the time per layer "
                   "(the call's / L) beside the single call's: a model pays MAX's per-call cost once per graph, "
                   "not once per layer. MAX's dense and built-in rows have no stacked form.")
@click.option("--graph", is_flag=True,
              help="GPU only: also time what each row times (with --stack, the L-layer stack; else the single "
                   "call) as a device graph captured once per batch size and replayed, as serving engines run "
                   "decode: pymoe through MAX's Model.capture, PyTorch through torch.cuda.CUDAGraph. Removes the "
                   "host work of launching each kernel and the MAX call's fixed cost. Rows that cannot be "
                   "captured (the HF-style loop, MAX's dense and built-in rows, pymoe layers whose kernels read "
                   "back to the host) say why.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Folder for the result file (results/bench/<device>/...).")
@click.option("--no-save", is_flag=True, help="Print only; write no result file.")
@click.option("--ablation", is_flag=True,
              help="Instead: time each op (softmax, relu, gate, expert matmul, layer) rung by rung "
                   "(scalar, SIMD, compile-time specialised, pre-packed weights, buffer pool) and the routing "
                   "overhead; CPU, "
                   "float32, one preset (default small). The slowest mode: about 20 graph compiles and scalar rungs "
                   "that take seconds per call (the result file records the run's wall time; --matmul-tokens "
                   "shortens it).")
@click.option("--matmul-tokens", type=int, default=None,
              help="With --ablation: tokens for the expert matmul and layer rungs (default 256; the scalar "
                   "rung is slow).")
def bench(presets, tokens, device, dtype, impls, min_seconds, stack, graph, out_dir, no_save, ablation,
          matmul_tokens) -> None:
    """Time pymoe's MoE layer against the dense FFN, PyTorch and MAX, side by side."""
    from .bench.runner import DEFAULT_PRESETS, run_ablation, run_bench
    from .bench.suite import DEFAULT_IMPL_NAMES

    tokens = _token_counts(tokens)
    if ablation:
        if device != "cpu" or dtype != "float32" or impls or len(presets) > 1 or stack is not None or graph:
            raise click.UsageError("--ablation runs on cpu in float32 for one --preset; "
                                   "--device, --dtype, --impl, --graph and --stack do not apply")
        if tokens is not None and len(tokens) > 1:
            raise click.UsageError("--ablation takes one --tokens count")
        tokens = tokens[0] if tokens else None
        try:
            run_ablation(presets[0] if presets else "small", tokens=tokens, matmul_tokens=matmul_tokens,
                         min_seconds=min_seconds, out_dir=None if no_save else out_dir)
        except ValueError as e:
            raise click.UsageError(str(e)) from e
        return
    if matmul_tokens is not None:
        raise click.UsageError("--matmul-tokens only applies with --ablation")
    try:
        run_bench(
            tuple(presets) or DEFAULT_PRESETS, tokens=tokens, device=device, dtype=dtype,
            impls=tuple(impls) or DEFAULT_IMPL_NAMES, min_seconds=min_seconds, stack=stack, graph=graph,
            out_dir=None if no_save else out_dir,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e



# -- expert offloading -------------------------------------------------------

@main.group()
def trace() -> None:
    """Record routing traces (which experts each token used in each layer)."""


@trace.command("lm")
@click.option("--preset", type=click.Choice(["switch", "qwen"]), required=True,
              help="Routing shape to train: experts, layers and top-k of the offloading preset.")
@click.option("--aux-loss/--no-aux-loss", default=True, show_default=True,
              help="Switch load-balancing loss (coefficient 0.01) on or off.")
@click.option("--capacity-factor", type=float, default=None, help="Drop tokens over this capacity in training.")
@click.option("--steps", type=int, default=800, show_default=True)
@click.option("--requests", type=int, default=128, show_default=True, help="Held-out sequences to trace.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/traces"),
              show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save the trained weights here.")
def trace_lm(preset, aux_loss, capacity_factor, steps, requests, seed, out_dir, checkpoint) -> None:
    """Train pymoe's small MoE language model on the Python standard library's source, then
    trace held-out text. Writes lm-<preset>-<aux|noaux>.npz and its .training.json log."""
    from .offload.lm import train_and_trace
    from .results import command_line

    if steps < 1 or requests < 1:
        raise click.UsageError("--steps and --requests must be >= 1")
    try:
        paths = train_and_trace(preset, aux_loss=aux_loss, steps=steps, requests=requests, out_dir=out_dir,
                                capacity_factor=capacity_factor, seed=seed, checkpoint=checkpoint,
                                command=command_line())
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"wrote {paths[0]} and {paths[1]}")


@trace.command("hf")
@click.argument("model")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Text file to run through the model.")
@click.option("--requests", type=int, default=16, show_default=True)
@click.option("--tokens", type=int, default=128, show_default=True, help="Tokens per request.")
@click.option("--random-init", is_flag=True, help="Build the model from its config with random weights.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
def trace_hf(model, text, requests, tokens, random_init, out_path) -> None:
    """Trace a Hugging Face transformers MoE model (hub id or local directory) on a text file."""
    from .offload.hf_capture import capture_hf, load_hf_model, tokenize_requests
    from .offload.trace import save_trace

    if requests < 1 or tokens < 1:
        raise click.UsageError("--requests and --tokens must be >= 1")
    net = load_hf_model(model, random_init=random_init)
    try:
        batches, how = tokenize_requests(model, text.read_text(errors="replace"), requests=requests,
                                         tokens=tokens, vocab_size=net.config.vocab_size, random_init=random_init)
        captured = capture_hf(net, batches, source={"model": model, "random_init": random_init,
                                                     "text": str(text), "tokens": how})
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"wrote {save_trace(captured, out_path)}: {captured.num_tokens} tokens, "
               f"{captured.num_layers} MoE layers, {captured.num_experts} experts, top-{captured.top_k}")


@trace.command("synthetic")
@click.option("--model", "model_name", default="switch", show_default=True,
              help="Preset (switch, qwen) or E:layers:k:d_model:d_ff[:activation[:dtype]].")
@click.option("--requests", type=int, default=128, show_default=True)
@click.option("--tokens", type=int, default=64, show_default=True, help="Tokens per request.")
@click.option("--zipf", type=float, default=1.0, show_default=True, help="Popularity skew (0 = uniform).")
@click.option("--reuse", type=float, default=0.3, show_default=True,
              help="Probability that a token reuses the previous token's expert in a layer.")
@click.option("--cross-layer", type=float, default=0.3, show_default=True,
              help="Probability that an expert follows from the previous layer's choice.")
@click.option("--fit", "fit_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Take zipf/reuse/cross-layer fitted to this trace instead.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
def trace_synthetic(model_name, requests, tokens, zipf, reuse, cross_layer, fit_path, seed, out_path) -> None:
    """Generate a synthetic trace (Zipf popularity, temporal reuse, cross-layer correlation)."""
    from .offload.models import get_model
    from .offload.synthetic import SyntheticParams, fit_params, generate
    from .offload.trace import load_trace, save_trace

    try:
        model = get_model(model_name)
        if fit_path is not None:
            fitted = load_trace(fit_path)
            fitted.check_shape(model.num_experts, model.num_layers, model.top_k, f"model {model.name}")
            params = fit_params(fitted)
            click.echo(f"fitted to {fit_path}: zipf {params.zipf:.3f}, reuse {params.reuse:.3f}, "
                       f"cross-layer {params.cross_layer:.3f}")
        else:
            params = SyntheticParams(zipf, reuse, cross_layer)
        generated = generate(model, params, requests=requests, tokens=tokens, seed=seed)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"wrote {save_trace(generated, out_path)}")


@trace.command("info")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def trace_info(path) -> None:
    """Check a trace file and print its shape and routing statistics."""
    import json

    from .offload.synthetic import fit_params
    from .offload.trace import TraceError, load_trace

    try:
        t = load_trace(path)
    except TraceError as e:
        raise click.ClickException(str(e)) from e
    p = fit_params(t)
    click.echo(f"{path}: {t.num_tokens} tokens in {t.num_requests} requests, {t.num_layers} layers, "
               f"{t.num_experts} experts, top-{t.top_k}, pre-gate {'yes' if t.pregate is not None else 'no'}")
    click.echo(f"fitted: zipf {p.zipf:.3f}, reuse {p.reuse:.3f}, cross-layer {p.cross_layer:.3f}")
    click.echo(json.dumps(t.meta.get("source", {}), indent=1))


@main.command()
@click.option("--model", "models", multiple=True, default=("switch", "qwen"), show_default=True,
              help="Expert shapes to time (presets or E:layers:k:d_model:d_ff[:act[:dtype]]).")
@click.option("--reps", type=int, default=20, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Default: results/offload/calibration-<device>.json")
@click.option("--host-compute/--no-host-compute", default=True, show_default=True,
              help="Also time this host's CPU computing 1-8 experts of 1-64 rows each in one call of pymoe's "
                   "CPU kernels (the hybrid policies' cost model; compiles one MAX graph per expert shape).")
@click.option("--host-gap-ms", type=float, default=None,
              help="Idle time before each timed host call (default 1 ms: the engine's worker waits for the "
                   "next layer's rows between calls).")
@click.option("--host-backend", type=click.Choice(["graph", "native"]), default="graph", show_default=True,
              help="How the timed host calls run pymoe's CPU kernels: one MAX graph call, or the same kernels "
                   "through a Mojo extension module without a MAX graph (built on first use in seconds, then "
                   "cached; the same cost per call as the graph on an H100 host).")
def calibrate(models, reps, out_path, host_compute, host_gap_ms, host_backend) -> None:
    """Measure host->GPU transfer time and expert compute time for the simulator's cost model
    (on a machine without a GPU: host memory copies and CPU compute, labelled so), and the
    host CPU's time for a layer's experts with pymoe's CPU kernels (a call's fixed cost and each
    expert's)."""
    from .offload.calibration import HOST_GAP_MS, HOST_ROWS, describe_host_compute
    from .offload.calibration import calibrate as run_calibration
    from .offload.models import get_model

    if reps < 1:
        raise click.UsageError("--reps must be >= 1")
    if host_gap_ms is not None and not 0 <= host_gap_ms <= 1000:
        raise click.UsageError(f"--host-gap-ms must be in [0, 1000], got {host_gap_ms}")
    try:
        shapes = [get_model(m) for m in models]
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    command = " ".join(["pymoe calibrate", *[f"--model {m}" for m in models], f"--reps {reps}",
                        *([] if host_compute else ["--no-host-compute"]),
                        *([] if host_gap_ms is None else [f"--host-gap-ms {host_gap_ms}"]),
                        *([] if host_backend == "graph" else [f"--host-backend {host_backend}"])])
    from .offload.host_native import NativeBuildError

    try:
        data, out_path = run_calibration(shapes, reps=reps, host_rows=HOST_ROWS if host_compute else None,
                                         host_gap_ms=HOST_GAP_MS if host_gap_ms is None else host_gap_ms,
                                         host_backend=host_backend, out_path=out_path, command=command,
                                         progress=lambda msg: click.echo(msg, err=True))
    except NativeBuildError as e:
        raise click.ClickException(str(e)) from e
    for memory in ("pinned", "pageable"):
        t = data["transfer"][memory]
        click.echo(f"{memory}: {t['gbps']:.1f} GB/s, {t['latency_ms'] * 1e3:.1f} us per queued copy, "
                   f"{t['start_latency_ms'] * 1e3:.1f} us more on an idle copy stream ({t['what']})")
    for key, curve in data.get("host_compute", {}).items():
        click.echo(f"host compute {key} ({curve['dtype']}): {describe_host_compute(curve)}")
    click.echo(f"wrote {out_path}")



@main.command()
@click.option("--model", "models", multiple=True, default=("switch", "qwen"), show_default=True,
              help="Expert shapes (presets or E:layers:k:d_model:d_ff[:act[:dtype]]).")
@click.option("--reps", type=int, default=20, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True)
@click.option("--calibration-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the simulator's calibration goes (default results/offload/calibration-<device>.json).")
def transfer(models, reps, out_dir, calibration_out) -> None:
    """Benchmark expert transfers (pinned / pageable host->GPU, GPU->GPU, fresh allocation vs
    slot pool; 1 and 10 experts, 1-256 MiB) and compute vs transfer; write the calibration."""
    from .offload.models import get_model
    from .offload.transfer import run_transfer
    from .results import command_line

    if reps < 2:
        raise click.UsageError("--reps must be >= 2")
    try:
        shapes = [get_model(m) for m in models]
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    run_transfer(shapes, reps=reps, out_dir=out_dir, calibration_out=calibration_out,
                 command=command_line())


@main.command()
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--model", "model_name", required=True,
              help="Preset (switch, qwen) or E:layers:k:d_model:d_ff[:act[:dtype]]; must match the trace.")
@click.option("--calibration", "calibration_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Cost model from `pymoe calibrate`.")
@click.option("--strategy", "strategies", multiple=True,
              help="Repeat to choose; default: all (pre-gated only if the trace has the pre-gate signal), "
                   "transfer-only. A label may name its eviction, name[eviction], and a miss policy before "
                   "a '+': cpu-on-miss (compute every missed expert on the host CPU), hybrid (per missed "
                   "expert, the host or a transfer, whichever the calibration says is done sooner), "
                   "cpu-on-miss-admit / hybrid-admit (also copy a host-served expert to the GPU cache "
                   "in the background); alone they prefetch nothing: hybrid, hybrid[predicted], "
                   "hybrid+intelligent[predicted], cpu-on-miss-admit+oracle. Host policies need the host "
                   "compute timings of `pymoe calibrate`; like every time here, theirs are SIMULATED.")
@click.option("--batch-sizes", default="1,2,4,8,16,32,64", show_default=True)
@click.option("--runs", type=int, default=5, show_default=True, help="Seeded request orders per configuration.")
@click.option("--requests", type=int, default=8, show_default=True,
              help="Requests per run (at least the batch size).")
@click.option("--cache-fraction", type=float, default=0.25, show_default=True,
              help="GPU cache size as a fraction of all experts.")
@click.option("--dedup", type=click.Choice(["on", "off", "both"]), default="both", show_default=True)
@click.option("--memory", type=click.Choice(["pinned", "pageable"]), default="pinned", show_default=True)
@click.option("--eviction", "evictions", multiple=True, type=click.Choice(list(EVICTIONS)),
              help="Run every strategy once per eviction policy given (default: each strategy's own); "
                   "predicted = evict the expert whose next use is expected furthest ahead, from the "
                   "request's recent experts and the profile's popularity (a practical Belady); "
                   "belady needs the future; tiered = L1/L2/L3 split of the same budget.")
@click.option("--routing-readback/--no-routing-readback", default=False, show_default=True,
              help=READBACK_HELP)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True)
def simulate(trace_path, model_name, calibration_path, strategies, batch_sizes, runs, requests, cache_fraction,
             dedup, memory, evictions, routing_readback, out_dir) -> None:
    """SIMULATE offloaded decoding: replay a trace through every strategy and batch size
    (optionally computing missed experts on the host: see --strategy)."""
    from .offload.calibration import CalibrationError
    from .offload.sweep import run_sweep
    from .offload.trace import TraceError

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise click.UsageError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    try:
        run_sweep(trace_path, model_name, calibration_path, strategies=tuple(strategies) or None,
                  batch_sizes=sizes, runs=runs, cache_fraction=cache_fraction, requests=requests, dedup=dedup,
                  memory=memory, evictions=tuple(evictions) or None, out_dir=out_dir,
                  routing_readback=routing_readback)
    except (TraceError, CalibrationError) as e:
        raise click.ClickException(str(e)) from e
    except ValueError as e:
        raise click.UsageError(str(e)) from e





@main.command("serve-offloaded")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--model", "model_name", required=True, help="Preset or E:layers:k:d_model:d_ff[:act[:dtype]].")
@click.option("--calibration", "calibration_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--strategy", "strategies", multiple=True,
              help="Repeat; default: all the trace supports (transfer-only). name[eviction] picks the eviction "
                   "policy, e.g. on-demand[predicted]; a miss policy before a '+' computes missed experts on "
                   "the host CPU with pymoe's CPU kernels, e.g. hybrid[predicted], hybrid-admit+expertflow, "
                   "cpu-on-miss (these need the host compute timings of `pymoe calibrate`).")
@click.option("--batch-sizes", default="1,4,16,64", show_default=True)
@click.option("--requests", type=int, default=8, show_default=True)
@click.option("--cache-fraction", type=float, default=0.25, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Run only the first N decode steps of each run (default: all of the requests' tokens).")
@click.option("--inject-prefetch-failures", "failure_rate", type=click.FloatRange(0, 1), default=0.0,
              show_default=True, help="Fraction of prefetch copies made to fail (tests the on-demand fallback).")
@click.option("--inject-host-failures", "host_failure_rate", type=click.FloatRange(0, 1), default=0.0,
              show_default=True, help="Fraction of host-computed experts made to fail (tests the fallback to a "
                                      "transfer and GPU compute; host miss policies only).")
@click.option("--time-limit", "time_limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Start no run after this many seconds; the file lists the runs left out.")
@click.option("--host-backend", type=click.Choice(["graph", "native"]), default="graph", show_default=True,
              help="How the host worker runs pymoe's CPU kernels (see `pymoe calibrate --host-backend`; "
                   "calibrate with the same one).")
@click.option("--routing-readback/--no-routing-readback", default=False, show_default=True,
              help=READBACK_HELP)
@click.option("--host-handoff", type=click.Choice(["thread", "gpu"]), default="thread", show_default=True,
              help="How a layer's combine waits for its host experts: the issuing thread waits for the host "
                   "worker (thread), or the GPU waits for a flag the worker sets in pinned memory and the "
                   "issuing thread never waits (gpu).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True)
def serve_offloaded(trace_path, model_name, calibration_path, strategies, batch_sizes, requests, cache_fraction,
                    max_steps, failure_rate, host_failure_rate, time_limit, host_backend, routing_readback,
                    host_handoff, out_dir) -> None:
    """Run the real offloading engine on the GPU (experts in pinned host memory, GPU slot pool,
    prefetches on a copy stream, missed experts on a host worker for the host miss policies)
    and compare its measured latency with the simulator's."""
    from .offload.engine import EngineError, validate
    from .offload.host_native import NativeBuildError
    from .offload.strategies import STRATEGIES
    from .offload.trace import TraceError
    from .results import command_line

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise click.UsageError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    chosen = tuple(strategies) or tuple(STRATEGIES)
    try:
        validate(trace_path, model_name, calibration_path, strategies=chosen, batch_sizes=sizes, requests=requests,
                 cache_fraction=cache_fraction, max_steps=max_steps, out_dir=out_dir,
                 command=command_line(), prefetch_failure_rate=failure_rate, host_failure_rate=host_failure_rate,
                 time_limit_s=time_limit, host_backend=host_backend, routing_readback=routing_readback,
                 host_handoff=host_handoff)
    except (EngineError, TraceError, ValueError, NativeBuildError) as e:
        raise click.ClickException(str(e)) from e


@main.command("train-predictor")
@click.option("--trace", "trace_paths", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Repeat for several traces.")
@click.option("--pregate/--no-pregate", default=True, show_default=True,
              help="Give the predictor the Pre-gated signal for the next layer (if the trace has it).")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True)
def train_predictor_cmd(trace_paths, pregate, epochs, out_dir) -> None:
    """Train the next-expert predictor on each trace (held-out: the last 25% of requests) and
    compare it with baselines and the Fano ceiling; writes results/offload/<stamp>-predictor.json."""
    from .offload.predictor import predictor_experiment
    from .offload.trace import TraceError
    from .results import command_line

    if epochs < 1:
        raise click.UsageError("--epochs must be >= 1")

    def show(run: dict) -> None:
        learned, bounds = run["learned"], run["learned_fraction_of_ceiling_range"]
        estimates = ", ".join(f"{name} {v['bits']:.2f} bits -> {v['fano_ceiling_top1']:.3f}"
                              for name, v in run["entropy_estimates"].items())
        click.echo(f"{run['trace']}: learned top-1 {learned['top1_accuracy']:.3f} (top-k recall "
                   f"{learned['topk_recall']:.3f}); transition table {run['transition_table']['top1_accuracy']:.3f}; "
                   f"previous token {run['previous_token']['top1_accuracy']:.3f}; most frequent "
                   f"{run['most_frequent']['top1_accuracy']:.3f}; Fano ceiling {run['fano_ceiling_top1']:.3f} (plug-in "
                   f"H(Y|X) = {run['conditional_entropy_bits']:.2f} bits): {run['learned_fraction_of_ceiling']:.0%} "
                   f"of it; {bounds[0]:.0%}-{bounds[1]:.0%} over the entropy estimates ({estimates})")
        if "fano_tightness" in run:
            tight = run["fano_tightness"]
            click.echo(f"  were the net's distribution the truth, the best top-1 would be "
                       f"{tight['net_as_truth_best_top1']:.3f} against a Fano ceiling of "
                       f"{tight['fano_ceiling_at_net_entropy']:.3f} at its entropy ({tight['ratio']:.0%}): how far "
                       "below Fano's bound a perfect predictor sits here")

    try:
        _, path = predictor_experiment(trace_paths, use_pregate=pregate, epochs=epochs, out_dir=out_dir,
                                       command=command_line(), on_run=show)
    except (TraceError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path}")


@main.command()
@click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Where the result files are.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Default: <results>/graphs")
def graphs(results_dir, out_dir) -> None:
    """Draw every figure from the result files <results>/figures.toml lists for it; list the
    figures it skipped and why, and newer result files that the list leaves out."""
    from .plots import render_all
    from .results import FigureListError

    try:
        report = render_all(results_dir, out_dir)
    except FigureListError as e:
        raise click.ClickException(str(e)) from e
    for path in report.written:
        click.echo(f"wrote {path}")
    for name, why in report.missing:
        click.echo(f"skipped {name}: {why}")
    for note in report.notes:
        click.echo(f"note: {note}")
    for name, why in report.errors:
        click.echo(f"error: {name} not drawn: {why}", err=True)
    if report.errors:
        raise click.ClickException(f"{len(report.errors)} figure(s) not drawn (see above)")


if __name__ == "__main__":
    main()
