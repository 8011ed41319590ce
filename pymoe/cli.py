"""The `pymoe` command line. Commands only parse arguments and call library functions."""

from __future__ import annotations

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


if __name__ == "__main__":
    main()
