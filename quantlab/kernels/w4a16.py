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

Three kernels share the layout. _w4a16_kernel ("dot") computes out^T = W x^T ("swap AB"): the
dequantized weight tile is the tensor-core A operand straight from registers and the small
activation tile is B, so decode batches (M = 1..16) waste no work on padding M up to 64; it
restages x per 16-wide slice. _w4a16_mm_kernel ("mm", M >= 16) is the plain orientation: the
x tile (BLOCK_M, BLOCK_K) is the A operand, loaded once per K step so that Triton pipelines it,
and the weight tile is unpacked with one broadcast shift per 128-block to (BLOCK_N, 16, 8) and
reshaped to (BLOCK_N, 128), whose column c holds k = 16 (c % 8) + c // 8; x's columns follow
that order, or the weight tile is permuted back to K's order (both are timed). Dequantization
there is (float(0x4B000000 | nibble) - (2^23 + zero)) * scale in fp32: exact until the one
rounding to the activation dtype, as in dequantize_int4. Split-K (both kernels) adds fp32
partial sums with atomics when the output tiles alone would leave SMs idle.

The 16-bit "pairs" path: when w.scales.dtype == x.dtype (pack_int4 / from_quantized with
scale_dtype=x.dtype), "mm" configs with a trailing 1 dequantize two weights per 32-bit
operation instead of one per fp32 one (_pairs_asm: one lop3 puts two nibbles into the
mantissas of two 16-bit magic numbers, then two packed 16x2 fmas subtract magic + zero and
apply the scale; inline PTX on the GPU, a plain-Triton twin in the interpreter). The result is
bit-identical to dequantize_int4 (n - zero is a small integer, exact in 16 bits, and the one
rounding is that of the product), checked on the GPU for bf16 and fp16 in every k order. On an
H200 (triton 3.6, 8B and 70B layer shapes, group 128, bf16 x; cuBLAS bf16 time / ours) it is
the faster path at M = 16 in 6 of 8 shapes (1.00-1.46 against 1.02-1.37 for the fp16-scale
default) and at M = 64 in all 8 (0.64-1.01 against 0.51-0.80); at M = 128 it adds at most
0.04 (0.45-0.67 against 0.43-0.63), and from M = 256 dequantize + cuBLAS (0.43-0.92) beats
"mm" with either dequantization (0.27-0.48). Casting the scales to the activation dtype costs
them precision only when that is bf16; vLLM does the same when it loads GPTQ and
compressed-tensors W4A16 checkpoints: it allocates the scale parameters in params_dtype, the
model's dtype, and loads the checkpoint's scales into them (GPTQMarlinLinearMethod.create_weights
in vllm/model_executor/layers/quantization/gptq_marlin.py; CompressedTensorsWNA16.create_weights
in .../compressed_tensors/schemes/compressed_tensors_wNa16.py).

