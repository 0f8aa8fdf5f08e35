"""Error metrics on pairs with known answers, and the command line."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from quantlab.cli import main
from quantlab.eval import (
    cosine_similarity,
    error_histogram,
    error_report,
    max_abs_error,
    mse,
    sqnr_db,
)


def test_metrics_on_known_pairs():
    ref = torch.tensor([3.0, 4.0])
    approx = torch.tensor([3.0, 3.0])
    assert mse(ref, approx) == 0.5
    assert sqnr_db(ref, approx) == pytest.approx(10 * math.log10(25 / 1))
    assert max_abs_error(ref, approx) == 1.0
    assert cosine_similarity(ref, approx) == pytest.approx(21 / (5 * math.sqrt(18)))
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(torch.zeros(2), ref) == -math.inf
    assert cosine_similarity(torch.zeros(3), torch.zeros(3)) == 1.0
    assert set(error_report(ref, approx)) == {"mse", "sqnr_db", "max_abs_error", "cosine"}


def test_sqnr_of_known_noise_power():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    noise = torch.randn(1_000_000, generator=g) * 0.1  # 20 dB below the signal
    assert sqnr_db(x, x + noise) == pytest.approx(20.0, abs=0.05)


def test_histogram_counts_every_error():
    ref = torch.randn(1000)
    approx = ref + torch.linspace(-1, 1, 1000)
    counts, edges = error_histogram(ref, approx, bins=20)
    assert counts.sum() == 1000 and counts.shape == (20,) and edges.shape == (21,)
    assert edges[0] == pytest.approx(-edges[-1]) and counts.min() >= 45


def test_metrics_reject_mismatched_or_empty():
    with pytest.raises(ValueError, match="shapes differ"):
        mse(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        sqnr_db(torch.zeros(0), torch.zeros(0))


def test_compare_prints_a_table_and_json(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert main(["weights", "--source", "gaussian", "--size", "256",
                 "--schemes", "w4a16,nvfp4,fp8_dynamic", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"w4a16\s+4\.1250\s", text) and "nvfp4" in text and "SQNR dB" in text
    rows = {r["scheme"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fp8_dynamic"]["sqnr_db"] > rows["nvfp4"]["sqnr_db"] > rows["w4a16"]["sqnr_db"]


def test_compare_on_a_safetensors_file(capsys, tmp_path):
    from safetensors.torch import save_file

    save_file({"layers.0.q_proj.weight": torch.randn(64, 128),
               "embed_tokens.weight": torch.randn(10, 128)}, str(tmp_path / "m.safetensors"))
    assert main(["weights", "--model", str(tmp_path), "--schemes", "w4a16"]) == 0
    text = capsys.readouterr().out
    assert "1 tensors, 8,192 elements" in text  # the embedding is skipped


def test_cli_errors_say_what_is_known(capsys, tmp_path):
    assert main(["weights", "--source", "gaussian", "--size", "64", "--schemes", "int3"]) == 2
    assert "known schemes: fp8_per_tensor" in capsys.readouterr().err
    assert main(["weights", "--model", str(tmp_path / "missing")]) == 2
    assert "no .safetensors" in capsys.readouterr().err


def test_formats_lists_every_format_and_preset(capsys):
    assert main(["formats"]) == 0
    text = capsys.readouterr().out
    for name in ("e4m3", "e2m1", "e8m0", "nf4", "uint2", "gguf_q4_0", "mxfp6_e3m2"):
        assert name in text


def test_readme_python_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace("4096, 4096", "512, 512")
    exec(compile(code, "README.md", "exec"), {})


def test_formats_sqnr_column_orders_by_precision(capsys):
    assert main(["formats", "--sqnr-size", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    db = {ln.split()[0]: ln.split()[-1] for ln in lines[2:15]}
    assert db["e8m0"] == "-"
    assert float(db["int8"]) > float(db["e4m3"]) > float(db["e2m3"]) > float(db["e2m1"]) \
        > float(db["int2"])
    assert float(db["e4m3"]) == pytest.approx(31.5, abs=0.6)  # 3 mantissa bits: ~31.5 dB
