"""Element and scale formats: exact against torch's casts and against a brute-force oracle."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.formats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    FORMATS,
    INT2,
    INT4,
    INT8,
    NF4,
    UINT4,
    get_format,
)

FLOATS = (E4M3, E5M2, E2M3, E3M2, E2M1)
TORCH_FLOATS = (E4M3, E5M2)
INF, NAN = float("inf"), float("nan")


def torch_codes(x, fmt):
    return x.to(fmt.torch_dtype).view(torch.uint8)


def torch_overflow_rule(fmt):
    """torch's own rule for finite overflow and inf (torch 2.13 saturates E4M3FN; older NaN)."""
    t = torch.tensor([1e30]).to(fmt.torch_dtype).float()
    return "nan" if t.isnan().all() else ("inf" if t.isinf().all() else "saturate")


def wide_random(n, seed, lo=-30, hi=20):
    """float32 values spread over many binades, both signs, plus float32 subnormals."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.randn(n, generator=g)
    exps = torch.randint(lo, hi, (n,), generator=g).float()
    return torch.cat([mant * torch.exp2(exps), torch.randn(1000, generator=g) * 1e-40])


def tie_points(fmt):
    """Every midpoint between neighbouring grid values, and the floats just either side of it."""
    grid = fmt.grid()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(INF)), torch.nextafter(mids, torch.tensor(-INF))
    big = torch.tensor([fmt.max * 1.0001, fmt.max * 1.5, fmt.max * 4, 1e30, 3.4e38])
    return torch.cat([mids, up, down, grid, big, -big])


@pytest.mark.parametrize("fmt", TORCH_FLOATS, ids=lambda f: f.name)
def test_decode_every_code_matches_torch(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(fmt.torch_dtype).float()
    ours = fmt.decode(codes)
    assert torch.equal(ref.isnan(), ours.isnan())
    ok = ~ref.isnan()
    assert torch.equal(ref[ok], ours[ok])
    assert torch.equal(torch.signbit(ref[ok]), torch.signbit(ours[ok]))  # -0.0 too


@pytest.mark.parametrize("fmt", TORCH_FLOATS, ids=lambda f: f.name)
def test_encode_matches_torch_cast(fmt):
    """Millions of random float32, every tie and its neighbours, every grid value, overflow."""
    rule = torch_overflow_rule(fmt)
    x = torch.cat([wide_random(2_000_000, 1), tie_points(fmt), torch.tensor([0.0, -0.0])])
    assert torch.equal(fmt.encode_exact(x, overflow=rule), torch_codes(x, fmt))
    # the fast saturating path (clamp, then torch's cast) equals the explicit arithmetic
    assert torch.equal(fmt.encode(x, overflow="saturate"), fmt.encode_exact(x, "saturate"))


@pytest.mark.parametrize("fmt", TORCH_FLOATS, ids=lambda f: f.name)
def test_nan_and_inf_follow_torch(fmt):
    rule = torch_overflow_rule(fmt)
    x = torch.tensor([NAN, -NAN, INF, -INF])
    assert torch.equal(fmt.encode(x, overflow="saturate"), fmt.encode_exact(x, "saturate"))
    ours, ref = fmt.encode_exact(x, overflow=rule), torch_codes(x, fmt)
    assert torch.equal(ours[2:], ref[2:])
    assert fmt.decode(ours[:2]).isnan().all() and fmt.decode(ref[:2]).isnan().all()
    assert torch.equal(ours[:2] & 0x7F, ref[:2] & 0x7F)


def test_e8m0_every_code_and_cast_match_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(torch.float8_e8m0fnu).float()
    ours = E8M0.decode(codes)
    assert torch.equal(ref[:255], ours[:255]) and ours[255].isnan() and ref[255].isnan()
    x = torch.cat([wide_random(1_000_000, 2, -150, 130), E8M0.grid() * 1.5, E8M0.grid() * 0.75,
                   torch.tensor([0.0, -0.0, INF, -INF, NAN, 2.0**-149, 3.4e38, -2.0, 1.4e-45])])
    assert torch.equal(E8M0.encode(x), x.to(torch.float8_e8m0fnu).view(torch.uint8))


def oracle_encode(x, fmt):
    """Brute force: the nearest finite grid value; on a tie, the code with an even mantissa."""
    codes = torch.arange(1 << fmt.bits)
    vals = fmt.table
    finite = torch.isfinite(vals)
    codes, vals = codes[finite], vals[finite].double()
    d = (x.double()[:, None] - vals[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    even = (codes % 2 == 0)[None, :] & cand
    pick = torch.where(even.any(1, keepdim=True), even, cand)
    # same value twice only for +-0: choose the code whose sign matches x
    same_sign = pick & (torch.signbit(vals)[None, :] == torch.signbit(x)[:, None])
    pick = torch.where(same_sign.any(1, keepdim=True), same_sign, pick)
    return codes[pick.float().argmax(1)].to(torch.uint8)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_encode_matches_brute_force_oracle(fmt):
    g = torch.Generator().manual_seed(3)
    inside = (torch.rand(20_000, generator=g) * 2 - 1) * fmt.max * 1.2
    small = torch.randn(5_000, generator=g) * fmt.min_normal
    ties = tie_points(fmt)
    x = torch.cat([inside, small, ties[ties.abs() <= fmt.max * 1.5]])
    assert torch.equal(fmt.encode_exact(x, overflow="saturate"), oracle_encode(x, fmt))
    assert torch.equal(fmt.encode(x, overflow="saturate"), oracle_encode(x, fmt))


def test_e2m1_grid_and_description():
    assert E2M1.grid().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    d = E2M1.describe()
    assert (d["max"], d["min_subnormal"], d["bias"], d["has_nan"]) == (6.0, 0.5, 1, False)


@pytest.mark.parametrize("fmt,maxv,minsub,values", [
    (E4M3, 448.0, 2.0**-9, 253), (E5M2, 57344.0, 2.0**-16, 247), (E2M3, 7.5, 0.125, 63),
    (E3M2, 28.0, 0.0625, 63), (E2M1, 6.0, 0.5, 15)], ids=lambda v: getattr(v, "name", str(v)))
def test_format_constants(fmt, maxv, minsub, values):
    assert (fmt.max, fmt.min_subnormal, fmt.grid().numel()) == (maxv, minsub, values)


def test_mx_emax_elem_matches_spec():
    assert {f.name: f.emax for f in FLOATS} == {"e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4,
                                                "e2m1": 2}


def test_overflow_rules():
    big = torch.tensor([464.0, 465.0, 1000.0, INF])
    assert E4M3.decode(E4M3.encode(big, overflow="saturate")).tolist() == [448.0] * 4
    assert E4M3.decode(E4M3.encode(big, overflow="nan"))[1:].isnan().all()
    assert E4M3.decode(E4M3.encode(big[:1], overflow="nan")).item() == 448.0  # tie rounds to even
    assert E5M2.decode(E5M2.encode(torch.tensor([61440.0]))).item() == INF
    assert E5M2.decode(E5M2.encode(torch.tensor([61439.0]))).item() == 57344.0
    assert E2M1.decode(E2M1.encode(torch.tensor([-100.0, INF]))).tolist() == [-6.0, 6.0]
    with pytest.raises(ValueError, match="no inf"):
        E4M3.encode(big, overflow="inf")


@pytest.mark.parametrize("fmt", (E2M3, E3M2, E2M1, INT8, INT4, NF4), ids=lambda f: f.name)
def test_formats_without_nan_reject_nan(fmt):
    with pytest.raises(ValueError, match="NaN"):
        fmt.encode(torch.tensor([1.0, NAN]))


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.kind == "float"],
                         ids=lambda f: f.name)
def test_every_code_round_trips(fmt):
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    vals = fmt.decode(codes)
    ok = ~vals.isnan()
    assert torch.equal(fmt.encode(vals[ok], overflow="inf" if fmt.special == "ieee" else None),
                       codes[ok])


@given(st.lists(st.floats(-500, 500, width=32), min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_encode_is_monotone_and_nearest(xs):
    x = torch.tensor(sorted(xs), dtype=torch.float32)
    for fmt in FLOATS:
        v = fmt.round(x, overflow="saturate")
        assert bool((v[1:] >= v[:-1]).all())
        clipped = x.clamp(-fmt.max, fmt.max)
        grid = fmt.grid()
        nearest = (clipped[:, None] - grid[None, :]).abs().min(1).values
        assert torch.allclose((clipped - v).abs(), nearest, rtol=0, atol=0)


def test_integers_round_half_to_even_and_saturate():
    x = torch.tensor([-200.0, -128.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, 127.5, 300.0])
    assert INT8.encode(x).tolist() == [-128, -128, -2, -2, 0, 0, 2, 2, 126, 127, 127]
    assert INT4.encode(torch.tensor([-9.0, 7.6, 3.5])).tolist() == [-8, 7, 4]
    assert UINT4.encode(torch.tensor([-1.0, 15.5, 4.5])).tolist() == [0, 15, 4]
    assert INT2.grid().tolist() == [-2, -1, 0, 1]
    codes = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(INT8.encode(INT8.decode(codes)), codes)
    all_bytes = torch.arange(256, dtype=torch.uint8).view(torch.int8)
    assert torch.equal(INT8.table.to(torch.int8), all_bytes)


def test_nf4_nearest_and_midpoint_ties_go_down():
    v = NF4.table
    assert v.numel() == 16 and v[7] == 0 and v[0] == -1 and v[15] == 1
    assert torch.equal(NF4.encode(v), torch.arange(16, dtype=torch.uint8))
    mids = NF4.midpoints
    assert torch.equal(NF4.encode(mids), torch.arange(15, dtype=torch.uint8))
    assert torch.equal(NF4.encode(torch.nextafter(mids, torch.tensor(2.0))),
                       torch.arange(1, 16, dtype=torch.uint8))
    assert NF4.encode(torch.tensor([-3.0, 3.0])).tolist() == [0, 15]


def test_get_format_names_and_errors():
    assert get_format("fp8_e4m3") is E4M3 and get_format("FP4") is E2M1
    with pytest.raises(ValueError, match="known: e4m3"):
        get_format("e9m9")


def test_descriptions_are_complete():
    for fmt in FORMATS.values():
        d = fmt.describe()
        assert {"name", "bits", "max", "has_nan", "values"} <= set(d)
        assert d["values"] == fmt.grid().numel() or fmt.kind == "int"
        assert math.isfinite(d["max"])
