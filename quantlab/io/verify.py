"""Check an export with the peers' own code: compressed-tensors' decompressors and gguf's reader
and dequantizer must give back the weights quantlab's QuantLinear layers compute with.

One row per quantized layer: {layer, equal (bit for bit), mismatches, max_abs_diff, dtype}.
NVFP4 rows also carry `ties_only`: True when every mismatch sits where our exact value is a
rounding tie of the peer's output dtype (see quantlab.io.compressed_tensors, module doc).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantlab.io.compressed_tensors import quantized_layers
from quantlab.io.safetensors_io import read_safetensors_dir
from quantlab.quantize import dequantize


def _bf16_tie(x: Tensor) -> Tensor:
    """float32 values lying exactly halfway between two neighbouring bfloat16 values."""
    bits = x.contiguous().view(torch.int32)
    return (bits & 0xFFFF) == 0x8000


def _row(name: str, theirs: Tensor, ours: Tensor, exact32: Tensor | None = None) -> dict:
    diff = theirs != ours
    row = {"layer": name, "equal": not bool(diff.any()), "mismatches": int(diff.sum()),
           "max_abs_diff": float((theirs.float() - ours.float()).abs().max()),
           "dtype": str(theirs.dtype).removeprefix("torch.")}
    if exact32 is not None:
        row["ties_only"] = bool(_bf16_tie(exact32[diff]).all())
    return row


def verify_compressed_tensors(out: str | os.PathLike, model: nn.Module) -> list[dict]:
    """Decompress every quantized layer of the exported directory with compressed-tensors'
    registered compressor for its config group, and compare to dequantize(our QuantizedTensor)
    in the dtype the peer returns."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = Path(out)
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = read_safetensors_dir(out)
    rows = []
    layers = quantized_layers(model)
    for scheme in qc.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        for name, m in layers.items():
            if scheme.targets != ["Linear"] and name not in scheme.targets:
                continue
            local = {k[len(name) + 1:]: v for k, v in tensors.items()
                     if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
            theirs = compressor.decompress(local, scheme)["weight"]
            ours = dequantize(m.qweight, theirs.dtype)
            exact = dequantize(m.qweight, torch.float32) if m.qweight.global_scale is not None \
                else None
            rows.append(_row(name, theirs, ours, exact))
    if len(rows) != len(layers):
        raise ValueError(f"the config's groups cover {len(rows)} of {len(layers)} quantized layers")
    return rows


def verify_gguf(path: str | os.PathLike, model: nn.Module) -> list[dict]:
    """Read the file with gguf.GGUFReader, dequantize with gguf.quants.dequantize, and compare
    with our dequantized weights in llama.cpp's row order."""
    import gguf

    from quantlab.io.gguf import hf_to_gguf_names, rope_permutation

    cfg = model.config
    back = {g: h for h, g in hf_to_gguf_names(cfg.num_hidden_layers).items()}
    layers = quantized_layers(model)
    rows = []
    for t in gguf.GGUFReader(str(path)).tensors:
        name = back.get(t.name.removesuffix(".weight"))
        if name not in layers:
            continue
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        ours = dequantize(layers[name].qweight, torch.float32)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(
            name.rpartition(".")[2])
        if heads:
            ours = ours[rope_permutation(ours.shape[0], heads)]
        rows.append(_row(name, theirs, ours))
    if len(rows) != len(layers):
        raise ValueError(f"{path} holds {len(rows)} of the model's {len(layers)} quantized layers")
    return rows
