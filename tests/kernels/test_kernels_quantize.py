"""Quantize kernels: codes and scales equal quantlab.quantize bit for bit, on awkward input."""

import pytest
import torch

from quantlab.kernels.testing import DEV, randn  # noqa: I001  (sets TRITON_INTERPRET)

pytest.importorskip("triton")
from quantlab import get_scheme, quantize  # noqa: E402
from quantlab.kernels import quantize as qk  # noqa: E402
from quantlab.quantize import QuantizedTensor  # noqa: E402

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


# Tuning configs (scripts/sweep_quantize.py): every tile, the fast arithmetic (integer amax,
# E2M1 by bit arithmetic, division through a per-scale reciprocal) and the persistent grid give
# the reference's codes too.
PER_TOKEN_CONFIGS = [(2, 128, 4, True), (1, 64, 4, True), (4, 32, 4, True), (2, 128, 4, False),
                     (2, 128, 4, 3), (1, 32, 4, 3), (2, 128, 4, 2), (2, 32, 4, 2)]
BLOCK_CONFIGS = [(8, 4, True, 0, 1), (4, 4, True, 1, 1), (16, 4, True, 1, 3), (2, 4, False, 2, 1),
                 (8, 4, 2, 0, 1), (4, 4, 2, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", PER_TOKEN_CONFIGS)
def test_per_token_configs_are_bit_exact(poison, dtype, config):
    x = awkward(dtype)
    x[7, 3] = -0.0 if dtype != torch.float16 else x[7, 3]
    for fmt, preset in (("e4m3", "fp8_dynamic"), ("int8", "int8_w8a8")):
        assert_same(qk.quantize_per_token(x, fmt, config=config),
                    ref(x, get_scheme(preset).activations))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", BLOCK_CONFIGS)
def test_block_configs_are_bit_exact(poison, dtype, config):
    x = awkward(dtype, seed=1)
    for kind in ("mxfp8", "mxfp4", "nvfp4"):
        assert_same(qk.quantize_blocks(x, kind, config=config), ref(x, kind))


def _around(values):
    """Each value, its float32 neighbours, and their negatives."""
    v = torch.tensor(values, dtype=torch.float32)
    both = torch.cat([v, torch.nextafter(v, v + 1), torch.nextafter(v, v - 1)])
    return torch.cat([both, -both])


def test_fast_e2m1_codes_at_every_rounding_boundary(poison):
    """MXFP4 blocks with scale 1 (amax 7.5): ties, their neighbours and subnormal-range values
    hit every branch of _encode_e2m1_fast; compared with the reference in fp32."""
    vals = _around([0.0, 2.0**-140, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0,
                    3.5, 4.0, 5.0, 6.0, 7.0, 7.5])
    vals = torch.cat([vals, randn(434 - len(vals), seed=8, std=2.0).cpu()])  # 14 blocks
    blocks = vals.reshape(-1, 31)
    x = torch.cat([torch.full((blocks.shape[0], 1), 7.5), blocks], 1).reshape(1, -1).to(DEV)
    for config in ((8, 4, True, 0, 1), (8, 4, False, 0, 1)):
        assert_same(qk.quantize_blocks(x, "mxfp4", config=config), ref(x, "mxfp4"))


@pytest.mark.parametrize("glob", [None, 3e-3, 2.0**-55, 2.0**55, 1.0 / 3])
def test_nvfp4_reciprocal_division_matches(poison, glob):
    """x / (s * global) through the reciprocal (global in [2**-50, 2**50]) or the fallback
    division (outside): the reference's codes, for fp32 values with every mantissa bit set."""
    x = randn(16, 64, seed=9, std=1.0).cpu()
    x[0] = _around([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(2)[:64] / 3
    if glob is not None:
        x = x * glob * 2688 / x.abs().amax()  # blocks' scales land in E4M3's range
    g = qk.nvfp4_global_scale(x) if glob is None else torch.tensor(glob)
    r = quantize(x, "nvfp4") if glob is None else None
    for config in ((8, 4, True, 0, 1), (8, 4, False, 0, 1), (8, 4, 2, 0, 1)):
        q = qk.quantize_blocks(x.to(DEV), "nvfp4", g.to(DEV), config=config)
        if r is None:  # the reference takes the global scale from x: compare the two paths
            r = QuantizedTensor(q.codes.cpu(), q.scales.cpu(), q.scheme, q.shape, q.dtype,
                                global_scale=q.global_scale.cpu())
            continue
        assert_same(q, r)


def test_per_token_fast_mixes_rows_on_both_division_paths(poison):
    """A program holding a tiny-scale row (scale < 2**-60: fallback division) and normal rows;
    the zero row and the -0 entries keep the reference's +0 / signed codes."""
    x = randn(8, 64, seed=10).cpu()
    x[1] *= 1e-25
    x[2] = 0
    x[3, :5] = -0.0
    x[5] *= 1e25
    for fmt, preset in (("e4m3", "fp8_dynamic"), ("int8", "int8_w8a8")):
        for config in ((4, 64, 4, True), (2, 32, 4, True), (4, 64, 4, 3), (2, 32, 4, 3)):
            assert_same(qk.quantize_per_token(x.to(DEV), fmt, config=config),
                        ref(x, get_scheme(preset).activations))


def test_int8_magic_codes_at_ties_and_the_top(poison):
    """fast=3 (int8 by a magic-number add, no clamp): x / s at half-integers (ties to even),
    their neighbours, +-127 and -0, for scales 1 and 3 and an irregular one."""
    v = _around([0.0, 0.5, 1.5, 2.5, 63.5, 64.5, 125.5, 126.5, 126.99, 127.0])
    v = torch.cat([v, torch.full((64 - len(v),), 0.25)])
    x = torch.stack([v, 3 * v, v * 0.7071, -v]).to(DEV)
    r = ref(x, get_scheme("int8_w8a8").activations)
    for config in ((4, 64, 4, 3), (1, 64, 4, 3), (4, 64, 4, False)):
        assert_same(qk.quantize_per_token(x, "int8", config=config), r)


def test_nvfp4_global_scale_is_the_correctly_rounded_quotient(poison):
    """amax / (448 * 6) correctly rounded, as the reference divides, for amax values where
    amax * (1 / 2688) (CUDA's division by a Python scalar) is 1 ulp off."""
    from quantlab.quantize import NVFP4_GLOBAL_DENOM as D

    v = torch.arange(0x3F80, 0x4780, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    v = v.float()
    off = v[(v / D) != v * (torch.tensor(1.0) / D)][:16]
    assert len(off) == 16
    for a in off:
        g = qk.nvfp4_global_scale(torch.stack([a, -a / 2]).to(DEV))
        assert torch.equal(g.cpu(), a / torch.tensor(D))
