"""Quantize-on-write for a preallocated KV cache: new keys or values (B, H_kv, T, D) are encoded
per (token, head), as the int8_per_token_head / fp8_per_token_head codecs encode them, and stored
at their positions of the cache, in one kernel launch.

write_per_token_head_ref is the plain-torch definition (the codec's encode, then index_copy_);
write_per_token_head is the Triton kernel that must store the same bits. The torch version takes
about a dozen small kernels per tensor: in a decode step replayed from a CUDA graph, 24 launches
per layer cost more than the attention kernel they feed at batch 1 (Llama-3-8B, 32k context, H200:
the int8 cache's step was 1.4 ms slower than the bf16 cache's, python -m quantlab.cli throughput).

Codes and scales: scale = amax(|x|) over the head vector / 127 (int8) or / 448 (E4M3), correctly
rounded; code = round-half-even(x / scale) clamped to +-127, or E4M3 round-to-nearest-even
saturating at 448; a vector of zeros gets scale 0 and codes 0. Non-finite input: E4M3 keeps a NaN
(code 0x7F) or an inf (saturated to +-448) in its element and takes the scale over the finite
values, as the codec does; int8 has no code for them, so a vector holding a NaN or inf gets a NaN
scale and codes 0 and decodes to NaN (the codec refuses it with an error, which would need a host
sync here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantlab.kv.codecs import get_codec

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference works without triton
    triton = None

ELEMENTS = {"int8": (torch.int8, 127.0), "e4m3": (torch.float8_e4m3fn, 448.0)}


def _check(x: Tensor, codes: Tensor, scales: Tensor, pos: Tensor, element: str) -> None:
    if element not in ELEMENTS:
        raise ValueError(f"element={element!r}; use one of {tuple(ELEMENTS)}")
    if x.ndim != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be (B, H_kv, T, D) float32/float16/bfloat16 keys or values, "
                         f"got {tuple(x.shape)} {x.dtype}")
    dtype = ELEMENTS[element][0]
    if codes.dtype != dtype:
        raise ValueError(f"codes are {codes.dtype}, element {element!r} stores {dtype}")
    B, H, T, D = x.shape
    if codes.shape[:2] != (B, H) or codes.shape[3] != D or scales.shape != codes.shape[:3]:
        raise ValueError(f"x {tuple(x.shape)} into codes {tuple(codes.shape)}, scales "
                         f"{tuple(scales.shape)}: need codes (B, H, L, D) and scales (B, H, L) "
                         "with x's B, H and D")
    if scales.dtype != torch.float32 or pos.shape != (T,) or pos.dtype not in (torch.int32,
                                                                               torch.int64):
        raise ValueError(f"scales must be float32 (got {scales.dtype}) and pos ({T},) int64 or "
                         f"int32 positions (got {tuple(pos.shape)} {pos.dtype})")
    if len({t.device for t in (x, codes, scales, pos)}) != 1:
        raise ValueError("x, codes, scales and pos must be on one device, got "
                         f"{sorted({str(t.device) for t in (x, codes, scales, pos)})}")
    capturing = pos.is_cuda and torch.cuda.is_current_stream_capturing()
    outside = (pos < 0) | (pos >= codes.shape[2])
    if not capturing and bool(outside.any()):
        # (checked outside CUDA-graph capture, where reading pos back is allowed; the kernel
        # also never stores outside the cache)
        raise ValueError(f"positions {pos[outside][:8].tolist()} fall outside the cache's "
                         f"{codes.shape[2]} slots")


def write_per_token_head_ref(x: Tensor, codes: Tensor, scales: Tensor, pos: Tensor,
                             element: str) -> None:
    """x (B, H, T, D) float -> codes[:, :, pos] (B, H, L, D) int8 / float8_e4m3fn and
    scales[:, :, pos] (B, H, L) float32, in place; pos (T,) int64 / int32 positions in [0, L)
    (refused otherwise, except during CUDA-graph capture, where they are not written). The codec's
    encode (int8: a NaN or inf makes its vector's scale NaN, as the kernel does, instead of
    raising)."""
    _check(x, codes, scales, pos, element)
    codec = get_codec(f"{element.replace('e4m3', 'fp8')}_per_token_head")
    xf = x.float()
    bad_rows = ~torch.isfinite(xf).all(-1) if element == "int8" else None
    if bad_rows is not None:
        xf = torch.where(bad_rows[..., None], 0.0, xf)
    parts = codec.encode(xf, "k")
    c, s = parts["codes"], parts["scale"]
    if bad_rows is not None:
        s = torch.where(bad_rows, float("nan"), s)
    pos = pos.long()
    codes.view(torch.uint8).index_copy_(2, pos, c.view(torch.uint8))  # no float8 index_copy_
    scales.index_copy_(2, pos, s)


if triton is not None:
    from quantlab.kernels.quantize import _bits, _encode_e4m3, _encode_int8, _to_f32

    @triton.jit
    def _write_kernel(X, C, S, Pos, N, H, T, L, sxb, sxh, sxt, scb, sch, sct, ssb, ssh,
                      D: tl.constexpr, BLOCK: tl.constexpr, INT8: tl.constexpr,
                      MAXV: tl.constexpr, HW_CAST: tl.constexpr, BF16_BITS: tl.constexpr):
        """BLOCK head vectors (b, h, t) per program, flat index (b * H + h) * T + t < N."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        t = rows % T
        b = rows // (H * T)
        h = (rows // T) % H
        offs = tl.arange(0, D)
        x = _to_f32(tl.load(X + (b * sxb + h * sxh + t * sxt)[:, None] + offs[None, :],
                            mask=ok[:, None], other=0), BF16_BITS)
        finite = tl.abs(x) < float("inf")  # False for NaN and +-inf
        s = tl.div_rn(tl.max(tl.where(finite, tl.abs(x), 0.0), 1), MAXV)  # over finite values
        if INT8:  # a NaN or inf makes the scale NaN (int8 has no code for them)
            s = tl.where(tl.min(finite.to(tl.int32), 1) == 0, float("nan"), s)
        y = tl.where(s[:, None] == 0, 0.0, tl.div_rn(x, tl.where(s == 0, 1.0, s)[:, None]))
        if INT8:
            code = _encode_int8(tl.where((s != s)[:, None], 0.0, y))  # a NaN vector: codes 0
        else:
            code = _encode_e4m3(tl.where(finite, y, x), HW_CAST)
        p = tl.load(Pos + t, mask=ok, other=0).to(tl.int64)
        ok = ok & (p >= 0) & (p < L)  # (the launcher refuses such positions outside a capture)
        tl.store(C + (b * scb + h * sch + p * sct)[:, None] + offs[None, :], code,
                 mask=ok[:, None])
        tl.store(S + b * ssb + h * ssh + p, s, mask=ok)


def write_per_token_head(x: Tensor, codes: Tensor, scales: Tensor, pos: Tensor,
                         element: str) -> None:
    """The Triton kernel of write_per_token_head_ref (same arguments, same bits stored); x may
    be a strided view (the head-dim stride must be 1), codes and scales contiguous in D and L.
    A CUDA graph can capture it: under capture the positions are not read back to be checked
    (one host sync per call otherwise)."""
    if triton is None:
        raise ImportError("write_per_token_head needs triton: pip install triton "
                          "(or quantlab[kernels])")
    from quantlab.kernels._runtime import check_device, interpreted

    _check(x, codes, scales, pos, element)
    check_device("write_per_token_head", "write_per_token_head_ref", x, codes, scales, pos)
    B, H, T, D = x.shape
    if D & (D - 1) or x.stride(3) != 1 or codes.stride(3) != 1 or scales.stride(2) != 1:
        raise ValueError(f"head_dim={D} must be a power of two with x, codes and scales "
                         "contiguous along it (scales along the positions)")
    N = B * H * T
    if N == 0:
        return
    c = codes.view(torch.uint8) if element == "e4m3" else codes
    block = max(1, min(16, 2048 // D))
    _write_kernel[(triton.cdiv(N, block),)](
        _bits(x), c, scales, pos, N, H, T, codes.shape[2], x.stride(0), x.stride(1),
        x.stride(2), codes.stride(0), codes.stride(1), codes.stride(2), scales.stride(0),
        scales.stride(1), D=D, BLOCK=block,
        INT8=element == "int8", MAXV=ELEMENTS[element][1], HW_CAST=not interpreted(),
        BF16_BITS=x.dtype == torch.bfloat16, num_warps=4)
