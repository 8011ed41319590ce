# Kernel-only check of the GPU dispatch (kernels/moe_dispatch.mojo) against a CPU counting sort,
# and its time beside the per-expert dispatch it replaces (not in
# the repo: the GPU part of kernels/moe_dispatch.mojo at commit 4f19b73, _scan_capped_counts and
# dispatch_gpu, the latter renamed old_dispatch_gpu, in a file old_dispatch.mojo). Build:
#   mojo build -I . -I <folder of old_dispatch.mojo> --target-accelerator=sm_90a scripts/dispatch_kernel_check.mojo
# and run with Mojo's runtime libraries on LD_LIBRARY_PATH (as scripts/grouped_gemm_kernel_bench.mojo).
from kernels.moe_dispatch import dispatch_gpu
from old_dispatch import old_dispatch_gpu
from max.gpu.host import DeviceContext
from std.memory import Pointer
from std.time import perf_counter_ns

def P(addr: Int) -> Pointer[Int32, MutAnyOrigin]:
    return Pointer[Int32, MutAnyOrigin](unsafe_from_address=addr)

def check(ctx: DeviceContext, tokens: Int, k: Int, E: Int, capacity: Int, time_it: Bool = False) raises:
    var slots = tokens * k
    var h_ids = ctx.enqueue_create_host_buffer[DType.int32](slots)
    var h_sorted = ctx.enqueue_create_host_buffer[DType.int32](slots)
    var h_off = ctx.enqueue_create_host_buffer[DType.int32](E + 1)
    var h_rows = ctx.enqueue_create_host_buffer[DType.int32](slots)
    ctx.synchronize()
    var st: UInt64 = 12345 + UInt64(slots)
    for s in range(slots):
        st = st * 6364136223846793005 + 1442695040888963407
        # skewed: a third of the slots go to expert 3 (hot expert), some out of range
        var r = Int((st >> 33) % UInt64(3 * (E + 1)))
        var e = r if r <= E else (3 if r % 2 == 0 else r % (E + 1))
        h_ids[s] = Int32(e - (1 if s % 97 == 5 else 0))
    var d_ids = ctx.enqueue_create_buffer[DType.int32](slots)
    var d_sorted = ctx.enqueue_create_buffer[DType.int32](slots)
    var d_off = ctx.enqueue_create_buffer[DType.int32](E + 1)
    var d_rows = ctx.enqueue_create_buffer[DType.int32](slots)
    ctx.enqueue_copy(d_ids, h_ids)
    var ps = Int(d_sorted.unsafe_ptr())
    var po = Int(d_off.unsafe_ptr())
    var pr = Int(d_rows.unsafe_ptr())
    var pi = Int(d_ids.unsafe_ptr())
    dispatch_gpu(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
    ctx.enqueue_copy(h_sorted, d_sorted)
    ctx.enqueue_copy(h_off, d_off)
    ctx.enqueue_copy(h_rows, d_rows)
    ctx.synchronize()
    var fill = List[Int](length=E, fill=0)
    for s in range(slots):
        var e = Int(h_ids[s])
        if e >= 0 and e < E:
            fill[e] += 1
    var off = List[Int](length=E + 1, fill=0)
    for e in range(E):
        off[e + 1] = off[e] + min(fill[e], capacity)
        fill[e] = 0
    var bad = 0
    for e in range(E + 1):
        if Int(h_off[e]) != off[e]:
            bad += 1
    for s in range(slots):
        var e = Int(h_ids[s])
        var want = -1
        if e >= 0 and e < E and fill[e] < capacity:
            want = off[e] + fill[e]
            fill[e] += 1
            if Int(h_sorted[want]) != s // k:
                bad += 1
        if Int(h_rows[s]) != want:
            bad += 1
    for r in range(off[E], slots):
        if Int(h_sorted[r]) != 0:
            bad += 1
    var line = String("tokens ", tokens, " k ", k, " E ", E, " cap ", capacity, " mismatches ", bad)
    if time_it:
        var reps = 50
        for which in range(2):
            for _ in range(3):
                if which == 0:
                    old_dispatch_gpu(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
                else:
                    dispatch_gpu(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
            ctx.synchronize()
            var t0 = perf_counter_ns()
            for _ in range(reps):
                if which == 0:
                    old_dispatch_gpu(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
                else:
                    dispatch_gpu(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
            ctx.synchronize()
            var us = Float64(perf_counter_ns() - t0) / 1000.0 / Float64(reps)
            line += String(" | ", "old" if which == 0 else "new", " us/call ", us)
    print(line)

def main() raises:
    var ctx = DeviceContext()
    check(ctx, 1, 8, 128, 8)
    check(ctx, 16, 8, 128, 128)
    check(ctx, 32, 8, 256, 256)
    check(ctx, 33, 8, 256, 256)
    check(ctx, 40, 8, 512, 320)
    check(ctx, 128, 2, 8, 40)
    check(ctx, 300, 2, 8, 1000)
    check(ctx, 1000, 8, 128, 70)
    check(ctx, 333, 8, 512, 2664)
    check(ctx, 129, 8, 128, 2, True)
    check(ctx, 1000, 1, 3, 1000)
    check(ctx, 128, 8, 128, 1024, True)
    check(ctx, 4096, 8, 128, 32768, True)
    check(ctx, 4096, 4, 32, 16384, True)
    check(ctx, 16384, 8, 128, 131072, True)
    check(ctx, 16384, 8, 128, 1100, True)
    check(ctx, 16384, 8, 256, 131072, True)
    check(ctx, 16384, 2, 8, 32768, True)
    check(ctx, 131072, 8, 128, 1048576, True)