For M <= 4 a CUDA-core GEMV (_w4a16_gemv_kernel) is also timed: it keeps the word tile, x and
the partial sums in one register layout (no shared-memory round trip per 16-wide chunk, which is
what limits the dot path at decode sizes: notes/kernels.md has the ncu numbers), streams the
words with 16-byte loads and applies scales once per group and column.
"""

from __future__ import annotations

import warnings
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
    picked,
)
from quantlab.kernels._tiles import grouped_tile

ACT_DTYPES = (torch.bfloat16, torch.float16)
_ASM_FAILED: dict[tuple, str] = {}  # "mm" configs whose inline-PTX dequantization failed


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
              zero_points: Tensor | None = None,
              scale_dtype: torch.dtype | None = None) -> Int4Weight:
    """codes (N, K) int (symmetric: [-8, 7]; with zero_points: [0, 15]), scales (N, K // g)
    float, zero_points (N, K // g) int in [0, 15] or None -> Int4Weight. Scales are stored in
    scale_dtype (fp16 or bf16; default: as given when fp16/bf16, else fp16). Scales in the
    activation dtype let the "mm" path dequantize in 16-bit arithmetic, two weights at a time."""
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
    if scale_dtype is not None and scale_dtype not in ACT_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype}: use torch.float16 or torch.bfloat16")
    sdt = scale_dtype or (scales.dtype if scales.dtype in ACT_DTYPES else torch.float16)
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


def from_quantized(q, scale_dtype: torch.dtype | None = None) -> Int4Weight:
    """A quantlab QuantizedTensor of scheme w4a16 / w4a16_asym (2-D) -> Int4Weight, scales
    stored in scale_dtype (see pack_int4; pass the activation dtype for the fastest "mm")."""
    ts = q.scheme
    if (ts.format not in ("int4", "uint4") or not isinstance(ts.granularity, Group)
            or q.codes.ndim != 2):
        raise ValueError(f"need a 2-D int4/uint4 group-quantized tensor, got {ts.describe()}")
    return pack_int4(q.codes, q.scales, ts.group_size, q.zero_points, scale_dtype)


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


def _pairs_asm(ty: str, magic: int, one: int) -> str:
    """PTX for one packed word -> its 8 weights as 16-bit outputs $0..$7 (weight j = nibble j).
    Inputs: $8 the word, $9..$12 the scale pairs and $13..$16 the pairs -(magic + zero) for the
    nibble pairs (s, s + 4), s = 0..3, low half first. Per pair: one lop3 ORs nibbles s and s + 4
    of the word (shifted right by 4 s) into the mantissas of two 16-bit floats magic + nibble,
    one fma subtracts magic + zero (exact: small integers), one fma by the scale (adding -0)
    rounds the exact product once, as dequantize_int4's cast of the fp32 product does."""
    lines = ["{", ".reg .b32 t, u, one, mz;", f"mov.b32 one, {one:#010x};",
             "mov.b32 mz, 0x80008000;"]
    for k in range(4):
        src = "$8"
        if k:
            lines.append(f"shr.u32 u, $8, {4 * k};")
            src = "u"
        lines += [f"lop3.b32 t, {src}, 0x000F000F, {magic:#010x}, 0xEA;",
                  f"fma.rn.{ty} t, t, one, ${13 + k};",
                  f"fma.rn.{ty} t, t, ${9 + k}, mz;",
                  f"mov.b32 {{${k}, ${k + 4}}}, t;"]
    return "\n".join(lines + ["}"])


_ASM_BF16 = tl.constexpr(_pairs_asm("bf16x2", 0x43004300, 0x3F803F80))  # 128 + nibble, 1.0
_ASM_F16 = tl.constexpr(_pairs_asm("f16x2", 0x64006400, 0x3C003C00))    # 1024 + nibble, 1.0
_ASM_CONSTRAINTS = tl.constexpr(",".join(["=h"] * 8 + ["r"] * 9))


@triton.jit
def _bits16(v, dtype: tl.constexpr):
    """A tensor of 16-bit floats (dtype) -> their bits in the low half of an int32."""
    return v.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pair_consts(s_ptr, z_ptr, N, offs_n, n_ok, blocks, s: tl.constexpr, dtype: tl.constexpr,
                 MAGIC: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """For nibble pair (s, s + 4) of the words of 128-blocks `blocks` (R,) and rows offs_n ->
    (scale pair, -(MAGIC + zero) pair), (BLOCK_N, R) int32 each, chunk s in the low half."""
    if GROUP >= 128:
        g_lo = blocks * 128 // GROUP
        g_hi = g_lo
    else:
        g_lo = blocks * (128 // GROUP) + s // (GROUP // 16)
        g_hi = blocks * (128 // GROUP) + (s + 4) // (GROUP // 16)
    off_lo = g_lo[None, :] * N + offs_n[:, None]
    off_hi = g_hi[None, :] * N + offs_n[:, None]
    ok = n_ok[:, None]
    sc_lo = _bits16(tl.load(s_ptr + off_lo, mask=ok, other=0.0), dtype)
    sc_hi = _bits16(tl.load(s_ptr + off_hi, mask=ok, other=0.0), dtype)
    if HAS_ZERO:
        z_lo = tl.load(z_ptr + off_lo, mask=ok, other=0).to(tl.float32)
        z_hi = tl.load(z_ptr + off_hi, mask=ok, other=0).to(tl.float32)
    else:
        z_lo = tl.full(off_lo.shape, 8.0, tl.float32)
        z_hi = z_lo
    nz_lo = _bits16(-(z_lo + MAGIC), dtype)
    nz_hi = _bits16(-(z_hi + MAGIC), dtype)
    return sc_lo | (sc_hi << 16), nz_lo | (nz_hi << 16)


@triton.jit
def _pairs_emulated(word, sp, nzp, s: tl.constexpr, dtype: tl.constexpr, MAGIC: tl.constexpr):
    """What the PTX of _pairs_asm computes for nibble pair (s, s + 4), in plain Triton (for the
    interpreter, which cannot run inline PTX): -> the two weights' bits as int16."""
    lo = (((word >> (4 * s)) & 0xF).to(tl.float32) + MAGIC
          + (nzp & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32))
    hi = (((word >> (4 * s + 16)) & 0xF).to(tl.float32) + MAGIC
          + ((nzp >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32))
    w_lo = lo * (sp & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    w_hi = hi * ((sp >> 16) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    return (w_lo.to(dtype).to(tl.int16, bitcast=True),
            w_hi.to(dtype).to(tl.int16, bitcast=True))


@triton.jit
def _unpack_block_pairs(w_ptr, s_ptr, z_ptr, N, KW, offs_n, n_ok, kb0, dtype: tl.constexpr,
                        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                        R: tl.constexpr, PERMUTE_W: tl.constexpr, ASM: tl.constexpr,
                        MAGIC: tl.constexpr):
    """_unpack_block for scales stored in the activation dtype: two weights per 32-bit
    operation in 16-bit float arithmetic (_pairs_asm; emulated when ASM is False), about 2
    instructions per weight against about 6 in fp32. The 8 outputs per word are joined back
    to (BLOCK_N, R, 16, 8) = (n, r, i, j), the same tile as _unpack_block's, bit for bit."""
    offs_r = tl.arange(0, R)
    offs_i = tl.arange(0, 16)
    wp = (w_ptr + offs_n[:, None, None] * KW + (kb0 + offs_r)[None, :, None] * 16
          + offs_i[None, None, :])
    words = tl.load(wp, mask=n_ok[:, None, None], other=0)                     # (BN, R, 16)
    blocks = kb0 + offs_r
    sp0, nz0 = _pair_consts(s_ptr, z_ptr, N, offs_n, n_ok, blocks, 0, dtype, MAGIC,
                            GROUP, HAS_ZERO)
    if GROUP >= 128:  # one group per (row, block): the same pairs for every nibble
        sp1, nz1, sp2, nz2, sp3, nz3 = sp0, nz0, sp0, nz0, sp0, nz0
    else:
        sp1, nz1 = _pair_consts(s_ptr, z_ptr, N, offs_n, n_ok, blocks, 1, dtype,
                                MAGIC, GROUP, HAS_ZERO)
        sp2, nz2 = _pair_consts(s_ptr, z_ptr, N, offs_n, n_ok, blocks, 2, dtype,
                                MAGIC, GROUP, HAS_ZERO)
        sp3, nz3 = _pair_consts(s_ptr, z_ptr, N, offs_n, n_ok, blocks, 3, dtype,
                                MAGIC, GROUP, HAS_ZERO)
    if ASM:
        args = [words, sp0[:, :, None], sp1[:, :, None], sp2[:, :, None], sp3[:, :, None],
                nz0[:, :, None], nz1[:, :, None], nz2[:, :, None], nz3[:, :, None]]
        if dtype == tl.bfloat16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _ASM_BF16, _ASM_CONSTRAINTS, args, dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _ASM_F16, _ASM_CONSTRAINTS, args, dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    else:
        o0, o4 = _pairs_emulated(words, sp0[:, :, None], nz0[:, :, None], 0, dtype,
                                 MAGIC)
        o1, o5 = _pairs_emulated(words, sp1[:, :, None], nz1[:, :, None], 1, dtype,
                                 MAGIC)
        o2, o6 = _pairs_emulated(words, sp2[:, :, None], nz2[:, :, None], 2, dtype,
                                 MAGIC)
        o3, o7 = _pairs_emulated(words, sp3[:, :, None], nz3[:, :, None], 3, dtype,
                                 MAGIC)
    # (..., u, v, w) flattens to j = 4 u + 2 v + w: the innermost join picks w, so leaf
    # (w, v) is join(o[2 v + w], o[4 + 2 v + w]).
    q0 = tl.join(tl.join(o0, o4), tl.join(o2, o6))
    q1 = tl.join(tl.join(o1, o5), tl.join(o3, o7))
    w = tl.reshape(tl.join(q0, q1), (BLOCK_N, R, 16, 8)).to(dtype, bitcast=True)
    if PERMUTE_W:
        w = tl.permute(w, (0, 1, 3, 2))                                        # (n, r, j, i)
    return tl.reshape(w, (BLOCK_N, 128 * R))


@triton.jit
def _unpack_block(w_ptr, s_ptr, z_ptr, N, KW, offs_n, n_ok, kb0, dtype: tl.constexpr,
                  GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                  R: tl.constexpr, PERMUTE_W: tl.constexpr):
    """R consecutive 128-blocks of K starting at block kb0, for a tile of rows -> (BLOCK_N,
    128 R) weights in `dtype`, equal to dequantize_int4's. The (BLOCK_N, 16 R) word tile is
    loaded once and unpacked by one broadcast shift to (BLOCK_N, R, 16, 8) = (n, r, i, j),
    the weight at k = 128 (kb0 + r) + 16 j + i; reshaped as is (PERMUTE_W False), column c of
    block r holds k = 16 (c % 8) + c // 8, so x must be loaded in that order; PERMUTE_W swaps
    (i, j) first, giving K in natural order. Dequantization: the nibble OR 0x4B000000 is the
    float 2^23 + nibble; subtracting 2^23 + zero is exact, and so is the product with a 16-bit
    scale in fp32 (at most 4 + 11 significant bits), so the cast rounds once, as the reference."""
    offs_r = tl.arange(0, R)
    offs_i = tl.arange(0, 16)
    offs_j = tl.arange(0, 8)
    wp = (w_ptr + offs_n[:, None, None] * KW + (kb0 + offs_r)[None, :, None] * 16
          + offs_i[None, None, :])
    words = tl.load(wp, mask=n_ok[:, None, None], other=0)                     # (BN, R, 16)
    nib = (words[:, :, :, None] >> (4 * offs_j)[None, None, None, :]) & 0xF    # (BN, R, 16, 8)
    f = (nib | 0x4B000000).to(tl.float32, bitcast=True)                        # 2^23 + nibble
    if GROUP >= 128:  # one group per (row, block)
        g = ((kb0 + offs_r) * 128 // GROUP)[None, :, None, None]
    else:  # group of chunk j of block r
        g = ((kb0 + offs_r)[:, None] * (128 // GROUP)
             + offs_j[None, :] // (GROUP // 16))[None, :, None, :]
    sz_off = g * N + offs_n[:, None, None, None]
    sz_ok = n_ok[:, None, None, None]
    s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0).to(tl.float32) + 8388608.0
    else:
        z = 8388616.0  # 2^23 + 8
    w = ((f - z) * s).to(dtype)
    if PERMUTE_W:
        w = tl.permute(w, (0, 1, 3, 2))                                        # (n, r, j, i)
    return tl.reshape(w, (BLOCK_N, 128 * R))


@triton.jit
def _w4a16_mm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,   # as in _w4a16_kernel
    M, N, K, stride_xm, stride_om, steps_per_split,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, ORDER: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
    PAIRS: tl.constexpr = False, ASM: tl.constexpr = False, MAGIC: tl.constexpr = 128.0,
):
    """Tensor-core path for M >= 16, not swapped: the x tile (BLOCK_M, BLOCK_K) is the dot's A
    operand, loaded once per K step (so Triton can pipeline it over num_stages), and the weight
    tile, unpacked by _unpack_block, is B. The order of k within a 128-block (a dot product
    does not care about it) is the unpacked words' order, x's columns gathered to match
    (ORDER 0) or x loaded contiguously and permuted in registers (2); or K's natural order, the
    weight tile permuted instead (1).
    Programs walk the (M, N) tiles in bands of GROUP_M tiles of M per N column, so that
    neighbours share x and weight tiles in L2; grid axis 1 splits K (fp32 atomics)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    KW = tl.multiple_of(K // 8, 16)
    R: tl.constexpr = BLOCK_K // 128
    offs_c = tl.arange(0, BLOCK_K)
    if ORDER != 0:
        offs_k = offs_c
    else:  # column c of 128-block r holds k = 128 r + 16 (c % 8) + c // 8
        cc = offs_c % 128
        offs_k = (offs_c - cc) + 16 * (cc % 8) + cc // 8
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    n_steps = K // BLOCK_K
    start = pid_k * steps_per_split
    end = tl.minimum(start + steps_per_split, n_steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(start, end):
        xt = tl.load(x_rows + step * BLOCK_K, mask=m_ok[:, None], other=0.0)
        if ORDER == 2:  # (m, r, j, i) -> (m, r, i, j): the unpacked words' order
            xt = tl.reshape(tl.permute(tl.reshape(xt, (BLOCK_M, R, 8, 16)), (0, 1, 3, 2)),
                            (BLOCK_M, BLOCK_K))
        if PAIRS:  # scales in x's dtype: dequantize two weights per 32-bit operation
            wt = _unpack_block_pairs(w_ptr, s_ptr, z_ptr, N, KW, offs_n, n_ok, step * R,
                                     x_ptr.dtype.element_ty, GROUP, HAS_ZERO, BLOCK_N, R,
                                     ORDER == 1, ASM, MAGIC)
        else:
            wt = _unpack_block(w_ptr, s_ptr, z_ptr, N, KW, offs_n, n_ok, step * R,
                               x_ptr.dtype.element_ty, GROUP, HAS_ZERO, BLOCK_N, R, ORDER == 1)
        if DOT_F32:  # the interpreter mis-multiplies cast bf16 tensors (triton 3.9)
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


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
    """cfg = ("mm", BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps, num_stages, GROUP_M, ORDER
    [, PAIRS]): tensor cores, x as the A operand (_w4a16_mm_kernel; ORDER 0/1/2 = x gathered /
    weight permuted / x permuted; PAIRS 1: 16-bit dequantization in pairs when w.scales.dtype
    is x's, else ignored; a config whose inline PTX fails to compile falls back to fp32 with a
    warning and is remembered in _ASM_FAILED);
    ("dot", BLOCK_M, BLOCK_N, BLOCK_K, split_k, num_warps, num_stages): tensor cores, swapped
    (x as B: small M);
    ("gemv", 1, BLOCK_N, 128, split_k, num_warps, flags): CUDA cores, one program per row of x
    (for small M), flags = 1 to prefetch the next block's words, + 2 to unpack nibbles in pairs
    (see _w4a16_gemv_kernel); ("dequant",): dequantize with
    a Triton kernel, then cuBLAS (large M)."""
    if cfg[0] == "dequant":
        return torch.nn.functional.linear(x2, dequantize_int4_triton(w, x2.dtype))
    path, BM, BN, BK, split, warps, stages = cfg[:7]
    M, K = x2.shape
    if K % BK:
        raise ValueError(f"config {cfg}: BLOCK_K={BK} does not divide K={K}")
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
    elif path == "mm":
        group_m, order = cfg[7:9]
        pairs = len(cfg) > 9 and bool(cfg[9]) and w.scales.dtype == x2.dtype
        asm = pairs and not interpreted()
        if asm and cfg in _ASM_FAILED:
            pairs = asm = False
        launch = _w4a16_mm_kernel[(triton.cdiv(M, BM) * triton.cdiv(N, BN), split)]
        kw = dict(GROUP=w.group_size, HAS_ZERO=w.zeros is not None, BLOCK_M=BM, BLOCK_N=BN,
                  BLOCK_K=BK, GROUP_M=group_m, ORDER=order, ATOMIC=atomic, DOT_F32=interpreted(),
                  MAGIC=128.0 if x2.dtype == torch.bfloat16 else 1024.0, num_warps=warps,
                  num_stages=stages)
        if not asm:
            launch(*args, PAIRS=pairs, **kw)
        else:
            try:
                launch(*args, PAIRS=True, ASM=True, **kw)
            except Exception as e:  # noqa: BLE001  (inline PTX this GPU/Triton rejects)
                from triton.runtime.errors import OutOfResources

                if isinstance(e, OutOfResources):
                    raise
                _ASM_FAILED[cfg] = f"{type(e).__name__}: {str(e)[:300]}"
                warnings.warn(f"w4a16: the 16-bit dequantization of {cfg} failed to compile "
                              f"({_ASM_FAILED[cfg][:120]}); using the fp32 one", stacklevel=2)
                if atomic:
                    out.zero_()
                launch(*args, PAIRS=False, **kw)
    else:
        _w4a16_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM), split)](
            *args, GROUP=w.group_size, HAS_ZERO=w.zeros is not None, BLOCK_M=BM, BLOCK_N=BN,
            BLOCK_K=BK, ATOMIC=atomic, DOT_F32=interpreted(), num_warps=warps, num_stages=stages)
    return out.to(x2.dtype) if atomic else out


def _candidates(M: int, N: int, K: int, sms: int, group: int = 128,
                pairs: bool = False) -> list[tuple]:
    """Configs worth timing for this shape (see _launch for the tuples). group=129 is how
    fp4_gemm asks for the swap-AB dot configs alone (it keeps those with path "dot").
    pairs: the scales are in x's dtype, so the "mm" configs dequantize in 16-bit pairs (their
    fp32 twins never won against them and are left out)."""
    if interpreted():  # small tiles keep the CPU interpreter quick; split-K exercised when K allows
        split = 2 if K >= 256 else 1
        if M <= 4 and group <= 128:
            return [("gemv", 1, 32, 128, split, 4, 3)]
        if group == 129 or M <= 32:
            return [("dot", 16, 32, 128, split, 4, 1)]
        return [("mm", 16, 32, 128, split, 4, 1, 2, 1) + ((1,) if pairs else ())]
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
    if group == 129:  # the swap-AB dot configs, as before the "mm" path existed
        if M <= 64:
            bm = max(16, triton.next_power_of_2(M))
            for bn, stages in ((64, 4), (128, 3)):
                tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
                out.append(("dot", bm, bn, bk, split_for(tiles, bk), 4, stages))
            return out
        return out + [("dot", 128, 128, 128, 1, 8, 3), ("dot", 64, 128, 128, 1, 4, 4)]
    if M <= 64:  # swap-AB dot: decode-sized batches waste nothing on padding M
        bm = max(16, triton.next_power_of_2(M))
        # from M = 16 only the 128-wide tile ever won the sweep; below 16 both are timed
        for bn, stages in ((64, 4), (128, 3)) if M < 16 else ((128, 3),):
            tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
            out.append(("dot", bm, bn, bk, split_for(tiles, bk), 4, stages))
    if M < 16:
        return out
    # "mm": x as the A operand, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, ORDER),
    # GROUP_M 8, in 16-bit pairs when the scales are in x's dtype (pairs) and in fp32 otherwise:
    # the configs that won scripts/sweep_w4a16.py on an H200 (8B and 70B shapes, round 2;
    # cuBLAS bf16 time / ours). M <= 32: the swap-AB dot won every shape with fp16 scales
    # (1.02-1.37); with bf16 scales the pairs "mm" 16 x 128 x 256 won 6 of 8 (the pick:
    # 1.03-1.46). M = 64: pairs 64 x 128 x 128 (x permuted) won all 8 (0.64-1.01); with fp16
    # scales that tile or 64 x 256 in fp32, once the dot (0.51-0.80). M = 128: "mm" 128 x 256
    # or dequantize + cuBLAS (0.43-0.66); dequantize + cuBLAS won 15 of 16 at M = 256 and all
    # at 1024 and 4096 (0.43-0.92; "mm" at most 0.48).
    if M <= 32:
        tiles = ((max(16, triton.next_power_of_2(M)), 128, bk, 4, 3, 1),) if pairs else ()
    elif M <= 64:
        tiles = ((64, 128, 128, 4, 4, 2),) + (() if pairs else ((64, 256, bk, 8, 2, 1),))
    elif M <= 256:
        tiles = ((128, 256, 128, 8, 3, 1),)
    else:
        tiles = ()
    for bm, bn, bk_, warps, stages, order in tiles:
        split = split_for(triton.cdiv(M, bm) * triton.cdiv(N, bn), bk_, 1)
        cfg = ("mm", bm, bn, bk_, split, warps, stages, 8, order)
        out.append(cfg + (1,) if pairs else cfg)
    if M >= 128:
        out.append(("dequant",))
    return out


def _check_groups_tensor(where: str, name: str, t: Tensor, expected: tuple, g: int) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {expected} "
                         f"(K // group_size, N) for group_size={g}, K-group-major: build the "
                         "weight with pack_int4 or from_quantized")


def _that_fit(cands: list[tuple], run) -> list[tuple]:
    """The candidates that compile and launch on this GPU (a tile can ask for more shared
    memory than a smaller GPU has); the last error if none does."""
    from triton.runtime.errors import OutOfResources

    ok, err = [], None
    for c in cands:
        try:
            run(c)
            ok.append(c)
        except OutOfResources as e:
            err = e
    if not ok:
        raise err
    return ok


def _key(M, N, K, w, dtype):
    return ("w4a16", triton.next_power_of_2(M), N, K, w.group_size, w.zeros is not None, dtype,
            w.scales.dtype)


def _PICKED_CONFIG(M, N, K, w, dtype):
    from quantlab.kernels._runtime import picked

    return picked(_key(M, N, K, w, dtype))


def w4a16_matmul(x: Tensor, w: Int4Weight, config: tuple | None = None) -> Tensor:
    """x (..., K) bf16/fp16 @ W^T for an Int4Weight W of shape (N, K) -> (..., N) in x.dtype.

    config: a _launch tuple, e.g. ("mm", 64, 128, 256, 1, 4, 3, 8, 1), to force one path;
    default: the fastest of a few candidates for this shape, timed once per shape on the GPU.
    Paths: fused dequant + tensor-core dot, x as A ("mm", M >= 16) or swapped ("dot", M <= 64),
    fused dequant + CUDA-core GEMV (M <= 4), and for M >= 128 a Triton dequantize to 16-bit
    followed by cuBLAS. Weights packed with scales in x's dtype (from_quantized(q,
    scale_dtype=x.dtype)) get "mm" configs that dequantize two weights per operation instead.
    """
    where = "w4a16_matmul"
    check_dtype(where, "x", x, ACT_DTYPES)
    check_dtype(where, "w.qweight", w.qweight, (torch.int32,))
    check_dtype(where, "w.scales", w.scales, ACT_DTYPES)
    parts = (w.qweight, w.scales) if w.zeros is None else (w.qweight, w.scales, w.zeros)
    check_device(where, "quantlab.kernels.w4a16.w4a16_matmul_ref", x, *parts)
    if w.qweight.ndim != 2:
        raise ValueError(f"{where}: w.qweight must be 2-D (N, K // 8), got shape "
                         f"{tuple(w.qweight.shape)}")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"{where}: x has K={x.shape[-1]} but the weight has K={K}")
    _check_group(K, w.group_size)
    _check_groups_tensor(where, "w.scales", w.scales, (K // w.group_size, N), w.group_size)
    if w.zeros is not None:
        check_dtype(where, "w.zeros", w.zeros, (torch.uint8,))
        _check_groups_tensor(where, "w.zeros", w.zeros, (K // w.group_size, N), w.group_size)
    for name, t in zip(("w.qweight", "w.scales", "w.zeros"), parts, strict=False):
        check_contiguous(where, name, t)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        raise ValueError(f"{where}: x must be contiguous along K (stride {x.stride()}); pass "
                         "x.contiguous()")
    M = x2.shape[0]
    if config is None:
        sms = (1 if interpreted()
               else torch.cuda.get_device_properties(x.device).multi_processor_count)
        key = _key(M, N, K, w, x.dtype)
        cands = _candidates(M, N, K, sms, w.group_size, w.scales.dtype == x.dtype)
        if len(cands) > 1 and picked(key) is None:
            cands = _that_fit(cands, lambda c: _launch(x2, w, c))
        config = pick_config(key, cands, lambda c: _launch(x2, w, c))
    return _launch(x2, w, config).reshape(*x.shape[:-1], N)
