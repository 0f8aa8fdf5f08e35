"""Reference quantizers: exact rules, peers' bytes, error bounds and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import PRESETS, TensorScheme, dequantize, fake_quantize, get_scheme, quantize
from quantlab.eval import sqnr_db
from quantlab.formats import E2M1, E4M3, get_format
from quantlab.packing import gguf_q4_0_blocks, gguf_q8_0_blocks, pack_nibbles, unpack_nibbles
from quantlab.quantize import mx_scale

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def gaussian(*shape, seed=0, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def awkward_blocks(seed):
    """Random rows plus an all-zero block, a +-tie for the largest magnitude, values on the grid."""
    x = gaussian(48, 256, seed=seed, std=3.0)
    x[0, :32] = 0
    x[1, :32] = torch.tensor([2.0, -2.0] * 16)
    x[2] = torch.round(x[2] * 4) / 4
    x[3, :32] = torch.linspace(-8, 8, 32)
    x[4] = gaussian(256, seed=seed + 1) * 1e-6
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gguf_q8_0_bytes_equal_gguf_reference(seed):
    x = awkward_blocks(seed)
    ref = gguf_quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    ours = gguf_q8_0_blocks(quantize(x, "gguf_q8_0")).numpy().reshape(ref.shape)
    assert np.array_equal(ref, ours)
    deq = gguf_quants.dequantize(ref, GGMLQuantizationType.Q8_0)
    assert np.array_equal(deq, dequantize(quantize(x, "gguf_q8_0")).numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gguf_q4_0_bytes_equal_gguf_reference(seed):
    x = awkward_blocks(seed)
    ref = gguf_quants.quantize(x.numpy(), GGMLQuantizationType.Q4_0)
    ours = gguf_q4_0_blocks(quantize(x, "gguf_q4_0")).numpy().reshape(ref.shape)
    assert np.array_equal(ref, ours)
    deq = gguf_quants.dequantize(ref, GGMLQuantizationType.Q4_0)
    assert np.array_equal(deq, dequantize(quantize(x, "gguf_q4_0")).numpy())


def test_mxfp4_agrees_with_gguf_mxfp4_off_ties():
    """gguf's MXFP4 uses the same FLOOR scale; it breaks element ties by table order, not RNE,
    so compare codes away from exact ties (and away from -0.0, which gguf maps to +0)."""
    x = gaussian(64, 256, seed=5, std=2.0)
    q = quantize(x, "mxfp4")
    ref = gguf_quants.quantize(x.numpy(), GGMLQuantizationType.MXFP4).reshape(-1, 17)
    e = torch.from_numpy(ref[:, :1].copy()).float()
    assert torch.equal(torch.exp2(e - 127).flatten(), q.scales.flatten())
    nib = torch.from_numpy(ref[:, 1:].copy())
    ref_codes = torch.cat([nib & 0xF, nib >> 4], 1).reshape(x.shape)  # j low, j + 16 high
    v = (x.reshape(-1, 32) / q.scales.reshape(-1, 1)).reshape(x.shape).abs()
    tie = torch.isin(v, (E2M1.grid()[1:] + E2M1.grid()[:-1]).abs() / 2)
    keep = ~tie & (E2M1.decode(q.codes) != 0)  # gguf codes every zero as +0
    assert keep.float().mean() > 0.8
    assert torch.equal(q.codes[keep], ref_codes[keep])
    assert torch.equal(ref_codes[~keep & ~tie], torch.zeros_like(ref_codes[~keep & ~tie]))


def test_mx_floor_scale_rule_by_hand():
    # amax 5.0: floor(log2 5) = 2; E2M1 emax 2 -> X = 2**0 = 1; 5.0 -> 4 (RNE of 5 between 4 and 6)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 5.0, -0.26
    q = quantize(x, "mxfp4")
    assert q.scales.item() == 1.0
    assert E2M1.decode(q.codes[0, :2]).tolist() == [4.0, -0.5]
    # E4M3 elements: emax 8; amax 1000 -> floor(log2) = 9 -> X = 2; 1000 / 2 = 500 saturates to 448
    x[0, 0] = 1000.0
    q8 = quantize(x, "mxfp8")
    assert q8.scales.item() == 2.0 and E4M3.decode(q8.codes[0, 0]).item() == 448.0


def test_mx_rceil_never_clips_and_floor_may():
    amax = torch.tensor([[5.0], [6.0], [7.0], [0.0], [1e-40]])
    floor = mx_scale(amax, E2M1, "mx_floor").flatten()
    rceil = mx_scale(amax, E2M1, "mx_rceil").flatten()
    assert floor.tolist()[:3] == [1.0, 1.0, 1.0]  # 7.0 / 1 = 7 clips to 6 under FLOOR
    assert rceil.tolist()[:3] == [1.0, 1.0, 2.0]  # RCEIL: 7 / 6 -> 2**1
    assert floor[3].item() == rceil[3].item() == 2.0**-127
    assert bool((amax.flatten()[:3] / rceil[:3] <= 6).all())


def test_nvfp4_two_level_scales():
    x = gaussian(8, 64, seed=7, std=0.02)
    x[3, 5] = 0.5  # the tensor amax
    q = quantize(x, "nvfp4")
    glob = q.global_scale.item()
    assert glob == pytest.approx(0.5 / (448 * 6), rel=1e-7)
    assert torch.equal(E4M3.round(q.scales), q.scales)  # block scales are E4M3 values
    assert q.scales.max().item() == 448.0  # the block holding the tensor amax uses E4M3's top
    amax_blk = x.reshape(8, 4, 16).abs().amax(-1)
    assert torch.allclose(q.scales.squeeze(-1) * glob * 6, amax_blk, rtol=2**-4)
    # the compressed-tensors convention divides by 448 * 6 / amax: the same values
    ct_global = (448 * 6) / x.abs().max()
    ct = E2M1.decode(q.codes) * (q.scales.repeat_interleave(16, -1) / ct_global)
    assert torch.allclose(ct, dequantize(q), rtol=1e-6, atol=0)


BPW = {"fp8_per_tensor": 8 + 32 / 4096**2, "fp8_dynamic": 8 + 32 / 4096,
       "fp8_block": 8 + 32 / 128**2, "int8_w8a8": 8 + 32 / 4096, "w8a16": 8 + 32 / 4096,
       "w4a16": 4.125, "w4a16_asym": 4 + 20 / 128, "nf4": 4.5, "mxfp8": 8.25, "mxfp6": 6.25,
       "mxfp6_e3m2": 6.25, "mxfp4": 4.25, "mxfp4_a16": 4.25, "nvfp4": 4.5 + 32 / 4096**2,
       "nvfp4_a16": 4.5 + 32 / 4096**2, "gguf_q8_0": 8.5, "gguf_q4_0": 4.5}


def test_every_preset_has_an_exact_bits_per_weight():
    assert set(BPW) == set(PRESETS)
    x = torch.empty(4096, 4096).normal_(generator=torch.Generator().manual_seed(0))
    for name, bpw in BPW.items():
        q = quantize(x[:128] if name != "fp8_per_tensor" else x[:1], name)  # fast: bpw only
        rows = q.shape[0]
        per_tensor = 32 / (rows * 4096) if name in ("fp8_per_tensor", "nvfp4", "nvfp4_a16") else 0
        expect = bpw - (32 / 4096**2 if per_tensor else 0) + per_tensor
        assert q.bits_per_weight == pytest.approx(expect, rel=1e-12), name


# Gaussian(0, 1) SQNR in dB of a 256 x 1024 tensor, as `quantlab compare --source gaussian
# --size 1024` measures it (per-channel int8 loses ~0.8 dB at K = 4096: larger row maxima).
SQNR_DB = {"fp8_dynamic": 31.5, "int8_w8a8": 42.0, "w4a16": 18.6, "w4a16_asym": 19.9,
           "nf4": 20.7, "mxfp8": 30.6, "mxfp6": 30.9, "mxfp6_e3m2": 25.3, "mxfp4": 18.8,
           "nvfp4": 20.4, "gguf_q8_0": 45.4, "gguf_q4_0": 21.3}


@pytest.mark.parametrize("name", list(SQNR_DB))
def test_gaussian_sqnr_is_what_the_format_predicts(name):
    x = gaussian(256, 1024, seed=11)
    assert sqnr_db(x, fake_quantize(x, name)) == pytest.approx(SQNR_DB[name], abs=0.3)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zeros_and_dtypes_round_trip(name, dtype):
    x = torch.zeros(4, 256, dtype=dtype)
    y = fake_quantize(x, name)
    assert y.dtype == dtype and torch.equal(y, x)
    x = gaussian(4, 256, seed=3).to(dtype)
    y = fake_quantize(x, name)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())


@given(st.integers(1, 6), st.sampled_from([128, 256, 384]), st.floats(1e-3, 1e3),
       st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_integer_error_is_at_most_half_a_step(rows, k, std, seed):
    x = gaussian(rows, k, seed=seed, std=std)
    # fp32 scales: half a step. fp16 scales are rounded before the codes are chosen, so the
    # range can fall short by (levels - 1) * 2**-11 steps and the zero point shifts it by <= 1/2.
    for name, slack in (("int8_w8a8", 1e-5), ("w4a16", 15 * 2**-11), ("w4a16_asym", 15 * 2**-11)):
        q = quantize(x, name)
        step = q.scales.repeat_interleave(k // q.scales.shape[-1], -1)
        assert bool(((x - dequantize(q)).abs() <= step * (0.5 + slack)).all()), name


@given(st.sampled_from(["fp8_dynamic", "mxfp8", "mxfp6", "mxfp4", "nvfp4"]),
       st.floats(1e-4, 1e4), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_float_schemes_round_each_element_to_half_an_ulp_or_clip(name, std, seed):
    """Scaled elements v = x / scale inside the format's normal range keep half an ulp of relative
    error; those past its max (MX FLOOR scales allow up to 2**(emax + 1)) clip to +-max."""
    x = gaussian(4, 256, seed=seed, std=std)
    q = quantize(x, name)
    fmt = get_format(q.scheme.format)
    per = x.shape[-1] // q.scales.shape[-1]
    g = q.global_scale if q.global_scale is not None else 1
    scale = q.scales.repeat_interleave(per, -1) * g
    v, y = x / scale, dequantize(q)
    normal = (v.abs() >= fmt.min_normal) & (v.abs() <= fmt.max)
    rel = ((x - y).abs() / x.abs())[normal]
    assert bool((rel <= 2.0 ** -(fmt.mbits + 1) * (1 + 1e-6)).all())
    over = v.abs() > fmt.max
    assert torch.allclose(y[over], (torch.sign(x) * fmt.max * scale)[over], rtol=1e-6, atol=0)


def test_asymmetric_keeps_zero_exact_and_uses_zero_points():
    x = torch.rand(8, 256) * 3 + 1.0  # all positive: the range is [0, max]
    x[:, 7] = 0.0
    q = quantize(x, "w4a16_asym")
    assert q.zero_points is not None and q.zero_points.shape == q.scales.shape
    assert bool((dequantize(q)[:, 7] == 0).all())
    assert bool((q.zero_points == 0).all())


def test_block_scheme_handles_partial_edge_blocks():
    x = gaussian(200, 300, seed=4)
    q = quantize(x, "fp8_block")
    assert q.scales.shape == (2, 3) and q.codes.shape == (200, 300)
    assert q.scales[1, 2].item() == (x[128:, 256:].abs().max() / 448).item()
    assert sqnr_db(x, dequantize(q)) > 30


def test_static_activation_scale():
    ts = get_scheme("fp8_per_tensor").activations
    x = gaussian(16, 64, seed=9)
    q = quantize(x, ts, scale=torch.tensor(0.001))
    assert q.scales.item() == pytest.approx(0.001)
    assert E4M3.decode(q.codes).abs().max().item() == 448.0  # clipped, saturating
    with pytest.raises(ValueError, match="shape"):
        quantize(x, get_scheme("fp8_dynamic").activations, scale=torch.ones(3))


@pytest.mark.parametrize("bad,err,match", [
    (torch.tensor([[1.0, float("nan"), float("inf")] + [0.0] * 125]), ValueError,
     "1 NaN and 1 inf"),
    (torch.zeros(0, 128), ValueError, "empty"),
    (torch.ones(4, 100), ValueError, "group_size=128 does not divide the last dimension K=100"),
    (torch.ones(4, 128, dtype=torch.int32), TypeError, "floating-point"),
    (torch.ones(4, 128, dtype=torch.complex64), TypeError, "floating-point"),
    (torch.tensor(1.0), ValueError, "0-d"),
])
def test_bad_input_gets_a_clear_error(bad, err, match):
    with pytest.raises(err, match=match):
        quantize(bad, "w4a16")


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(ValueError, match="known schemes: fp8_per_tensor, fp8_dynamic"):
        quantize(torch.ones(4, 128), "int3_magic")


def test_block_needs_2d_and_schemes_validate():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 128, 128), "fp8_block")
    with pytest.raises(ValueError, match="asymmetric"):
        TensorScheme("e4m3", "channel", symmetric=False)
    with pytest.raises(ValueError, match="group_size"):
        TensorScheme("int4", "group")
    with pytest.raises(ValueError, match="signed"):
        TensorScheme("uint4", "channel")


def test_pack_nibbles_round_trip():
    c = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    p = pack_nibbles(c)
    assert p.shape == (3, 32) and torch.equal(unpack_nibbles(p), c)
    assert p[0, 0].item() == c[0, 0].item() | (c[0, 1].item() << 4)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


def test_storage_accounting_matches_bits():
    q = quantize(gaussian(64, 256), "w4a16")
    assert q.storage_bits == 64 * 256 * 4 + 64 * 2 * 16
    assert q.nbytes == math.ceil(q.storage_bits / 8)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["w8a16", "fp8_dynamic", "fp8_block", "mxfp4_a16", "nvfp4_a16",
                                    "gguf_q8_0", "w4a16"])
def test_reference_quantizer_is_the_same_on_cuda_and_cpu(scheme):
    """Scales are divided correctly rounded on every device (PyTorch's CUDA division by a Python
    scalar multiplies by its reciprocal, 1 ulp off for some values): same codes and scales."""
    from quantlab import quantize

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(512, 1024, generator=g) * torch.logspace(-3, 1, 1024)).to(torch.bfloat16)
    cpu, gpu = quantize(w.float(), scheme), quantize(w.float().cuda(), scheme)
    assert torch.equal(cpu.codes, gpu.codes.cpu())
    assert torch.equal(cpu.scales, gpu.scales.cpu())
