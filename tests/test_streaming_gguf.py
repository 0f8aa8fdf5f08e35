"""GGUF written layer by layer (sequential.export_sequential(to="gguf"), io.gguf.GGUFStream):
byte-identical to the in-memory export, and a full disk leaves nothing."""

from __future__ import annotations

import errno

import pytest
import torch

from quantlab import models
from quantlab.cli import main
from tests.test_io_fixtures import make_sharded_llama


def test_embedded_rtn_gguf_byte_identical(tmp_path):
    """quantlab export --to gguf: --pipeline sequential writes the in-memory pipeline's bytes."""
    ref, seq = tmp_path / "ref.gguf", tmp_path / "seq.gguf"
    base = ["export", "--scheme", "gguf_q4_0", "--to", "gguf", "--no-verify", "--device", "cpu"]
    assert main([*base, "--out", str(ref), "--pipeline", "in-memory"]) == 0
    assert main([*base, "--out", str(seq), "--pipeline", "sequential"]) == 0
    assert ref.read_bytes() == seq.read_bytes()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama in 3+ bf16 shards with the embedded tokenizer (tests/test_io_fixtures.py)."""
    return make_sharded_llama(tmp_path_factory.mktemp("tiny-gguf") / "llama")


def test_tiny_awq_gguf_byte_identical(tiny_dir, tmp_path):
    """AWQ (a forward per layer): a layer's tensors reach the sink norms first, then the
    quantized projections; the reorder buffer writes them in the in-memory file order."""
    from quantlab.algorithms import awq
    from quantlab.io.gguf import export_gguf
    from quantlab.sequential import export_sequential

    calib = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1))
    model, tok = models.load_causal_lm(str(tiny_dir))
    ref = export_gguf(awq(model, "gguf_q8_0", calib), tmp_path / "ref.gguf", tok, name="llama")
    seq = export_sequential(tiny_dir, "gguf_q8_0", tmp_path / "seq.gguf", algorithm="awq",
                            calib=calib, device="cpu", tokenizer=tok, to="gguf", progress=False)
    assert ref.read_bytes() == seq.read_bytes()


def test_gguf_stream_refuses_bad_requests(tiny_dir, tmp_path):
    from quantlab.sequential import export_sequential

    _, tok = models.load_causal_lm(str(tiny_dir))
    with pytest.raises(ValueError, match="GGUF cannot store"):
        export_sequential(tiny_dir, "w4a16", tmp_path / "x.gguf", to="gguf", tokenizer=tok,
                          device="cpu", progress=False)
    with pytest.raises(ValueError, match="ending in .gguf"):
        export_sequential(tiny_dir, "gguf_q8_0", tmp_path / "x", to="gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_gguf_disk_full_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import gguf

    from quantlab.sequential import export_sequential

    _, tok = models.load_causal_lm(str(tiny_dir))
    real, calls = gguf.GGUFWriter.write_tensor_data, []

    def full(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(OSError, match="disk full.*free at least"):
        export_sequential(tiny_dir, "gguf_q4_0", tmp_path / "out" / "m.gguf", to="gguf",
                          tokenizer=tok, device="cpu", progress=False)
    assert len(calls) == 4
    assert list((tmp_path / "out").iterdir()) == []  # no file, no .partial folder
