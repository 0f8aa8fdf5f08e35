"""Scale test of the layer-sequential export: a Llama-3-8B-shaped checkpoint with random bf16
weights, written shard by shard under a temporary folder (removed after), exported with
`quantlab export --pipeline sequential` in a child process whose wall time and peak RSS
(os.wait4's ru_maxrss) are reported, then audited and loaded in transformers +
compressed-tensors: the whole model at --load-check-layers depth (from_pretrained), and the
deepest export one decoder layer at a time (scripts/load_check.py: compressed-tensors'
decompressor, transformers' LlamaDecoderLayer, a finite forward through every layer), each as
a child with its peak RSS.

    python scripts/scale_test.py                                  # 8B shape, w4a16 + fp8_dynamic
    python scripts/scale_test.py --layers 8,16,32 --schemes w4a16 # RSS against depth
    python scripts/scale_test.py --hidden 256 --intermediate 512 --vocab 1024 --layers 2,4

Shallower versions reuse the deepest checkpoint's shards (symlinked, the index restricted to
their layers, config.json's num_hidden_layers changed), so the disk holds one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def llama_config(args, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=8192, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, dtype="bfloat16",
                       rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})


def write_checkpoint(folder: Path, config, seed: int = 0, shard: str = "1GB") -> int:
    """Random bf16 weights (N(0, 0.02), norms 1) as sharded safetensors, one tensor at a time:
    the skeleton on the meta device gives the names and shapes. Returns the bytes written."""
    from transformers import AutoModelForCausalLM

    from quantlab.io.stream import ShardWriter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, shard)
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        if p.ndim == 1:
            t.fill_(1.0)
        else:
            rows = max(1, 2**24 // p.shape[1])  # 64 MB of float32 at a time
            for i in range(0, p.shape[0], rows):
                t[i:i + rows] = (torch.randn(t[i:i + rows].shape, generator=gen) * 0.02)
        writer.add(name, t)
    writer.close()
    config.save_pretrained(folder)
    return writer.total


def shallower(src: Path, dst: Path, layers: int) -> None:
    """A view of src with only its first `layers` decoder layers: config, restricted index,
    symlinked shards."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {n: f for n, f in index["weight_map"].items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": keep}))
    for f in set(keep.values()):
        os.symlink(src / f, dst / f)


def measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run cmd as a child: (return code, wall seconds, peak RSS GB of that child, output tail)."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9, out[-2000:]


def load_check(path: Path) -> str:
    """Load the export with transformers + compressed-tensors on the CPU and run a forward."""
    code = ("import torch, sys; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); "
            "x = torch.arange(16).reshape(1, 16); y = m(x).logits; "
            "assert torch.isfinite(y).all(); "
            "print('transformers loaded', type(m).__name__, 'logits', tuple(y.shape), 'finite')")
    rc, wall, rss, out = measured([sys.executable, "-c", code, str(path)])
    return f"rc={rc} {wall:.0f} s {rss:.2f} GB: {out.strip().splitlines()[-1] if out else ''}"


def layer_load_check(path: Path) -> str:
    """scripts/load_check.py on the export: every layer through third-party code, one at a time."""
    script = Path(__file__).resolve().parent / "load_check.py"
    rc, wall, rss, out = measured([sys.executable, str(script), str(path)])
    return f"rc={rc} {wall:.0f} s {rss:.2f} GB: {out.strip().splitlines()[-1] if out else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="32", help="comma-separated depths (the deepest written)")
    ap.add_argument("--schemes", default="w4a16,fp8_dynamic")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tmp", default=None, help="folder for the checkpoint (default: system tmp)")
    ap.add_argument("--audit", action="store_true", help="quantlab audit each deepest export")
    ap.add_argument("--load-check-layers", type=int, default=4,
                    help="also export a version this deep and load it in transformers (0: skip)")
    ap.add_argument("--no-layer-load", dest="layer_load", action="store_false",
                    help="skip the one-layer-at-a-time third-party load of the deepest export")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--checkpoint", help="export this existing checkpoint folder (its config's "
                    "depth is the deepest) instead of writing one; it is kept")
    args = ap.parse_args()
    depths = sorted(int(x) for x in args.layers.split(","))
    root = Path(tempfile.mkdtemp(prefix="quantlab-scale-", dir=args.tmp))
    rows = []
    try:
        ckpt = root / f"llama-{depths[-1]}l"
        if args.checkpoint:
            os.symlink(Path(args.checkpoint).resolve(), ckpt)
        else:
            t0 = time.perf_counter()
            size = write_checkpoint(ckpt, llama_config(args, depths[-1]))
            print(f"wrote {ckpt} ({size / 1e9:.2f} GB bf16) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        extra = [args.load_check_layers] if args.load_check_layers else []
        for d in sorted(set(depths[:-1] + extra)):
            shallower(ckpt, root / f"llama-{d}l", d)
        for scheme in args.schemes.split(","):
            for d in sorted(set(depths + extra)):
                src, out = root / f"llama-{d}l", root / f"out-{scheme}-{d}l"
                rc, wall, rss, tail = measured(
                    [sys.executable, "-m", "quantlab.cli", "export", "--model", str(src),
                     "--scheme", scheme, "--out", str(out), "--pipeline", "sequential",
                     "--device", "cpu"])
                if rc:
                    print(tail)
                    raise SystemExit(f"export of {src} failed (rc {rc})")
                outsize = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                row = {"scheme": scheme, "layers": d, "wall_s": round(wall, 1),
                       "peak_rss_gb": round(rss, 2), "out_gb": round(outsize / 1e9, 2)}
                if args.audit and d == depths[-1]:
                    arc, awall, arss, atail = measured(
                        [sys.executable, "-m", "quantlab.cli", "audit", str(out)])
                    row["audit"] = f"rc={arc} {atail.strip().splitlines()[-1]}"
                    row["audit_rss_gb"] = round(arss, 2)
                if args.layer_load and d == depths[-1]:
                    row["layer_load"] = layer_load_check(out)
                if d == args.load_check_layers:
                    row["load"] = load_check(out)
                print(json.dumps(row), flush=True)
                rows.append(row)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
