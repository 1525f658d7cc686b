"""Streaming safetensors I/O for `finlora.merge`: one tensor in memory at a time.

Reading: the header of a .safetensors file is parsed here (8-byte little-endian
length + JSON) and each tensor is read with an explicit seek+readinto into its own
buffer. `safetensors.safe_open` would work too, but it memory-maps the whole file
and every page it touches stays in the process's resident set until the file is
closed, so reading a 5 GB shard tensor by tensor still shows ~5 GB of RSS.
Explicit reads keep the resident set at one tensor; the kernel page cache (not
counted against the process) does the buffering.

Writing: the shard layout (names, dtypes, shapes, offsets) is known before any byte
is written, so each output shard's header is written first and tensors are then
streamed into it one by one. A tensor that the merge does not change is copied
file-to-file with `os.copy_file_range` (no trip through Python memory). The files
are plain safetensors; tests read them back with `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference limit


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str          # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int          # absolute byte offset in `file`
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor name -> TensorInfo, and the file's __metadata__."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise SafetensorsError(f"{path}: header of {n} bytes is not plausible (not a safetensors file?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header: {e}") from None
    size = path.stat().st_size
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        b, e = h["data_offsets"]
        start = 8 + n + b
        if not (0 <= b <= e) or start + (e - b) > size:
            raise SafetensorsError(f"{path}: tensor {name} lies outside the file (truncated download?)")
        out[name] = TensorInfo(name, path, h["dtype"], tuple(h["shape"]), start, e - b)
    return out, meta


def read_tensor(info: TensorInfo, f=None) -> torch.Tensor:
    """The tensor's own copy, in its stored dtype."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    own = f is None
    if own:
        f = open(info.file, "rb")
    try:
        f.seek(info.start)
        view = memoryview(buf.numpy())
        got = 0
        while got < info.nbytes:
            k = f.readinto(view[got:])
            if not k:
                raise SafetensorsError(f"{info.file}: unexpected end of file in tensor {info.name}")
            got += k
    finally:
        if own:
            f.close()
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return buf.view(info.torch_dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def copy_bytes(src, dst, offset: int, count: int, chunk: int = 16 << 20) -> None:
    """Append `count` bytes at `offset` of file `src` to `dst` (kernel-side where possible)."""
    dst.flush()
    start_pos = dst.tell()
    if hasattr(os, "copy_file_range"):
        try:
            done = 0
            while done < count:
                k = os.copy_file_range(src.fileno(), dst.fileno(), count - done, offset + done)
                if k == 0:
                    raise SafetensorsError(f"{src.name}: unexpected end of file")
                done += k
            dst.seek(0, os.SEEK_END)
            return
        except OSError:  # not supported on this file system: plain reads below
            dst.seek(start_pos)
            dst.truncate()
    src.seek(offset)
    left = count
    while left:
        data = src.read(min(chunk, left))
        if not data:
            raise SafetensorsError(f"{src.name}: unexpected end of file")
        dst.write(data)
        left -= len(data)


class ShardWriter:
    """Write one safetensors file whose tensor list is fixed in advance.

    `entries` is [(name, dtype_name, shape, nbytes)] in write order; call `write_tensor`
    or `copy_from` for each, in that order, then `close`.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None = None):
        self.path = Path(path)
        self.entries = entries
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        off = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.i = 0

    def _expect(self, name: str, nbytes: int) -> None:
        exp_name, _, _, exp_n = self.entries[self.i]
        if name != exp_name or nbytes != exp_n:
            raise RuntimeError(f"internal error: writing {name} ({nbytes} B) where {exp_name} ({exp_n} B) was planned")
        self.i += 1

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        data = tensor_bytes(t)
        self._expect(name, data.nbytes)
        self.f.write(data)

    def copy_from(self, name: str, info: TensorInfo, src) -> None:
        self._expect(name, info.nbytes)
        copy_bytes(src, self.f, info.start, info.nbytes)

    def close(self) -> None:
        if self.i != len(self.entries):
            raise RuntimeError(f"internal error: {self.path.name} closed after {self.i}/{len(self.entries)} tensors")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (as transformers)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1GiB)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if unit == "B":
        mult = 1
    else:
        base = 1024 if "I" in unit else 1000
        mult = base ** ("KMGT".index(unit[0]) + 1)
    n = int(num * mult)
    if n <= 0:
        raise ValueError(f"shard size must be positive: {text!r}")
    return n
