"""safetensors written one tensor at a time, so a conversion holds one tensor in memory, not the model.

The format: an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte range, plus ``__metadata__`` strings) padded with spaces to 8 bytes, then the raw bytes.
Knowing every tensor's shape and dtype up front is enough to write the header first.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order of the declared layout.

    ``layout`` maps names to (shape, dtype) for every tensor the file will hold; ``write`` must
    then be called once per name in that order. The file appears under its name only when
    ``close`` finds every tensor written (it is written to a temporary name first).
    """

    def __init__(
        self,
        path: Path,
        layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str],
    ) -> None:
        self.path = Path(path)
        self.names = list(layout)
        self.layout = dict(layout)
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for name, (shape, dtype) in self.layout.items():
            if dtype not in DTYPE_NAMES:
                raise TypeError(f"{name}: dtype {dtype} has no safetensors name")
            size = tensor_bytes(shape, dtype)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file = self.tmp.open("wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.names) or name != self.names[self.next]:
            expected = self.names[self.next] if self.next < len(self.names) else "nothing"
            raise ValueError(f"{self.path}: wrote '{name}', expected {expected}")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path}: tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}"
            )
        data = tensor.detach().to("cpu").contiguous()
        # Bytes as stored in memory (little endian on every platform torch supports), written from
        # the tensor's own buffer: no copy, so a conversion holds one tensor, not two.
        if data.numel():
            self.file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.names):
            self.abort()
            raise ValueError(
                f"{self.path}: {len(self.names) - self.next} declared tensors were never written"
            )
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
