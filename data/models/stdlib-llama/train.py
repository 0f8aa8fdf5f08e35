"""Train stdlib-llama, quantlab's embedded causal LM, from the CPython standard library sources.

Run from the repository root (quantlab importable: ``pip install -e .`` or ``PYTHONPATH=.``):

    python data/models/stdlib-llama/train.py --out /tmp/sl             # CPU defaults, < 30 min
    python data/models/stdlib-llama/train.py --device cuda --out /tmp/sl  # the shipped weights' run

The shipped weights read CPython 3.11.7's Lib folder (``--stdlib`` picks another interpreter's);
another Python version has other sources, so its split and weights differ (README.md).

Steps: collect the stdlib's .py files (sorted, tests and data tables left out) -> split them by a
hash of their path into train / val / eval -> train a byte-level BPE tokenizer (4096 tokens) on
train -> train a LlamaForCausalLM (hidden 256, 6 layers, GQA 4/2 heads) on random windows of the
train tokens, keeping the weights with the lowest val loss -> save them in bf16 with the tokenizer,
eval.txt and calib.txt -> reload the saved files and score eval.txt (perplexity, bits per byte).
Every random choice is seeded. CPU runs repeat bit for bit; GPU runs only up to kernel ordering.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made a
# CPU training step 1.5-4x slower (7-20 s against 4.6-6.5 s at load average 7). Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from quantlab.models import load_causal_lm, score_text

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
MODEL = dict(  # every Linear dim a multiple of 128 so quantization groups and kernels fit
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
# Defaults per device: the CPU run fits 30 min on 2 cores; the GPU run made the shipped weights.
PRESETS = {
    "cpu": dict(steps=200, batch_size=16, seq_len=256, lr=2e-3, warmup=20, eval_every=100),
    "cuda": dict(steps=1400, batch_size=32, seq_len=1024, lr=2e-3, warmup=150, eval_every=100),
}
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"}
EVAL_BYTES, VAL_BYTES, CALIB_BYTES, MAX_HELDOUT_FILE = 250_000, 250_000, 100_000, 40_000


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's .py files in sorted order, without tests, site-packages and build-specific
    files (_sysconfigdata*, config-*/); read_docs also drops the data tables."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith(("_sysconfigdata", "test_")):
            continue
        files.append(path)
    return files


def read_docs(root: Path) -> list[tuple[str, str]]:
    """[(relative path, document text)], each document '# file: <path>\\n<source>\\n\\n'."""
    docs = []
    for path in stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few files are deliberately in other encodings
        if "gencodec.py" in source:
            continue
        rel = path.relative_to(root).as_posix()
        docs.append((rel, f"# file: {rel}\n{source.rstrip()}\n\n"))
    return docs


def bucket(rel: str) -> int:
    """A stable 0..99 bucket from the file's relative path (same on every machine and version)."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100


