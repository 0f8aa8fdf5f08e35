"""Decode attention over a quantized KV cache: one query token per sequence, GQA, split-K.

decode_attention_ref is the plain-torch definition; decode_attention is the Triton kernel that must
match it. The cache is contiguous: codes k, v (B, H_kv, T, D) as int8, float8_e4m3fn or bf16 (no
scale), per-(token, head) fp32 scales (B, H_kv, T), and per-sequence lengths (B,) int32.

The kernel dequantizes in registers: an int8 or E4M3 code is exact in fp16, so the codes go to the
tensor cores as fp16 (q rounded to fp16: exact for bf16 q inside fp16's range, +-65504) and the
scale multiplies the score (keys) or the probability (values), one multiply per token instead of
one per element. E4M3 converts by the hardware's cvt.rn.f16x2.e4m3x2; int8 by inline PTX (a lop3,
two prmt and two packed subtractions per four codes). Keys are read as their transpose so that
the tensor-core operand comes from shared memory in 16-byte reads. Split-K as in flash-decoding
(Dao et al. 2023): the T axis is cut into splits that run in parallel, then a second kernel merges
their softmax states; the number of splits is chosen so the programs fill whole waves of what the
GPU holds at once (_n_splits).

Measured on an H200 (`python -m quantlab.kv.bench`, data/bench/kv-nvidia-h200.json, Llama-3-8B
heads; against bf16 SDPA): int8 1.31-1.37x and fp8 1.48-1.51x at 32k tokens and batch 4-64, 1.13x
and 1.34x at batch 1. Wherever a step reads 128k tokens or more (batch x context), int8 reaches
68-75% and fp8 77-83% of its byte floor, where a bf16 cache reaches 95-107% (SDPA 100-108%).
The settings (128 tokens a step, 3 pipeline stages, 4 warps) are the best or within 6% of the best
of `--tune` (data/bench/tune-kv-decode-nvidia-h200.json) on every shape it times, for every cache
dtype. notes/kernels.md has the profile and what was tried.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from quantlab.kernels._runtime import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference works without triton
    triton = None


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, k_scale: Tensor | None = None,
                         v_scale: Tensor | None = None, lens: Tensor | None = None,
                         sm_scale: float | None = None) -> Tensor:
    """q (B, H_q, D); k, v (B, H_kv, T, D) codes or floats; k_scale, v_scale (B, H_kv, T) fp32 or
    None; lens (B,) valid tokens per sequence (default T) -> (B, H_q, D) float32."""
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    kf = k.float() if k_scale is None else k.float() * k_scale.float().unsqueeze(-1)
    vf = v.float() if v_scale is None else v.float() * v_scale.float().unsqueeze(-1)
    qf = q.float().reshape(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhtd->bhgt", qf, kf) * (sm_scale or 1 / math.sqrt(D))
    if lens is not None:
        s = s.masked_fill(torch.arange(T, device=q.device) >= lens.view(B, 1, 1, 1), float("-inf"))
    o = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(s, -1), vf)
    return o.reshape(B, Hq, D)


if triton is not None:
    # Four int8 codes (one 32-bit register) -> four fp16 (two registers), exact: the byte b + 128
    # (xor 0x80) placed under the fp16 exponent of 1024 reads as 1024 + b + 128; subtracting 1152
    # leaves b. One lop3, two prmt and two packed subtractions per four codes.
    _I8_TO_F16 = tl.constexpr(
        "{ .reg .b32 t, hi, m; xor.b32 t, $2, 0x80808080; mov.b32 hi, 0x64646464;"
        " mov.b32 m, 0x64806480; prmt.b32 $0, t, hi, 0x4140; prmt.b32 $1, t, hi, 0x4342;"
        " sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }")

    @triton.jit
    def _codes_to(x, DOT: tl.constexpr, I8_PTX: tl.constexpr):
        """Cache codes or values -> the tensor-core operand dtype DOT (exact for int8 / E4M3)."""
        if I8_PTX:
            return tl.inline_asm_elementwise(_I8_TO_F16, "=r,=r,r", [x], dtype=tl.float16,
                                             is_pure=True, pack=4)
        else:
            return x.to(DOT)

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, KS, VS, Lens, Op, Mp, Lp,  # inputs; partial out (B,Hq,S,D), max and sum (B,Hq,S)
        qk_scale,  # 1/sqrt(D) * log2(e): exponentials are exp2
        split_len,  # tokens per split, a multiple of BLOCK_N
        sqb, sqh, skb, skh, skt, svb, svh, svt, ssb, ssh,  # strides (scales: token stride 1)
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, N_SPLITS,
        DOT: tl.constexpr,  # tensor-core operand dtype: fp16 for codes, bf16 for a bf16 cache
        I8_PTX: tl.constexpr,  # int8 codes -> fp16 by bit arithmetic (inline PTX, GPU only)
    ):  # (fp32 under TRITON_INTERPRET)
        pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // HKV, pid_bh % HKV
        length = tl.load(Lens + b)
        start = pid_s * split_len
        end = tl.minimum(start + split_len, length)
        offs_g = tl.arange(0, GP)  # the G query heads sharing kv head h, padded for tl.dot
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :],
                    mask=(offs_g < G)[:, None], other=0.0).to(DOT)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            # k read as its transpose (D, BLOCK_N): the tensor-core operand then comes from
            # shared memory in 16-byte reads instead of single bytes
            kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skt + offs_d[:, None],
                         mask=valid[None, :], other=0.0)
            s = tl.dot(q, _codes_to(kt, DOT, I8_PTX))  # (GP, BLOCK_N) fp32; codes exact in DOT
            if HAS_SCALE:
                s = s * tl.load(KS + b * ssb + h * ssh + offs_n, mask=valid, other=0.0)[None, :]
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_SCALE:
                p = p * tl.load(VS + b * ssb + h * ssh + offs_n, mask=valid, other=0.0)[None, :]
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svt + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), _codes_to(v, DOT, I8_PTX))
            m_i = m_new
        row = (b * HKV * G + h * G + offs_g) * N_SPLITS + pid_s  # (B, Hq, S) flat index
        gm = offs_g < G
        tl.store(Op + row[:, None] * D + offs_d[None, :], acc, mask=gm[:, None])
        tl.store(Mp + row, m_i, mask=gm)
        tl.store(Lp + row, l_i, mask=gm)

    @triton.jit
    def _decode_merge_kernel(Op, Mp, Lp, Out, N_SPLITS, SP: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)  # one (b, query head)
        offs_s = tl.arange(0, SP)
        offs_d = tl.arange(0, D)
        ms = offs_s < N_SPLITS
        m = tl.load(Mp + pid * N_SPLITS + offs_s, mask=ms, other=float("-inf"))
        l_s = tl.load(Lp + pid * N_SPLITS + offs_s, mask=ms, other=0.0)
        w = tl.where(ms & (m > float("-inf")), tl.exp2(m - tl.max(m, 0)), 0.0)  # empty split: 0
        o = tl.load(Op + (pid * N_SPLITS + offs_s)[:, None] * D + offs_d[None, :],
                    mask=ms[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(l_s * w, 0)
        tl.store(Out + pid * D + offs_d, out.to(Out.dtype.element_ty))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_dtype(codes: bool):
    # triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (errors ~1e10 on a 16x16
    # product, checked 2026-11-23), so under TRITON_INTERPRET the dot runs in fp32: exact there.
    if interpreted():
        return tl.float32
    return tl.float16 if codes else tl.bfloat16


def _n_splits(work: int, T: int, block_n: int, slots: int) -> int:
    """Splits of the T axis per (sequence, kv head): `work` of those times the splits programs
    should fill whole waves of the `slots` programs the GPU holds at once (an unfilled last
    wave leaves SMs idle: 640 programs on 396 slots measured 54% of DRAM bandwidth under Nsight
    Compute). The fewest splits whose fill is within 2% of the best, searched up to four waves'
    worth of programs (more splits only add partial outputs to write and merge), at most 256,
    none shorter than one block."""
    most = max(1, min(-(-T // block_n), 256, 4 * -(-slots // work)))
    best_fill, best = 0.0, 1
    for s in range(1, most + 1):
        n = work * _cdiv(T, _cdiv(_cdiv(T, s), block_n) * block_n)  # programs after rounding
        fill = n / (-(-n // slots) * slots)
        if fill > best_fill + 0.02:
            best_fill, best = fill, s
    return best


_SLOTS: dict = {}  # (device, kernel settings) -> programs resident per SM


def _programs_per_sm(n_regs: int, shared: int, num_warps: int, props) -> int:
    """How many programs of a kernel (n_regs registers a thread, `shared` bytes of shared memory)
    one SM of a GPU (torch.cuda.get_device_properties) holds: registers are allocated per warp in
    units of 256, each program's shared memory takes 1 KB more (the system's reserve), and an SM
    runs at most 32 programs."""
    regs_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_warp // num_warps
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024)
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_scale: Tensor | None = None,
                     v_scale: Tensor | None = None, lens: Tensor | None = None,
                     sm_scale: float | None = None, n_splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4,
                     num_stages: int | None = None) -> Tensor:
    """Triton decode attention; same arguments as decode_attention_ref -> (B, H_q, D) in q.dtype.
    k, v: int8 or float8_e4m3fn codes with k_scale, v_scale, or bf16/fp16 with no scales.
    block_n, num_warps, num_stages: launch settings (defaults: see the module doc); n_splits:
    splits of the T axis (default: _n_splits, from the compiled kernel's occupancy)."""
    if triton is None:
        raise ImportError("decode_attention needs triton: pip install triton "
                          "(or quantlab[kernels])")
    B, Hq, D = q.shape
    _, Hkv, T, Dk = k.shape
    if Dk != D or v.shape != k.shape or k.shape[0] != B:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q "
                         "(B, H_q, D) and k, v (B, H_kv, T, D) with the same B and D")
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv}: GQA shares each kv head "
                         "among a whole number of query heads")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim={D}: the kernel needs a power of two >= 16 (tl.arange); use "
                         "decode_attention_ref for other sizes")
    has_scale = k_scale is not None
    plain = k.dtype in (torch.bfloat16, torch.float16)
    block_n = block_n or 128
    if has_scale != (v_scale is not None) or has_scale == plain:
        raise ValueError(f"k.dtype={k.dtype} with k_scale {'set' if has_scale else 'None'}: int8 "
                         "and float8_e4m3fn codes need k_scale and v_scale (B, H_kv, T); bf16/fp16 "
                         "keys and values take none")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last (head_dim) dimension: call .contiguous()")
    if has_scale and (k_scale.shape != (B, Hkv, T) or v_scale.shape != (B, Hkv, T)):
        raise ValueError(f"k_scale / v_scale must be (B, H_kv, T) = {(B, Hkv, T)}")
    if lens is None:
        lens = torch.full((B,), T, dtype=torch.int32, device=q.device)
    G = Hq // Hkv
    num_stages = num_stages or 3
    ks = k_scale.contiguous() if has_scale else lens  # dummy pointers when unused
    vs = v_scale.contiguous() if has_scale else lens
    settings = dict(HKV=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
                    HAS_SCALE=has_scale, DOT=_dot_dtype(has_scale),
                    I8_PTX=k.dtype == torch.int8 and not interpreted(),
                    num_warps=num_warps, num_stages=num_stages)

    def args(split_len: int, op: Tensor, mp: Tensor, lp: Tensor) -> tuple:
        return (q, k, v, ks, vs, lens, op, mp, lp,
                (sm_scale or 1 / math.sqrt(D)) * 1.4426950408889634, split_len,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), ks.stride(0) if has_scale else 0,
                ks.stride(1) if has_scale else 0)

    S = n_splits
    if S is None:
        slots = 4
        if q.device.type == "cuda":
            key = (q.device, k.dtype, q.dtype, tuple(sorted(
                (n, str(x)) for n, x in settings.items())))
            if key not in _SLOTS:  # compile (no launch) to read the kernel's resources
                f32 = torch.empty(1, device=q.device)
                kernel = _decode_split_kernel.warmup(*args(block_n, f32, f32, f32), N_SPLITS=2,
                                                     grid=(1,), **settings)
                kernel._init_handles()  # loads it: n_regs is known from here
                _SLOTS[key] = _programs_per_sm(kernel.n_regs, kernel.metadata.shared, num_warps,
                                               torch.cuda.get_device_properties(q.device))
            slots = _SLOTS[key] * torch.cuda.get_device_properties(
                q.device).multi_processor_count
        S = _n_splits(B * Hkv, T, block_n, slots)
    split_len = _cdiv(_cdiv(T, S), block_n) * block_n  # whole blocks per split
    S = _cdiv(T, split_len)
    op = torch.empty(B, Hq, S, D, dtype=torch.float32, device=q.device)
    mp = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    lp = torch.empty_like(mp)
    _decode_split_kernel[(B * Hkv, S)](*args(split_len, op, mp, lp), N_SPLITS=S, **settings)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(B * Hq,)](op, mp, lp, out, N_SPLITS=S,
                                    SP=max(2, triton.next_power_of_2(S)), D=D)
    return out


def sdpa_decode(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The bf16 peer: F.scaled_dot_product_attention over (B, H_kv, T, D) with enable_gqa."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)
