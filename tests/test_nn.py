"""QuantLinear and quantize_model on a small random Llama."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantlab import dequantize, fake_quantize, get_scheme, quantize
from quantlab.nn import QuantLinear, linear_layers, model_size_bytes, quantize_model


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_quantlinear_matches_fake_quantized_math():
    lin = nn.Linear(256, 64)
    x = torch.randn(3, 5, 256)
    for name in ("w4a16", "fp8_dynamic", "int8_w8a8", "nvfp4", "mxfp4"):
        s = get_scheme(name)
        ql = QuantLinear.from_linear(lin, s)
        xq = fake_quantize(x, s.activations) if s.activations else x
        wq = fake_quantize(lin.weight.detach(), s.weights)
        ref = torch.nn.functional.linear(xq, wq, lin.bias)
        assert torch.equal(ql(x), ref), name


def test_quantlinear_keeps_codes_in_state_dict_and_takes_given_weights():
    lin = nn.Linear(128, 32, bias=False)
    q = quantize(lin.weight.detach(), "w4a16_asym")
    ql = QuantLinear.from_linear(lin, "w4a16_asym", qweight=q)
    sd = ql.state_dict()
    assert {"weight_codes", "weight_scales", "weight_zero_points"} <= set(sd)
    assert "weight" not in sd  # the dequantized cache is not saved
    assert torch.equal(ql.weight, dequantize(q))
    with pytest.raises(ValueError, match="does not match"):
        QuantLinear.from_linear(nn.Linear(64, 32), "w4a16_asym", qweight=q)


def test_static_activation_scale_is_required_and_used():
    lin = nn.Linear(128, 16)
    with pytest.raises(ValueError, match="static scale"):
        QuantLinear.from_linear(lin, "fp8_per_tensor")
    ql = QuantLinear.from_linear(lin, "fp8_per_tensor", act_scale=torch.tensor(0.01))
    x = torch.full((1, 128), 100.0)  # far past 448 * 0.01: saturates to 4.48
    assert torch.allclose(ql.quantize_input(x), torch.full((1, 128), 4.48))


def test_quantize_model_ignore_overrides_and_size():
    model = tiny_llama()
    x = torch.randint(0, 128, (1, 16))
    ref = model(x).logits
    n_linear = len(linear_layers(model))
    quantize_model(model, "w4a16", overrides={"*.down_proj": "w8a16", "*.k_proj": None})
    kinds = {n: (m.scheme.name if isinstance(m, QuantLinear) else "float")
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert len(kinds) == n_linear
    assert kinds["lm_head"] == "float" and kinds["model.layers.0.self_attn.k_proj"] == "float"
    assert kinds["model.layers.1.mlp.down_proj"] == "w8a16"
    assert kinds["model.layers.0.self_attn.q_proj"] == "w4a16"
    out = model(x).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2
    assert model_size_bytes(model) < sum(p.numel() for p in tiny_llama().parameters()) * 2


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), "w4a16")
    with pytest.raises(ValueError, match="in_features=100 is not a multiple"):
        quantize_model(nn.Sequential(nn.Linear(100, 8)), "w4a16")
    with pytest.raises(ValueError, match="known schemes"):
        quantize_model(tiny_llama(), "w5a5")
