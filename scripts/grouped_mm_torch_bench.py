"""torch._grouped_mm alone at the expert GEMM shapes of scripts/grouped_gemm_kernel_bench.mojo (random top-k
routing, rows already grouped), beside the bf16 matmul peak: the kernel-level baseline for pymoe's grouped GEMM.
Run on a GPU machine: `OUT=<folder> python3 scripts/grouped_mm_torch_bench.py` (writes gmm_torch.json there).
Times: median of 20 CUDA-event-timed calls after 3 warm-ups."""

import json
import os
import statistics

import torch

# (name, E, K, N, tokens, top-k): N counts gate and up columns for the gated projections.
CASES = [
    ("qwen3-up", 128, 2048, 1536, 4096, 8), ("qwen3-down", 128, 768, 2048, 4096, 8),
    ("qwen3-up", 128, 2048, 1536, 16384, 8), ("qwen3-down", 128, 768, 2048, 16384, 8),
    ("mixtral-up", 8, 4096, 28672, 16384, 2), ("mixtral-down", 8, 14336, 4096, 16384, 2),
    ("gptoss20-up", 32, 2880, 5760, 4096, 4), ("qwen3-up", 128, 2048, 1536, 1024, 8),
    ("qwen3-up", 128, 2048, 1536, 2048, 8),
]


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    x, y = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: x @ y)
    print(f"peak mm 8192^3: {ms:.3f} ms = {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s", torch.cuda.get_device_name())
    out = []
    for name, experts, k_dim, n, tokens, top_k in CASES:
        ids = torch.stack([torch.randperm(experts, device=dev)[:top_k] for _ in range(tokens)]).flatten()
        offs = torch.cumsum(torch.bincount(ids, minlength=experts), 0).to(torch.int32)
        rows = tokens * top_k
        a = torch.randn(rows, k_dim, device=dev, dtype=torch.bfloat16)
        w = torch.randn(experts, k_dim, n, device=dev, dtype=torch.bfloat16) / k_dim**0.5
        w_colmajor = w.transpose(1, 2).contiguous().transpose(1, 2)  # the layout _grouped_mm may prefer
        result = {}
        for label, weights in (("rowmajor", w), ("colmajor", w_colmajor)):
            try:
                call = lambda a=a, weights=weights, offs=offs: torch._grouped_mm(a, weights, offs=offs)  # noqa: E731
                result[label] = median_ms(call)
            except Exception as e:  # noqa: BLE001 - record what failed and go on
                result[label] = repr(e)[:80]
        flops = 2 * rows * k_dim * n
        shown = {lab: f"{v:.3f} ms {flops / v / 1e9:.0f} TF" if isinstance(v, float) else v
                 for lab, v in result.items()}
        print(name, "tokens", tokens, shown)
        out.append(dict(name=name, E=experts, K=k_dim, N=n, tokens=tokens, k=top_k, ms=result, flops=flops))
    path = os.path.join(os.environ.get("OUT", "."), "gmm_torch.json")
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cases=out), f, indent=1)


if __name__ == "__main__":
    main()
