"""Load a whole compressed-tensors export with third-party code, one decoder layer at a time, so a
checkpoint larger than RAM in bf16 (an 8B-shaped one is 16 GB) is checked on a 24 GB machine.

Nothing of quantlab runs here: the tensors are read with safetensors' `safe_open` (through the
shards' index), each quantized linear is decompressed by compressed-tensors' own compressor for
its config group (`BaseCompressor.get_value_from_registry(format).decompress`, the classmethod
interface of compressed-tensors 0.20, compressors/base.py), the layer is built as transformers'
`LlamaDecoderLayer` from the export's config.json and loaded with `load_state_dict(strict=True)`
(every tensor present, every shape right), then run. 16 tokens' hidden states go through
embed_tokens, every decoder layer in turn and the final norm + lm_head; every output must be
finite. Prints one JSON line: layers checked, logits shape, wall time, peak RSS of this process.

    python scripts/load_check.py OUT_DIR [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def _shards(path: Path) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _read(path: Path, weight_map: dict[str, str], names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(weight_map[n], []).append(n)
    out = {}
    for f, group in by_file.items():
        with safe_open(str(path / f), "pt") as handle:
            out.update({n: handle.get_tensor(n) for n in group})
    return out


def _decompressed(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor],
                  qc, dtype) -> dict[str, torch.Tensor]:
    """The module's state dict (local names) with every quantized Linear decompressed by
    compressed-tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils.match import is_match

    sd = {}
    local = {k[len(prefix):]: v for k, v in tensors.items()}
    for name, m in module.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        mine = {k[len(name) + 1:]: v for k, v in local.items()
                if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        scheme = next((s for s in qc.config_groups.values()
                       if is_match(prefix + name, m, s.targets, qc.ignore or [])), None)
        if scheme is None or "weight" in mine:
            continue  # full precision: loaded as stored
        comp = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        sd[f"{name}.weight"] = comp.decompress(mine, scheme)["weight"].to(dtype)
        for k in mine:
            local.pop(f"{name}.{k}")
    for k, v in local.items():
        sd[k] = v.to(dtype) if v.is_floating_point() else v
    return sd


@torch.inference_mode()
def check(path: str | Path, tokens: int = 16, dtype=torch.bfloat16, logits_out: list | None = None
          ) -> dict:
    """The per-layer load and forward; logits_out, when given, receives the logits (1, T, V)."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )

    start = time.perf_counter()
    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config._attn_implementation = "sdpa"  # what from_pretrained picks on a CPU
    qc = QuantizationConfig.model_validate(config.quantization_config)
    weight_map = _shards(path)
    emb = _read(path, weight_map, ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    ids = torch.arange(tokens).reshape(1, tokens) % config.vocab_size
    hidden = emb[ids].to(dtype)
    del emb
    rotary = LlamaRotaryEmbedding(config)
    pos = torch.arange(tokens).reshape(1, tokens)
    cos_sin = rotary(hidden, pos)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None].to(dtype)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = LlamaDecoderLayer(config, i).to(dtype)
        names = [n for n in weight_map if n.startswith(prefix)]
        sd = _decompressed(layer, prefix, _read(path, weight_map, names), qc, dtype)
        layer.load_state_dict(sd, strict=True)  # every tensor present, every shape right
        del sd
        out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
        if not torch.isfinite(hidden).all():
            raise SystemExit(f"layer {i}: non-finite output")
        del layer
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
    norm.load_state_dict({"weight": _read(path, weight_map, ["model.norm.weight"])[
        "model.norm.weight"].to(dtype)})
    head_name = "lm_head.weight" if "lm_head.weight" in weight_map else "model.embed_tokens.weight"
    head = _read(path, weight_map, [head_name])[head_name].to(dtype)
    logits = norm(hidden) @ head.T
    if not torch.isfinite(logits).all():
        raise SystemExit("non-finite logits")
    if logits_out is not None:
        logits_out.append(logits)
    return {"layers": config.num_hidden_layers, "logits": list(logits.shape),
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                                 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a compressed-tensors export directory (Llama)")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    print(json.dumps({"load_check": "per-layer transformers + compressed-tensors",
                      **check(args.path, args.tokens)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
