"""GPTQ at 8B scale on a GPU: a Llama-3-8B-shaped checkpoint with random bf16 weights (written as
scripts/scale_test.py writes it, under a temporary folder removed after), exported layer by layer
with GPTQ (`quantlab.sequential.export_sequential`, algorithm="gptq", device cuda), reporting wall
time and peak GPU memory, then `quantlab audit` and a transformers + compressed-tensors load of
the export with a forward pass.

    python scripts/scale_gptq.py                       # 8B shape, w4a16, 2048 calibration tokens
    python scripts/scale_gptq.py --layers 4 --json out.json

Calibration tokens: the embedded model's calibration text through its tokenizer (vocabulary
4096), each id mapped into the 128256-token vocabulary as id * 31 mod 128256 (31 is prime to
128256, so distinct ids stay distinct and spread over the table): a random-weight model has no
tokenizer of its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _scale_test():
    spec = importlib.util.spec_from_file_location("scale_test", HERE / "scale_test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def calibration_ids(n_tokens: int, vocab: int, seq_len: int = 256) -> torch.Tensor:
    """(n_tokens // seq_len, seq_len) ids of the embedded calibration text, mapped into vocab."""
    from transformers import AutoTokenizer

    from quantlab import models
    from quantlab.eval.lm import token_windows

    tok = AutoTokenizer.from_pretrained(models.embedded_lm_dir(), local_files_only=True)
    return token_windows(tok, models.calib_text(), seq_len, n_tokens) * 31 % vocab


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--scheme", default="w4a16")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--no-load", action="store_true", help="skip the transformers load")
    st = _scale_test()
    st_args = argparse.Namespace(hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                                 vocab=128256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scale_gptq.py runs GPTQ on a CUDA GPU; none is here "
                         "(scripts/scale_test.py is the CPU scale test)")
    from quantlab.sequential import export_sequential

    root = Path(tempfile.mkdtemp(prefix="quantlab-gptq-", dir=args.tmp))

    def report():  # after every phase, so a run cut short keeps what it measured
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=1))

    row = {"scheme": args.scheme, "algorithm": "gptq", "layers": args.layers,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "calib_tokens": args.calib_tokens}
    try:
        ckpt, out = root / "llama", root / "out"
        t0 = time.perf_counter()
        size = st.write_checkpoint(ckpt, st.llama_config(st_args, args.layers))
        row["checkpoint_gb"] = round(size / 1e9, 2)
        row["write_s"] = round(time.perf_counter() - t0, 1)
        report()
        calib = calibration_ids(args.calib_tokens, st_args.vocab)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        export_sequential(ckpt, args.scheme, out, algorithm="gptq", calib=calib, device="cuda")
        row["export_s"] = round(time.perf_counter() - t0, 1)
        row["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        row["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
        row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
        row["out_gb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 2)
        report()
        rc, wall, rss, tail = st.measured([sys.executable, "-m", "quantlab.cli", "audit", str(out)])
        row["audit"] = f"rc={rc} {wall:.0f} s {rss:.2f} GB: {tail.strip().splitlines()[-1]}"
        report()
        if not args.no_load:
            row["load"] = st.load_check(out)
        report()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