def split(docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Files -> {'train', 'val', 'eval', 'calib'} document lists. eval (buckets 0-2) and val
    (3-8) are whole files never trained on, capped in size; calib is a slice of train (50-52)."""
    parts: dict[str, list[str]] = {"train": [], "val": [], "eval": [], "calib": []}
    sizes = {"val": 0, "eval": 0, "calib": 0}
    caps = {"eval": EVAL_BYTES, "val": VAL_BYTES, "calib": CALIB_BYTES}
    for rel, text in docs:
        b, n = bucket(rel), len(text.encode())
        held = "eval" if b < 3 else "val" if b < 9 else None
        if held and n <= MAX_HELDOUT_FILE and sizes[held] + n <= caps[held]:
            parts[held].append(text)
            sizes[held] += n
            continue
        parts["train"].append(text)
        if 50 <= b < 53 and sizes["calib"] + n <= CALIB_BYTES:
            parts["calib"].append(text)
            sizes["calib"] += n
    return parts


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenization, so any text encodes) of VOCAB_SIZE tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL["max_position_embeddings"],
    )


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Documents -> one (N,) int64 token stream, documents back to back."""
    ids = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return torch.tensor([i for enc in ids for i in enc.ids], dtype=torch.long)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def val_loss(model, tokens: torch.Tensor, seq_len: int, device: str) -> float:
    """Mean next-token loss (nats) over the val stream in non-overlapping windows."""
    n = len(tokens) // (seq_len + 1)
    windows = tokens[: n * (seq_len + 1)].view(n, seq_len + 1)
    total = 0.0
    for chunk in windows.split(16):
        chunk = chunk.to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
        total += float(
            F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        )
    return total / windows[:, 1:].numel()


def train(model, train_ids, val_ids, args, log) -> dict:
    """AdamW on random (batch_size, seq_len) windows; returns the state dict of lowest val loss."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=args.device.startswith("cuda"),
    )
    gen = torch.Generator().manual_seed(args.seed)
    best, best_state, t0 = float("inf"), None, time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            loss = val_loss(model, val_ids, args.seq_len, args.device)
            model.train()
            if loss < best:
                best, best_state = (
                    loss,
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                )
            log(f"step {step:5d}  val loss {loss:.4f}  best {best:.4f}  {time.time() - t0:7.1f} s")
            if step == args.steps:
                break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(len(train_ids) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts]).to(args.device)
        with torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda")):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {"best_val_loss": best, "state": best_state, "train_seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model into")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda; picks the defaults in PRESETS"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the device's preset)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float, default=0.3, help="AdamW decay of matrices")
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="the stdlib folder to read (default: this interpreter's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in PRESETS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "train_log.txt").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")

    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    t_start = time.time()
    docs = read_docs(args.stdlib)
    parts = split(docs)
    if not docs or not parts["eval"]:
        raise SystemExit(
            f"found no usable .py files under {args.stdlib}; pass --stdlib <python's Lib folder>"
        )
    corpus = "".join(parts["train"]).encode()
    counts = {name: len(docs) for name, docs in parts.items()}
    digest = hashlib.sha256(corpus).hexdigest()[:16]
    log(
        f"stdlib {args.stdlib}: {len(docs)} files; files per split {counts}; train text "
        f"{len(corpus)} bytes, sha256 {digest}"
    )
    for name in ("eval", "calib"):
        (args.out / f"{name}.txt").write_text("".join(parts[name]), encoding="utf-8")

    tokenizer = train_tokenizer(parts["train"])
    tokenizer.save_pretrained(args.out)
    # transformers 5 writes its own class name; the generic one also loads under transformers 4
    config_path = args.out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) | {
        "tokenizer_class": "PreTrainedTokenizerFast"
    }
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    train_ids, val_ids = encode(tokenizer, parts["train"]), encode(tokenizer, parts["val"])
    log(
        f"tokenizer: {len(tokenizer)} tokens; train {len(train_ids)} tokens "
        f"({len(corpus) / len(train_ids):.2f} bytes/token), val {len(val_ids)} tokens; "
        f"{time.time() - t_start:.1f} s so far"
    )

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(**MODEL, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = LlamaForCausalLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters; {vars(args)}")
    result = train(model, train_ids, val_ids, args, log)
    model.load_state_dict(result["state"])
    model.to(torch.bfloat16).save_pretrained(args.out)

    reloaded, tok = load_causal_lm(args.out, dtype=torch.float32, device=args.device)
    score = score_text(
        reloaded, tok, (args.out / "eval.txt").read_text(encoding="utf-8"), seq_len=256
    )
    summary = dict(
        parameters=n_params,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        train_tokens=len(train_ids),
        best_val_loss=round(result["best_val_loss"], 4),
        train_seconds=round(result["train_seconds"], 1),
        total_seconds=round(time.time() - t_start, 1),
        eval_tokens=score.n_tokens,
        eval_bytes=score.n_bytes,
        eval_perplexity=round(score.perplexity, 3),
        eval_bits_per_byte=round(score.bits_per_byte, 4),
        torch=torch.__version__,
        python=sys.version.split()[0],
    )
    log(json.dumps(summary))
    log_file.close()
    return summary


if __name__ == "__main__":
    main()
