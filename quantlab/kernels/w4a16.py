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

For M <= 4 a CUDA-core GEMV (_w4a16_gemv_kernel) is also timed: it keeps the word tile, x and
the partial sums in one register layout (no shared-memory round trip per 16-wide chunk, which is
what limits the dot path at decode sizes: notes/kernels.md has the ncu numbers), streams the
words with 16-byte loads and applies scales once per group and column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantlab.granularity import Group
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
    if (ts.format not in ("int4", "uint4") or not isinstance(ts.granularity, Group)
            or q.codes.ndim != 2):
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
def _group_affine(s_ptr, z_ptr, g, N, offs_n, n_ok, HAS_ZERO: tl.constexpr):
    """Scale group g of a tile of rows -> (s16, c), both (BLOCK_N,) float32, such that
    (nibble - zero) * scale = f * s16 + c for f = 1 + nibble / 16. Both products are exact for
    16-bit scales, so the one FMA rounds once, like the reference's (code - zero) * scale."""
    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
    else:
        z = 8.0
    return s * 16.0, -(16.0 + z) * s


@triton.jit
def _nibble_f(words, j: tl.constexpr):
    """Nibble j of every int32 word as f = 1 + nibble / 16 in float32 (exact): one shift puts the
    nibble in mantissa bits 19..22, one and-or gives the float's bits."""
    if 4 * j <= 19:
        t = words << (19 - 4 * j)
    else:
        t = words >> (4 * j - 19)
    return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


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
    KW = tl.multiple_of(K // 8, 16)  # K % 128 == 0: rows start 64-byte aligned, so 16-byte loads
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
                if (j * 16) % GROUP == 0:  # a new scale group starts here (always at j = 0)
                    s16, c = _group_affine(s_ptr, z_ptr, k0 // GROUP, N, offs_n, n_ok, HAS_ZERO)
                f = _nibble_f(words, j)
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
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SUB: tl.constexpr,  # SUB = min(GROUP, 128)
    BLOCK_N: tl.constexpr, AHEAD: tl.constexpr, PAIRS: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Decode path on the CUDA cores: one row of x per program (grid axis 0), a (BLOCK_N, 16)
    tile of words per 128-block, all in one register layout: x is loaded as a (1, 16) row that
    broadcasts over the tile, so nothing goes through shared memory. With f = 1 + nibble / 16
    (exact), sum_k (nibble - z) s x = s (16 sum_k f x - (16 + z) sum_k x): per weight one shift,
    one and-or and one FMA; scale and zero point are applied once per group and word column,
    and the 16 columns are summed once at the end. AHEAD: load the next block's words before
    unpacking this one (Triton does not pipeline loads that feed no dot), so that more bytes
    are in flight per warp. PAIRS (groups of 32 or more): one shift serves two nibbles, the
    second read as f = 1 + nibble / 256 (8 bits of the fp32 sum go to the offset, 16 remain)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 16)
    n_ok = offs_n < N
    KW = tl.multiple_of(K // 8, 16)  # K % 128 == 0: rows start 64-byte aligned, so 16-byte loads
    start = pid_k * steps_per_split
    end = tl.minimum(start + steps_per_split, K // 128)
    x_row = x_ptr + pid_m * stride_xm
    tot = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    w_rows = w_ptr + offs_n[:, None] * KW + offs_i[None, :]
    if AHEAD:  # (the last step re-reads its own block, from cache, rather than mask along K)
        nxt = tl.load(w_rows + start * 16, mask=n_ok[:, None], other=0)
    for kb in range(start, end):
        if AHEAD:
            words = nxt
            nxt = tl.load(w_rows + tl.minimum(kb + 1, end - 1) * 16, mask=n_ok[:, None], other=0)
        else:
            words = tl.load(w_rows + kb * 16, mask=n_ok[:, None], other=0)
        for j in tl.static_range(8):
            k0 = kb * 128 + 16 * j
            if (j * 16) % SUB == 0:  # a group starts: fresh partial sums
                fx = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
                xs = tl.zeros((1, 16), dtype=tl.float32)
                if PAIRS:
                    fx2 = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
                    xs2 = tl.zeros((1, 16), dtype=tl.float32)
            xj = tl.load(x_row + k0 + offs_i[None, :]).to(tl.float32)             # (1, 16)
            if PAIRS and j % 2 == 0:  # nibble j rides along with nibble j + 1
                x_even = xj
            else:
                if 4 * j <= 19:
                    t = words << (19 - 4 * j)
                else:
                    t = words >> (4 * j - 19)
                fx += ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xj
                xs += xj
                if PAIRS:  # the same shift put nibble j - 1 in bits 15..18: f = 1 + nibble / 256
                    fx2 += ((t & 0x78000) | 0x3F800000).to(tl.float32, bitcast=True) * x_even
                    xs2 += x_even
            if ((j + 1) * 16) % SUB == 0:  # the group (or this block of it) ends
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                else:
                    z = tl.full((BLOCK_N,), 8.0, tl.float32)
                part = 16.0 * fx - (16.0 + z)[:, None] * xs
                if PAIRS:
                    part += 256.0 * fx2 - (256.0 + z)[:, None] * xs2
                tot += s[:, None] * part
    out = tl.sum(tot, axis=1)
    o_ptrs = out_ptr + pid_m * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(o_ptrs, out, mask=n_ok, sem="relaxed")
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr):
    """Int4Weight -> (N, K) 16-bit weights, for large M where cuBLAS then does the product."""
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 16)
    n_ok = offs_n < N
    KW = tl.multiple_of(K // 8, 16)
    words = tl.load(w_ptr + offs_n[:, None] * KW + kb * 16 + offs_i[None, :],
                    mask=n_ok[:, None], other=0)
    for j in tl.static_range(8):
        k0 = kb * 128 + 16 * j
        if (j * 16) % GROUP == 0:
            s16, c = _group_affine(s_ptr, z_ptr, k0 // GROUP, N, offs_n, n_ok, HAS_ZERO)
        wj = (_nibble_f(words, j) * s16[:, None] + c[:, None]).to(out_ptr.dtype.element_ty)
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
    ("gemv", 1, BLOCK_N, 128, split_k, num_warps, flags): CUDA cores, one program per row of x
    (for small M), flags = 1 to prefetch the next block's words, + 2 to unpack nibbles in pairs
    (see _w4a16_gemv_kernel); ("dequant",): dequantize with
    a Triton kernel, then cuBLAS (large M)."""
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
    zeros = w.zeros if w.zeros is not None else w.scales
    args = (x2, w.qweight, w.scales, zeros, out, M, N, K, x2.stride(0), out.stride(0), per)
    if path == "gemv":  # rows of x side by side in the grid: they share weight tiles in L2
        _w4a16_gemv_kernel[(M, triton.cdiv(N, BN), split)](
            *args, GROUP=w.group_size, HAS_ZERO=w.zeros is not None, SUB=min(w.group_size, 128),
            BLOCK_N=BN, AHEAD=stages % 2 == 1, PAIRS=stages >= 2 and w.group_size >= 32,
            ATOMIC=atomic, num_warps=warps, num_stages=1)
    else:
        _w4a16_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM), split)](
            *args, GROUP=w.group_size, HAS_ZERO=w.zeros is not None, BLOCK_M=BM, BLOCK_N=BN,
            BLOCK_K=BK, ATOMIC=atomic, DOT_F32=interpreted(), num_warps=warps, num_stages=stages)
    return out.to(x2.dtype) if atomic else out


def _candidates(M: int, N: int, K: int, sms: int, group: int = 128) -> list[tuple]:
    """Configs worth timing for this shape (see _launch for the tuple)."""
    if interpreted():  # small tiles keep the CPU interpreter quick; split-K exercised when K allows
        split = 2 if K >= 256 else 1
        if M <= 4 and group <= 128:  # (fp4_gemm passes group=129: dot only)
            return [("gemv", 1, 32, 128, split, 4, 3)]
        return [("dot", 16, 32, 128, split, 4, 1)]
    bk = 256 if K % 256 == 0 else 128
    out = []

    def split_for(tiles, bk, per_sm=2):  # split K until the grid covers the SMs per_sm times
        split = 1
        while tiles * split < per_sm * sms and K // bk >= 4 * split:
            split *= 2
        return split

    if M <= 4 and group <= 128:  # (fp4_gemm passes group=129 to get the dot configs alone)
        for bn, warps, flags, per_sm in ((128, 4, 3, 4), (64, 4, 3, 4), (128, 4, 3, 2),
                                         (128, 4, 1, 4)):
            split = split_for(M * triton.cdiv(N, bn), 128, per_sm)
            out.append(("gemv", 1, bn, 128, split, warps, flags))
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
    dequant + tensor-core dot, fused dequant + CUDA-core GEMV (small M), and for large M a
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
    if config is None:
        sms = (1 if interpreted()
               else torch.cuda.get_device_properties(x.device).multi_processor_count)
        cands = _candidates(M, N, K, sms, w.group_size)
        config = pick_config(_key(M, N, K, w, x.dtype), cands, lambda c: _launch(x2, w, c))
    return _launch(x2, w, config).reshape(*x.shape[:-1], N)
