"""`pymoe check`: build a layer for a preset, run it on CPU, compare with the reference."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from . import reference
from .config import ACTIVATIONS, get_preset
from .layer import MoELayer
from .weights import MoEWeights

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def check_preset(name: str, tokens: int | None = None, dtype: str = "float32", seed: int = 0) -> bool:
    """Run the preset's layer (shape, router, biases, shared expert) with each expert
    activation; print a table; True if all pass."""
    preset = get_preset(name)
    tokens = preset.tokens[0] if tokens is None else tokens
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    console = Console()
    base = preset.config
    table = Table(title=f"pymoe check: {name} ({tokens} tokens, d_model {base.d_model}, {dtype}, CPU)")
    for col in ("experts", "compile s", "run s", "rel. error vs float64", "tolerance", "result"):
        table.add_column(col)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, base.d_model), dtype=np.float32)
    all_ok = True
    for activation in ACTIVATIONS:
        config = dataclasses.replace(base, activation=activation)
        weights = MoEWeights.random(config, seed=seed)
        with console.status(f"compiling the {activation} layer graph (first time: ~15-60 s)"):
            layer = MoELayer(config, weights, dtype=dtype)
        start = time.perf_counter()
        out = layer(x)
        run_s = time.perf_counter() - start
        with console.status("float64 reference"):
            ref = reference.moe_layer(x, weights, config).out
        err = reference.relative_error(out, ref)
        ok = err < TOLERANCE[dtype]
        all_ok &= ok
        table.add_row(
            f"{activation}, top-{config.top_k} of {config.num_experts}",
            f"{layer.compile_seconds:.1f}",
            f"{run_s:.4f}",
            f"{err:.2e}",
            f"{TOLERANCE[dtype]:.0e}",
            "[green]pass[/]" if ok else "[red]FAIL[/]",
        )
    console.print(table)
    console.print("'run s' is one call right after compiling, not a benchmark.")
    return all_ok
