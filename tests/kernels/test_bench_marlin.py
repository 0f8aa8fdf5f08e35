"""CPU-testable parts of the Marlin peer (scripts/peers/marlin_peer.py) and its bench rows."""

import importlib.util
from pathlib import Path

import pytest
import torch

from quantlab.kernels import bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mp():
    spec = importlib.util.spec_from_file_location("marlin_peer_t",
                                                  ROOT / "scripts" / "peers" / "marlin_peer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gptq_pack_round_trip(mp):
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (64, 256), dtype=torch.int8)
    word = mp.gptq_pack(codes)
    assert word.dtype == torch.int32 and word.shape == (32, 64)
    assert torch.equal(mp.gptq_unpack(word), codes)


def test_gptq_pack_nibble_order(mp):
    codes = torch.full((64, 8), -8, dtype=torch.int8)  # stored 0 everywhere ...
    codes[3, 2] = 7                                     # ... but q(n=3, k=2) = 15
    codes[5, 7] = 0                                     # q(n=5, k=7) = 8: the sign bit
    word = mp.gptq_pack(codes)
    assert int(word[0, 3]) == 15 << 8
    assert int(word[0, 5]) == (8 << 28) - (1 << 32)
    assert int(word[0, 0]) == 0


def test_scale_permutation(mp):
    perm = mp._scale_perm()
    assert sorted(perm.tolist()) == list(range(64))
    assert torch.equal(perm.view(8, 8), torch.arange(64).view(8, 8).t())  # 8x8 transpose
    s = torch.randn(128, 4)  # (N, K/128)
    p = mp.permute_scales(s)
    assert p.shape == (4, 128)
    assert torch.equal(p[0, :8], s[[0, 8, 16, 24, 32, 40, 48, 56], 0])
    assert torch.equal(mp.unpermute_scales(p), s)


def test_generated_sources(mp, tmp_path):
    if not (mp.UPSTREAM / "gptq_marlin.cu").exists():
        pytest.skip(".peers/gptq_marlin not present (ignored folder, not committed)")
    srcs = mp.write_sources(tmp_path)
    inst = [p for p in srcs if p.name.startswith("inst_")]
    text = "".join(p.read_text() for p in inst)
    assert text.count("template __global__ void Marlin<") == 2 * len(mp._variants()) == 30
    disp = (tmp_path / "gptq_marlin_min.cu").read_text()
    assert disp.count("_GET_IF(vllm::kU4B8,") == len(mp._variants())
    assert "COMMON_GET_IF(vllm::kU4B8" not in disp.split("MarlinFuncPtr get_marlin_kernel")[1]


def test_bench_lists_marlin(capsys):
    assert "marlin" in bench.KERNELS
    rows = [{"kernel": k, "M": 1, "N": 64, "K": 256, "model": "8b", "layer": "o", "ms": ms,
             "floor_frac": 0.5} for k, ms in (("ours_w4a16", 0.01), ("marlin_w4a16", 0.02))]
    bench.summarize(rows)
    assert "x_vs_marlin" in capsys.readouterr().out
