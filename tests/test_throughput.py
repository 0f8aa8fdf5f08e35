"""quantlab.throughput: the static-cache decode loop against transformers' generate, and the
command on the CPU with tiny settings (CPU numbers, reference backend)."""

import json

import pytest
import torch

from quantlab.cli import main
from quantlab.throughput import (
    StaticCache,
    build_model,
    forward,
    generate,
    throughput,
    weight_bytes,
)


def test_static_cache_decode_equals_transformers_generate():
    model = build_model("stdlib", layers=2, device="cpu", dtype=torch.float32)
    prompt = (torch.arange(1, 17) * 131 % 4096).reshape(2, 8)
    ours = generate(model, prompt, 5)
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs[:, 8:])


def test_rows_floor_and_bytes():
    model = build_model("stdlib", device="cpu")
    cache = StaticCache.empty(model, 1, 1, torch.bfloat16)
    assert cache.nbytes_per_token == 6 * 2 * 2 * 64 * 2  # layers x (k, v) x kv heads x dim x 2 B
    wb = weight_bytes(model)
    assert 6.5e6 < wb < 13.6e6  # bf16 weights without the 4096 x 256 embedding
    rows = throughput("stdlib", ("bf16", "w4a16"), batches=(1, 2), context=8, prompt=8, steps=2,
                      layers=2, bandwidth=1e11, log=lambda m: None, device="cpu")
    assert [(r.scheme, r.kind, r.batch) for r in rows] == [
        ("bf16", "decode", 1), ("bf16", "decode", 2), ("bf16", "prefill", 1),
        ("w4a16", "decode", 1), ("w4a16", "decode", 2), ("w4a16", "prefill", 1)]
    assert all(r.tokens_per_s > 0 and r.device == "cpu" and r.scaled for r in rows)
    dec = {r.scheme: r for r in rows if r.kind == "decode" and r.batch == 1}
    # w4a16 stores about a quarter of the linear-layer bytes; lm_head stays bf16
    assert dec["w4a16"].weight_gb < 0.8 * dec["bf16"].weight_gb
    assert dec["w4a16"].floor_tokens_per_s > dec["bf16"].floor_tokens_per_s
    assert dec["w4a16"].backend == "reference"


def test_cli_throughput_labels_cpu_numbers(tmp_path, capsys):
    """The CLI measures the GPU when there is one; CPU numbers are labelled as such."""
    out = tmp_path / "e2e.json"
    assert main(["throughput", "--schemes", "bf16", "--batches", "1", "--context", "8",
                 "--prompt", "8", "--steps", "2", "--layers", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    on_cpu = not torch.cuda.is_available()
    assert ("CPU numbers" in text) == on_cpu and "| decode | 1 |" in text
    data = json.loads(out.read_text())
    assert data["cpu_numbers"] == on_cpu and data["rows"][0]["scheme"] == "bf16"
    assert {"device", "torch", "triton", "date"} <= data.keys()


@pytest.mark.kernels
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_cache_codes_and_kernel_decode(kv):
    """The static cache stores exactly the codec's codes and scales, and a decode step through
    the decode-attention kernel (interpreted here) matches SDPA over the decoded cache."""
    from quantlab.kv.codecs import get_codec

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel compiled, or interpreted
    model = build_model("stdlib", layers=1, device=dev)
    cache = StaticCache.empty(model, 2, 16, torch.bfloat16, kv)
    k, v = torch.randn(2, 2, 5, 64, device=dev) * 3, torch.randn(2, 2, 5, 64, device=dev)
    k[0, 1, 2] = 0  # an all-zero head vector: scale 0, codes 0
    cache.write(0, torch.arange(3, 8, device=dev), k, v)
    parts = get_codec(f"{kv}_per_token_head").encode(k, "k")
    codes = cache.k[0][:, :, 3:8]
    assert torch.equal(codes.view(torch.uint8) if kv == "fp8" else codes,
                       parts["codes"].to(codes.dtype) if kv == "int8" else parts["codes"])
    assert torch.equal(cache.ks[0][:, :, 3:8], parts["scale"])
    prompt = (torch.arange(1, 13, device=dev) * 131 % 4096).reshape(2, 6)
    with torch.no_grad():
        kern = generate(model, prompt, 3, kv=kv)
        ref = generate(model, prompt, 3)
    assert (kern == ref).float().mean() >= 0.5  # int8/fp8 keys: a near tie may flip
    logits = {}
    for name in (kv, "bf16"):  # one decode step: kernel over int8/fp8 vs SDPA over bf16
        cache = StaticCache.empty(model, 2, 9, torch.bfloat16, name)
        with torch.no_grad():
            forward(model, cache, prompt, torch.arange(6, device=dev))
            logits[name] = forward(model, cache, prompt[:, -1:], torch.tensor([6], device=dev))
    err = (logits[kv] - logits["bf16"]).norm() / logits["bf16"].norm()
    assert err < 0.03, err


def test_fused_projections_are_the_same_model():
    """fuse_projections merges q/k/v and gate/up (as vLLM): same greedy tokens; a group-wise
    scheme quantizes the merged weight exactly as the parts (scales are per output row)."""
    import copy

    from quantlab.nn import quantize_model
    from quantlab.throughput import fuse_projections

    model = build_model("stdlib", layers=2, device="cpu", dtype=torch.float32)
    fused = fuse_projections(copy.deepcopy(model))
    a = fused.model.layers[0].self_attn
    assert not hasattr(a, "q_proj") and a.split_sizes == [256, 128, 128]
    prompt = (torch.arange(1, 17) * 131 % 4096).reshape(2, 8)
    assert torch.equal(generate(model, prompt, 4), generate(fused, prompt, 4))
    q = quantize_model(copy.deepcopy(model), "w4a16")
    qf = quantize_model(fuse_projections(copy.deepcopy(model)), "w4a16")
    parts = [q.model.layers[1].mlp.gate_proj, q.model.layers[1].mlp.up_proj]
    merged = qf.model.layers[1].mlp.gate_up_proj
    assert torch.equal(merged.qweight.dequantize(),
                       torch.cat([p.qweight.dequantize() for p in parts]))
    with pytest.raises(TypeError, match="fuse before quantize_model"):
        fuse_projections(q)


def test_static_scales_of_a_fused_model_equal_the_unfused_ones():
    import copy

    from quantlab.algorithms import calibration
    from quantlab.schemes import get_scheme
    from quantlab.throughput import fuse_projections, static_act_scales

    model = build_model("stdlib", layers=2, device="cpu", dtype=torch.float32)
    scheme, calib = get_scheme("fp8_per_tensor"), (torch.arange(64) * 37 % 4096).reshape(2, 32)
    want = calibration.static_act_scales(model, scheme, calib)
    got = static_act_scales(fuse_projections(copy.deepcopy(model)), scheme, calib)
    for i in range(2):
        p = f"model.layers.{i}."
        torch.testing.assert_close(got[p + "self_attn.qkv_proj"], want[p + "self_attn.q_proj"])
        torch.testing.assert_close(got[p + "mlp.gate_up_proj"], want[p + "mlp.up_proj"])
        torch.testing.assert_close(got[p + "mlp.down_proj"], want[p + "mlp.down_proj"])
    assert static_act_scales(model, get_scheme("fp8_dynamic"), calib) == {}
