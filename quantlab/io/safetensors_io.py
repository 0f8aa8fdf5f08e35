"""Safe file plumbing for export and import: checked safetensors reads, atomic output.

Only safetensors and GGUF are ever read; nothing here unpickles. A safetensors file is an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
We check that header ourselves before handing the file to the safetensors library, so a
malformed or truncated file fails with a message naming the file and the tensor, not a panic.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
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
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (expected one of "
                         f"{', '.join(DTYPE_BYTES)}); the header is corrupt")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{path}: tensor {name!r} has a malformed shape {shape!r} (expected a "
                         "list of non-negative integers); the header is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise ValueError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r} "
                         "(expected [begin, end] byte offsets); the header is corrupt")
    start, end = offsets
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
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a shard the index names but the folder lacks would drop its tensors
        named = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if missing := sorted(n for n in named if not (path / n).is_file()):
            raise FileNotFoundError(f"{path}: model.safetensors.index.json names shards the "
                                    f"folder lacks: {missing}; the download or copy is "
                                    "incomplete: fetch them again")
    out: dict[str, Tensor] = {}
    for f in files:
        for name, t in read_safetensors(f).items():
            if name in out:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            out[name] = t
    return out


MARKER = ".quantlab-export"  # written into every exported folder: --overwrite replaces only these
OWNER = ".quantlab-partial"  # pid and host of the export writing a .partial folder
_MARKER_TEXT = "written by quantlab; --overwrite may replace this folder\n"


def _pid_alive(owner: Path) -> bool:
    """Whether the export that wrote this .partial/.old folder may still be running."""
    try:
        info = json.loads(owner.read_text())
        if info.get("host") != socket.gethostname():
            return True  # another machine's export (shared disk): never touch it
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # unreadable owner file: not provably ours, leave it
    return True


def _clean_stale(out: Path) -> None:
    """Remove `.<name>.XXXXXXXX.partial` folders that a killed export left beside `out` (only
    folders named exactly as atomic_output names them, holding its owner file, whose process is
    gone); put back a `.<name>.old-PID` that a crash between the two renames left while `out`
    is missing, and remove it when `out` is there."""
    name = re.escape(out.name)
    partial = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.partial")
    old = re.compile(rf"\.{name}\.old-\d+")
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        is_partial, is_old = partial.fullmatch(p.name), old.fullmatch(p.name)
        if not (is_partial or is_old) or p.is_symlink() or not p.is_dir():
            continue
        if not (p / OWNER).is_file() or _pid_alive(p / OWNER):
            continue
        if is_old and not os.path.lexists(out):
            inner = p / out.name  # a single-file export was set aside inside its folder
            if inner.is_file():
                os.replace(inner, out)
                shutil.rmtree(p)
            else:
                os.replace(p, out)
                (out / OWNER).unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _refuse_unsafe_target(out: Path, is_dir: bool, overwrite: bool,
                          source: str | os.PathLike | None) -> None:
    """Raise unless writing `out` (and, with overwrite, replacing it) can only lose a previous
    quantlab export: never a symlink, the working folder or one above it, or the source model."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symlink (to {os.readlink(out)}); quantlab does not "
                         "write through links: pass the real path "
                         f"({out.resolve()}) or another --out")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"--out {out} is the working folder or one above it ({real}); "
                         "replacing it would delete your files: pass a new folder, "
                         "e.g. --out out/model-w4a16")
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        if real == src or real in src.parents:
            raise ValueError(f"--out {out} is the source model folder {src} or holds it; "
                             "writing there would delete the model: pass another --out")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass overwrite "
                              "(--overwrite) to replace it")
    if is_dir:
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not an export folder; quantlab will not "
                                  "replace it: remove it yourself or choose another --out")
        if (out / MARKER).is_file() or not any(out.iterdir()):
            return
        raise FileExistsError(f"{out} is not a quantlab export (it has no {MARKER} file), so "
                              "--overwrite will not replace it; exports written before quantlab "
                              "added the marker must be removed by hand (rm -r), or choose "
                              "another --out")
    if out.is_dir():
        raise FileExistsError(f"{out} is a folder; --overwrite replaces only a file export: "
                              "choose another --out")
    with open(out, "rb") as f:
        magic = f.read(4)
    if not (out.suffix == ".gguf" and magic == b"GGUF"):
        raise FileExistsError(f"{out} is not a GGUF file quantlab wrote (its first bytes are "
                              f"{magic!r}), so --overwrite will not replace it: remove it "
                              "yourself or choose another --out")


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder, under root, so the rename publishes data on disk."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a folder; the data still is
        pass
    finally:
        os.close(fd)


def _apply_umask(root: Path) -> None:
    """mkdtemp makes 0700 folders: give the export the modes the user's umask asks for."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err).lower()
    if isinstance(err, OSError) and re.search(r"\d+ requested and \d+ written", text):
        return True  # numpy's tofile (the GGUF writer) on a short write
    return type(err).__name__ == "SafetensorError" and ("no space" in text or "os error 28" in text)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False, is_dir: bool = True, *,
                  source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success publish it as `out`, on any error delete
    it, so a failed export never leaves a half-written directory or file behind.

    overwrite replaces only a previous quantlab export (a folder holding MARKER, an empty
    folder, or a .gguf file) and never a symlink, the working folder or one above it, or
    `source` (the model being exported) or a folder holding it. Files are fsynced before the
    rename and the parent folder after it; modes follow the umask. Replacing an export is
    rename old aside, rename new in, remove old: a crash between the two renames leaves the old
    export as `.<name>.old-PID`, which the next export to `out` puts back before it starts.
    `.partial` folders of killed exports are removed by the next export to the same `out`."""
    out = Path(out)
    _refuse_unsafe_target(out, is_dir, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    _refuse_unsafe_target(out, is_dir, overwrite, source)  # a restored .old counts as existing
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    (tmp / OWNER).write_text(owner)
    target = tmp if is_dir else tmp / out.name
    try:
        try:
            yield target
        except Exception as err:
            if not _disk_full(err):
                raise
            free = shutil.disk_usage(out.parent).free
            written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            raise OSError(errno.ENOSPC, f"disk full while writing {out}: nothing was written "
                          f"(the partial output is removed); {written / 1e9:.2f} GB were "
                          f"written before the disk filled and {free / 1e9:.2f} GB are free on "
                          f"{out.parent.resolve()}: free at least {written / 1e9 + 1:.0f} GB "
                          "more, or pass an --out on another disk") from err
        if is_dir:
            (tmp / MARKER).write_text(_MARKER_TEXT)
        _apply_umask(tmp)
        _fsync_tree(tmp)
        old = None
        if os.path.lexists(out):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if is_dir:
                (out / OWNER).write_text(owner)  # so a crash here can be undone
                os.replace(out, old)
            else:
                old.mkdir()
                (old / OWNER).write_text(owner)
                os.replace(out, old / out.name)
            _fsync_dir(out.parent)
        os.replace(target, out)
        if is_dir:
            (out / OWNER).unlink()  # kept until now so a killed run's folder is always ours
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what config.json's dtype field holds)."""
    return str(dtype).removeprefix("torch.")
