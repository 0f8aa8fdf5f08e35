"""Which kernel serves which scheme: the table QuantLinear's triton backend looks schemes up in.

Each entry says which schemes it serves (a predicate on the Scheme, so a custom scheme with a
preset's exact weight and activation settings is served too; `schemes` lists the presets), how
it packs a QuantizedTensor weight into plain tensors (what the module keeps, no float copy), its
matmul (the Triton kernels, activation quantization included) and its plain-torch reference of
the same function, and the `python -m quantlab.kernels.bench` kernels that benchmark it.

    entry = find(scheme)                  # None: no kernel, the layer stays on the reference path
    packed = entry.pack(qweight)          # {name: Tensor}
    y = entry.matmul(x, packed, scheme, input_scale)     # x (..., K) bf16/fp16 -> (..., N)
    y_ref = entry.reference(x, packed, scheme, input_scale)

This module imports no Triton code until a matmul runs (kernels load lazily), so the reference
backend works on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from quantlab.quantize import QuantizedTensor, quantize
from quantlab.schemes import PRESETS, Scheme

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class KernelEntry:
    name: str
    schemes: tuple[str, ...]      # the presets it serves
    packing: str                  # one line: the packed layout
    pack: Callable[[QuantizedTensor], dict[str, Tensor]]
    matmul: Callable[[Tensor, dict[str, Tensor], Scheme, Tensor | None], Tensor]
    reference: Callable[[Tensor, dict[str, Tensor], Scheme, Tensor | None], Tensor]
    bench: tuple[str, ...]        # kernel names of quantlab.kernels.bench

    def serves(self, scheme: Scheme) -> bool:
        """Same weight and activation settings as one of the presets listed."""
        return any(scheme.weights == PRESETS[s].weights
                   and scheme.activations == PRESETS[s].activations for s in self.schemes)


# ---- W4A16: int4 groups of 128, sym or asym (quantlab.kernels.w4a16) ----
def _int4(p: dict[str, Tensor]):
    from quantlab.kernels.w4a16 import Int4Weight

    # the group size follows from the shapes (no host sync, so CUDA graphs can capture the call)
    group = p["qweight"].shape[1] * 8 // p["scales"].shape[0]
    return Int4Weight(p["qweight"], p["scales"], p.get("zeros"), group)


def _pack_int4(q: QuantizedTensor) -> dict[str, Tensor]:
    from quantlab.kernels.w4a16 import from_quantized

    # scales in the model's dtype, as vLLM's GPTQ-Marlin and compressed-tensors loaders hold
    # them: for a bf16 model the kernel then takes its bf16 "pairs" dequantize
    w = from_quantized(q, q.dtype if q.dtype in (torch.bfloat16, torch.float16) else None)
    p = {"qweight": w.qweight, "scales": w.scales}
    if w.zeros is not None:
        p["zeros"] = w.zeros
    return p


def _w4a16(x, p, scheme, input_scale):
    from quantlab.kernels.w4a16 import w4a16_matmul

    return w4a16_matmul(x.contiguous(), _int4(p))


def _w4a16_ref(x, p, scheme, input_scale):
    from quantlab.kernels.w4a16 import w4a16_matmul_ref

    return w4a16_matmul_ref(x, _int4(p))


# ---- FP8 W8A8: tensor / token x channel / 128-block scales (quantlab.kernels.fp8_gemm) ----
def _pack_fp8(q: QuantizedTensor) -> dict[str, Tensor]:
    scales = q.scales.float().reshape(1) if q.scales.numel() == 1 else q.scales.float()
    return {"qweight": q.codes.view(FP8).contiguous(), "scales": scales.contiguous()}


def _fp8_act(x2: Tensor, scheme: Scheme, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """x2 (M, K) -> e4m3 codes (M, K) and the scales fp8_matmul expects, through the quantize
    kernels: per token; 1x128 groups as per-token rows of 128; a static per-tensor scale as one
    division and cast (one elementwise op, as vLLM's static fp8 quantize)."""
    from quantlab.kernels.quantize import quantize_per_token

    M, K = x2.shape
    if input_scale is not None and not scheme.activations.dynamic:
        s = input_scale.float().reshape(1)
        return (x2.float() / s).clamp(-448, 448).to(FP8), s
    if scheme.activations.group_size:
        g = scheme.activations.group_size
        q = quantize_per_token(x2.reshape(M * K // g, g), "e4m3")
        return q.codes.view(FP8).reshape(M, K), q.scales.reshape(M, K // g)
    q = quantize_per_token(x2, "e4m3")
    return q.codes.view(FP8), q.scales.reshape(M, 1)


def _fp8(x, p, scheme, input_scale):
    from quantlab.kernels.fp8_gemm import fp8_matmul

    K = x.shape[-1]
    xq, xs = _fp8_act(x.reshape(-1, K).contiguous(), scheme, input_scale)
    y = fp8_matmul(xq, xs, p["qweight"], p["scales"], out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def _fp8_ref(x, p, scheme, input_scale):
    from quantlab.kernels.fp8_gemm import fp8_matmul_ref

    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    scale = None if scheme.activations.dynamic else input_scale
    q = quantize(x2, scheme.activations, scale=scale)
    xs = q.scales.float().reshape(1) if q.scales.numel() == 1 else q.scales.float()
    y = fp8_matmul_ref(q.codes.view(FP8), xs, p["qweight"], p["scales"], out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], -1)


# ---- MXFP4 / NVFP4 weight-only (quantlab.kernels.fp4_gemm) ----
def _fp4w(p: dict[str, Tensor]):
    from quantlab.kernels.fp4_gemm import Fp4Weight

    kind = "nvfp4" if "global_scale" in p else "mxfp4"
    return Fp4Weight(p["qweight"], p["scales"], p.get("global_scale"), kind)


def _pack_fp4(q: QuantizedTensor) -> dict[str, Tensor]:
    from quantlab.kernels.fp4_gemm import pack_fp4

    w = pack_fp4(q)
    p = {"qweight": w.qweight, "scales": w.scales}
    if w.global_scale is not None:
        p["global_scale"] = w.global_scale
    return p


def _fp4(x, p, scheme, input_scale):
    from quantlab.kernels.fp4_gemm import fp4_matmul

    return fp4_matmul(x.contiguous(), _fp4w(p))


def _fp4_ref(x, p, scheme, input_scale):
    from quantlab.kernels.fp4_gemm import fp4_matmul_ref

    return fp4_matmul_ref(x, _fp4w(p))


REGISTRY: tuple[KernelEntry, ...] = (
    KernelEntry("w4a16", ("w4a16", "w4a16_asym"),
                "qweight (N, K/8) int32 K-interleaved nibbles, scales (K/g, N) in the model dtype, "
                "zeros (K/g, N) uint8 when asymmetric",
                _pack_int4, _w4a16, _w4a16_ref, ("w4a16", "int4pack", "bf16")),
    KernelEntry("fp8", ("fp8_per_tensor", "fp8_dynamic", "fp8_block"),
                "qweight (N, K) float8_e4m3fn, scales () / (N, 1) / (N/128, K/128) float32; "
                "activations quantized per call by quantlab.kernels.quantize",
                _pack_fp8, _fp8, _fp8_ref, ("fp8", "quant", "bf16")),
    KernelEntry("fp4", ("mxfp4_a16", "nvfp4_a16"),
                "qweight (N, K/8) int32 E2M1 nibbles (w4a16 layout), scales (K/B, N) uint8 "
                "E8M0 / E4M3 codes, NVFP4 fp32 global scale",
                _pack_fp4, _fp4, _fp4_ref, ("fp4", "bf16")),
)


def find(scheme: Scheme) -> KernelEntry | None:
    """The entry serving scheme, or None (the layer then runs the reference path)."""
    return next((e for e in REGISTRY if e.serves(scheme)), None)


def served_schemes() -> tuple[str, ...]:
    """Every preset some kernel serves, in registry order."""
    return tuple(s for e in REGISTRY for s in e.schemes)

