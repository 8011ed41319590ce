"""The `pymoe` command line. Commands only parse arguments and call library functions."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
@click.version_option(package_name="pymoe")
def main() -> None:
    """pymoe: Mixture-of-Experts layers as Mojo custom ops in MAX graphs."""


@main.command()
@click.option("--preset", default="small-decode", show_default=True, help="Layer shape and token count.")
@click.option("--tokens", type=int, default=None, help="Override the preset's token count.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
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


@main.command()
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="Preset to run (repeatable). Default: small-decode and small.")
@click.option("--tokens", type=int, default=None, help="Override the presets' token counts.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--impl", "impls", multiple=True, metavar="NAME",
              help="Only these implementations (repeatable): pymoe, max_dense, torch_loop, torch_grouped, "
                   "torch_dense, max_builtin.")
@click.option("--min-seconds", type=float, default=1.0, show_default=True,
              help="Keep repeating each timing (3 at least) until this much time is spent.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Folder for the result file (results/bench/<device>/...).")
@click.option("--no-save", is_flag=True, help="Print only; write no result file.")
@click.option("--ablation", is_flag=True,
              help="Instead: time each op (softmax, relu, gate, expert matmul, layer) rung by rung "
                   "(scalar, SIMD, compile-time specialised, buffer pool) and the routing overhead; CPU, "
                   "float32, one preset (default small). The slowest mode: about 20 graph compiles and scalar rungs "
                   "that take seconds per call (the result file records the run's wall time; --matmul-tokens "
                   "shortens it).")
@click.option("--matmul-tokens", type=int, default=None,
              help="With --ablation: tokens for the expert matmul and layer rungs (default 256; the scalar "
                   "rung is slow).")
def bench(presets, tokens, device, dtype, impls, min_seconds, out_dir, no_save, ablation, matmul_tokens) -> None:
    """Time pymoe's MoE layer against the dense FFN, PyTorch and MAX, side by side."""
    from .bench.runner import DEFAULT_PRESETS, run_ablation, run_bench
    from .bench.suite import IMPL_NAMES

    if tokens is not None and tokens < 1:
        raise click.UsageError(f"--tokens must be >= 1, got {tokens}")
    if ablation:
        if device != "cpu" or dtype != "float32" or impls or len(presets) > 1:
            raise click.UsageError("--ablation runs on cpu in float32 for one --preset; "
                                   "--device, --dtype and --impl do not apply")
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
            impls=tuple(impls) or IMPL_NAMES, min_seconds=min_seconds,
            out_dir=None if no_save else out_dir,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e


if __name__ == "__main__":
    main()
