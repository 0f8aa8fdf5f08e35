"""Quantize kernels: codes and scales equal quantlab.quantize bit for bit, on awkward input."""

import pytest
import torch

from quantlab.kernels.testing import DEV, randn  # noqa: I001  (sets TRITON_INTERPRET)

pytest.importorskip("triton")
from quantlab import get_scheme, quantize  # noqa: E402
from quantlab.kernels import quantize as qk  # noqa: E402

E4M3_MID = [0.0, 0.5, 1.0625, 1.1875, 15.0, 17.0, 232.0, 240.0, 432.0, 440.0, 446.0, 1.5 * 2**-9]
E2M1_MID = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 7.9]


def awkward(dtype, K=96, seed=0):
    """Rows: zeros, ties at every scale, saturating, tiny and subnormal, huge, plain random."""
    x = randn(8, K, seed=seed, std=3.0).cpu()
    x[0] = 0
    x[1, :12] = torch.tensor(E4M3_MID) * torch.tensor([1, -1] * 6)
    x[1, 12:] = 0
    x[1, 40] = 448.0                          # per-token scale exactly 1: e4m3 ties stay ties
    x[2, :32] = torch.tensor([1.0, -1.0] * 16) * 300.0   # MXFP8 block with scale 1
    x[2, 0] = 511.0
    x[3, :9] = torch.tensor(E2M1_MID)          # MXFP4 block with scale 1 (amax 7.9)
    x[3, 9:32] = 0.5
    x[3, 32:] = torch.arange(K - 32) + 0.5     # int8-style half-integer ties
    x[4] = randn(K, seed=seed + 1).cpu() * 1e-40 if dtype != torch.float16 else x[4] * 1e-6
    x[5] *= 1e30 if dtype != torch.float16 else 1e3
    x[6, :16] = torch.tensor([1e-3] * 15 + [6.0])
    return x.to(dtype).to(DEV)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ref(x, scheme):
    """The reference runs on the CPU (its minifloat tables live there)."""
    return quantize(x.cpu(), scheme)


def assert_same(q, r):
    q.codes, q.scales = q.codes.cpu(), q.scales.cpu()
    q.global_scale = None if q.global_scale is None else q.global_scale.cpu()
    assert q.codes.dtype == r.codes.dtype and q.codes.shape == r.codes.shape
    assert torch.equal(q.codes, r.codes), (q.codes != r.codes).nonzero()[:5]
    assert torch.equal(q.scales, r.scales)
    if r.global_scale is not None:
        assert torch.equal(q.global_scale, r.global_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,preset", [("e4m3", "fp8_dynamic"), ("int8", "int8_w8a8")])
def test_per_token_is_bit_exact(poison, dtype, fmt, preset):
    x = awkward(dtype)
    assert_same(qk.quantize_per_token(x, fmt), ref(x, get_scheme(preset).activations))


def test_per_token_long_rows_loop_over_k(poison):
    x = randn(2, 3, 200, seed=3, dtype=torch.bfloat16)  # 200 > the block: two passes over a row
    assert_same(qk.quantize_per_token(x), ref(x, get_scheme("fp8_dynamic").activations))


@pytest.mark.parametrize("K", [40, 128, 200])  # one pass with a ragged tile, exact tile, loop
def test_per_token_odd_row_counts(poison, K):
    """Programs take two rows at a time here: the last program's second row does not exist."""
    x = randn(7, K, seed=K, dtype=torch.bfloat16)
    for fmt, preset in (("e4m3", "fp8_dynamic"), ("int8", "int8_w8a8")):
        assert_same(qk.quantize_per_token(x, fmt), ref(x, get_scheme(preset).activations))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mxfp8", "mxfp4", "nvfp4"])
def test_blocks_are_bit_exact(poison, dtype, kind):
    x = awkward(dtype, seed=1)
    assert_same(qk.quantize_blocks(x, kind), ref(x, kind))


def test_every_e2m1_and_e4m3_code_round_trips(poison):
    from quantlab.formats import E2M1, E4M3

    g = E4M3.grid()
    x = torch.cat([g, g.new_zeros((-len(g)) % 32)]).reshape(1, -1) * 1.0
    x[0, 0] = 448.0  # every block holds 448 or less: scale 2**0 in MXFP8 only if amax in [256, 512)
    r = ref(x.to(DEV), "mxfp8")
    assert_same(qk.quantize_blocks(x.to(DEV), "mxfp8"), r)
    v = E2M1.grid()
    x4 = torch.cat([v, v.new_zeros(32 - len(v))]).reshape(1, 32).to(DEV)
    assert_same(qk.quantize_blocks(x4, "mxfp4"), ref(x4, "mxfp4"))


def test_nonfinite_rows_do_not_touch_other_rows(poison):
    x = awkward(torch.float32, seed=2)
    x[6, 5] = float("nan")
    x[7, 0] = float("inf")
    ok = x[:6]
    q = qk.quantize_per_token(x)
    r = ref(ok, get_scheme("fp8_dynamic").activations)
    assert torch.equal(q.codes[:6].cpu(), r.codes) and torch.equal(q.scales[:6].cpu(), r.scales)
    qb = qk.quantize_blocks(x, "mxfp8")
    rb = ref(ok, "mxfp8")
    assert torch.equal(qb.codes[:6].cpu(), rb.codes) and torch.equal(qb.scales[:6].cpu(), rb.scales)
    with pytest.raises(ValueError, match="NaN or inf"):
        qk.quantize_per_token(x, check_finite=True)


def test_static_nvfp4_global_scale_is_used(poison):
    x = randn(4, 64, seed=4)
    g = qk.nvfp4_global_scale(x)
    assert_same(qk.quantize_blocks(x, "nvfp4", global_scale=g), ref(x, "nvfp4"))


def test_bad_input_raises_with_advice():
    with pytest.raises(TypeError, match="expected one of"):
        qk.quantize_per_token(torch.ones(2, 32, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="pad K to 64"):
        qk.quantize_blocks(randn(2, 48, seed=5), "mxfp4")
    with pytest.raises(ValueError, match="contiguous"):
        qk.quantize_per_token(randn(64, 4, seed=6).t())
    with pytest.raises(ValueError, match="non-empty"):
        qk.quantize_per_token(torch.empty(0, 32, device=DEV))
    with pytest.raises(ValueError, match="kind must be"):
        qk.quantize_blocks(randn(2, 32, seed=7), "nf4")
