"""QuantLinear's triton backend against its reference backend: the kernel registry, each entry's
matmul against its plain-torch reference, and greedy tokens of the embedded model.

Under the interpreter (no GPU) the model tests use one decoder layer and a few tokens; the full
sweep over every served scheme is marked slow. On a GPU they run as they are.
"""

import warnings
import zlib

import pytest
import torch
from torch import nn

from quantlab import get_scheme
from quantlab.algorithms.calibration import static_act_scales
from quantlab.kernels._runtime import interpreted
from quantlab.kernels.registry import REGISTRY, find, served_schemes
from quantlab.kernels.testing import rel_err
from quantlab.nn import QuantLinear, bits_per_weight, quantize_model
from quantlab.schemes import PRESETS

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# as tests/kernels/test_kernels_*.py: the interpreter's dots round bf16 operands less exactly
TOL = 1e-2 if interpreted() else 3e-3


def test_registry_serves_exactly_the_listed_presets():
    assert set(served_schemes()) == {"w4a16", "w4a16_asym", "fp8_per_tensor", "fp8_dynamic",
                                     "fp8_block", "mxfp4_a16", "nvfp4_a16"}
    for name, s in PRESETS.items():
        e = find(s)
        assert (e is not None) == (name in served_schemes()), name
        if e is not None:
            assert name in e.schemes and e.bench and e.packing


def test_backend_choice_and_fallback():
    lin = nn.Linear(256, 128, dtype=torch.bfloat16, device=DEV)
    assert QuantLinear.from_linear(lin, "w4a16", backend="auto").backend == (
        "triton" if DEV == "cuda" else "reference")
    with pytest.warns(UserWarning, match="no Triton kernel serves nf4"):
        q = QuantLinear.from_linear(lin.cpu(), "nf4", backend="triton")
    assert q.backend == "reference" and "no Triton kernel serves" in repr(q)
    with pytest.raises(ValueError, match="use one of"):
        QuantLinear.from_linear(lin, "w4a16", backend="cuda")


@pytest.mark.parametrize("scheme", [s for e in REGISTRY for s in e.schemes])
def test_entry_matmul_matches_its_reference(scheme, poison):
    torch.manual_seed(zlib.crc32(scheme.encode()) % 1000)  # hash() is salted per process
    lin = nn.Linear(256, 128, bias=True, dtype=torch.bfloat16, device=DEV)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16, device=DEV)
    s = get_scheme(scheme)
    act_scale = x.float().abs().amax() / 448 if scheme == "fp8_per_tensor" else None
    ref = QuantLinear.from_linear(lin, s, act_scale=act_scale)
    tri = QuantLinear.from_linear(lin, s, act_scale=act_scale, backend="triton")
    # no float copy and no unpacked codes on the triton backend; same stored bits
    assert tri.qweight is None and not hasattr(tri, "weight_codes")
    wide = (torch.bfloat16, torch.float16, torch.float32)  # (bf16 scales are allowed)
    assert not any(t.dtype in wide and t.numel() >= lin.weight.numel()
                   for t in tri.packed().values())
    assert tri.storage_bits == ref.storage_bits
    y = tri(x)
    y_k = tri.kernel.matmul(x, tri.packed(), s, tri.input_scale)
    y_kref = tri.kernel.reference(x, tri.packed(), s, tri.input_scale)
    assert y.shape == (3, 5, 128) and torch.isfinite(y).all()
    # kernel vs its plain-torch reference: fp32 sums in both, one bf16 rounding
    assert rel_err(y_k, y_kref) < TOL, scheme
    assert torch.equal(y, y_k + tri.bias)
    # vs the reference backend (dequantize + F.linear in bf16): bf16 sums there
    assert rel_err(y, ref(x)) < 2 * TOL, scheme


def small_model(scheme: str, backend: str, layers: int):
    from quantlab.models import load_causal_lm

    model, _ = load_causal_lm(dtype=torch.bfloat16, device=DEV)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    # fp8_per_tensor: one calibrated scale per layer input, as vLLM's static fp8; {} otherwise
    calib = (torch.arange(64, device=DEV) * 37 % 4096).reshape(2, 32)
    act_scales = static_act_scales(model, get_scheme(scheme), calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a served scheme must not fall back
        return quantize_model(model, scheme, act_scales=act_scales, backend=backend)


def greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits that chose them, through the model's own KV cache."""
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits, 1).float()


def check_greedy(scheme: str, layers: int, steps: int) -> None:
    prompt = (torch.arange(1, 9, device=DEV) * 131 % 4096).reshape(1, 8)
    ref_tok, ref_lg = greedy(small_model(scheme, "reference", layers), prompt, steps)
    tri_tok, tri_lg = greedy(small_model(scheme, "triton", layers), prompt, steps)
    if torch.equal(tri_tok, ref_tok):
        return
    # Kernel rounding (fp32 sums vs bf16 F.linear) may flip a near tie: then the logits must
    # agree to 5% of their spread up to the first differing token, and at that token the
    # reference's margin between its choice and the kernel's must be within the logit error.
    first = int((tri_tok != ref_tok).int().argmax())
    a, b = tri_lg[0, : first + 1], ref_lg[0, : first + 1]
    err = (a - b).abs().max()
    assert err <= 0.05 * (b.amax() - b.amin()), scheme
    margin = b[first, ref_tok[0, first]] - b[first, tri_tok[0, first]]
    assert margin <= 2 * err, (scheme, float(margin), float(err))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", served_schemes())
def test_greedy_tokens_triton_equal_reference(scheme):
    """Every scheme a kernel serves (12-50 s each in the interpreter: 1 layer, 2 tokens)."""
    check_greedy(scheme, layers=1 if DEV == "cpu" else 6, steps=2 if DEV == "cpu" else 16)


def test_quantize_model_backend_mixed_and_bits():
    lin = nn.Sequential(nn.Linear(256, 128, dtype=torch.bfloat16),
                        nn.Linear(128, 256, dtype=torch.bfloat16))
    ref = quantize_model(lin, "w4a16", ignore=(), overrides={"1": "w8a16"})
    lin2 = nn.Sequential(nn.Linear(256, 128, dtype=torch.bfloat16),
                         nn.Linear(128, 256, dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match="w8a16"):
        tri = quantize_model(lin2, "w4a16", ignore=(), overrides={"1": "w8a16"}, backend="triton")
    assert [m.backend for m in tri] == ["triton", "reference"]
    assert bits_per_weight(tri) == pytest.approx(bits_per_weight(ref))
