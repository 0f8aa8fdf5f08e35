"""Decode-attention Triton kernel against its plain-torch reference: interpreted on a CPU
(TRITON_INTERPRET=1), compiled on a GPU (these are `kernels` tests: `make test-gpu`).

Tolerances (relative error of the output): under the interpreter the kernel's dot runs in fp32
(triton 3.9's interpreter computes bf16 tl.dot wrongly), so CPU agreement is ~1e-6: 1e-5. On the
GPU the dot takes bf16 operands (q and the probabilities rounded to bf16: ~2^-9 each), measured
1.6e-3 to 3.0e-3 on an H200: 6e-3. A bf16 cache: the output itself is rounded to bf16: 1e-2.
"""

import pytest
import torch

triton = pytest.importorskip("triton")  # tests/conftest.py turns the interpreter on without a GPU

pytestmark = pytest.mark.kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CODES_TOL = 6e-3 if DEV == "cuda" else 1e-5

from quantlab.kv.attention import decode_attention, decode_attention_ref  # noqa: E402
from quantlab.kv.codecs import get_codec  # noqa: E402


def cache_for(codec, B, Hkv, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    k[..., 3] *= 10  # an outlier channel
    if codec == "bf16":
        return k.bfloat16(), v.bfloat16(), None, None
    c = get_codec(codec)
    pk, pv = c.encode(k, "k"), c.encode(v, "v")
    kc, vc = pk["codes"], pv["codes"]
    if kc.dtype == torch.uint8:  # E4M3 bit patterns: the kernel reads them as float8_e4m3fn
        kc, vc = kc.view(torch.float8_e4m3fn), vc.view(torch.float8_e4m3fn)
    return kc, vc, pk["scale"], pv["scale"]


def on_dev(*ts):
    return [t if t is None else t.to(DEV) for t in ts]


@pytest.mark.parametrize("codec,B,Hq,Hkv,T,D,splits", [
    ("int8_per_token_head", 2, 4, 2, 150, 32, 3),   # GQA 2, ragged last block, 3 splits
    ("fp8_per_token_head", 3, 8, 2, 77, 16, 2),     # GQA 4
    ("int8_per_token_head", 1, 2, 2, 40, 64, 1),    # MHA, one split
    ("bf16", 2, 6, 2, 100, 32, 4),                   # the bf16 baseline path, GQA 3
])
def test_kernel_matches_reference(codec, B, Hq, Hkv, T, D, splits):
    kc, vc, ks, vs = cache_for(codec, B, Hkv, T, D, seed=T)
    q = torch.randn(B, Hq, D)
    if codec == "bf16":
        q = q.bfloat16()
    lens = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    lens[0] = T
    q, kc, vc, ks, vs, lens = on_dev(q, kc, vc, ks, vs, lens)
    ref = decode_attention_ref(q, kc, vc, ks, vs, lens)
    out = decode_attention(q, kc, vc, ks, vs, lens, n_splits=splits, block_n=16)
    assert out.dtype == q.dtype and out.shape == (B, Hq, D) and out.device == q.device
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < (1e-2 if codec == "bf16" else CODES_TOL), err


def test_reference_is_attention_over_the_decoded_cache():
    kc, vc, ks, vs = cache_for("int8_per_token_head", 2, 2, 30, 16, seed=0)
    q = torch.randn(2, 4, 16)
    kd, vd = kc.float() * ks[..., None], vc.float() * vs[..., None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, enable_gqa=True).squeeze(2)
    assert torch.allclose(decode_attention_ref(q, kc, vc, ks, vs), want, atol=1e-5)


def test_kernel_rejects_bad_shapes_with_advice():
    kc, vc, ks, vs = on_dev(*cache_for("int8_per_token_head", 1, 2, 8, 16, seed=0))
    with pytest.raises(ValueError, match="not a multiple of H_kv"):
        decode_attention(torch.randn(1, 3, 16, device=DEV), kc, vc, ks, vs)
    with pytest.raises(ValueError, match="need k_scale and v_scale"):
        decode_attention(torch.randn(1, 2, 16, device=DEV), kc, vc)
    k24 = torch.zeros(1, 2, 8, 24, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(torch.randn(1, 2, 24, device=DEV), k24, k24)


def test_splits_fill_whole_waves():
    from types import SimpleNamespace

    from quantlab.kv.attention import _cdiv, _n_splits, _programs_per_sm

    h200 = SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                           max_threads_per_multi_processor=2048)
    # today's int8 kernel (168 registers, 75.8 KB): 3 per SM by both; the bf16 one of the first
    # sweep (88 registers, 38.9 KB): 5 by both; a 1-warp kernel with no shared memory: 32
    assert _programs_per_sm(168, 75776, 4, h200) == 3
    assert _programs_per_sm(88, 38912, 4, h200) == 5
    assert _programs_per_sm(16, 0, 1, h200) == 32
    slots = 3 * 132
    for work in (8, 32, 128, 512):           # batch x kv heads
        for T in (1000, 8192, 32768, 131072):
            s = _n_splits(work, T, 128, slots)
            split = _cdiv(_cdiv(T, s), 128) * 128
            n = work * _cdiv(T, split)       # programs launched
            fill = n / (_cdiv(n, slots) * slots)
            assert 1 <= s <= 256 and split >= 128
            # as full as any count up to four waves' worth (and 256, and one block each) makes
            # it, within 2%
            most = min(_cdiv(T, 128), 256, 4 * _cdiv(slots, work))
            best = max(work * _cdiv(T, _cdiv(_cdiv(T, c), 128) * 128)
                       / (_cdiv(work * _cdiv(T, _cdiv(_cdiv(T, c), 128) * 128), slots) * slots)
                       for c in range(1, most + 1))
            assert fill >= best - 0.02, (work, T, s, fill, best)
    assert _n_splits(128, 32768, 128, slots) == 3  # batch 16: 384 programs, 0.97 of one wave
