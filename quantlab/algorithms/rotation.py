"""Hadamard rotation: QuaRot (Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler,
Hensman, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv:2404.00456), which is also
SpinQuant's fixed-rotation baseline (Liu et al., arXiv:2405.16406, "R1/R2/R4" with Hadamards).

For an orthogonal Q, (x Q)(W Q)^T = x W^T, and RMSNorm(x Q) = RMSNorm(x) Q once the norm's
weight is folded into the next linear. So the whole residual stream can live in a rotated basis:
embeddings E Q, every linear reading the residual W Q, every linear writing it Q^T W. A
randomized Hadamard Q spreads each outlier channel over all channels, so activations and weights
become near-Gaussian and a 4-bit grid fits them (W4A4). Steps, as in the paper (section 4):
1. fold every RMSNorm weight into the linears that read it (`fuse_rmsnorms`);
2. rotate the residual stream with Q = D H / sqrt(d), D random signs (`rotate_model`);
3. rotate each value head by a Hadamard, undone in o_proj's columns (offline, exact);
4. an online Hadamard on down_proj's input (the product of gate and up has outliers no offline
   rotation reaches), its inverse folded into down_proj's weight (`HadamardInput`).
Departures: the online Hadamard across heads before o_proj and the query/key rotation for a
quantized KV cache are left out; rotations are applied in float64 and stored in the model dtype.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor, nn

from quantlab.algorithms.calibration import decoder_layers, static_act_scales
from quantlab.algorithms.gptq import gptq
from quantlab.nn import quantize_model
from quantlab.schemes import Scheme, get_scheme


def fwht(x: Tensor) -> Tensor:
    """Fast Walsh-Hadamard transform along the last dim, unnormalized: x (..., n) @ H_n with
    H_n the Sylvester Hadamard matrix (symmetric, entries +-1), n a power of two; n log2 n adds."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {n}; use hadamard_transform for "
                         "n = m * 2**k (m = 12, 20, 24, ...) or pad the dimension")
    lead, h, y = x.shape[:-1], 1, x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


