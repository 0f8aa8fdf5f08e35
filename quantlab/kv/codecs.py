"""KV-cache codecs: how one layer's keys or values (B, H, T, D) become codes and scales, and back.

Every codec returns a dict of tensors whose dim 2 is the token axis (scales of a token group too),
so a cache appends by concatenating along dim 2. Element rounding goes through quantlab.formats
(E4M3 round-to-nearest-even with saturation, integer half-to-even), so codes are exact.

- fp8_e4m3: E4M3 codes, one static (calibrated) fp32 scale per layer for K and one for V (vLLM).
- int8_per_token_head, fp8_per_token_head: int8 / E4M3 codes, one fp32 scale per (token, head),
  computed when the token is written.
- kivi_4, kivi_2: asymmetric uint-b codes with fp16 scale and min; keys per channel over groups of
  32 tokens, values per token over groups of 32 channels; the newest tokens in full precision.
- turbo_4, turbo_3, turbo_2: randomized Hadamard rotation, a Lloyd-Max codebook per coordinate,
  the vector's norm in fp16.
- bf16, fp16: no quantization (the baseline).

KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
(arXiv:2402.02750), with its defaults group 32 and a residual window of 128 full-precision tokens.
TurboQuant: Zandieh et al., "TurboQuant: Online Vector Quantization with Near-optimal Distortion
Rate" (arXiv:2504.19874). We implement its MSE quantizer; see RotatedCodec for where we depart.

Non-finite keys and values: the E4M3 codecs keep a NaN in its own element (E4M3 has a NaN code;
the scale comes from the finite values, so one NaN never spreads to its head vector or the layer)
and saturate +-inf to +-448 x scale, as the saturating fp8 cast does; bf16/fp16 store them as they
are; the integer, KIVI and TurboQuant codecs have no code for them and raise (check_input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from quantlab.formats import E4M3, INT8, CodebookFormat, IntFormat
from quantlab.scales import _div_const, _safe_div

Parts = dict[str, Tensor]  # every tensor (B, H, T or T // group, ...) with the token axis at dim 2


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """(..., D) uint8 codes < 2**bits, D * bits % 8 == 0 -> (..., D * bits // 8) uint8.
    Little-endian bit stream: element i holds bits [i * bits, (i + 1) * bits) (4-bit: as
    quantlab.packing.pack_nibbles, element 2i in the low nibble)."""
    *lead, d = codes.shape
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole codes per byte, shift them into place
        per = 8 // bits
        shifts = torch.arange(per, device=codes.device) * bits
        grouped = codes.reshape(*lead, d // per, per).to(torch.int32)
        return (grouped << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device)
    b = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (..., D, bits)
    b = b.reshape(*lead, d * bits // 8, 8)
    return (b << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, d: int) -> Tensor:
    """Inverse of pack_bits: (..., D * bits // 8) uint8 -> (..., D) uint8."""
    *lead, _ = packed.shape
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, device=packed.device, dtype=torch.uint8) * bits
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, d)
    b = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    b = b.reshape(*lead, d, bits)
    return (b << torch.arange(bits, device=packed.device)).sum(-1).to(torch.uint8)


