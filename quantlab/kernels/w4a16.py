"""W4A16: int4 weights with per-group scales (symmetric, or asymmetric with zero points) times
bf16/fp16 activations, dequantized in registers and fed to the tensor cores.

Packed layout (`Int4Weight`), chosen so that unpacking needs no shuffles:
  qweight (N, K // 8) int32. K is cut into 128-wide blocks of 16 words per row; in block b,
  bits 4j..4j+3 of word i hold the weight at k = 128 b + 16 j + i. So nibble j of all 16 words
  is the contiguous K-chunk [128 b + 16 j, 128 b + 16 j + 16): one shift and one mask turn a
  tile of words into a (BLOCK_N, 16) tile of weights that meets a 16-wide slice of x.
  Nibbles are offset binary: stored = code + 8 for symmetric codes in [-8, 7], the code itself
  for asymmetric codes in [0, 15]. Weight value = (stored - zero) * scale, zero = 8 when
  symmetric.
  scales (K // g, N) fp16 or bf16 and zeros (K // g, N) uint8 (None when symmetric) are stored
  K-group-major so that one group's scales for a tile of rows are one contiguous load.
  g (the group size) is a multiple of 16 that divides 128, or a multiple of 128.

The kernel computes out^T = W x^T ("swap AB"): the dequantized weight tile is the tensor-core
A operand straight from registers and the small activation tile is B, so decode batches
(M = 1..16) waste no work on padding M up to 64. Split-K adds fp32 partial sums with atomics
when the N tiles alone would leave SMs idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantlab.kernels._runtime import (
    check_contiguous,
    check_device,
    check_dtype,
    interpreted,
    pick_config,
)

ACT_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class Int4Weight:
    """A packed int4 weight of logical shape (N, K); see the module doc for the layout."""

    qweight: Tensor            # (N, K // 8) int32
    scales: Tensor             # (K // g, N) fp16 / bf16
    zeros: Tensor | None       # (K // g, N) uint8, None = symmetric (zero 8)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight: codes, scales and zero points."""
        z = 0 if self.zeros is None else self.zeros.numel()
        return self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size() + z

    def to(self, device) -> Int4Weight:
        z = None if self.zeros is None else self.zeros.to(device)
        return Int4Weight(self.qweight.to(device), self.scales.to(device), z, self.group_size)


def _check_group(K: int, g: int) -> None:
    if g % 16 or (g < 128 and 128 % g):
        raise ValueError(f"group_size={g}: use a multiple of 16 that divides 128, or a multiple "
                         "of 128 (the packed layout walks K in 16-wide chunks)")
    if K % 128 or K % g:
        need = max(128, g)
        raise ValueError(f"K={K} must be a multiple of 128 and of group_size={g}; pad K to "
                         f"{-(-K // need) * need} with zero weights")


