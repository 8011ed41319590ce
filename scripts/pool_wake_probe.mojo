# What waking the CPU kernels' worker pool costs (issue 23: why a batch-1 native host call runs
# in one parallel region, pymoe/offload/host_ffn.mojo): the time of 1 or 2 sync_parallelize
# regions of a no-op on every worker, back to back, after 0-5 ms of idle before each sample
# (a host worker waits about a decode layer's GPU time between calls). Prints median, 10th and
# 90th percentile of 60 samples per case, in microseconds.
#
#   mojo run scripts/pool_wake_probe.mojo
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from std.time import perf_counter_ns, sleep


def main() raises:
    var workers = parallelism_level(None)
    print("workers", workers)
    var sink = List[Int](length=workers, fill=0)
    var sp = sink.unsafe_ptr()
    for gap_us in [0, 1000, 2000, 5000]:
        for regions in [1, 2]:
            var samples = List[Int]()
            for _ in range(60):
                if gap_us > 0:
                    sleep(Float64(gap_us) / 1e6)
                var t0 = perf_counter_ns()
                for r in range(regions):
                    def work(i: Int) {var sp, var r}:
                        sp.unsafe_store(i, sp.unsafe_load(i) + r + 1)
                    sync_parallelize(work, workers)
                samples.append(Int(perf_counter_ns() - t0))
            sort(samples)
            print("gap_us", gap_us, "regions", regions, "median_us", Float64(samples[30]) / 1000.0,
                  "p10_us", Float64(samples[6]) / 1000.0, "p90_us", Float64(samples[54]) / 1000.0)
    _ = sink^  # the workers wrote through sp: it lives to here (Mojo destroys a value after its last use)
