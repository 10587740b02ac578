"""The dtypes a span computes in, by the names the CLI, the DHT records and the wire give them.

Importing this module costs no torch import (a CLI's `--help` lists the names); turning a
name into a torch dtype imports torch then.
"""

from __future__ import annotations

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """`torch.bfloat16` for "bfloat16"; refuses names that are not compute dtypes."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: {', '.join(COMPUTE_DTYPES)}")
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """"bfloat16" for `torch.bfloat16`; refuses dtypes that are not compute dtypes."""
    name = str(dtype).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of: {', '.join(COMPUTE_DTYPES)}")
    return name
