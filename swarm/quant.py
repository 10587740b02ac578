"""Quantized peers: a span's Linear weights stored in 8 or 4 bits, so one machine holds
about twice (int8) or three and a half times (nf4) as many blocks as in bfloat16.

Only the weights of the blocks' `nn.Linear` modules are quantized, in place after the span
is loaded; norms, rotary tables and the KV cache keep the span's dtype, and so does compute.

- ``int8``: weight-only, symmetric, a scale per 64 inputs of each row, with torch's own ops
  (`Int8Linear`, nothing to install). On CUDA, bitsandbytes' LLM.int8 (int8 matmul with
  outlier columns kept in 16 bits) when it is installed.
- ``nf4``: bitsandbytes' 4-bit NormalFloat (QLoRA's format), blocks of 64 with double-quantized
  scales; needs ``pip install 'swarmlm[quant]'``; runs on CPU and CUDA.

Every replacement is an `nn.Linear` subclass, so tuning methods that hook the blocks' linears
(LoRA, IA3) find and hook them as before, and gradients flow through them to the inputs, deep
prompts and adapter tensors; the weights themselves never need one.
"""

from __future__ import annotations

import importlib.util
import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .heap import release_freed_memory

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("none", "int8", "nf4")
# Inputs per int8 scale. Measured on the default model (benchmarks/quant.py prompts, float32):
# one scale per row keeps greedy decoding identical for 65% of 32-token positions, groups of
# 64 for 90%, at 6% more memory (a float32 scale per 64 bytes).
GROUP_SIZE = 64
INSTALL_HINT = "pip install 'swarmlm[quant]' (bitsandbytes)"


class QuantizationError(ValueError):
    """A quantization this device or installation cannot do; says what would work."""


class Int8Linear(nn.Linear):
    """Weight-only int8 linear with torch's own ops: y = x @ dequantize(codes, scales).T + bias.

    Symmetric absmax codes in [-127, 127] with one float32 scale per GROUP_SIZE consecutive
    inputs of each output row (per row when the input size is not a multiple of it). The
    weight is dequantized into the input's dtype at every call, so Forward, Backward's
    recomputation and inference steps compute the same function, and autograd reaches the
    inputs through a plain `F.linear`; the float copy lives only for that one call.

    A subclass of `nn.Linear` (with its in/out features and bias) so that adapter hooks find
    it, but it holds no float weight.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.out_features, self.in_features = codes.shape
        if scales.shape[0] != self.out_features or self.in_features % scales.shape[1]:
            raise ValueError(f"scales {tuple(scales.shape)} do not split codes {tuple(codes.shape)} into groups")
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE) -> Int8Linear:
        weight = linear.weight.detach().float()
        rows, columns = weight.shape
        group = group_size if columns % group_size == 0 else columns
        grouped = weight.view(rows, columns // group, group)
        # Each group's largest weight maps to +-127 exactly; an all-zero group gets scale 1
        # (its codes are 0 anyway) instead of a division by zero.
        scales = grouped.abs().amax(dim=2) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(grouped / scales[:, :, None]).clamp_(-127, 127).to(torch.int8).view(rows, columns)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(codes, scales, bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        rows, columns = self.codes.shape
        grouped = self.codes.view(rows, self.scales.shape[1], -1).to(dtype)
        return (grouped * self.scales.to(dtype)[:, :, None]).view(rows, columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        group = self.in_features // self.scales.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 in groups of {group}")


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _bitsandbytes() -> ModuleType:
    # bitsandbytes logs a failed optional-kernel lookup at import on CPU; its fallback works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def check_quant(quant: str, device: torch.device | str) -> None:
    """Raises QuantizationError if `quant` cannot run on `device` with what is installed."""
    device = torch.device(device)
    if quant not in QUANT_CHOICES:
        raise QuantizationError(f"quantization {quant!r} is not one of {', '.join(QUANT_CHOICES)}")
    if device.type not in ("cpu", "cuda") and quant != "none":
        raise QuantizationError(f"quantization {quant} supports cpu and cuda, not {device.type}; use --quant none")
    if quant == "nf4" and not bitsandbytes_installed():
        raise QuantizationError(f"--quant nf4 needs bitsandbytes, which is not installed: {INSTALL_HINT}; "
                                "or use --quant int8, which needs nothing")


def default_backend(quant: str, device: torch.device) -> str:
    if quant == "nf4" or (device.type == "cuda" and bitsandbytes_installed()):
        return "bitsandbytes"
    return "torch"


def quantize_linear(linear: nn.Linear, quant: str, backend: str | None = None) -> nn.Linear:
    """A quantized replacement of `linear` on its device, computing in its dtype. `backend`
    ("torch" or "bitsandbytes") overrides the default: torch for int8 unless on CUDA with
    bitsandbytes installed, bitsandbytes for nf4."""
    device, dtype = linear.weight.device, linear.weight.dtype
    backend = backend or default_backend(quant, device)
    if quant == "int8" and backend == "torch":
        return Int8Linear.from_linear(linear).to(device)
    if backend != "bitsandbytes" or quant not in ("int8", "nf4"):
        raise QuantizationError(f"no {backend!r} backend for quantization {quant!r}; choose one of "
                                f"{', '.join(QUANT_CHOICES[1:])}")
    bnb = _bitsandbytes()
    has_bias = linear.bias is not None
    # Built on meta, so no float weight is allocated only to be replaced; bitsandbytes
    # quantizes a parameter as it moves to its device from CPU.
    if quant == "int8":
        # threshold 6: LLM.int8's outlier decomposition, as transformers' load_in_8bit uses it.
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().cpu(), requires_grad=False,
                                         has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False,
                                         quant_type="nf4").to(device)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def quantize_layers(layers: nn.Module, quant: str, backend: str | None = None) -> int:
    """Replaces every plain `nn.Linear` inside `layers` by its quantized version, in place;
    returns how many were replaced. ``"none"`` leaves them as they are."""
    if quant == "none":
        return 0
    device = next(layers.parameters()).device
    check_quant(quant, device)
    names = [name for name, module in layers.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = layers.get_submodule(parent) if parent else layers
        # One at a time: each float weight is freed before the next is quantized, so the peak
        # is the loaded span plus one layer's temporaries.
        setattr(owner, child, quantize_linear(getattr(owner, child), quant, backend))
    layers.requires_grad_(False)
    release_freed_memory()
    logger.info("quantized %d linear layers to %s (%s)", len(names), quant, backend or default_backend(quant, device))
    return len(names)


def _storages(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensor and what a quantized parameter keeps beside it (scales, code books)."""
    found = [tensor]
    scb = getattr(tensor, "SCB", None)  # bitsandbytes int8: one scale per row
    if isinstance(scb, torch.Tensor):
        found.append(scb)
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: block scales, code book
    while state is not None:
        found += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    return found


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, quantization state included; shared
    storages (tied or aliased tensors) count once."""
    seen: dict[int, int] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        for t in _storages(tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
