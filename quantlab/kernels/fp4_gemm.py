"""MXFP4 / NVFP4 weights times bf16/fp16 activations on GPUs without FP4 tensor cores (Hopper):
E2M1 codes are decoded to 16-bit floats in registers, then the tensor cores multiply.

Packed layout (`Fp4Weight`): qweight (N, K // 8) int32 holds the 4-bit E2M1 codes
(sign | exponent(2) | mantissa) in the same K-interleaved words as W4A16 (quantlab.kernels.w4a16:
nibble j of word i in 128-block b is k = 128 b + 16 j + i). scales (K // B, N) uint8 hold the
block scales as bit patterns: E8M0 for MXFP4 (B = 32), E4M3 for NVFP4 (B = 16, times the fp32
global scale). Weight value = e2m1(code) * scale (* global), computed in float32 in that order,
as quantlab.quantize.dequantize does, then rounded once to the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantlab.formats import E4M3, E8M0
from quantlab.kernels._runtime import (
    check_contiguous,
    check_device,
    check_dtype,
    interpreted,
    pick_config,
)
from quantlab.kernels.w4a16 import ACT_DTYPES, pack_words, unpack_words
from quantlab.scales import MX, NVFP4

KINDS = {"mxfp4": 32, "nvfp4": 16}


@dataclass
class Fp4Weight:
    """A packed MXFP4 or NVFP4 weight of logical shape (N, K); see the module doc."""

    qweight: Tensor               # (N, K // 8) int32
    scales: Tensor                # (K // B, N) uint8: E8M0 (mxfp4) or E4M3 (nvfp4) codes
    global_scale: Tensor | None   # () float32, nvfp4 only (multiplied)
    kind: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8

    @property
    def block(self) -> int:
        return KINDS[self.kind]

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * 4 + self.scales.numel() + 4 * (self.global_scale is not None)

    def to(self, device) -> Fp4Weight:
        g = None if self.global_scale is None else self.global_scale.to(device)
        return Fp4Weight(self.qweight.to(device), self.scales.to(device), g, self.kind)


def pack_fp4(q) -> Fp4Weight:
    """A 2-D QuantizedTensor of scheme mxfp4 / nvfp4 (weights) -> Fp4Weight."""
    ts = q.scheme
    kind = "nvfp4" if ts.scale_rule == NVFP4 else "mxfp4" if isinstance(ts.scale_rule, MX) \
        else None
    if ts.format != "e2m1" or kind is None or q.codes.ndim != 2:
        raise ValueError(f"need a 2-D MXFP4 or NVFP4 tensor, got {ts.describe()}")
    N, K = q.codes.shape
    if K % 128:
        raise ValueError(f"K={K} must be a multiple of 128; pad K to {-(-K // 128) * 128}")
    enc = E8M0.encode if kind == "mxfp4" else (lambda s: E4M3.encode(s, overflow="saturate"))
    # E4M3.encode leaves a fp32 value already on the E4M3 grid unchanged: the codes are exact.
    glob = None if q.global_scale is None else q.global_scale.float().reshape(())
    return Fp4Weight(pack_words(q.codes.to(torch.int64)), enc(q.scales).t().contiguous(), glob,
                     kind)


def dequantize_fp4(w: Fp4Weight, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Fp4Weight -> (N, K) `dtype`: e2m1 * scale (* global) in float32, rounded once."""
    from quantlab.formats import E2M1

    dev = w.qweight.device
    vals = E2M1.table.to(dev)[unpack_words(w.qweight)]
    table = (E8M0 if w.kind == "mxfp4" else E4M3).table.to(dev)
    out = vals * table[w.scales.long()].t().repeat_interleave(w.block, -1)
    if w.global_scale is not None:
        out = out * w.global_scale
    return out.to(dtype)


def fp4_matmul_ref(x: Tensor, w: Fp4Weight) -> Tensor:
    """Reference: x (..., K) -> x @ dequantize_fp4(w).T (..., N) in x.dtype, fp32 sums."""
    return (x.float() @ dequantize_fp4(w, x.dtype).float().t()).to(x.dtype)


