"""A value in pinned host memory that the host writes and a CUDA stream waits for, on the GPU.

What lets a host thread release GPU work it has queued ahead of time: the stream's next
operations wait (cuStreamWaitValue32, a CUDA driver stream memory operation) until the host
has written a value at least as large; the issuing thread never blocks. Used by
scripts/host_handoff_probe.py to time a GPU-side wait for the hybrid engine's host output
against the engine's thread hand-off (issue 23)."""

from __future__ import annotations

import ctypes

import torch

CU_STREAM_WAIT_VALUE_GEQ = 0


class HostFlag:
    """An int32 in pinned host memory that the host sets and a CUDA stream can wait for."""

    def __init__(self):
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.host = self.flag.numpy()
        lib = ctypes.CDLL("libcuda.so.1")
        self._wait = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        get_ptr = lib.cuMemHostGetDevicePointer_v2
        get_ptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        dptr = ctypes.c_uint64()
        code = get_ptr(ctypes.byref(dptr), ctypes.c_void_p(self.flag.data_ptr()), 0)
        if code != 0:
            raise RuntimeError(f"cuMemHostGetDevicePointer failed (CUresult {code})")
        self.device_ptr = dptr.value

    def wait(self, stream: torch.cuda.Stream, value: int) -> None:
        """`stream` waits (on the GPU) until the flag is >= value."""
        code = self._wait(ctypes.c_void_p(stream.cuda_stream), self.device_ptr, value, CU_STREAM_WAIT_VALUE_GEQ)
        if code != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed (CUresult {code}): stream memory operations unsupported?")

    def set(self, value: int) -> None:
        self.host[0] = value  # after the output's stores: x86 keeps stores in order
