"""GGUF export: byte-exact with gguf's reference quantizers, llama.cpp's names, rope row order
and Llama metadata, read back by gguf's reader and dequantizer, and by quantlab."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlab.io import gguf as qg
from quantlab.io.verify import verify_gguf
from quantlab.nn import QuantLinear
from tests.test_io_fixtures import calib_ids, quantized, tiny  # noqa: F401

gguf = pytest.importorskip("gguf")


def reference_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp documents it."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.fixture(scope="module", params=["gguf_q8_0", "gguf_q4_0"])
def exported(request, tiny, calib_ids, tmp_path_factory):  # noqa: F811
    m = quantized(tiny, calib_ids, request.param)
    path = qg.export_gguf(m, tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny[1], name="tiny")
    return request.param, m, path


def test_rope_permutation_matches_convert_hf_to_gguf():
    w = np.arange(256 * 3).reshape(256, 3)
    for heads in (4, 2):
        assert np.array_equal(w[qg.rope_permutation(256, heads).numpy()],
                              reference_permute(w, heads))


def test_gguf_reader_dequantizes_to_our_weights(exported):
    _, m, path = exported
    rows = verify_gguf(path, m)
    assert len(rows) == 7 and all(r["equal"] for r in rows), rows


def test_blocks_equal_gguf_reference_quantizer(exported, tiny):  # noqa: F811
    scheme, m, path = exported
    qtype = {"gguf_q8_0": gguf.GGMLQuantizationType.Q8_0,
             "gguf_q4_0": gguf.GGMLQuantizationType.Q4_0}[scheme]
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    base = tiny[0]
    for hf, heads in (("model.layers.0.self_attn.k_proj", 2), ("model.layers.0.mlp.up_proj", 0)):
        w = base.get_submodule(hf).weight.detach().numpy()
        if heads:
            w = reference_permute(w, heads)
        name = qg.hf_to_gguf_names(1)[hf] + ".weight"
        assert tensors[name].tensor_type == qtype
        assert np.array_equal(np.asarray(tensors[name].data), gguf.quants.quantize(w, qtype))


def test_metadata_and_names(exported, tiny):  # noqa: F811
    scheme, _, path = exported
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg = tiny[0].config
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == {"gguf_q8_0": 7, "gguf_q4_0": 2}[scheme]
    assert f["llama.block_count"] == 1 and f["llama.embedding_length"] == 256
    assert f["llama.feed_forward_length"] == 512 and f["llama.context_length"] == 256
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert f["tokenizer.ggml.eos_token_id"] == 0 and len(f["tokenizer.ggml.merges"]) > 0
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == {"gguf_q8_0": "Q8_0", "gguf_q4_0": "Q4_0"}[scheme]


def test_read_gguf_round_trip(exported):
    _, m, path = exported
    ck = qg.read_gguf(path)
    assert sorted(ck.other) == ["lm_head", "model.embed_tokens"]
    for n, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(ck.layers[n].codes, mod.qweight.codes), n
            assert torch.equal(ck.layers[n].scales, mod.qweight.scales), n


def test_non_gguf_scheme_refused(tiny, calib_ids, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="quantize with gguf_q8_0 or gguf_q4_0"):
        qg.export_gguf(quantized(tiny, calib_ids, "w4a16"), tmp_path / "x.gguf", tiny[1])
    assert list(tmp_path.iterdir()) == []


def test_linear_bias_refused_not_dropped(tiny, calib_ids, tmp_path):  # noqa: F811
    """A Llama GGUF has no bias tensors: a model with q_proj biases (Qwen2-style) is refused,
    never written without them."""
    import copy

    model = quantized(tiny, calib_ids, "gguf_q8_0")
    model = copy.deepcopy(model)
    q = model.model.layers[0].self_attn.q_proj
    q.bias = torch.nn.Parameter(torch.ones(q.qweight.shape[0]), requires_grad=False)
    with pytest.raises(ValueError, match="q_proj has a bias"):
        qg.export_gguf(model, tmp_path / "x.gguf", tiny[1])
    assert list(tmp_path.iterdir()) == []