def pack_words(nib: Tensor) -> Tensor:
    """(N, K) integers in [0, 15], K % 128 == 0 -> (N, K // 8) int32 in the module's layout."""
    N, K = nib.shape
    # (N, K/128, j, i) -> (N, K/128, i, j): word i of a block gathers nibble j = chunk j.
    nib = nib.reshape(N, K // 128, 8, 16).transpose(2, 3).to(torch.int64)
    words = (nib << (4 * torch.arange(8, device=nib.device))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(N, K // 8).contiguous()


def unpack_words(words: Tensor) -> Tensor:
    """Inverse of pack_words: (N, K // 8) int32 -> (N, K) int64 in [0, 15]."""
    N, K = words.shape[0], words.shape[1] * 8
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = (w.reshape(N, K // 128, 16, 1) >> (4 * torch.arange(8, device=w.device))) & 0xF
    return nib.transpose(2, 3).reshape(N, K)


def pack_int4(codes: Tensor, scales: Tensor, group_size: int = 128,
              zero_points: Tensor | None = None) -> Int4Weight:
    """codes (N, K) int (symmetric: [-8, 7]; with zero_points: [0, 15]), scales (N, K // g)
    float, zero_points (N, K // g) int in [0, 15] or None -> Int4Weight (scales kept as fp16
    unless given as bf16)."""
    N, K = codes.shape
    _check_group(K, group_size)
    if scales.shape != (N, K // group_size):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected {(N, K // group_size)}")
    c = codes.to(torch.int32)
    lo, hi = (0, 15) if zero_points is not None else (-8, 7)
    if bool((c < lo).any()) or bool((c > hi).any()):
        raise ValueError(f"codes must lie in [{lo}, {hi}] "
                         f"({'asymmetric' if zero_points is not None else 'symmetric'})")
    words = pack_words(c if zero_points is not None else c + 8)
    sdt = scales.dtype if scales.dtype in ACT_DTYPES else torch.float16
    zeros = None
    if zero_points is not None:
        if zero_points.shape != scales.shape:
            raise ValueError(f"zero_points has shape {tuple(zero_points.shape)}, expected "
                             f"{tuple(scales.shape)}")
        zeros = zero_points.to(torch.uint8).t().contiguous()
    return Int4Weight(words, scales.to(sdt).t().contiguous(),
                      zeros, group_size)


def unpack_int4(w: Int4Weight) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inverse of pack_int4: -> (codes (N, K) int8 or uint8, scales (N, K // g), zeros or None)."""
    nib = unpack_words(w.qweight)
    if w.zeros is None:
        return (nib - 8).to(torch.int8), w.scales.t().contiguous(), None
    return nib.to(torch.uint8), w.scales.t().contiguous(), w.zeros.t().contiguous()


def from_quantized(q) -> Int4Weight:
    """A quantlab QuantizedTensor of scheme w4a16 / w4a16_asym (2-D) -> Int4Weight."""
    ts = q.scheme
    if ts.format not in ("int4", "uint4") or ts.granularity != "group" or q.codes.ndim != 2:
        raise ValueError(f"need a 2-D int4/uint4 group-quantized tensor, got {ts.describe()}")
    return pack_int4(q.codes, q.scales, ts.group_size, q.zero_points)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Int4Weight -> (N, K) `dtype`: (code - zero) * scale in float32, rounded once to dtype."""
    codes, scales, zeros = unpack_int4(w)
    v = codes.float()
    if zeros is not None:
        v = v - zeros.float().repeat_interleave(w.group_size, -1)
    return (v * scales.float().repeat_interleave(w.group_size, -1)).to(dtype)


def w4a16_matmul_ref(x: Tensor, w: Int4Weight) -> Tensor:
    """Reference: x (..., K) bf16/fp16 -> x @ dequantize(w).T (..., N) in x.dtype, fp32 sums."""
    return (x.float() @ dequantize_int4(w, x.dtype).float().t()).to(x.dtype)


@triton.jit
def _w4a16_kernel(
    x_ptr,          # (M, K) activations, bf16/fp16, row stride stride_xm
    w_ptr,          # (N, K // 8) int32 packed weights (module doc)
    s_ptr,          # (K // GROUP, N) scales
    z_ptr,          # (K // GROUP, N) uint8 zero points (unused when HAS_ZERO is False)
    out_ptr,        # (M, N) output, x's dtype, or float32 when ATOMIC (split-K partial sums)
    M, N, K, stride_xm, stride_om,
    steps_per_split,               # K-steps of BLOCK_K each program walks
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
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
    n_steps = K // BLOCK_K
    start = pid_k * steps_per_split
    end = tl.minimum(start + steps_per_split, n_steps)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(start, end):
        for r in tl.static_range(BLOCK_K // 128):
            kb = step * (BLOCK_K // 128) + r
            words = tl.load(w_ptr + offs_n[:, None] * KW + kb * 16 + offs_i[None, :],
                            mask=n_ok[:, None], other=0)
            for j in tl.static_range(8):
                k0 = kb * 128 + 16 * j
                if (j * 16) % GROUP == 0:  # a new scale group starts at this chunk (always at j = 0)
                    g = k0 // GROUP
                    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                    else:
                        z = 8.0
                    # f = 1 + nibble/16 (exact), so f * 16s - (16 + z) s = (nibble - z) s; both
                    # products are exact for 16-bit scales, so an FMA rounds once, like the
                    # reference's (code - zero) * scale.
                    s16 = s * 16.0
                    c = -(16.0 + z) * s
                if 4 * j <= 19:
                    t = words << (19 - 4 * j)
                else:
                    t = words >> (4 * j - 19)
                f = ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                wj = (f * s16[:, None] + c[:, None]).to(x_ptr.dtype.element_ty)
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


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,   # as in _w4a16_kernel
    M, N, K, stride_xm, stride_om, steps_per_split,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Decode path for M <= 4 on the CUDA cores. With f = 1 + nibble / 16 (exact),
    sum_k (nibble - z) s x = s (16 sum_k f x - (16 + z) sum_k x): per weight one shift, one
    mask and one FMA per row of x; scale and zero point are applied once per group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, 16)
    n_ok = offs_n < N
    m_ok = offs_m < M
    KW = K // 8
    start = pid_k * steps_per_split
    end = tl.minimum(start + steps_per_split, K // 128)
    out = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(start, end):
        words = tl.load(w_ptr + offs_n[:, None] * KW + kb * 16 + offs_i[None, :],
                        mask=n_ok[:, None], other=0)
        for j in tl.static_range(8):
            k0 = kb * 128 + 16 * j
            if (j * 16) % GROUP == 0:  # a group starts: fresh partial sums
                fx = tl.zeros((BLOCK_N, 16, BLOCK_M), dtype=tl.float32)
                xs = tl.zeros((16, BLOCK_M), dtype=tl.float32)
            if 4 * j <= 19:
                t = words << (19 - 4 * j)
            else:
                t = words >> (4 * j - 19)
            f = ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            xj = tl.load(x_ptr + offs_m[None, :] * stride_xm + k0 + offs_i[:, None],
                         mask=m_ok[None, :], other=0.0).to(tl.float32)      # (16, BLOCK_M)
            fx += f[:, :, None] * xj[None, :, :]
            xs += xj
            if ((j + 1) * 16) % GROUP == 0:  # the group ends: scale it into the output
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                else:
                    z = tl.full((BLOCK_N,), 8.0, tl.float32)
                red = tl.sum(fx, axis=1)                                      # (BLOCK_N, BLOCK_M)
                xsum = tl.sum(xs, axis=0)                                     # (BLOCK_M,)
                out += s[:, None] * (16.0 * red - (16.0 + z)[:, None] * xsum[None, :])
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, out, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr):
    """Int4Weight -> (N, K) 16-bit weights, for large M where cuBLAS then does the product."""
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 16)
    n_ok = offs_n < N
    words = tl.load(w_ptr + offs_n[:, None] * (K // 8) + kb * 16 + offs_i[None, :],
                    mask=n_ok[:, None], other=0)
    for j in tl.static_range(8):
        k0 = kb * 128 + 16 * j
        if (j * 16) % GROUP == 0:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
            else:
                z = 8.0
            s16 = s * 16.0
            c = -(16.0 + z) * s
        if 4 * j <= 19:
            t = words << (19 - 4 * j)
        else:
            t = words >> (4 * j - 19)
        f = ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        wj = (f * s16[:, None] + c[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n[:, None] * K + k0 + offs_i[None, :], wj, mask=n_ok[:, None])


def dequantize_int4_triton(w: Int4Weight, dtype: torch.dtype) -> Tensor:
    """The kernel twin of dequantize_int4: (N, K) in dtype, bit for bit (one fp32 rounding)."""
    N, K = w.shape
    out = torch.empty((N, K), dtype=dtype, device=w.qweight.device)
    zeros = w.zeros if w.zeros is not None else w.scales
    _dequant_kernel[(triton.cdiv(N, 64), K // 128)](
        w.qweight, w.scales, zeros, out, N, K, GROUP=w.group_size, HAS_ZERO=w.zeros is not None,
        BLOCK_N=64, num_warps=4)
    return out


def _launch(x2: Tensor, w: Int4Weight, cfg: tuple) -> Tensor:
    """cfg = ("dot", BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps, num_stages): tensor cores;
    ("gemv", BLOCK_M, BLOCK_N, 128, split_k, num_warps, num_stages): CUDA cores, M <= 4;
    ("dequant",): dequantize with a Triton kernel, then cuBLAS (large M)."""
    if cfg[0] == "dequant":
        return torch.nn.functional.linear(x2, dequantize_int4_triton(w, x2.dtype))
    path, BM, BN, BK, split, warps, stages = cfg
    M, K = x2.shape
    N = w.qweight.shape[0]
    n_steps = K // BK
    per = -(-n_steps // split)
    split = -(-n_steps // per)
    atomic = split > 1
    out = (torch.zeros if atomic else torch.empty)(
        (M, N), dtype=torch.float32 if atomic else x2.dtype, device=x2.device)
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM), split)
    zeros = w.zeros if w.zeros is not None else w.scales
    if path == "gemv":
        _w4a16_gemv_kernel[grid](x2, w.qweight, w.scales, zeros, out, M, N, K, x2.stride(0),
                                 out.stride(0), per, GROUP=w.group_size,
                                 HAS_ZERO=w.zeros is not None, BLOCK_M=BM, BLOCK_N=BN,
                                 ATOMIC=atomic, num_warps=warps, num_stages=stages)
        return out.to(x2.dtype) if atomic else out
    _w4a16_kernel[grid](x2, w.qweight, w.scales, zeros, out, M, N, K, x2.stride(0), out.stride(0),
                        per, GROUP=w.group_size, HAS_ZERO=w.zeros is not None, BLOCK_M=BM,
                        BLOCK_N=BN, BLOCK_K=BK, ATOMIC=atomic, DOT_F32=interpreted(), num_warps=warps,
                        num_stages=stages)
    return out.to(x2.dtype) if atomic else out


def _candidates(M: int, N: int, K: int, sms: int, group: int = 128) -> list[tuple]:
    """Configs worth timing for this shape (see _launch for the tuple)."""
    if interpreted():  # small tiles keep the CPU interpreter quick; split-K exercised when K allows
        path = "gemv" if M <= 4 and group <= 128 else "dot"  # (callers pass group=129: dot only)
        return [(path, 4 if path == "gemv" else 16, 32, 128, 2 if K >= 256 else 1, 4, 1)]
    bk = 256 if K % 256 == 0 else 128
    out = []

    def split_for(tiles, bk):
        split = 1
        while tiles * split < 2 * sms and K // bk >= 4 * split:
            split *= 2
        return split

    if M <= 4 and group <= 128:
        bm = triton.next_power_of_2(M)
        for bn, warps, stages in ((64, 4, 4), (128, 4, 3), (32, 4, 4)):
            out.append(("gemv", bm, bn, 128, split_for(triton.cdiv(N, bn), 128), warps, stages))
    if M <= 64:
        bm = max(16, triton.next_power_of_2(M))
        for bn, stages in ((64, 4), (128, 3)):
            tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
            out.append(("dot", bm, bn, bk, split_for(tiles, bk), 4, stages))
        return out
    out += [("dot", 128, 128, 128, 1, 8, 3), ("dot", 64, 128, 128, 1, 4, 4)]
    if M >= 128:
        out.append(("dequant",))
    return out


def _key(M, N, K, w, dtype):
    return ("w4a16", triton.next_power_of_2(M), N, K, w.group_size, w.zeros is not None, dtype)


def _PICKED_CONFIG(M, N, K, w, dtype):
    from quantlab.kernels._runtime import picked

    return picked(_key(M, N, K, w, dtype))


def w4a16_matmul(x: Tensor, w: Int4Weight, config: tuple | None = None) -> Tensor:
    """x (..., K) bf16/fp16 @ W^T for an Int4Weight W of shape (N, K) -> (..., N) in x.dtype.

    config: a _launch tuple, e.g. ("dot", 16, 64, 256, 4, 4, 4), to force one path; default: the
    fastest of a few candidates for this shape, timed once per shape on the GPU. Paths: fused
    dequant + tensor-core dot, fused dequant + CUDA-core GEMV (M <= 4), and for large M a
    Triton dequantize to 16-bit followed by cuBLAS.
    """
    where = "w4a16_matmul"
    check_dtype(where, "x", x, ACT_DTYPES)
    check_dtype(where, "w.qweight", w.qweight, (torch.int32,))
    check_device(where, "quantlab.kernels.w4a16.w4a16_matmul_ref", x, w.qweight, w.scales)
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"{where}: x has K={x.shape[-1]} but the weight has K={K}")
    _check_group(K, w.group_size)
    for name, t in (("w.qweight", w.qweight), ("w.scales", w.scales)):
        check_contiguous(where, name, t)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        raise ValueError(f"{where}: x must be contiguous along K (stride {x.stride()}); pass "
                         "x.contiguous()")
    M = x2.shape[0]
    if config is not None and config[0] == "gemv" and (M > 4 or w.group_size > 128):
        raise ValueError(f"{where}: the gemv path takes M <= 4 and group_size <= 128")
    if config is None:
        sms = 1 if interpreted() else torch.cuda.get_device_properties(x.device).multi_processor_count
        cands = _candidates(M, N, K, sms, w.group_size)
        config = pick_config(_key(M, N, K, w, x.dtype), cands, lambda c: _launch(x2, w, c))
    return _launch(x2, w, config).reshape(*x.shape[:-1], N)
