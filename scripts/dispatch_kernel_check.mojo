# Kernel-only check of the GPU dispatch (kernels/moe_dispatch.mojo) against a CPU counting sort,
# both of its paths (one kernel of one block; three kernels over slot ranges) in every case where
# they apply (and the few-slots kernel up to 256 slots), and their times side by side, which set
# ONE_BLOCK_DISPATCH_SLOTS and FEW_DISPATCH_SLOTS. Build:
#   mojo build -I . --target-accelerator=sm_90a scripts/dispatch_kernel_check.mojo
# and run with Mojo's runtime libraries on LD_LIBRARY_PATH (as scripts/grouped_gemm_kernel_bench.mojo).
from kernels.moe_dispatch import dispatch_gpu_few_slots, dispatch_gpu_one_block, dispatch_gpu_ranges
from max.gpu.host import DeviceContext
from std.memory import Pointer
from std.time import perf_counter_ns

def P(addr: Int) -> Pointer[Int32, MutAnyOrigin]:
    return Pointer[Int32, MutAnyOrigin](unsafe_from_address=addr)

def run_path(ctx: DeviceContext, path: Int, ps: Int, po: Int, pr: Int, pi: Int, slots: Int, k: Int, E: Int, capacity: Int) raises:
    if path == 0:
        dispatch_gpu_one_block(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
    elif path == 2:
        dispatch_gpu_few_slots(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)
    else:
        dispatch_gpu_ranges(ctx, P(ps), P(po), P(pr), P(pi), slots, k, E, capacity)


def check(ctx: DeviceContext, tokens: Int, k: Int, E: Int, capacity: Int, time_it: Bool = False) raises:
    var line = String("tokens ", tokens, " k ", k, " E ", E, " cap ", capacity)
    for path in range(3):
        if path == 1 and tokens * k < E:
            continue  # the ranges path needs at least E slots
        if path == 2 and tokens * k > 256:
            continue  # the few-slots path: O(slots^2) ranks
        line += check_path(ctx, path, tokens, k, E, capacity, time_it)
    print(line)


def check_path(ctx: DeviceContext, path: Int, tokens: Int, k: Int, E: Int, capacity: Int, time_it: Bool) raises -> String:
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
    run_path(ctx, path, ps, po, pr, pi, slots, k, E, capacity)
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
    var line = String(" | ", "one-block" if path == 0 else ("ranges" if path == 1 else "few-slots"), " mismatches ", bad)
    if time_it:
        var reps = 50
        for _ in range(3):
            run_path(ctx, path, ps, po, pr, pi, slots, k, E, capacity)
        ctx.synchronize()
        var t0 = perf_counter_ns()
        for _ in range(reps):
            run_path(ctx, path, ps, po, pr, pi, slots, k, E, capacity)
        ctx.synchronize()
        line += String(" us/call ", Float64(perf_counter_ns() - t0) / 1000.0 / Float64(reps))
    # Mojo destroys a value after its last use: the buffers whose addresses the kernels were
    # given live to here.
    _ = d_ids^
    _ = d_sorted^
    _ = d_off^
    _ = d_rows^
    return line

def main() raises:
    var ctx = DeviceContext()
    check(ctx, 1, 8, 128, 8, True)
    check(ctx, 4, 8, 128, 32, True)
    check(ctx, 16, 8, 128, 128, True)
    check(ctx, 32, 8, 128, 256, True)
    check(ctx, 64, 8, 128, 512, True)
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
    check(ctx, 256, 8, 128, 2048, True)
    check(ctx, 512, 8, 128, 4096, True)
    check(ctx, 1024, 8, 128, 8192, True)
    check(ctx, 128, 8, 256, 1024, True)
    check(ctx, 512, 4, 32, 2048, True)
    check(ctx, 2048, 2, 8, 4096, True)
    check(ctx, 4096, 8, 128, 32768, True)
    check(ctx, 4096, 4, 32, 16384, True)
    check(ctx, 16384, 8, 128, 131072, True)
    check(ctx, 16384, 8, 128, 1100, True)
    check(ctx, 16384, 8, 256, 131072, True)
    check(ctx, 16384, 2, 8, 32768, True)
    check(ctx, 131072, 8, 128, 1048576, True)
