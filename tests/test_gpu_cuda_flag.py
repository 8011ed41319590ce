"""pymoe.offload.cuda_flag.HostFlag on a CUDA GPU: a stream's work queued behind a wait for the
flag runs only once the host has written a large enough value (skipped without a GPU)."""

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_stream_waits_for_the_host_flag():
    from pymoe.offload.cuda_flag import HostFlag

    flag = HostFlag()
    stream = torch.cuda.Stream()
    src = torch.arange(1024, dtype=torch.float32, pin_memory=True)
    dst = torch.zeros(1024, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        flag.wait(stream, 2)
        dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    flag.set(1)  # not enough
    time.sleep(0.05)
    assert not done.query(), "the copy ran before the flag reached its value"
    flag.set(2)
    done.synchronize()
    assert torch.equal(dst.cpu(), src)

