"""The machine's physical limits, measured in the same run as the benchmark.

- matmul peak: a large square matmul through PyTorch (its BLAS is the best
  matmul on the machine we can call), in the benchmark's dtype;
- copy bandwidth: a large tensor copy, counted as bytes read + bytes written;
- read bandwidth: a large sum-reduction, bytes read only. Decode reads the
  weights once and writes little, so its roofline floor uses this one;
- MAX graph call: the time of one call of a MAX graph that does almost
  nothing (x + x on a [32, 1024] float32 tensor), made the way MoELayer
  makes its calls (input shared or copied into a device buffer, execute,
  output wrapped). No MAX implementation can take less per call, so for
  small decode batches it is a floor beside the roofline.
"""

from __future__ import annotations

import torch

from .timing import device_sync, measure, summarize

MATMUL_N = {"cpu": 4096, "gpu": 8192}
STREAM_BYTES = {"cpu": 512 * 2**20, "gpu": 2 * 2**30}


def _matmul_times(n: int, tdev: str, dtype: torch.dtype, min_seconds: float, sync) -> dict:
    a = torch.randn(n, n, device=tdev).to(dtype)
    b = torch.randn(n, n, device=tdev).to(dtype)
    return summarize(measure(lambda: a @ b, min_seconds=min_seconds, sync=sync))


def _stream_times(elems: int, tdev: str, min_seconds: float, sync) -> tuple[dict, dict]:
    src = torch.ones(elems, device=tdev)
    dst = torch.empty_like(src)
    copy = summarize(measure(lambda: dst.copy_(src), min_seconds=min_seconds, sync=sync))
    read = summarize(measure(lambda: src.sum(), min_seconds=min_seconds, sync=sync))
    return copy, read


MAX_CALL_SHAPE = (32, 1024)


def max_call_graph_spec(device: str):
    """The graph whose call time is the MAX-call floor: x + x on [tokens, 1024] float32."""
    from ..runtime import GraphSpec

    def build(name, module):
        from max.graph import Graph, TensorType

        from ..dtypes import max_dtype
        from ..runtime import device_ref

        input_types = [TensorType(max_dtype("float32"), ["tokens", MAX_CALL_SHAPE[1]], device_ref(device))]
        with Graph(name, input_types=input_types, module=module) as g:
            x = g.inputs[0].tensor
            g.output(x + x)
        return g

    return GraphSpec(("max_call_floor", device), device, build)


def _max_call_times(device: str, tdev: str, min_seconds: float, sync) -> dict:
    from ..runtime import compiled, driver_device, to_device_buffer, wrap_output

    model, _ = compiled(max_call_graph_spec(device))
    dev = driver_device(device)
    x = torch.randn(*MAX_CALL_SHAPE, device=tdev)

    def call():
        return wrap_output(model.execute(to_device_buffer(x, "float32", dev))[0], x)

    # The first calls of a process pay MAX's start-up (seen on the H100: a
    # median of 0.73 ms in the first graph's first 30 calls, 0.19 ms later).
    return summarize(measure(call, warmup=20, min_reps=100, max_reps=1000, min_seconds=min_seconds, sync=sync))


def measure_ceilings(device: str = "cpu", dtype: torch.dtype = torch.float32, min_seconds: float = 1.0) -> dict:
    tdev = "cuda" if device == "gpu" else "cpu"
    sync = device_sync(device)
    n = MATMUL_N[device]
    elems = STREAM_BYTES[device] // 4
    # One after the other, so the matmul operands are freed before the large
    # stream buffers are allocated.
    mm = _matmul_times(n, tdev, dtype, min_seconds, sync)
    copy, read = _stream_times(elems, tdev, min_seconds, sync)
    call = _max_call_times(device, tdev, min_seconds, sync)
    flops, nbytes = 2 * n**3, elems * 4
    return {
        "matmul": {
            **mm,
            "shape": [n, n, n],
            "dtype": str(dtype).removeprefix("torch."),
            "via": "torch.matmul",
            "gflops": flops / mm["median_s"] / 1e9,
        },
        "copy": {**copy, "bytes": 2 * nbytes, "via": "torch copy_ (read + write)",
                 "gbps": 2 * nbytes / copy["median_s"] / 1e9},
        "read": {**read, "bytes": nbytes, "via": "torch sum (read only)", "gbps": nbytes / read["median_s"] / 1e9},
        "max_call": {**call, "shape": list(MAX_CALL_SHAPE),
                     "via": "MAX graph computing x + x, called as MoELayer calls"},
    }
