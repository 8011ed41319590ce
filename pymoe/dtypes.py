"""Dtypes by name: the one map from pymoe's dtype strings to their sizes and to PyTorch and MAX dtypes.

The layer and its kernels take "float32" and "bfloat16" (LAYER_DTYPES); the offloading
models also size experts in "float16". PyTorch and MAX are imported on first use, so
that the offloading tools run where MAX is not installed.
"""

from __future__ import annotations

LAYER_DTYPES = ("float32", "bfloat16")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _check(dtype: str) -> str:
    if dtype not in ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(ITEMSIZE)}")
    return dtype


def itemsize(dtype: str) -> int:
    """Bytes of one element of `dtype`."""
    return ITEMSIZE[_check(dtype)]


def torch_dtype(dtype: str):
    """The torch.dtype called `dtype`."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[_check(dtype)]


def max_dtype(dtype: str):
    """The max.dtype.DType called `dtype`."""
    from max.dtype import DType

    return {"float32": DType.float32, "bfloat16": DType.bfloat16, "float16": DType.float16}[_check(dtype)]


def dtype_name(dtype) -> str:
    """The name of a MAX DType or a torch.dtype, as the maps above spell it."""
    name = str(dtype).removeprefix("torch.").removeprefix("DType.")
    return _check(name)