@triton.jit
def _scale_value(c, NVFP4: tl.constexpr):
    """uint8 scale codes -> float32: E8M0 2**(c - 127) (c = 0: 2**-127), or E4M3 (no sign)."""
    c = c.to(tl.int32)
    if NVFP4:
        e = (c >> 3) & 15
        m = c & 7
        normal = ((e + 120) << 23 | (m << 20)).to(tl.float32, bitcast=True)
        return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2**-9
    return tl.where(c == 0, 0x00400000, c << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_kernel(
    x_ptr,          # (M, K) activations bf16/fp16, row stride stride_xm
    w_ptr,          # (N, K // 8) int32 packed E2M1 codes
    s_ptr,          # (K // B, N) uint8 scale codes
    g_ptr,          # (1,) float32 global scale (NVFP4), unused for MXFP4
    out_ptr,        # (M, N) output in x's dtype, or float32 partial sums when ATOMIC
    M, N, K, stride_xm, stride_om, steps_per_split,
    B: tl.constexpr, NVFP4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, 16)
    n_ok = offs_n < N
    m_ok = offs_m < M
    KW = K // 8
    start = pid_k * steps_per_split
    end = tl.minimum(start + steps_per_split, K // BLOCK_K)
    if NVFP4:
        glob = tl.load(g_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(start, end):
        for r in tl.static_range(BLOCK_K // 128):
            kb = step * (BLOCK_K // 128) + r
            words = tl.load(w_ptr + offs_n[:, None] * KW + kb * 16 + offs_i[None, :],
                            mask=n_ok[:, None], other=0)
            for j in tl.static_range(8):
                k0 = kb * 128 + 16 * j
                if (j * 16) % B == 0:
                    s = _scale_value(tl.load(s_ptr + (k0 // B) * N + offs_n, mask=n_ok, other=0),
                                     NVFP4)
                t = words >> (4 * j)
                em = t & 7
                # E2M1 magnitude as float32 bits: exponent field e >= 1 -> (em << 22) + 126 << 23;
                # e = 0 (0 or the subnormal 0.5) -> em * bits(0.5).
                fb = tl.where(em < 2, em * 0x3F000000, (em << 22) + 0x3F000000)
                fb = fb | ((t & 8) << 28)
                wv = fb.to(tl.float32, bitcast=True) * s[:, None]
                if NVFP4:
                    wv = wv * glob
                wj = wv.to(x_ptr.dtype.element_ty)
                xj = tl.load(x_ptr + offs_m[None, :] * stride_xm + k0 + offs_i[:, None],
                             mask=m_ok[None, :], other=0.0)
                if DOT_F32:  # the interpreter mis-multiplies cast bf16 tensors (triton 3.9)
                    acc = tl.dot(wj.to(tl.float32), xj.to(tl.float32), acc)
                else:
                    acc = tl.dot(wj, xj, acc)
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _launch(x2: Tensor, w: Fp4Weight, cfg: tuple) -> Tensor:
    BM, BN, BK, split, warps, stages = cfg
    M, K = x2.shape
    N = w.qweight.shape[0]
    per = -(-(K // BK) // split)
    split = -(-(K // BK) // per)
    atomic = split > 1
    out = (torch.zeros if atomic else torch.empty)(
        (M, N), dtype=torch.float32 if atomic else x2.dtype, device=x2.device)
    g = w.global_scale.reshape(1) if w.global_scale is not None else w.scales
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM), split)
    _fp4_kernel[grid](x2, w.qweight, w.scales, g, out, M, N, K, x2.stride(0), out.stride(0), per,
                      B=w.block, NVFP4=w.kind == "nvfp4", BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                      ATOMIC=atomic, DOT_F32=interpreted(), num_warps=warps, num_stages=stages)
    return out.to(x2.dtype) if atomic else out


def fp4_matmul(x: Tensor, w: Fp4Weight, config: tuple | None = None) -> Tensor:
    """x (..., K) bf16/fp16 @ W^T for an MXFP4/NVFP4 Fp4Weight (N, K) -> (..., N) in x.dtype.

    config: (BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps, num_stages); default: timed pick.
    """
    from quantlab.kernels.w4a16 import _candidates

    where = "fp4_matmul"
    check_dtype(where, "x", x, ACT_DTYPES)
    check_device(where, "quantlab.kernels.fp4_gemm.fp4_matmul_ref", x, w.qweight, w.scales)
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"{where}: x has K={x.shape[-1]} but the weight has K={K}")
    check_contiguous(where, "w.qweight", w.qweight)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        raise ValueError(f"{where}: x must be contiguous along K; pass x.contiguous()")
    M = x2.shape[0]
    if config is None:
        sms = (1 if interpreted()
               else torch.cuda.get_device_properties(x.device).multi_processor_count)
        key = ("fp4", w.kind, triton.next_power_of_2(M), N, K, x.dtype)
        cands = [c[1:] for c in _candidates(M, N, K, sms, 129) if c[0] == "dot"]
        config = pick_config(key, cands, lambda c: _launch(x2, w, c))
    return _launch(x2, w, config).reshape(*x.shape[:-1], N)
