"""Shared fixtures for the I/O and export tests: a tiny random Llama with a byte-level BPE
tokenizer, saved like a Hugging Face checkpoint (bf16-exact weights, as the embedded model)."""

from __future__ import annotations

import copy

import pytest
import torch

TEXT = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n",
        "class A:\n    pass\n", "for i in range(10):\n    print(i * 2)\n"] * 10


def make_tiny(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # bf16-exact, so a bf16 export stores the unquantized tensors exactly
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return model, hf_tok


def make_sharded_llama(path):
    """A 2-layer random Llama (hidden 128, GQA 4/2 heads, K = 128: whole GGUF blocks) saved as
    3+ bf16 safetensors shards with an index, and the embedded model's tokenizer files (what
    load_causal_lm and the exporters want). Returns path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantlab import models

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="200KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((models.embedded_lm_dir() / f).read_bytes())
    assert len(list(path.glob("*.safetensors"))) >= 2
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, tokenizer, source directory)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = make_tiny(path)
    return model, tok, path


@pytest.fixture(scope="session")
def calib_ids(tiny):
    return torch.randint(0, len(tiny[1]), (2, 32), generator=torch.Generator().manual_seed(1))


def quantized(tiny, calib_ids, scheme):
    from quantlab.algorithms.calibration import static_act_scales
    from quantlab.nn import quantize_model
    from quantlab.schemes import get_scheme

    model = tiny[0]
    s = get_scheme(scheme)
    return quantize_model(copy.deepcopy(model), s, act_scales=static_act_scales(model, s,
                                                                                calib_ids))
