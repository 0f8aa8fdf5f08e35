"""Accuracy of each KV codec on a causal LM, measured through the cache.

    python -m quantlab.studies.kv --out data/bench/kv-accuracy-stdlib-llama.json

- perplexity: held-out windows fed in chunks through a QuantizedKVCache, so every token attends to
  keys and values as the cache decodes them (write-then-read: the same as token-by-token decoding;
  tests/test_kv.py checks that);
- per layer: SQNR of keys and of values, relative error of the attention scores q.k and SQNR of the
  attention output, from the model's own post-RoPE q, k, v;
- greedy agreement: tokens generated with the codec that equal those generated with the bf16 cache;
- outlier channels: per layer, max over channels of a channel's absmax divided by the median
  channel's absmax, for keys and for values (keys have a few large channels: KIVI's observation).
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from quantlab.eval import mean_nll, sqnr_db, token_windows
from quantlab.kv.cache import QuantizedKVCache, QuantizedKVLayer
from quantlab.kv.codecs import CODECS, get_codec

DEFAULT_CODECS = [n for n in CODECS if n != "fp16"]
_CAPTURED: dict[int, tuple[Tensor, Tensor, Tensor]] = {}


def _probe(module, query, key, value, attention_mask, **kwargs):
    """An attention function that records each layer's post-RoPE q, k, v, then runs SDPA."""
    _CAPTURED[module.layer_idx] = (query.detach(), key.detach(), value.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("quantlab_kv_probe", _probe)


@torch.inference_mode()
def capture_qkv(model, ids: Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """ids (B, T) -> {layer: (q (B, H_q, T, D), k (B, H_kv, T, D), v)} in float32, no cache."""
    old = model.config._attn_implementation
    model.set_attn_implementation("quantlab_kv_probe")
    _CAPTURED.clear()
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(old)
    return {i: tuple(t.float() for t in qkv) for i, qkv in _CAPTURED.items()}


def calibrate_static_scales(model, ids: Tensor) -> list[tuple[float, float]]:
    """Per layer (k_scale, v_scale) = amax / 448 over calibration tokens ids (B, T): the static
    per-tensor scales of vLLM's fp8 KV cache (llm-compressor computes them the same way)."""
    qkv = capture_qkv(model, ids)
    return [(float(k.abs().amax()) / 448, float(v.abs().amax()) / 448)
            for _, (_, k, v) in sorted(qkv.items())]


def cached_logits(model, batch: Tensor, codec, chunk: int = 32, static_scales=None) -> Tensor:
    """batch (B, T) -> logits (B, T, vocab) float32, read in chunks through a fresh cache of
    `codec`, so every token attends to keys and values as the cache decodes them."""
    cache = QuantizedKVCache(codec, config=model.config,
                             static_scales=static_scales if get_codec(codec).static else None)
    return torch.cat([model(input_ids=batch[:, i:i + chunk], past_key_values=cache,
                            use_cache=True).logits.float()
                      for i in range(0, batch.shape[1], chunk)], 1)


def cache_nll(model, windows: Tensor, codec, chunk: int = 32, batch_size: int = 8,
              static_scales=None) -> float:
    """Mean next-token NLL (nats) over windows (N, T), each read in chunks through a fresh cache."""
    forward = partial(cached_logits, codec=codec, chunk=chunk, static_scales=static_scales)
    return mean_nll(model, windows, batch_size, forward)


def _attention(q, k, v):
    """Causal GQA attention in float32 -> (scores (B, H_q, T, T), output (B, H_q, T, D))."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s, torch.softmax(s, -1) @ v


def layer_errors(qkv, codec, static_scales=None) -> list[dict]:
    """Per layer: key / value SQNR (dB), relative error of the (causal) attention scores, SQNR of
    the attention output, with k and v as a cache holding the whole prompt decodes them."""
    rows = []
    for i, (q, k, v) in sorted(qkv.items()):
        ks, vs = static_scales[i] if (static_scales and get_codec(codec).static) else (None, None)
        layer = QuantizedKVLayer(codec, ks, vs)
        layer.update(k, v)
        kh, vh = layer.update(k[:, :, :0], v[:, :, :0])  # read back after the write (KIVI: flushed)
        s, o = _attention(q, k, v)
        sh, oh = _attention(q, kh, vh)
        mask = torch.isfinite(s)
        rows.append({"layer": i, "key_sqnr_db": sqnr_db(k, kh), "value_sqnr_db": sqnr_db(v, vh),
                     "score_rel_error": float((s - sh)[mask].norm() / s[mask].norm()),
                     "output_sqnr_db": sqnr_db(o, oh)})
    return rows


def outlier_channels(qkv) -> list[dict]:
    """Per layer: max channel absmax / median channel absmax, for keys and for values."""
    rows = []
    for i, (_, k, v) in sorted(qkv.items()):
        ratio = {}
        for name, x in (("key", k), ("value", v)):
            amax = x.abs().amax(dim=(0, 2))  # (H, D): per head, per channel
            ratio[name] = float((amax.amax(-1) / amax.median(-1).values).max())
            ratio[f"{name}_top_channel"] = int(amax.amax(0).argmax())
        rows.append({"layer": i, "key_outlier_ratio": ratio["key"],
                     "value_outlier_ratio": ratio["value"],
                     "key_top_channel": ratio["key_top_channel"]})
    return rows


@torch.inference_mode()
def greedy(model, prompts: Tensor, codec, new_tokens: int, static_scales=None) -> Tensor:
    """prompts (N, P) -> generated tokens (N, new_tokens), greedy, through a codec's cache."""
    cache = QuantizedKVCache(codec, config=model.config,
                             static_scales=static_scales if get_codec(codec).static else None)
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=cache,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    return out[:, prompts.shape[1]:]


def evaluate(model=None, tokenizer=None, codecs=None, seq_len: int = 512, n_windows: int = 8,
             chunk: int = 64, n_prompts: int = 4, prompt_len: int = 128, new_tokens: int = 32
             ) -> dict:
    """Every measurement above for each codec, on the embedded stdlib-llama by default.
    Returns {"setup": ..., "codecs": [row per codec], "layers": {codec: [...]},
    "outliers": [...]}."""
    from quantlab.models import calib_text, eval_text, load_causal_lm

    if model is None:
        model, tokenizer = load_causal_lm()
    codecs = codecs or DEFAULT_CODECS
    ids = torch.tensor(tokenizer(eval_text(), add_special_tokens=False)["input_ids"])
    if len(ids) < n_windows * seq_len:
        raise ValueError(f"eval text has {len(ids)} tokens, fewer than {n_windows} x {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    prompts = ids[-n_prompts * prompt_len:].view(n_prompts, prompt_len)
    calib = token_windows(tokenizer, calib_text(), seq_len, 8 * seq_len)
    static = calibrate_static_scales(model, calib)
    qkv = capture_qkv(model, windows[:2])
    cfg = model.config
    n_layers, n_kv, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    base_nll = cache_nll(model, windows, "bf16", chunk)
    base_gen = greedy(model, prompts, "bf16", new_tokens)
    rows, layers = [], {}
    for name in codecs:
        c = get_codec(name)
        nll = base_nll if name == "bf16" else cache_nll(model, windows, name, chunk,
                                                        static_scales=static)
        gen = base_gen if name == "bf16" else greedy(model, prompts, name, new_tokens, static)
        same = gen == base_gen
        first_diff = [int(r.logical_not().nonzero()[0]) if not r.all() else new_tokens
                      for r in same]
        layers[c.name] = layer_errors(qkv, name, static)
        rows.append({
            "codec": c.name, "bits": c.bits,
            "bytes_per_token": n_layers * c.bytes_per_token(n_kv, head_dim),
            "bytes_per_1k_tokens": n_layers * c.bytes_for(1024, n_kv, head_dim),
            "perplexity": math.exp(nll), "perplexity_delta": math.exp(nll) - math.exp(base_nll),
            "greedy_agreement": float(same.float().mean()),
            "greedy_tokens_before_divergence": sum(first_diff) / len(first_diff),
            "min_output_sqnr_db": min(r["output_sqnr_db"] for r in layers[c.name]),
        })
    setup = {"model": getattr(cfg, "_name_or_path", "") or "stdlib-llama", "seq_len": seq_len,
             "n_windows": n_windows, "chunk": chunk, "n_prompts": n_prompts,
             "prompt_len": prompt_len, "new_tokens": new_tokens, "model_dtype": str(model.dtype),
             "reference": "bf16 cache (keys and values rounded to bf16, same chunked path)",
             "static_scales": static}
    return {"setup": setup, "codecs": rows, "layers": layers, "outliers": outlier_channels(qkv)}


def format_table(result: dict) -> str:
    lines = ["| codec | bits | perplexity | delta | KV bytes / 1k tokens | greedy agreement | "
             "min layer output SQNR dB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["codecs"]:
        lines.append(f"| {r['codec']} | {r['bits']} | {r['perplexity']:.3f} | "
                     f"{r['perplexity_delta']:+.3f} | {r['bytes_per_1k_tokens']:,} | "
                     f"{r['greedy_agreement']:.3f} | {r['min_output_sqnr_db']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="KV codec accuracy on the embedded causal LM")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--codecs", nargs="*")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    result = evaluate(codecs=args.codecs, n_windows=args.windows, seq_len=args.seq_len)
    print(format_table(result))
    for o in result["outliers"]:
        print(f"layer {o['layer']}: key outlier ratio {o['key_outlier_ratio']:.1f} "
              f"(channel {o['key_top_channel']}), value {o['value_outlier_ratio']:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