def static_scale(value, what: str = "static scale") -> Tensor:
    """A calibrated per-layer KV scale as an fp32 scalar tensor; raises unless finite and > 0
    (0 would decode every key to 0, NaN every key to NaN)."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what}={v}: a static KV scale must be finite and positive; "
                         "recalibrate it (quantlab.studies.kv.calibrate_static_scales) or leave "
                         "it out to take the first batch's amax / 448")
    return torch.tensor(v)


@dataclass(frozen=True)
class KVCodec:
    """Base: name, nominal element bits. Subclasses define encode/decode and the byte counts.

    static: True if the codec needs a per-layer scale for keys and one for values, calibrated
    beforehand (see quantlab.studies.kv.calibrate_static_scales); residual: tokens kept in full
    precision at the end of the cache (KIVI's window; 0 for the others).
    """

    name: str
    bits: int
    static = False
    residual = 0
    flush_every = 1  # tokens are encoded in blocks of this many (KIVI: its residual window)

    keeps_nonfinite = False  # True: NaN / inf survive encode (E4M3 codes, bf16 / fp16)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError, saying what to do, if this codec cannot take vectors of head_dim."""

    def check_input(self, x: Tensor, role: str) -> None:
        """Raise ValueError, saying what to do, unless x is (B, H, T, D) float keys (role "k") or
        values ("v") this codec can encode. encode() calls it first; the cache calls it before it
        changes anything, so a refused batch leaves the cache as it was."""
        if role not in ("k", "v"):
            raise ValueError(f"role={role!r}: use 'k' for keys or 'v' for values")
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                   else type(x).__name__)
            raise ValueError(f"{self.name}: {role} must be a (batch, kv_heads, tokens, head_dim) "
                             f"float tensor, got a {got}")
        if x.device.type == "meta":
            raise ValueError(f"{self.name}: {role} is on the meta device (no values); run the "
                             "model with real weights")
        self.check_head_dim(x.shape[-1])
        if not self.keeps_nonfinite and x.numel() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{self.name}: {bad} of {x.numel()} {role} elements are NaN or inf, "
                             f"which {self.name} has no code for; find the layer that produces "
                             "them (run the model in bfloat16/float32, not float16), or use "
                             "fp8_per_token_head / fp8_e4m3, which keep a NaN in its element")

    def encode(self, x: Tensor, role: str, scale: Tensor | None = None) -> Parts:
        raise NotImplementedError

    def decode(self, parts: Parts, role: str, scale: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def bytes_per_token(self, n_kv_heads: int, head_dim: int) -> float:
        """Bytes of keys + values per token per layer once encoded, scales included (per-group
        scales amortized over their group; fixed per-layer scales and the full-precision
        window excluded: see bytes_for)."""
        raise NotImplementedError

    @property
    def fixed_bytes(self) -> int:
        """Bytes per layer shared by all sequences: a static fp32 scale for K and one for V."""
        return 8 if self.static else 0

    def bytes_for(self, n_tokens: int, n_kv_heads: int, head_dim: int, full_bytes: int = 2) -> int:
        """Exact bytes one layer's cache holds for one sequence of n_tokens: encoded tokens with
        their scales, and the full-precision window (full_bytes per element: 2 for bf16).
        A layer holding B such sequences holds B * bytes_for(...) + fixed_bytes."""
        enc = (n_tokens // self.flush_every) * self.flush_every
        window = (n_tokens - enc) * n_kv_heads * head_dim * 2 * full_bytes
        return round(enc * self.bytes_per_token(n_kv_heads, head_dim)) + window


@dataclass(frozen=True)
class PerTokenHeadCodec(KVCodec):
    """int8 or E4M3 codes, one fp32 scale per (token, head) = amax over the head vector / format
    max, computed at write time (dynamic). codes (B, H, T, D) int8 or uint8 E4M3 bits; scale
    (B, H, T) float32. Static: one calibrated fp32 scale per layer and role instead (vLLM fp8)."""

    element: str = "int8"  # "int8" or "e4m3"
    per_tensor: bool = False

    @property
    def static(self) -> bool:  # type: ignore[override]
        return self.per_tensor

    @property
    def fmt(self):
        return INT8 if self.element == "int8" else E4M3

    @property
    def keeps_nonfinite(self) -> bool:  # type: ignore[override]
        return self.element == "e4m3"

    def encode(self, x: Tensor, role: str, scale: Tensor | None = None) -> Parts:
        self.check_input(x, role)
        x = x.float()
        if self.per_tensor:
            if scale is None:
                raise ValueError(f"{self.name} needs a calibrated per-layer scale for {role}")
            s = scale.float().reshape(1, 1, 1, 1)
        else:  # amax over the finite values: a NaN stays in its element, not its whole vector
            s = _div_const(x.nan_to_num(0, 0, 0).abs().amax(-1, keepdim=True), self.fmt.max)
        y = torch.where(torch.isfinite(x), _safe_div(x, s), x)
        codes = E4M3.encode(y, overflow="saturate") if self.element == "e4m3" else INT8.encode(y)
        return {"codes": codes} if self.per_tensor else {"codes": codes, "scale": s.squeeze(-1)}

    def decode(self, parts: Parts, role: str, scale: Tensor | None = None) -> Tensor:
        v = self.fmt.decode(parts["codes"])
        s = scale.float() if self.per_tensor else parts["scale"].unsqueeze(-1)
        return v * s

    def bytes_per_token(self, n_kv_heads: int, head_dim: int) -> float:
        return 2 * n_kv_heads * (head_dim + (0 if self.per_tensor else 4))


@dataclass(frozen=True)
class KiviCodec(KVCodec):
    """KIVI: asymmetric uint-b (min-max) codes; keys per channel over groups of `group` tokens
    (key outliers live in fixed channels), values per token over groups of `group` channels.
    Tokens are encoded `residual` at a time; the newest (< residual) stay in full precision.
    keys: codes (B, H, T, D * b / 8) packed, scale and min (B, H, T / group, D) fp16;
    values: codes packed likewise, scale and min (B, H, T, D / group) fp16."""

    group: int = 32
    window: int = 128

    @property
    def residual(self) -> int:  # type: ignore[override]
        return self.window

    @property
    def flush_every(self) -> int:  # type: ignore[override]
        return self.window

    def __post_init__(self):
        if self.window % self.group:
            raise ValueError(f"KIVI window={self.window} must be a multiple of group={self.group}")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group or (head_dim * self.bits) % 8:
            raise ValueError(f"{self.name}: head_dim={head_dim} is not a multiple of the value "
                             f"group {self.group}; use a codec with group dividing {head_dim} "
                             f"(e.g. KiviCodec('kivi', {self.bits}, group=16)) or turbo_*/int8")

    def _minmax_codes(self, g: Tensor, dim: int) -> Parts:
        fmt = IntFormat("u", self.bits, False)
        lo = g.amin(dim, keepdim=True).half()
        s = _div_const(g.amax(dim, keepdim=True) - lo.float(), fmt.qmax).half()
        codes = fmt.encode(_safe_div(g - lo.float(), s.float()))
        return {"codes": codes, "scale": s.squeeze(dim), "min": lo.squeeze(dim)}

    def encode(self, x: Tensor, role: str, scale: Tensor | None = None) -> Parts:
        self.check_input(x, role)
        B, H, T, D = x.shape
        if role == "k" and T % self.group:
            raise ValueError(f"{self.name}: keys are encoded in blocks of {self.group} tokens, got "
                             f"{T}; encode through QuantizedKVCache (it keeps the rest in its "
                             f"full-precision window) or pass a multiple of {self.group} tokens")
        x = x.float()
        if role == "k":  # (B, H, T/G, G, D): one scale per channel per token group
            p = self._minmax_codes(x.reshape(B, H, T // self.group, self.group, D), 3)
        else:  # (B, H, T, D/G, G): one scale per token per channel group
            p = self._minmax_codes(x.reshape(B, H, T, D // self.group, self.group), 4)
        p["codes"] = pack_bits(p["codes"].reshape(B, H, T, D), self.bits)
        return p

    def decode(self, parts: Parts, role: str, scale: Tensor | None = None) -> Tensor:
        B, H, T, nb = parts["codes"].shape
        D = nb * 8 // self.bits
        c = unpack_bits(parts["codes"], self.bits, D).float()
        s, lo = parts["scale"].float(), parts["min"].float()
        if role == "k":
            c = c.reshape(B, H, T // self.group, self.group, D)
            return (c * s.unsqueeze(3) + lo.unsqueeze(3)).reshape(B, H, T, D)
        c = c.reshape(B, H, T, D // self.group, self.group)
        return (c * s.unsqueeze(-1) + lo.unsqueeze(-1)).reshape(B, H, T, D)

    def bytes_per_token(self, n_kv_heads: int, head_dim: int) -> float:
        codes = head_dim * self.bits / 8
        k_scales = head_dim * 4 / self.group  # fp16 scale + min per channel, per group of tokens
        v_scales = head_dim // self.group * 4  # fp16 scale + min per channel group, per token
        return n_kv_heads * (2 * codes + k_scales + v_scales)


@cache
def lloyd_max_sphere(head_dim: int, bits: int, iters: int = 500) -> tuple[float, ...]:
    """Lloyd-Max codebook (2**bits values, ascending) for z = sqrt(d) * u_i, where u is uniform on
    the unit sphere in d dims: u_i has density proportional to (1 - t^2)^((d - 3) / 2) on [-1, 1]
    (TurboQuant, Lemma 1). Fitted numerically in float64 on a fine grid of |z| < 8 (the mass
    beyond is below 1e-14), cell sums from prefix sums so an iteration costs O(2**bits)."""
    lim = min(8.0, math.sqrt(head_dim))
    z = torch.linspace(-lim, lim, 64001, dtype=torch.float64)[1:-1]
    w = (1 - z * z / head_dim).clamp(min=0) ** ((head_dim - 3) / 2)
    cw = torch.cat([torch.zeros(1, dtype=torch.float64), w.cumsum(0)])
    cwz = torch.cat([torch.zeros(1, dtype=torch.float64), (w * z).cumsum(0)])
    n = 1 << bits
    c = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)  # N(0,1) quantiles
    for _ in range(iters):  # alternate nearest-centroid cells and cell means
        edges = torch.cat([torch.tensor([0]), torch.searchsorted(z, (c[1:] + c[:-1]) / 2),
                           torch.tensor([len(z)])])
        c, old = (cwz[edges[1:]] - cwz[edges[:-1]]) / (cw[edges[1:]] - cw[edges[:-1]]), c
        if float((c - old).abs().max()) < 1e-10:
            break
    c = (c - c.flip(0)) / 2  # the density is even: make the grid's float noise cancel
    return tuple(float(v) for v in c.float())


@cache
def hadamard_signs(head_dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(D, D) orthonormal Sylvester Hadamard matrix and (D,) random +-1 signs (fixed seed)."""
    h = torch.ones(1, 1)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=g).float() * 2 - 1
    return h / math.sqrt(head_dim), signs


@dataclass(frozen=True)
class RotatedCodec(KVCodec):
    """TurboQuant-style: u = x / ||x||, y = H diag(signs) u (randomized Hadamard rotation, so each
    coordinate of y has the sphere marginal whatever x's outlier channels), code_i = nearest of a
    Lloyd-Max codebook for sqrt(D) * y_i; decode x = ||x|| diag(signs) H^T c / sqrt(D).
    codes (B, H, T, D * b / 8) packed; norm (B, H, T) fp16.

    Departures from the paper: a randomized Hadamard transform instead of a dense random rotation
    (same marginals in the limit, O(D log D), the usual substitute: QuaRot, QuIP#); one fixed
    rotation for all layers and heads; the norm stored in fp16; no 1-bit QJL residual sketch
    (TurboQuant_prod), so inner products <q, k> carry the MSE quantizer's small bias; no split of
    outlier channels into a higher-bit group (the paper's 2.5 / 3.5-bit KV settings)."""

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim & (head_dim - 1) or head_dim < 8:
            raise ValueError(f"{self.name}: the Hadamard rotation needs a power-of-two head_dim "
                             ">= 8, "
                             f"got {head_dim}; use int8_per_token_head / fp8_per_token_head, or "
                             "pad head vectors to the next power of two")

    def _parts(self, d: int, device) -> tuple[Tensor, Tensor, CodebookFormat]:
        h, signs = hadamard_signs(d)
        book = CodebookFormat(f"lloyd_max_d{d}_b{self.bits}", lloyd_max_sphere(d, self.bits))
        return h.to(device), signs.to(device), book

    def encode(self, x: Tensor, role: str, scale: Tensor | None = None) -> Parts:
        self.check_input(x, role)
        d = x.shape[-1]
        h, signs, book = self._parts(d, x.device)
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True)
        y = (_safe_div(x, norm) * signs) @ h.T * math.sqrt(d)
        codes = book.encode(y)
        return {"codes": pack_bits(codes, self.bits), "norm": norm.squeeze(-1).half()}

    def decode(self, parts: Parts, role: str, scale: Tensor | None = None) -> Tensor:
        d = parts["codes"].shape[-1] * 8 // self.bits
        h, signs, book = self._parts(d, parts["codes"].device)
        y = book.decode(unpack_bits(parts["codes"], self.bits, d)) / math.sqrt(d)
        return (y @ h) * signs * parts["norm"].float().unsqueeze(-1)

    def bytes_per_token(self, n_kv_heads: int, head_dim: int) -> float:
        return 2 * n_kv_heads * (head_dim * self.bits / 8 + 2)


@dataclass(frozen=True)
class PlainCodec(KVCodec):
    """No quantization: keys and values stored as bf16 or fp16 (the baseline every codec is
    measured against). parts {"x": (B, H, T, D)}."""

    dtype: torch.dtype = torch.bfloat16
    keeps_nonfinite = True

    def encode(self, x: Tensor, role: str, scale: Tensor | None = None) -> Parts:
        self.check_input(x, role)
        fmax = torch.finfo(self.dtype).max
        if torch.finfo(x.dtype).max > fmax and bool((x.nan_to_num(0, 0, 0).abs() > fmax).any()):
            # finite in, inf out: refuse (fp16 stops at 65504)
            raise ValueError(f"{self.name}: {role} holds values beyond {self.name}'s max {fmax:g}, "
                             "which would be stored as inf; use the bf16 cache (fp32's range)")
        return {"x": x.to(self.dtype)}

    def decode(self, parts: Parts, role: str, scale: Tensor | None = None) -> Tensor:
        return parts["x"].float()

    def bytes_per_token(self, n_kv_heads: int, head_dim: int) -> float:
        return 2 * n_kv_heads * head_dim * self.bits // 8


CODECS: dict[str, KVCodec] = {c.name: c for c in (
    PlainCodec("bf16", 16),
    PlainCodec("fp16", 16, dtype=torch.float16),
    PerTokenHeadCodec("fp8_e4m3", 8, element="e4m3", per_tensor=True),
    PerTokenHeadCodec("int8_per_token_head", 8, element="int8"),
    PerTokenHeadCodec("fp8_per_token_head", 8, element="e4m3"),
    KiviCodec("kivi_4", 4),
    KiviCodec("kivi_2", 2),
    RotatedCodec("turbo_4", 4),
    RotatedCodec("turbo_3", 3),
    RotatedCodec("turbo_2", 2),
)}


def get_codec(codec: str | KVCodec) -> KVCodec:
    """A codec by preset name (see CODECS), or the codec itself."""
    if isinstance(codec, KVCodec):
        return codec
    if codec not in CODECS:
        raise ValueError(f"unknown KV codec {codec!r}; known: {', '.join(CODECS)}")
    return CODECS[codec]
