"""Quantize-on-write kernel (quantlab.kv.write) against its plain-torch reference: the same codes
and scales, bit for bit, interpreted on a CPU and compiled on a GPU (`kernels` tests)."""

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py turns the interpreter on without a GPU

pytestmark = pytest.mark.kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"

from quantlab.kv.codecs import get_codec  # noqa: E402
from quantlab.kv.write import ELEMENTS, write_per_token_head, write_per_token_head_ref  # noqa: E402


def awkward(B, H, T, D, seed, dtype):
    """(B, T, H, D) random values viewed as (B, H, T, D), as a model's k / v arrive, with a zero
    vector, subnormal, huge, tie-making and (for the caller to add) non-finite values."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 3, D)[torch.randperm(D, generator=g)]  # channel magnitudes
    x = torch.randn(B, T, H, D, generator=g) * spread
    x[0, 0, 0] = 0.0                                   # a zero vector: scale 0, codes 0
    if T > 1:
        x[0, 1, 0] = torch.arange(D) - D / 2           # integer ratios: x / s lands on .5 ties
    if T > 2:
        x[0, 2, 0] = 1e-39 * torch.randn(D, generator=g)  # subnormal amax and scale
    if T > 3:
        x[-1, 3, -1] = 3e38 * torch.rand(D, generator=g)  # near fp32's max
    return x.to(dtype).to(DEV).transpose(1, 2)


def run_both(x, element, L, pos):
    B, H, T, D = x.shape
    dt = ELEMENTS[element][0]
    out = []
    for fn in (write_per_token_head, write_per_token_head_ref):
        codes = torch.zeros(B, H, L, D, dtype=torch.int8, device=DEV).view(dt)
        scales = torch.full((B, H, L), -1.0, device=DEV)  # untouched positions stay -1
        fn(x, codes, scales, pos, element)
        out.append((codes.view(torch.uint8), scales))
    return out


@pytest.mark.parametrize("element", ["int8", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D", [(2, 3, 5, 32), (1, 8, 1, 128), (3, 2, 7, 16)])
def test_kernel_stores_the_reference_bits(element, dtype, B, H, T, D):
    x = awkward(B, H, T, D, seed=B * 100 + T, dtype=dtype)
    L = T + 6
    pos = torch.randperm(L)[:T].to(DEV)                # scattered, unordered positions
    (ck, sk), (cr, sr) = run_both(x, element, L, pos)
    assert torch.equal(ck, cr)
    assert torch.equal(sk, sr)
    untouched = torch.ones(L, dtype=torch.bool, device=DEV)
    untouched[pos] = False
    assert (sk[:, :, untouched] == -1).all() and (ck[:, :, untouched] == 0).all()


def test_reference_is_the_codec():
    x = awkward(2, 2, 4, 32, seed=1, dtype=torch.float32)
    for element, name in (("int8", "int8_per_token_head"), ("e4m3", "fp8_per_token_head")):
        codec = get_codec(name)
        (_, _), (c, s) = run_both(x, element, 4, torch.arange(4, device=DEV))
        parts = codec.encode(x, "k")
        assert torch.equal(c, parts["codes"].view(torch.uint8))
        assert torch.equal(s, parts["scale"])
        dec = codec.decode({"codes": c.view(parts["codes"].dtype), "scale": s}, "k")
        step = s[..., None] * (1.0 if element == "int8" else 2.0**-9)  # smallest code step
        bound = torch.maximum(x.abs() * 2.0**-4 if element == "e4m3" else 0 * x, step / 2)
        assert ((dec - x).abs() <= bound * 1.0001).all()


def test_non_finite_values():
    x = awkward(1, 2, 3, 16, seed=2, dtype=torch.float32).contiguous()
    x[0, 0, 1, 3] = float("nan")
    x[0, 1, 2, 5] = float("inf")
    x[0, 1, 0, 7] = float("-inf")
    pos = torch.arange(3, device=DEV)
    (ck, sk), (cr, sr) = run_both(x, "e4m3", 3, pos)
    assert torch.equal(ck, cr) and torch.equal(sk, sr)
    assert ck[0, 0, 1, 3] == 0x7F and torch.isfinite(sk).all()   # NaN kept in its element
    assert ck[0, 1, 2, 5] == 0x7E and ck[0, 1, 0, 7] == 0xFE     # +-inf saturate to +-448
    (ck, sk), (cr, sr) = run_both(x, "int8", 3, pos)
    for b, h, t in ((0, 0, 1), (0, 1, 2), (0, 1, 0)):  # int8: those vectors decode to NaN
        assert torch.isnan(sk[b, h, t]) and torch.isnan(sr[b, h, t]) and (ck[b, h, t] == 0).all()
    assert torch.equal(ck, cr)
    finite = ~torch.isnan(sk)
    assert torch.equal(sk[finite], sr[finite])


def test_bad_input_is_refused():
    x = torch.randn(1, 2, 3, 16, device=DEV)
    codes = torch.zeros(1, 2, 8, 16, dtype=torch.int8, device=DEV)
    scales = torch.zeros(1, 2, 8, device=DEV)
    pos = torch.arange(3, device=DEV)
    for fn in (write_per_token_head, write_per_token_head_ref):
        with pytest.raises(ValueError, match="element"):
            fn(x, codes, scales, pos, "int4")
        with pytest.raises(ValueError, match="stores"):
            fn(x, codes, scales, pos, "e4m3")
        with pytest.raises(ValueError, match="need codes"):
            fn(x, codes[:, :1], scales, pos, "int8")
        with pytest.raises(ValueError, match="positions"):
            fn(x, codes, scales, pos[:2], "int8")
        with pytest.raises(ValueError, match="outside the cache"):
            fn(x, codes, scales, torch.tensor([0, 8, 2], device=DEV), "int8")
        with pytest.raises(ValueError, match="outside the cache"):
            fn(x, codes, scales, torch.tensor([0, -1, 2], device=DEV), "int8")
        with pytest.raises(ValueError, match=r"\(B, H_kv, T, D\)"):
            fn(x[0], codes, scales, pos, "int8")
    assert (codes == 0).all() and (scales == 0).all()  # nothing written by a refused call
    for fn in (write_per_token_head, write_per_token_head_ref):  # int32 positions are fine
        fn(x, codes, scales, pos.int() + 5, "int8")
    assert (scales[:, :, 5:] > 0).all() and (scales[:, :, :5] == 0).all()
