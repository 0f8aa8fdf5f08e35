"""Quantize kernels: fp8 E4M3 and int8 per token (dynamic), MXFP8 / MXFP4 blocks of 32 (E8M0
scale, OCP FLOOR rule) and NVFP4 blocks of 16 (E4M3 scale, fp32 global).

Each returns the same QuantizedTensor, bit for bit, as the plain-torch reference
`quantlab.quantize.quantize(x, scheme)` for the scheme named beside it (`REFERENCE`). Rounding is
done with integer bit arithmetic and correctly rounded division (tl.div_rn). The one exception:
on the GPU, E4M3 elements go through the hardware conversion (cvt.rn.satfinite: round to nearest
even, saturating, what torch's cast does); the interpreter's float -> fp8 cast rounds wrongly, so
there the same kernels encode with integer arithmetic. The tests check both, each where it runs.

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

from quantlab.kernels._runtime import (
    check_contiguous,
    check_device,
    check_dtype,
    interpreted,
    pick_config,
)
from quantlab.quantize import NVFP4_GLOBAL_DENOM, QuantizedTensor
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
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    offs = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_x
    q_rows = q_ptr + rows[:, None] * K
    if ONE_PASS:
        mask = r_ok[:, None] & (offs < K)[None, :]
        x = _to_f32(tl.load(x_rows + offs[None, :], mask=mask, other=0), BF16_BITS)
        amax_r = tl.max(tl.abs(x), axis=1)
        bad_r = tl.max((x != x).to(tl.int32), axis=1)
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
    s = tl.div_rn(amax_r, 448.0 if FP8 else 127.0)
    # max() skips NaN, and int8 has no NaN code: a NaN in the row makes its scale NaN, so the row
    # dequantizes to NaN (an inf already does: its scale is inf) rather than to a finite value
    s = tl.where(bad_r > 0, float("nan"), s)
    tl.store(s_ptr + rows, s, mask=r_ok)
    safe = tl.where(s == 0, 1.0, s)[:, None]
    zero = (s == 0)[:, None]
    if ONE_PASS:
        tl.store(q_rows + offs[None, :], _per_token_code(x, safe, zero, FP8, HW_CAST), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = r_ok[:, None] & (k0 + offs < K)[None, :]
            x = _to_f32(tl.load(x_rows + k0 + offs[None, :], mask=mask, other=0), BF16_BITS)
            code = _per_token_code(x, safe, zero, FP8, HW_CAST)
            tl.store(q_rows + k0 + offs[None, :], code, mask=mask)


@triton.jit
def _per_token_code(x, safe, zero, FP8: tl.constexpr, HW_CAST: tl.constexpr):
    """x / scale (correctly rounded, as the reference divides) -> e4m3 bits or int8."""
    v = tl.where(zero, 0.0, tl.div_rn(x, safe))
    if FP8:
        code = _encode_e4m3(v, HW_CAST)
    else:
        a = tl.minimum(tl.abs(v), 128.0)
        a = (a + 8388608.0) - 8388608.0                      # ties to even, like torch.round
        code = tl.minimum(tl.where(v < 0, -a, a), 127.0).to(tl.int8)
    return code


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
):
    offs_g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    ptrs = offs_g[:, None] * B + tl.arange(0, B)[None, :]
    x = _to_f32(tl.load(x_ptr + ptrs, mask=g_ok[:, None], other=0), BF16_BITS)
    amax = tl.max(tl.abs(x), axis=1)
    if NVFP4:
        glob = tl.load(glob_ptr)
        s = _round_grid(tl.div_rn(tl.div_rn(amax, 6.0), glob), 3, -6, 448.0)  # E4M3 value
        d = s * glob
        v = tl.where(d[:, None] == 0, 0.0, tl.div_rn(x, tl.where(d == 0, 1.0, d)[:, None]))
    else:
        # OCP MX v1.0 6.3: X = 2**(floor(log2 amax) - emax_elem), exponent clamped to E8M0.
        e = tl.minimum(tl.maximum(_floor_log2(amax) - EMAX, -127), 127)
        e = tl.where(amax == 0, -127, e)
        s = tl.where(e == -127, 0x00400000, (e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e, a normal float: exact
        v = x * inv[:, None]
    if HW_CAST and EBITS == 4:
        code = _encode_e4m3(v, True)
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


def _per_token_candidates(K: int) -> list[tuple]:
    """(BLOCK_R, BLOCK_K, num_warps) worth timing: rows that fit in registers are read once
    (BLOCK_K >= K, at most ~64 values per thread); longer rows loop over K twice."""
    kp = triton.next_power_of_2(K)
    if interpreted():  # small tiles; rows of up to 128 take the one-pass path, longer ones loop
        return [(2, kp if kp <= 128 else 64, 4)]
    if kp > 16384:
        return [(1, 4096, 8), (2, 2048, 8), (4, 1024, 8)]
    one = [(br, kp, w) for br, w in ((1, 4), (1, 8), (1, 16), (2, 8), (4, 8), (4, 16), (8, 16))
           if br * kp <= 64 * 32 * w]
    return one + [(1, min(kp, 4096), 8)]


def quantize_per_token(x: Tensor, fmt: str = "e4m3", check_finite: bool = False) -> QuantizedTensor:
    """x (..., K) float -> codes (..., K) (e4m3: uint8 bit patterns; int8: int8), scales (..., 1)
    float32 = amax(row) / format max. Matches quantize(x, fp8_dynamic / int8_w8a8 activations)."""
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
        br, bk, warps = cfg
        _per_token_kernel[(triton.cdiv(R, br),)](
            _bits(x2), q, s, R, K, x2.stride(0), FP8=fp8, BF16_BITS=x.dtype == torch.bfloat16,
            BLOCK_R=br, BLOCK_K=bk, ONE_PASS=bk >= K, HW_CAST=not interpreted(),
            num_warps=warps)

    key = ("quant_per_token", min(triton.next_power_of_2(R), 8192), K, fp8, x.dtype)
    run(pick_config(key, _per_token_candidates(K), run))
    kind = "fp8_per_token" if fp8 else "int8_per_token"
    return QuantizedTensor(q.reshape(x.shape), s.reshape(*x.shape[:-1], 1), _tensor_scheme(kind),
                           x.shape, x.dtype)


def nvfp4_global_scale(x: Tensor) -> Tensor:
    """The NVFP4 per-tensor scale, multiplied on decode: amax / (448 * 6), 1 for an all-zero x."""
    g = x.detach().abs().amax().float() / NVFP4_GLOBAL_DENOM
    return torch.where(g == 0, torch.ones_like(g), g)


def quantize_blocks(x: Tensor, kind: str, global_scale: Tensor | None = None,
                    check_finite: bool = False) -> QuantizedTensor:
    """x (..., K) float -> codes (..., K) uint8, scales (..., K // B) float32 (+ NVFP4 global).

    kind: "mxfp8" (E4M3, B = 32), "mxfp4" (E2M1, B = 32), "nvfp4" (E2M1, B = 16).
    global_scale: NVFP4 only; a calibrated fp32 scalar, or None to take amax(x) / (448 * 6)
    (one extra pass over x, through torch).
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

    def run(cfg):
        block_g, warps = cfg
        _block_kernel[(triton.cdiv(G, block_g),)](
            _bits(x), q, s, glob if glob is not None else s, G, B=B, BLOCK_G=block_g,
            NVFP4=kind == "nvfp4", EBITS=ebits, MBITS=mbits, BIAS=bias, MAXV=maxv, EMAX=emax,
            NAN_CODE=nan, BF16_BITS=x.dtype == torch.bfloat16, HW_CAST=not interpreted(),
            num_warps=warps)

    # (BLOCK_G blocks per program, num_warps)
    cands = ([(8, 4)] if interpreted() else
             [(128, 4), (64, 4), (256, 4), (256, 8), (512, 8), (1024, 16)])
    run(pick_config(("quant_blocks", kind, min(triton.next_power_of_2(G), 2**20), x.dtype),
                    cands, run))
    return QuantizedTensor(q, s.reshape(*x.shape[:-1], K // B), _tensor_scheme(kind), x.shape,
                           x.dtype, global_scale=glob)
