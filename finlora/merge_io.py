"""Streamed safetensors I/O for `finlora.merge`, one tensor in memory at a time: how and why,
docs/MERGE.md ("Streamed")."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from finlora.errors import MergeError

# The names the safetensors format gives torch dtypes (its spec; safetensors.torch keeps
# this table private).
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo, in the order the tensors lie in the file."""
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for name in f.offset_keys():
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in DTYPES:
                    raise MergeError(f"{path}: tensor {name} has unsupported dtype {dtype}")
                out[name] = TensorInfo(name, path, DTYPES[dtype], tuple(sl.get_shape()))
            return out
    except SafetensorError as e:
        raise MergeError(f"{path}: not a readable safetensors file (truncated download?): {e}") from None


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor in its stored dtype, its file open only while it is read: an open file's
    mapped pages stay resident until it closes; reopening costs one header parse."""
    try:
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(info.name)
    except SafetensorError as e:
        raise MergeError(f"{info.file}: tensor {info.name}: {e}") from None


class ShardWriter:
    """Write one safetensors file whose tensor list is fixed in advance.

    `entries` is [(name, torch dtype, shape)] in write order; call `write_tensor` for
    each, in that order, then `close`.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = path
        self.entries = entries
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, dtype, shape in self.entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.i = 0

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self.entries[self.i]
        if (name, t.dtype, tuple(t.shape)) != (exp_name, exp_dtype, tuple(exp_shape)):
            raise RuntimeError(f"internal error: writing {name} {t.dtype}{list(t.shape)} where "
                               f"{exp_name} {exp_dtype}{list(exp_shape)} was planned")
        self.i += 1
        self.f.write(t.contiguous().view(-1).view(torch.uint8).numpy())  # the raw bytes, any dtype

    def close(self) -> None:
        if self.i != len(self.entries):
            raise RuntimeError(f"internal error: {self.path.name} closed after {self.i}/{len(self.entries)} tensors")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
