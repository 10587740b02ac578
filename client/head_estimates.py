"""Two ways to read a float32 LM head in int8, each with a rigorous bound on every logit's error.

`client/greedy_head.py` screens the head with one of these: it computes exactly, from the float
weights, only the tokens whose bound still lets them be the largest. Both store the head's row i
as codes c_i = round(W_i / s_i), s_i >= max|W_i| / 127, so each weight is off by at most s_i / 2
and, for the head's input x, the codes' part of the error is at most s_i |x|_1 / 2. They differ
in how x enters the kernel:

- `Int8Activations` (fbgemm's int8 x int8 linear, VNNI where the CPU has it): x is read in two
  int8 levels, so the kernel's integer sums are exact. Row r is scaled by m_r = max|x_r| / 63:
  q1 = round(x_r / m_r) and q2 = round((x_r / m_r - q1) K), K = 126, both within [-63, 63] (7
  bits: no int16 saturation on CPUs without VNNI). The logits are m_r (y1 + y2 / K); the input is
  then off by e_r = x_r - m_r (q1 + q2 / K), at most m_r / 252 an entry, and its part of the
  error is at most s_i |c_i|_1 max|e_r| (the codes' L1 norm, kept per row). 0.9 ms a step for
  the default model on one core of this box (2 rows of 49152 x 576), against 3.9 for the next.
- `BFloat16Activations` (`torch.ops.aten._weight_int8pack_mm`, any CPU torch runs on): x enters
  in bfloat16, each entry off by at most 2^-9 |x_k|; the output is bfloat16, off by at most 2^-9
  of itself. Bound: s_i |x|_1 (1/2 + 127 / 2^9 + slack) + |approx_i| / 2^7.

Each estimate returns the approximate logits and the bound, both (rows, vocab). The float32 head
the screen is checked against rounds its own sums too (576 terms: about 2^-15 of s_i |x|_1 at
worst); the slack in the weight term covers that.
"""

from __future__ import annotations

import warnings

import torch

# The codes' rounding (1/2) with room for float32 rounding in the reference head (see above).
CODE_ROUNDING = 0.5 + 2.0**-6
# Per-row error per unit of s_i |x|_1 for bfloat16 input: the codes (1/2) + bfloat16 input
# (127 / 2^9 = 0.248) + float32 sums (576 terms: 0.005), rounded up.
BF16_WEIGHT_BOUND = 0.8
BF16_OUTPUT_BOUND = 2.0**-7  # the kernel's bfloat16 output, twice over
# The second level's resolution: q2 = round(residual * K) must stay within [-63, 63].
LEVEL = 126
# Float32 rounding in the kernel's scaling and in m_r (y1 + y2 / K), per unit of m_r s_i |c_i|_1:
# a few roundings of 2^-24 of at most 64 m_r s_i |c_i|_1, with room to spare.
FLOAT_SLACK = 2.0**-14


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (vocab, hidden), scales float32 (vocab,)): scales rounded up to bfloat16, which
    `_weight_int8pack_mm` multiplies by exactly; no code leaves [-127, 127]."""
    scales = (weight.abs().amax(dim=1) / 127 * (1 + 2.0**-7)).clamp_min(1e-30).to(torch.bfloat16).float()
    codes = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


class Int8Activations:
    """The head as fbgemm's packed int8 weights; the input read in two int8 levels."""

    def __init__(self, weight: torch.Tensor) -> None:
        codes, scales = int8_codes(weight)
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; the kernel is current
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(
                codes, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.kernel = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
        self.code_bound = scales * CODE_ROUNDING
        self.input_bound = scales * codes.abs().sum(dim=1, dtype=torch.int32).float()

    def estimate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        unit, high, low = _levels(hidden)
        # Integers in, scale 1 and zero point 64: the kernel's uint8 codes are q + 64, in [1, 127].
        out = self.kernel(torch.cat([high, low]), 1.0, 64, self.packed)
        approx = out[:rows].add_(out[rows:], alpha=1 / LEVEL).mul_(unit)
        off = (hidden.double() - _read(unit, high, low)).abs().amax(dim=1, keepdim=True).float() + unit * FLOAT_SLACK
        bound = torch.addcmul(self.code_bound * hidden.abs().sum(dim=1, keepdim=True), self.input_bound, off)
        return approx, bound

    def computes_as_assumed(self, weight: torch.Tensor, hidden: torch.Tensor, approx: torch.Tensor,
                            bound: torch.Tensor, exact: torch.Tensor) -> bool:
        """Whether the kernel's sums are the exact integer sums the bound assumes, to float32
        rounding: against the same sums in float64 (the codes made again: kept, they would
        double the copy's memory for a check run once)."""
        codes, scales = int8_codes(weight)
        unit, high, low = _levels(hidden)
        exact = (_read(unit, high, low) @ codes.double().T) * scales.double()
        allowed = unit.double() * self.input_bound.double() * FLOAT_SLACK / 2
        return bool(((approx.double() - exact).abs() <= allowed).all())


def _levels(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m_r, q1, q2 of the module docstring: the input's two int8 levels, as floats."""
    unit = (hidden.abs().amax(dim=1, keepdim=True) / 63).clamp_min(1e-30)
    scaled = hidden / unit
    high = torch.round(scaled).clamp_(-63, 63)
    return unit, high, torch.round((scaled - high) * LEVEL).clamp_(-63, 63)


def _read(unit: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The input as the kernel reads it (float64): m_r (q1 + q2 / K)."""
    return unit.double() * (high.double() + low.double() / LEVEL)


class BFloat16Activations:
    """The head as int8 codes for `_weight_int8pack_mm`; the input in bfloat16."""

    # torch's kernel reads the hidden size in blocks: measured with torch 2.13, sizes that are not
    # a multiple of 16 give wrong sums (8, 24, 40) or crash the process (7, 100). Every released
    # LLM's hidden size is a multiple of 64.
    hidden_multiple = 64

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.shape[1] % self.hidden_multiple:
            raise NotImplementedError(f"hidden size {weight.shape[1]} is not a multiple of {self.hidden_multiple}")
        self.codes, scales = int8_codes(weight)
        self.bf16_scales = scales.to(torch.bfloat16)
        self.bound_scales = scales * BF16_WEIGHT_BOUND

    def estimate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        approx = torch.ops.aten._weight_int8pack_mm(hidden.to(torch.bfloat16), self.codes, self.bf16_scales).float()
        bound = torch.add(self.bound_scales * hidden.abs().sum(dim=1, keepdim=True), approx.abs(),
                          alpha=BF16_OUTPUT_BOUND)
        return approx, bound

    def computes_as_assumed(self, weight: torch.Tensor, hidden: torch.Tensor, approx: torch.Tensor,
                            bound: torch.Tensor, exact: torch.Tensor) -> bool:
        """Whether the kernel keeps within half its bound of the float head (`exact`). Its
        partial sums round to bfloat16 in ways torch does not document, so the bound's slack is
        measured rather than derived: a kernel that needs more than half of it is not trusted."""
        return bool(((approx - exact).abs() <= bound / 2).all())


# The estimates a screened head tries, fastest first.
ESTIMATES = (Int8Activations, BFloat16Activations)
