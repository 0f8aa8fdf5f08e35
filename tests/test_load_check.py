"""scripts/load_check.py (a third-party, one-layer-at-a-time load of a compressed-tensors export)
gives the logits transformers' own from_pretrained gives for the whole model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from quantlab import models
from quantlab.sequential import export_sequential

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_check.py"


def test_per_layer_load_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("load_check", SCRIPT)
    load_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_check)
    out = export_sequential(models.embedded_lm_dir(), "w4a16", tmp_path / "out", device="cpu",
                            max_shard_bytes="3MB", progress=False)
    got: list = []
    row = load_check.check(out, tokens=16, dtype=torch.float32, logits_out=got)
    assert row["layers"] == 6 and row["logits"] == [1, 16, 4096]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(16).reshape(1, 16)
    with torch.inference_mode():
        ref = model(ids).logits.float()
    diff = (got[0].float() - ref).abs().max() / ref.abs().max()
    assert diff < 1e-4, float(diff)  # float32: the same ops, summed in other orders