@cache
def paley_hadamard(m: int) -> Tensor:
    """Paley construction I: a Hadamard matrix of order m (float64 +-1) when q = m - 1 is a prime
    with q = 3 (mod 4): H = I + [[0, 1^T], [-1, J]], J[i, j] = Legendre symbol of (j - i) mod q."""
    q = m - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley construction I needs m - 1 prime and = 3 mod 4, got m={m}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in residues else -1.0 for r in range(1, q)],
                       dtype=torch.float64)
    idx = torch.arange(q)
    S = torch.zeros(m, m, dtype=torch.float64)
    S[0, 1:], S[1:, 0] = 1.0, -1.0
    S[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return S + torch.eye(m, dtype=torch.float64)


def _split(n: int) -> tuple[int, int]:
    """n = m * 2**k with m = 1 or a Paley order; the smallest such m."""
    p = n & -n  # largest power of two dividing n
    if p == n:
        return 1, n
    m = n // p
    while p > 1:
        m, p = m * 2, p // 2
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            return m, p
    raise ValueError(f"no Hadamard construction here for size {n}: supported are 2**k and m * 2**k "
                     "with m - 1 a prime = 3 (mod 4) (m = 4, 8, 12, 20, 24, 32, 44, ...); pad the "
                     "dimension, or skip this rotation (rotate_model(..., online_down=False))")


def hadamard_transform(x: Tensor) -> Tensor:
    """x (..., n) @ H_n / sqrt(n), an orthonormal Hadamard transform: the fast transform along
    2**k and a small dense Paley matrix along m for n = m * 2**k (n = 768 = 12 * 64)."""
    n = x.shape[-1]
    m, p = _split(n)
    y = fwht(x.reshape(*x.shape[:-1], m, p))
    if m > 1:  # (x @ (A kron B))[c, d] = sum_ab x[a, b] A[a, c] B[b, d]
        y = torch.einsum("...ab,ac->...cb", y, paley_hadamard(m).to(y.dtype))
    return y.reshape(x.shape) / n**0.5


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal (n, n) matrix H with hadamard_transform(x) = x @ H."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).to(dtype)


def random_hadamard(n: int, seed: int = 0) -> Tensor:
    """Q = D H (float64, orthogonal), D a diagonal of random signs: QuaRot's randomized Hadamard."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(n)


class HadamardInput(nn.Module):
    """y = linear(x @ H): an online Hadamard before a linear whose weight was rotated by H
    (QuaRot's rotation of down_proj's input). The wrapped layer is `.linear`."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(hadamard_transform(x.float()).to(x.dtype))


def _set(param: Tensor, value: Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


@torch.no_grad()
def fuse_rmsnorms(model: nn.Module) -> nn.Module:
    """Fold each RMSNorm's weight g into the linears reading its output (W[:, j] *= g_j) and
    set g = 1, in place; unties lm_head from the embeddings. Outputs are unchanged."""
    layers = decoder_layers(model)
    emb, head = model.model.embed_tokens, model.lm_head
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    pairs = [(model.model.norm, [head])]
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        pairs += [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                  (layer.post_attention_layernorm, [m.gate_proj, m.up_proj])]
    for norm, lins in pairs:
        if getattr(norm, "bias", None) is not None or norm.weight.ndim != 1:
            raise ValueError(f"{type(norm).__name__} is not an RMSNorm with a weight only; "
                             "rotation needs RMSNorm (LayerNorm's mean subtraction breaks it)")
        g = norm.weight.double()
        for lin in lins:
            _set(lin.weight, lin.weight.double() * g)
        _set(norm.weight, torch.ones_like(g))
    return model


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down: bool = True,
                 rotate_heads: bool = True) -> nn.Module:
    """The float transform, in place: fuse RMSNorms, rotate the residual stream by a randomized
    Hadamard Q (d, d), each value head by H (head_dim), and down_proj's input online. The
    model's outputs are unchanged up to float rounding. Returns the model."""
    layers = decoder_layers(model)
    d = model.config.hidden_size
    _split(d)  # fail before changing anything
    fuse_rmsnorms(model)
    Q = random_hadamard(d, seed)
    emb = model.model.embed_tokens
    _set(emb.weight, emb.weight.double() @ Q)
    readers, writers = [model.lm_head], []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        readers += [a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj]
        writers += [a.o_proj, m.down_proj]
    for lin in readers:
        _set(lin.weight, lin.weight.double() @ Q)
    for lin in writers:
        _set(lin.weight, Q.T @ lin.weight.double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ Q)
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        if rotate_heads:
            hd = a.head_dim
            Hh = hadamard_matrix(hd)  # v_h -> v_h H: rows of each value head, columns of o_proj
            wv = a.v_proj.weight.double().reshape(-1, hd, d)
            _set(a.v_proj.weight, torch.einsum("ij,hjd->hid", Hh.T, wv).reshape(-1, d))
            if a.v_proj.bias is not None:
                _set(a.v_proj.bias, (a.v_proj.bias.double().reshape(-1, hd) @ Hh).reshape(-1))
            wo = a.o_proj.weight.double().reshape(d, -1, hd)
            _set(a.o_proj.weight, (wo @ Hh).reshape(d, -1))
        if online_down:
            H = hadamard_matrix(m.down_proj.in_features)
            _set(m.down_proj.weight, m.down_proj.weight.double() @ H)
            m.down_proj = HadamardInput(m.down_proj)
    return model


def quarot(model: nn.Module, scheme: Scheme | str, calib: Tensor | None = None, seed: int = 0,
           weights: str = "rtn", ignore: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Rotate (rotate_model) then quantize, in place: weights="rtn" rounds to nearest, "gptq" runs
    GPTQ on the rotated model (QuaRot's best setting; needs calib). calib: (B, T) int64 token
    ids, also used for static activation scales. Returns the model."""
    scheme = get_scheme(scheme)
    if weights not in ("rtn", "gptq"):
        raise ValueError(f"weights={weights!r}: use 'rtn' or 'gptq'")
    if calib is None and (weights == "gptq" or (scheme.activations is not None
                                                and not scheme.activations.dynamic)):
        raise ValueError(f"weights={weights!r} with {scheme.name} needs calib: (B, T) token ids")
    rotate_model(model, seed)
    if weights == "gptq":
        return gptq(model, scheme, calib, ignore=ignore)
    scales = static_act_scales(model, scheme, calib, ignore) if calib is not None else {}
    return quantize_model(model, scheme, ignore=ignore, act_scales=scales)
