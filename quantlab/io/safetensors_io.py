"""Safe file plumbing for export and import: checked safetensors reads, atomic output.

Only safetensors and GGUF are ever read; nothing here unpickles. A safetensors file is an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
We check that header ourselves before handing the file to the safetensors library, so a
malformed or truncated file fails with a message naming the file and the tensor, not a panic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

# safetensors dtype names -> bytes per element (the format's spec, safetensors/src/tensor.rs).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The checked JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}}
    (plus "__metadata__"). Raises ValueError saying what is wrong and where."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes is too short for a safetensors file "
                             "(it starts with an 8-byte header length); the file is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path}: header length {n} does not fit the file's {size} bytes; "
                             "the file is truncated or not safetensors (re-export or re-download)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({err}); "
                             "the file is corrupt or not safetensors") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, data_bytes)
    return header


def _check_entry(path: Path, name: str, info, data_bytes: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{path}: header entry {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    want = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != want or start < 0:
        raise ValueError(f"{path}: tensor {name!r} ({dtype} {shape}) needs {want} bytes but its "
                         f"data_offsets span {end - start}; the header is corrupt")
    if end > data_bytes:
        raise ValueError(f"{path}: tensor {name!r} ends at byte {end} of the data section but "
                         f"the file holds only {data_bytes}; the file is truncated")


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of one .safetensors file (header checked first; never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: safetensors could not read it: {err}") from err


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a checkpoint: one .safetensors file or a directory of shards. Refuses
    .bin/.pt/.pth checkpoints: they are pickles and can run code when loaded."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors and .gguf files are read (pickle-based "
                             ".bin/.pt files can run code when loaded); convert it to safetensors")
        return read_safetensors(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = (f" It holds {pickles}: pickle files, which quantlab never loads because they can "
                "run code; convert them to safetensors first.") if pickles else ""
        raise FileNotFoundError(f"{path} holds no .safetensors file.{hint}")
    out: dict[str, Tensor] = {}
    for f in files:
        for name, t in read_safetensors(f).items():
            if name in out:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            out[name] = t
    return out


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False,
                  is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success rename it to `out`, on any error delete it,
    so a failed export never leaves a half-written directory or file behind."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass overwrite "
                              "(--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    target = tmp if is_dir else tmp / out.name
    try:
        yield target
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(target, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what config.json's dtype field holds)."""
    return str(dtype).removeprefix("torch.")
