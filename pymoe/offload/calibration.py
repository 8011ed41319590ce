"""The simulator's cost model, measured: host->GPU transfer time of an expert (pinned and
pageable host memory) and the compute time of one expert FFN as a function of its tokens.

`measure_calibration` times both with PyTorch on the GPU when there is one (each transfer
synchronised on its own: what a single load costs; expert compute as the mean of 20 calls
queued back to back: what an engine running expert after expert sees); without a GPU it
measures the CPU's own host memory copies (recorded as both "pinned" and "pageable", and
labelled so) and the expert FFN on the CPU in float32. The file it writes
(`pymoe.calibration/1`) records the raw timings; the simulator reads the fitted values.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..baselines import expert_ffn
from .models import OffloadModel

SCHEMA = "pymoe.calibration/1"
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MEMORY_KINDS = ("pinned", "pageable")


class CalibrationError(ValueError):
    pass


@dataclass
class Calibration:
    data: dict
    path: str = "<memory>"

    @property
    def device(self) -> str:
        return self.data.get("device", "unknown")

    def transfer_ms(self, nbytes: int, memory: str = "pinned") -> float:
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        fit = self.data["transfer"][memory]
        return fit["latency_ms"] + nbytes / (fit["gbps"] * 1e9) * 1e3

    def compute_curve(self, model: OffloadModel):
        """tokens -> ms for one expert of this model's shape: linear interpolation between
        the measured token counts, linear extrapolation beyond the last two."""
        curves = self.data.get("compute", {})
        key = model.shape_key()
        if key not in curves:
            raise CalibrationError(
                f"calibration {self.path} has no compute timings for expert shape {key} (model {model.name}); "
                f"it has {sorted(curves)}. Run `pymoe calibrate --model {model.name}` to add them.")
        tokens = np.asarray(curves[key]["tokens"], dtype=float)
        ms = np.asarray(curves[key]["median_ms"], dtype=float)
        slope = (ms[-1] - ms[-2]) / (tokens[-1] - tokens[-2]) if len(tokens) > 1 else 0.0
        cache: dict[int, float] = {}

        def curve(n: int) -> float:
            if n not in cache:
                cache[n] = float(np.interp(n, tokens, ms)) if n <= tokens[-1] else float(ms[-1] + slope * (n - tokens[-1]))
            return cache[n]

        return curve


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"calibration {path}: no such file (run `pymoe calibrate` to write one)") from None
    except json.JSONDecodeError as err:
        raise CalibrationError(f"calibration {path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CalibrationError(f"calibration {path}: schema is not {SCHEMA}")
    for memory in MEMORY_KINDS:
        fit = data.get("transfer", {}).get(memory, {})
        if not (fit.get("gbps", 0) > 0 and fit.get("latency_ms", -1) >= 0):
            raise CalibrationError(f"calibration {path}: transfer.{memory} needs gbps > 0 and latency_ms >= 0")
    for key, curve in data.get("compute", {}).items():
        t, ms = curve.get("tokens", []), curve.get("median_ms", [])
        if len(t) < 1 or len(t) != len(ms) or list(t) != sorted(t) or not all(np.isfinite(ms)) or min(ms) <= 0:
            raise CalibrationError(f"calibration {path}: compute curve {key} is malformed")
    return Calibration(data, str(path))


def _fit_transfer(sizes: list[int], ms: list[float]) -> dict:
    """time = latency + bytes / bandwidth, least squares over the measured sizes."""
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(ms, float), 1)
    return {"gbps": float(1e-6 / slope), "latency_ms": float(max(intercept, 0.0))}


def time_calls(fn, reps: int, sync, inner: int = 1) -> list[float]:
    """reps samples of the time per call; each sample times `inner` calls issued back to
    back before one synchronisation (as an engine queues expert after expert on a stream)."""
    for _ in range(2):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3 / inner)
    return out


def measure_calibration(models: list[OffloadModel], *, tokens=DEFAULT_TOKENS, reps: int = 20,
                        progress=None) -> dict:
    """Measure transfers and expert compute on this machine (GPU if torch sees one)."""
    import torch

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    say = progress or (lambda msg: None)
    data: dict = {"schema": SCHEMA, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                  "transfer": {}, "compute": {}, "reps": reps}
    sizes = sorted({2**20, 4 * 2**20, 16 * 2**20, 64 * 2**20, *(m.expert_bytes for m in models)})
    for memory in MEMORY_KINDS:
        raw = {}
        for size in sizes:
            say(f"transfer {memory} {size / 2**20:.1f} MiB")
            src = torch.empty(size, dtype=torch.uint8, pin_memory=gpu and memory == "pinned")
            src.fill_(1)
            dst = torch.empty(size, dtype=torch.uint8, device="cuda" if gpu else "cpu")
            raw[size] = time_calls(lambda: dst.copy_(src, non_blocking=memory == "pinned"), reps, sync)
        medians = [float(np.median(raw[s])) for s in sizes]
        data["transfer"][memory] = {
            **_fit_transfer(sizes, medians),
            "what": ("host->GPU copy" if gpu else "host memory copy (no GPU: CPU stand-in)"),
            "sizes_bytes": sizes, "median_ms": medians, "raw_ms": [raw[s] for s in sizes],
        }
    for model in models:
        dtype = getattr(torch, model.dtype) if gpu else torch.float32
        dev = "cuda" if gpu else "cpu"
        g = torch.Generator(device="cpu").manual_seed(0)
        w_in = (torch.randn(model.d_model, model.w_in_cols, generator=g) * 0.02).to(dev, dtype)
        w_out = (torch.randn(model.d_ff, model.d_model, generator=g) * 0.02).to(dev, dtype)

        curve = {"tokens": list(tokens), "median_ms": [], "raw_ms": [],
                 "dtype": str(dtype).replace("torch.", ""),
                 "what": f"PyTorch expert FFN on {dev}" + (", 20 calls back to back per sample" if gpu else "")}
        for n in tokens:
            say(f"compute {model.name} expert, {n} tokens")
            x = torch.randn(n, model.d_model, generator=g).to(dev, dtype)
            raw = time_calls(lambda: expert_ffn(x, w_in, w_out, model.activation), reps, sync, inner=20 if gpu else 1)
            curve["median_ms"].append(float(np.median(raw)))
            curve["raw_ms"].append(raw)
        data["compute"][model.shape_key()] = curve
    return data


def write_calibration(data: dict, path: str | Path, *, merge: bool = True) -> Path:
    """Write the file; with merge, compute curves already in an existing file for the same
    device are kept unless re-measured."""
    path = Path(path)
    if merge and path.is_file():
        old = json.loads(path.read_text())
        if old.get("device") == data.get("device"):
            data = {**data, "compute": {**old.get("compute", {}), **data["compute"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
