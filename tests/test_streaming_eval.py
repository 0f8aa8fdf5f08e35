"""compare() layer by layer (quantlab.compare.compare_sequential) against the in-memory compare():
perplexity, KL, bits, size and per-layer errors equal within float rounding (the two run the same
float32 ops on the same batches; on another CPU or batch split the last bits may move, hence
the margins), on the embedded model and on tiny sharded checkpoints (tied and untied head);
and its bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantlab import compare as cmp
from quantlab import models

SIZES = dict(seq_len=128, eval_tokens=1024, calib_tokens=512, kl_tokens=512)


def _same(mem, seq):
    (b1, r1), (b2, r2) = mem, seq
    assert b2["perplexity"] == pytest.approx(b1["perplexity"], rel=1e-5)
    assert (b2["size_mib"], b2["eval_tokens"]) == (b1["size_mib"], b1["eval_tokens"])
    assert [(r.scheme, r.algorithm) for r in r1] == [(r.scheme, r.algorithm) for r in r2]
    for a, b in zip(r1, r2, strict=True):
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5), a.scheme
        assert b.kl == pytest.approx(a.kl, rel=1e-4, abs=1e-9), a.scheme
        assert (b.bits_per_weight, b.size_mib) == (a.bits_per_weight, a.size_mib)
        assert [x["layer"] for x in b.layers] == [x["layer"] for x in a.layers]
        for x, y in zip(a.layers, b.layers, strict=True):
            assert y["output_sqnr_db"] == pytest.approx(x["output_sqnr_db"], abs=1e-3)
            assert y["weight_sqnr_db"] == pytest.approx(x["weight_sqnr_db"], abs=1e-3)
        assert b.worst_layer == a.worst_layer
        assert a.kl > 0 and math.isfinite(b.perplexity)


def _both(path, tok, schemes, algorithms, text=None):
    text = text or models.eval_text()
    model, _ = models.load_causal_lm(str(path))
    mem = cmp.compare(model, tok, text, models.calib_text(), schemes, algorithms, log=None,
                      **SIZES)
    seq = cmp.compare_sequential(path, tok, text, models.calib_text(), schemes, algorithms,
                                 device="cpu", log=None, progress=False, **SIZES)
    return mem, seq


def test_embedded_model_equal(tmp_path):
    """rtn with static activation scales (fp8_per_tensor: from the float stream, per layer)."""
    _, tok = models.load_causal_lm(None)
    _same(*_both(models.embedded_lm_dir(), tok, ["fp8_per_tensor"], ["rtn"]))


def _make_tiny(folder, tied: bool):
    """A 2-layer Llama from a LlamaConfig, saved as 3+ bf16 shards with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                      max_position_embeddings=256, tie_word_embeddings=tied)
    path = folder / "llama"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="400KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((models.embedded_lm_dir() / f).read_bytes())
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _make_tiny(tmp_path_factory.mktemp("tiny-eval"), tied=False)


def test_tiny_sharded_equal(tiny):
    """w4a16 rtn; GPTQ: each scheme's own quantized calibration stream carried layer to layer."""
    _, tok = models.load_causal_lm(None)
    _same(*_both(tiny, tok, ["w4a16"], ["rtn", "gptq"]))


def test_tiny_tied_head_equal(tmp_path):
    """tie_word_embeddings: lm_head is read from the embedding's tensor."""
    _, tok = models.load_causal_lm(None)
    _same(*_both(_make_tiny(tmp_path, tied=True), tok, ["w8a16"], ["rtn"]))


def test_cli_compare_sequential(tiny, capsys, tmp_path):
    from quantlab.cli import main

    assert main(["compare", "--model", str(tiny), "--pipeline", "sequential", "--schemes",
                 "w8a16", "--eval-tokens", "512", "--seq-len", "128", "--calib-tokens", "512",
                 "--device", "cpu", "--report", "", "--json", str(tmp_path / "r.json")]) == 0
    assert "(sequential)" in capsys.readouterr().out
    assert (tmp_path / "r.json").is_file()


def test_pipeline_auto(tiny, monkeypatch):
    assert cmp.choose_pipeline("auto", None, "cpu") == "in-memory"
    assert cmp.choose_pipeline("auto", "meta-llama/Llama-3.1-8B", "cpu") == "in-memory"
    assert cmp.choose_pipeline("auto", str(tiny), "cpu") == "in-memory"  # 1 MB fits
    monkeypatch.setattr(cmp, "_fits_in_memory", lambda *_: False)
    assert cmp.choose_pipeline("auto", str(tiny), "cpu") == "sequential"
    assert cmp.choose_pipeline("in-memory", str(tiny), "cpu") == "in-memory"


def test_bad_inputs(tiny, tmp_path, monkeypatch):
    import shutil

    from quantlab import sequential

    _, tok = models.load_causal_lm(None)
    run = dict(device="cpu", log=None, progress=False, **SIZES)
    text, calib = models.eval_text(), models.calib_text()
    with pytest.raises(ValueError, match="not layer-sequential.*--pipeline in-memory"):
        cmp.compare_sequential(tiny, tok, text, calib, ["w4a16"], ["awq"], **run)
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    sorted(broken.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="missing.*fetch those files again"):
        cmp.compare_sequential(broken, tok, text, calib, ["w4a16"], **run)

    class Odd(nn.Module):  # decoder layers in an nn.Sequential: not one at a time
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 4))

    monkeypatch.setattr(sequential, "skeleton", lambda _: Odd())
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList.*--pipeline in-memory"):
        cmp.compare_sequential(tiny, tok, text, calib, ["w4a16"], **run)
