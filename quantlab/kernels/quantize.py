"""Quantize kernels: fp8 E4M3 and int8 per token (dynamic), MXFP8 / MXFP4 blocks of 32 (E8M0
scale, OCP FLOOR rule) and NVFP4 blocks of 16 (E4M3 scale, fp32 global).

Each returns the same QuantizedTensor, bit for bit, as the plain-torch reference
`quantlab.quantize.quantize(x, scheme)` for the scheme named beside it (`REFERENCE`). Rounding is
done with integer bit arithmetic and correctly rounded division (tl.div_rn). The one exception:
on the GPU, E4M3 elements go through the hardware conversion (cvt.rn.satfinite: round to nearest
even, saturating, what torch's cast does); the interpreter's float -> fp8 cast rounds wrongly, so
there the same kernels encode with integer arithmetic. The tests check both, each where it runs.

Launch configs (config=... on both launchers; scripts/sweep_quantize.py times a grid of them):
tile shape and warps, and a "fast" arithmetic that gives the same codes with fewer instructions
per element (MXFP4 / NVFP4 at 8192^2 took 0.089 / 0.107 ms on the H200 and 0.091 / 0.105 ms on
the H100, whose copy bandwidth is 30% lower: instructions, not bytes, bound them): the per-token
amax as an integer max of |x|'s bits, E2M1 codes by bit arithmetic (_encode_e2m1_fast), and the
per-token and NVFP4 divisions x / scale through the scale's correctly rounded reciprocal with
two fma residual steps (_div_rcp; plain division where the scale is out of its safe range).
Block kernels can also run a persistent grid (programs per SM, loop over tiles). On by default
where it won on the H200 (bf16, % of copy bandwidth at 8192^2 / 16384x8192, one program per
tile): MXFP4 56.0 / 58.8 -> 77.5 / 83.2, NVFP4 49.5 / 51.3 -> 63.7 / 66.7. Second-round
variants, timed beside them by pick_config: NVFP4's block scale amax / 6 / global through
_div_rcp too (fast=2), and per token the amax of bf16's own 16 bits (x widened only after the
row reduction) with int8 codes by a magic-number add (fast=2 / 3).

Non-finite input: the reference raises ValueError. The kernels do not scan for NaN/inf (it would
cost a pass over x); a row or block holding one gets unspecified codes and a non-finite or
saturated scale, and every other row or block is exact; a per-token row holding a NaN gets a NaN
scale, so it dequantizes to NaN, never to a finite value. Pass check_finite=True to raise instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantlab import scales
from quantlab.kernels._runtime import (
    check_contiguous,
    check_device,
    check_dtype,
    interpreted,
    pick_config,
)
from quantlab.quantize import QuantizedTensor
from quantlab.schemes import get_scheme

IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (scheme preset, which TensorScheme) each kernel reproduces.
REFERENCE = {"fp8_per_token": ("fp8_dynamic", "activations"),
             "int8_per_token": ("int8_w8a8", "activations"),
             "mxfp8": ("mxfp8", "weights"), "mxfp4": ("mxfp4", "weights"),
             "nvfp4": ("nvfp4", "weights")}
# element format constants: (EBITS, MBITS, BIAS, MAX, EMAX, NaN code or -1)
E4M3 = (4, 3, 7, 448.0, 8, 0x7F)
E2M1 = (2, 1, 1, 6.0, 2, -1)


@triton.jit
def _round_grid(a, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXV: tl.constexpr):
    """a: float32 >= 0 -> nearest value (ties to even) with MBITS mantissa bits, exponent >= EMIN
    (fixed step below: subnormals), saturated at MAXV. Exact: only power-of-two scalings."""
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127          # floor(log2 a); fp32 subnormals: -127
    e = tl.maximum(e, EMIN)
    inv_step = ((MBITS - e + 127) << 23).to(tl.float32, bitcast=True)
    step = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)
    r = a * inv_step                                         # < 2**(MBITS + 1) for finite a
    r = (r + 8388608.0) - 8388608.0                          # fp32 add rounds ties to even
    return tl.minimum(r * step, MAXV)


@triton.jit
def _encode_float(v, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                  MAXV: tl.constexpr, NAN_CODE: tl.constexpr):
    """v: float32 -> int32 codes sign|exponent|mantissa of the minifloat, RNE, saturating."""
    q = _round_grid(tl.abs(v), MBITS, 1 - BIAS, MAXV)
    qb = q.to(tl.int32, bitcast=True)
    normal = ((qb >> 23) & 0xFF) - 127 >= 1 - BIAS
    code_n = (((((qb >> 23) & 0xFF) - 127 + BIAS) << MBITS)
              | ((qb >> (23 - MBITS)) & ((1 << MBITS) - 1)))
    sub_mul = tl.full((), (MBITS - (1 - BIAS) + 127) << 23, tl.int32).to(tl.float32, bitcast=True)
    code_s = (q * sub_mul).to(tl.int32)                     # exact small integer
    code = tl.where(normal & (q > 0), code_n, code_s)
    code = code | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << (EBITS + MBITS))
    if NAN_CODE >= 0:
        code = tl.where(v != v, code | NAN_CODE, code)
    return code


@triton.jit
def _encode_e4m3(v, HW_CAST: tl.constexpr):
    """v: float32 -> E4M3 bit patterns (uint8), RNE, saturating at 448, NaN -> 0x7F. HW_CAST: the
    GPU's own conversion (cvt.rn.satfinite, one instruction per two values; its exactness is
    checked by the same tests on the GPU); else the integer arithmetic the interpreter needs."""
    if HW_CAST:
        code = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        code = _encode_float(v, 4, 3, 7, 448.0, 0x7F).to(tl.uint8)
    return code


@triton.jit
def _encode_e2m1_fast(a):
    """a: float32 >= 0 (|x| / scale) -> E2M1 magnitude codes 0..7 (int32), RNE, saturating at 6;
    the same codes as _encode_float(.., 2, 1, 1, 6.0, -1) in about 8 instructions instead of ~30.
    Below 1 the step is 0.5: a + 2**22 rounds a to it (ties to even) and its low bits are the
    code. From 1 up one mantissa bit is kept: add half an ulp of it less one plus the kept bit
    (ties to even) and shift; the shifted biased exponent|mantissa less 252 is the code."""
    a = tl.minimum(a, 6.0)
    code_s = (a + 4194304.0).to(tl.int32, bitcast=True) - 0x4A800000
    b = a.to(tl.int32, bitcast=True)
    code_n = (b + (0x1FFFFF - (252 << 22)) + ((b >> 22) & 1)) >> 22
    return tl.where(a < 1.0, code_s, code_n)


@triton.jit
def _div_rcp(a, d, y):
    """RN(a / d) for float32 a >= 0 given y = RN(1 / d), d in [2**-60, 2**60]: q0 = RN(a * y) is
    within 1.5 ulp; one residual step (r = a - d * q, exact by fma) makes it faithful, a second
    one correctly rounded (Markstein's theorem). 5 instructions per element against ~10 for
    div.rn (the reciprocal is computed once per scale). Outside that range of d, or for results
    under 2**-60 (only ever encoded as 0), intermediates could under- or overflow: the callers
    take tl.div_rn there."""
    nd = -d  # negating the per-scale d, not each q, keeps the residual one fma
    q = a * y
    q = tl.fma(tl.fma(q, nd, a), y, q)
    return tl.fma(tl.fma(q, nd, a), y, q)


@triton.jit
def _floor_log2(a):
    """a: float32 > 0 -> int32 floor(log2 a), exact for fp32 subnormals too (no FTZ hazard)."""
    b = a.to(tl.int32, bitcast=True)
    e = (b >> 23) - 127
    sub = (b & 0x7FFFFF).to(tl.float32)                      # subnormal: a = m * 2**-149
    e_sub = ((sub.to(tl.int32, bitcast=True) >> 23) - 127) - 149
    return tl.where(e == -127, e_sub, e)


@triton.jit
def _to_f32(raw, BF16_BITS: tl.constexpr):
    """Loaded values -> float32. bf16 arrives as its int16 bits: widening them by hand is exact
    everywhere (the triton 3.9 interpreter mis-converts bf16 subnormals)."""
    if BF16_BITS:
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return raw.to(tl.float32)


@triton.jit
def _per_token_kernel(
    x_ptr,            # (R, K) input rows, fp32/fp16/bf16, row stride stride_x
    q_ptr,            # (R, K) codes: uint8 (fp8) or int8
    s_ptr,            # (R,) float32 scales
    R, K, stride_x,
    FP8: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,        # rows per program
    BLOCK_K: tl.constexpr,        # columns per load
    ONE_PASS: tl.constexpr,       # BLOCK_K >= K: the tile stays in registers between the amax
                                  # and the encode, so x is read once
    HW_CAST: tl.constexpr,        # E4M3 through the GPU's conversion (see _encode_e4m3)
    FAST: tl.constexpr,           # amax as an integer max of |x|'s bits (a NaN, whose bits
                                  # exceed inf's, becomes the row's amax and so its scale), and
                                  # x / s through the row's reciprocal (_div_rcp)
    RAW: tl.constexpr,            # amax as that integer max too, of bf16's own 16 bits (the
                                  # tile is widened to fp32 only after the row reduction, so
                                  # fewer registers are live across it), and int8 codes by one
                                  # magic-number add (_int8_code) where FAST divides
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    offs = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    q_rows = q_ptr + rows[:, None] * K
    INT_AMAX: tl.constexpr = FAST or RAW
    if ONE_PASS:
        mask = r_ok[:, None] & (offs < K)[None, :]
        raw = tl.load(x_rows + offs[None, :], mask=mask, other=0)
        if INT_AMAX:
            amax_r = tl.max(_abs_bits(raw, BF16_BITS, RAW), axis=1)
        else:
            x = _to_f32(raw, BF16_BITS)
            amax_r = tl.max(tl.abs(x), axis=1)
            bad_r = tl.max((x != x).to(tl.int32), axis=1)
    else:
        if INT_AMAX:
            amax_i = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                mask = r_ok[:, None] & (k0 + offs < K)[None, :]
                raw = tl.load(x_rows + k0 + offs[None, :], mask=mask, other=0)
                amax_i = tl.maximum(amax_i, _abs_bits(raw, BF16_BITS, RAW))
            amax_r = tl.max(amax_i, axis=1)
        else:
            amax = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            bad = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                mask = r_ok[:, None] & (k0 + offs < K)[None, :]
                x = _to_f32(tl.load(x_rows + k0 + offs[None, :], mask=mask, other=0), BF16_BITS)
                amax = tl.maximum(amax, tl.abs(x))
                bad = tl.maximum(bad, (x != x).to(tl.int32))
            amax_r = tl.max(amax, axis=1)
            bad_r = tl.max(bad, axis=1)
    if INT_AMAX:
        if RAW and BF16_BITS:
            amax_r = amax_r << 16
        s = tl.div_rn(amax_r.to(tl.float32, bitcast=True), 448.0 if FP8 else 127.0)
    else:
        s = tl.div_rn(amax_r, 448.0 if FP8 else 127.0)
        # max() skips NaN, and int8 has no NaN code: a NaN in the row makes its scale NaN, so
        # the row dequantizes to NaN (an inf already does: its scale is inf) rather than to a
        # finite value
        s = tl.where(bad_r > 0, float("nan"), s)
    if FAST:
        # a zero row keeps +0 codes (the reference's 0 / 0 = +0): no sign, reciprocal 0
        d = tl.where(s == 0, 1.0, s)
        y = tl.where(s == 0, 0.0, tl.div_rn(1.0, d))
        sign = tl.where(s == 0, 0, -2147483648)
        # the whole program takes the reciprocal path when every row's scale allows it
        rcp = tl.min(((s == 0) | ((s >= 2.0**-60) & (s <= 2.0**60))).to(tl.int32), axis=0)
    else:
        d = tl.where(s == 0, 1.0, s)
        y = d
        sign = tl.where(s == 0, 0, -2147483648)
        rcp = 0
    tl.store(s_ptr + rows, s, mask=r_ok)
    if ONE_PASS:
        if INT_AMAX:
            x = _to_f32(raw, BF16_BITS)
        code = _per_token_code(x, d[:, None], y[:, None], sign[:, None], (s == 0)[:, None], rcp,
                               FP8, HW_CAST, FAST, RAW)
        tl.store(q_rows + offs[None, :], code, mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = r_ok[:, None] & (k0 + offs < K)[None, :]
            x = _to_f32(tl.load(x_rows + k0 + offs[None, :], mask=mask, other=0), BF16_BITS)
            code = _per_token_code(x, d[:, None], y[:, None], sign[:, None], (s == 0)[:, None],
                                   rcp, FP8, HW_CAST, FAST, RAW)
            tl.store(q_rows + k0 + offs[None, :], code, mask=mask)


@triton.jit
def _abs_bits(raw, BF16_BITS: tl.constexpr, RAW: tl.constexpr):
    """|x|'s bits as int32 (ordered as |x| is, NaN above inf): of bf16's 16 bits as loaded
    (RAW and BF16_BITS; shift the max left by 16 for the fp32 bits), else of x widened to
    fp32."""
    if RAW and BF16_BITS:
        return raw.to(tl.int32) & 0x7FFF
    return _to_f32(raw, BF16_BITS).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _per_token_code(x, d, y, sign, zero, rcp, FP8: tl.constexpr, HW_CAST: tl.constexpr,
                    FAST: tl.constexpr, RAW: tl.constexpr):
    """x / scale (correctly rounded, as the reference divides) -> e4m3 bits or int8. d: the
    scale (1 where it is 0), y: RN(1 / d) (FAST only), sign: the sign-bit mask (0 where the
    scale is 0), rcp: whether _div_rcp may divide (FAST only)."""
    if FAST and RAW and not FP8:
        if rcp != 0:
            code = _int8_code(_div_rcp(tl.abs(x), d, y), x)
        else:
            code = _encode_int8(tl.where(zero, 0.0, tl.div_rn(x, d)))
    else:
        if FAST:
            if rcp != 0:
                a = _div_rcp(tl.abs(x), d, y)
            else:
                a = tl.where(zero, 0.0, tl.div_rn(tl.abs(x), d))
            v = (a.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & sign)).to(
                tl.float32, bitcast=True)
        else:
            v = tl.where(zero, 0.0, tl.div_rn(x, d))
        if FP8:
            code = _encode_e4m3(v, HW_CAST)
        else:
            code = _encode_int8(v)
    return code


@triton.jit
def _encode_int8(v):
    """v: float32 (x / scale) -> int8, round half to even (torch.round), clamped to +-127."""
    a = tl.minimum(tl.abs(v), 128.0)
    a = (a + 8388608.0) - 8388608.0                          # ties to even, like torch.round
    return tl.minimum(tl.where(v < 0, -a, a), 127.0).to(tl.int8)


@triton.jit
def _int8_code(a, x):
    """a = RN(|x| / s) with s = RN(amax / 127) a normal float (the reciprocal path), so
    a <= 127 * (1 + 2**-23) < 127.5 and no clamp is needed -> int8 code with x's sign.
    a + 1.5 * 2**23 rounds a to an integer (ties to even) held in the low mantissa bits; the
    low byte of those bits, negated in two's complement where x < 0, is the code (int8 keeps
    the low byte, and 1.5 * 2**23's low byte is 0). 4 instructions against ~9."""
    r = (a + 12582912.0).to(tl.int32, bitcast=True)
    m = x.to(tl.int32, bitcast=True) >> 31                   # 0, or -1 where x's sign is set
    return ((r ^ m) - m).to(tl.int8)


@triton.jit
def _block_kernel(
    x_ptr,            # (G * B,) contiguous input, fp32/fp16/bf16
    q_ptr,            # (G * B,) uint8 codes
    s_ptr,            # (G,) float32 scales
    glob_ptr,         # NVFP4: (1,) float32 global scale; unused for MX
    G,
    B: tl.constexpr, BLOCK_G: tl.constexpr, NVFP4: tl.constexpr,
    EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr,
    EMAX: tl.constexpr, NAN_CODE: tl.constexpr, BF16_BITS: tl.constexpr,
    HW_CAST: tl.constexpr,        # E4M3 elements (MXFP8) through the GPU's conversion
    FAST: tl.constexpr,           # 1: E2M1 through _encode_e2m1_fast, NVFP4 division by
                                  # _div_rcp; 2: also NVFP4's block scale amax / 6 / global
                                  # through _div_rcp (two div.rn per block fewer)
    PERSIST: tl.constexpr,        # a program loops over tiles pid, pid + grid, ...
    STAGES: tl.constexpr,         # PERSIST: num_stages of that loop
):
    glob = tl.load(glob_ptr) if NVFP4 else 1.0
    # the global scale's reciprocal, once per program (FAST 2; unused elsewhere)
    y_glob = tl.div_rn(1.0, glob) if NVFP4 and FAST == 2 else 1.0
    if PERSIST:
        for t in tl.range(tl.program_id(0), tl.cdiv(G, BLOCK_G), tl.num_programs(0),
                          num_stages=STAGES):
            _block_tile(t, x_ptr, q_ptr, s_ptr, glob, y_glob, G, B, BLOCK_G, NVFP4, EBITS,
                        MBITS, BIAS, MAXV, EMAX, NAN_CODE, BF16_BITS, HW_CAST, FAST)
    else:
        _block_tile(tl.program_id(0), x_ptr, q_ptr, s_ptr, glob, y_glob, G, B, BLOCK_G, NVFP4,
                    EBITS, MBITS, BIAS, MAXV, EMAX, NAN_CODE, BF16_BITS, HW_CAST, FAST)


@triton.jit
def _block_tile(t, x_ptr, q_ptr, s_ptr, glob, y_glob, G,
                B: tl.constexpr, BLOCK_G: tl.constexpr, NVFP4: tl.constexpr,
                EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr,
                EMAX: tl.constexpr, NAN_CODE: tl.constexpr, BF16_BITS: tl.constexpr,
                HW_CAST: tl.constexpr, FAST: tl.constexpr):
    """Blocks t * BLOCK_G ... t * BLOCK_G + BLOCK_G - 1: codes and scales."""
    offs_g = t * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # t * BLOCK_G < G: int32 is enough
    g_ok = offs_g < G
    ptrs = offs_g[:, None] * B + tl.arange(0, B)[None, :]
    x = _to_f32(tl.load(x_ptr + ptrs, mask=g_ok[:, None], other=0), BF16_BITS)
    amax = tl.max(tl.abs(x), axis=1)
    sign = 8
    if NVFP4:
        if FAST:
            if (glob >= 2.0**-50) & (glob <= 2.0**50):  # then d = s * glob is in 2**+-60
                if FAST == 2:
                    # RN(RN(amax / 6) / glob) by _div_rcp: correctly rounded wherever the
                    # quotient reaches E4M3's range (>= 2**-11: no intermediate is subnormal
                    # there); amax / 6 over 2**60 saturates either way, and capping it keeps
                    # the residuals finite
                    t6 = _div_rcp(amax, 6.0, 0.16666667163372040)  # RN(1 / 6)
                    s = _round_grid(_div_rcp(tl.minimum(t6, 2.0**60), glob, y_glob), 3, -6,
                                    448.0)
                else:
                    s = _round_grid(tl.div_rn(tl.div_rn(amax, 6.0), glob), 3, -6, 448.0)
                d = s * glob
                d1 = tl.where(d == 0, 1.0, d)
                # a zero scale makes the block +0: reciprocal 0 gives a = 0, and no sign
                y = tl.where(d == 0, 0.0, tl.div_rn(1.0, d1))[:, None]
                a = _div_rcp(tl.abs(x), d1[:, None], y)
            else:
                s = _round_grid(tl.div_rn(tl.div_rn(amax, 6.0), glob), 3, -6, 448.0)
                d = s * glob
                dd = tl.where(d == 0, 1.0, d)[:, None]
                a = tl.where(d[:, None] == 0, 0.0, tl.div_rn(tl.abs(x), dd))
            sign = tl.where(d == 0, 0, 8)[:, None]
        else:
            s = _round_grid(tl.div_rn(tl.div_rn(amax, 6.0), glob), 3, -6, 448.0)  # E4M3 value
            d = s * glob
            dd = tl.where(d == 0, 1.0, d)[:, None]
            v = tl.where(d[:, None] == 0, 0.0, tl.div_rn(x, dd))
    else:
        # OCP MX v1.0 6.3: X = 2**(floor(log2 amax) - emax_elem), exponent clamped to E8M0.
        e = tl.minimum(tl.maximum(_floor_log2(amax) - EMAX, -127), 127)
        e = tl.where(amax == 0, -127, e)
        s = tl.where(e == -127, 0x00400000, (e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e, a normal float: exact
        v = x * inv[:, None]
        a = tl.abs(v)
    if HW_CAST and EBITS == 4:
        code = _encode_e4m3(v, True)
    elif FAST and EBITS == 2:
        code = (_encode_e2m1_fast(a) | ((x.to(tl.int32, bitcast=True) >> 28) & sign)).to(
            tl.uint8)
    else:
        code = _encode_float(v, EBITS, MBITS, BIAS, MAXV, NAN_CODE).to(tl.uint8)
    tl.store(q_ptr + ptrs, code, mask=g_ok[:, None])
    tl.store(s_ptr + offs_g, s, mask=g_ok)


def _prepare(where: str, x: Tensor, check_finite: bool) -> Tensor:
    check_dtype(where, "x", x, IN_DTYPES)
    check_device(where, "quantlab.quantize.quantize", x)
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}; need a non-empty (..., K) tensor")
    check_contiguous(where, "x", x)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: x holds NaN or inf; replace them (torch.nan_to_num) first")
    return x


def _bits(x: Tensor) -> Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _tensor_scheme(kind: str):
    preset, which = REFERENCE[kind]
    return getattr(get_scheme(preset), which)


def _sm_count(device) -> int:
    """Streaming multiprocessors of x's GPU (persistent grids); 4 in the interpreter."""
    if interpreted():
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _per_token_candidates(K: int, fp8: bool = True) -> list[tuple]:
    """PerTokenConfig tuples (BLOCK_R, BLOCK_K, num_warps, fast) worth timing: rows that fit in
    registers are read once (BLOCK_K >= K, at most ~64 values per thread); longer rows loop
    over K twice. fp8 keeps plain division (on the H200 fast=1 took 0.0707 ms at 8192^2
    against 0.0647 for fast=0) and times the bf16-bits amax (fast=2) beside it; int8 times the
    magic-number codes (fast=3) beside plain division."""
    kp = triton.next_power_of_2(K)
    fast = False if fp8 else 3
    if interpreted():  # small tiles; rows of up to 128 take the one-pass path, longer ones loop
        return [(2, kp if kp <= 128 else 64, 4, fast)]
    if kp > 16384:
        return [(1, 4096, 8, fast), (2, 2048, 8, fast), (4, 1024, 8, fast)]
    one = [(br, kp, w, fast) for br, w in ((1, 4), (1, 8), (1, 16), (2, 8), (4, 8), (4, 16),
                                           (8, 16))
           if br * kp <= 64 * 32 * w]
    other = [(1, kp, w, 2 if fp8 else False) for w in (4, 8) if kp <= 64 * 32 * w]
    return one + other + [(1, min(kp, 4096), 8, fast)]


def quantize_per_token(x: Tensor, fmt: str = "e4m3", check_finite: bool = False,
                       config: tuple | None = None) -> QuantizedTensor:
    """x (..., K) float -> codes (..., K) (e4m3: uint8 bit patterns; int8: int8), scales (..., 1)
    float32 = amax(row) / format max. Matches quantize(x, fp8_dynamic / int8_w8a8 activations).

    config: (BLOCK_R rows per program, BLOCK_K columns per load, num_warps, fast) to launch
    instead of the one pick_config times among _per_token_candidates (tuning sweeps). fast, bit
    flags: 1 integer amax and division through each row's reciprocal (_div_rcp); 2 integer
    amax of bf16's own bits, and with 1 int8 codes by a magic-number add. The codes are the
    same whatever the config.
    """
    where = f"quantize_per_token({fmt})"
    if fmt not in ("e4m3", "int8"):
        raise ValueError(f"{where}: fmt must be 'e4m3' or 'int8'")
    _prepare(where, x, check_finite)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    fp8 = fmt == "e4m3"
    q = torch.empty(x2.shape, dtype=torch.uint8 if fp8 else torch.int8, device=x.device)
    s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    R = x2.shape[0]

    def run(cfg):
        br, bk, warps, fast = cfg
        _per_token_kernel[(triton.cdiv(R, br),)](
            _bits(x2), q, s, R, K, x2.stride(0), FP8=fp8, BF16_BITS=x.dtype == torch.bfloat16,
            BLOCK_R=br, BLOCK_K=bk, ONE_PASS=bk >= K, HW_CAST=not interpreted(),
            FAST=bool(int(fast) & 1), RAW=bool(int(fast) & 2),
            num_warps=warps)

    if config is None:
        key = ("quant_per_token", min(triton.next_power_of_2(R), 8192), K, fp8, x.dtype)
        config = pick_config(key, _per_token_candidates(K, fp8), run)
    run(tuple(config))
    kind = "fp8_per_token" if fp8 else "int8_per_token"
    return QuantizedTensor(q.reshape(x.shape), s.reshape(*x.shape[:-1], 1), _tensor_scheme(kind),
                           x.shape, x.dtype)


def nvfp4_global_scale(x: Tensor) -> Tensor:
    """The NVFP4 per-tensor scale, multiplied on decode: amax / (448 * 6), 1 for an all-zero x."""
    return scales.nvfp4_global_scale(x.detach().abs().amax().float())  # the reference's own


def _block_candidates(kind: str, G: int) -> list[tuple]:
    """BlockConfig tuples (BLOCK_G blocks per program, num_warps, fast, programs per SM or 0 for
    one program per tile, num_stages of the persistent loop) pick_config times: the best exact
    ones of scripts/sweep_quantize.py on the H200 (bf16, 4096^2 to 16384x8192; % of copy
    bandwidth at 8192^2 / 16384x8192): MXFP4 (256, 4, fast) 77.5 / 83.2 and (128, 4, fast)
    (57.0 at 4096^2); NVFP4 (256, 8, fast) 63.7 / 66.7 and (128, 4, fast), each also with
    fast=2; MXFP8 (64, 4) 89.1 / 95.9 (fast changes nothing there). One program per tile: the
    persistent grids were slower."""
    if kind == "mxfp8":
        cands = [(64, 4, False, 0, 1), (128, 4, False, 0, 1)]
    elif kind == "mxfp4":
        cands = [(256, 4, True, 0, 1), (128, 4, True, 0, 1)]
    else:
        cands = [(256, 8, 2, 0, 1), (128, 4, 2, 0, 1), (256, 8, True, 0, 1), (128, 4, True, 0, 1)]
    if interpreted():
        return [(8, 4, cands[0][2], 0, 1)]
    return cands


def quantize_blocks(x: Tensor, kind: str, global_scale: Tensor | None = None,
                    check_finite: bool = False, config: tuple | None = None) -> QuantizedTensor:
    """x (..., K) float -> codes (..., K) uint8, scales (..., K // B) float32 (+ NVFP4 global).

    kind: "mxfp8" (E4M3, B = 32), "mxfp4" (E2M1, B = 32), "nvfp4" (E2M1, B = 16).
    global_scale: NVFP4 only; a calibrated fp32 scalar, or None to take amax(x) / (448 * 6)
    (one extra pass over x, through torch).
    config: (BLOCK_G, num_warps, fast, programs per SM (0: one per tile), num_stages) to launch
    instead of pick_config's choice among _block_candidates (tuning sweeps). fast: 1 (True)
    E2M1 codes through _encode_e2m1_fast and NVFP4's division through _div_rcp; 2 also NVFP4's
    block scale through _div_rcp. The codes are the same whatever the config.
    """
    where = f"quantize_blocks({kind})"
    if kind not in ("mxfp8", "mxfp4", "nvfp4"):
        raise ValueError(f"{where}: kind must be 'mxfp8', 'mxfp4' or 'nvfp4'")
    _prepare(where, x, check_finite)
    B = 16 if kind == "nvfp4" else 32
    K = x.shape[-1]
    if K % B:
        raise ValueError(f"{where}: the last dimension K={K} is not a multiple of the block "
                         f"size {B}; pad K to {-(-K // B) * B}")
    ebits, mbits, bias, maxv, emax, nan = E4M3 if kind == "mxfp8" else E2M1
    G = x.numel() // B
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    s = torch.empty(G, dtype=torch.float32, device=x.device)
    glob = None
    if kind == "nvfp4":
        glob = nvfp4_global_scale(x) if global_scale is None else torch.as_tensor(
            global_scale, dtype=torch.float32, device=x.device).reshape(())
        # checked where it costs no GPU sync (a host value), or when asked to scan
        host = not isinstance(global_scale, Tensor) or global_scale.device.type == "cpu"
        if global_scale is not None and (host or check_finite) and not bool(
                torch.isfinite(glob) & (glob > 0)):
            raise ValueError(f"{where}: global_scale={float(glob)} must be finite and positive "
                             "(0 turns every block into 0); calibrate it as amax / (448 * 6), "
                             "or pass None to take it from x")

    n_sm = _sm_count(x.device)

    def run(cfg):
        block_g, warps, fast, per_sm, stages = cfg
        tiles = triton.cdiv(G, block_g)
        _block_kernel[(min(tiles, per_sm * n_sm) if per_sm else tiles,)](
            _bits(x), q, s, glob if glob is not None else s, G, B=B, BLOCK_G=block_g,
            NVFP4=kind == "nvfp4", EBITS=ebits, MBITS=mbits, BIAS=bias, MAXV=maxv, EMAX=emax,
            NAN_CODE=nan, BF16_BITS=x.dtype == torch.bfloat16, HW_CAST=not interpreted(),
            FAST=fast, PERSIST=per_sm > 0, STAGES=stages, num_warps=warps)

    if config is None:
        config = pick_config(("quant_blocks", kind, min(triton.next_power_of_2(G), 2**20),
                              x.dtype), _block_candidates(kind, G), run)
    run(tuple(config))
    return QuantizedTensor(q, s.reshape(*x.shape[:-1], K // B), _tensor_scheme(kind), x.shape,
                           x.dtype, global_scale=glob)
