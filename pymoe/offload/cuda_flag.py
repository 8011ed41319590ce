"""A value in pinned host memory shared by the host and a CUDA stream, through the CUDA
driver's stream memory operations.

`wait`: the stream's next operations wait (cuStreamWaitValue32) until the host has written a
value at least as large: a host thread releases GPU work queued ahead of time, and the
issuing thread never blocks (scripts/host_handoff_probe.py times it against the hybrid
engine's thread hand-off). `write`: the stream writes a value once its earlier work is done
(cuStreamWriteValue32, with a memory barrier): a host thread spinning on `address` (e.g.
host_ffn.mojo's ffn_when) learns that the stream's copies to host memory are done without a
thread woken by the CUDA driver."""

from __future__ import annotations

import ctypes

import torch

CU_STREAM_WAIT_VALUE_GEQ = 0
CU_STREAM_WRITE_VALUE_DEFAULT = 0  # with a memory barrier: the stream's earlier writes are visible first


class HostFlag:
    """An int32 in pinned host memory that the host sets and a CUDA stream can wait for."""

    def __init__(self):
        self.flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.host = self.flag.numpy()
        self.address = self.flag.data_ptr()  # where a host thread reads it
        lib = ctypes.CDLL("libcuda.so.1")
        self._wait = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self._write = getattr(lib, "cuStreamWriteValue32_v2", None) or lib.cuStreamWriteValue32
        self._write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
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

    def write(self, stream: torch.cuda.Stream, value: int) -> None:
        """`stream` writes value into the flag once its earlier work is done."""
        code = self._write(ctypes.c_void_p(stream.cuda_stream), self.device_ptr, value, CU_STREAM_WRITE_VALUE_DEFAULT)
        if code != 0:
            raise RuntimeError(f"cuStreamWriteValue32 failed (CUresult {code}): stream memory operations unsupported?")

    def set(self, value: int) -> None:
        self.host[0] = value  # after the output's stores: x86 keeps stores in order
