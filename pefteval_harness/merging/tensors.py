"""Reading and writing safetensors one tensor (or a few rows of one) at a time, without memory maps.

`SafetensorsReader` reads a model or adapter folder (one `<stem>.safetensors`, or shards + index): the
headers when it opens, then tensors or row ranges on demand, each into a fresh buffer with `pread`.
safetensors' own `safe_open` maps the whole file privately: every page a merge reads (and every page it
modifies, copy-on-write) stays in the process's resident memory until the file is closed, so merging K
experts would hold K models' worth of pages. Reading into buffers the engine frees keeps memory at what
is alive; safetensors itself still validates every file when it is opened.

`SafetensorsWriter` writes a model straight to disk in a fixed order: every shard's header is known up
front from the names, shapes and dtypes, so tensor bytes are appended as they are produced (whole
tensors or row pieces) and nothing of the output is held. The layout is HF's: one `<stem>.safetensors`,
or `<stem>-0000i-of-0000N.safetensors` shards plus `<stem>.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pefteval_harness.errors import BadInput
from pefteval_harness.trust import refuse_pickles

if TYPE_CHECKING:
    import torch

MODEL, ADAPTER = "model", "adapter_model"  # file stems of a HF model folder and a peft adapter folder
_MAX_READ = 1 << 30  # bytes per pread call (Linux moves at most ~2 GiB per call)


def _dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes (the ones this torch has)."""
    import torch

    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    }  # fmt: skip
    return {st: getattr(torch, name) for st, name in names.items() if hasattr(torch, name)}


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, the header's JSON) of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


class SafetensorsReader:
    """Lazy reader of a folder's safetensors (one file, or shards + index): headers now, tensors on demand.

    `stack` closes the files. Every tensor `get` or `rows` returns is a fresh, writable, contiguous buffer.
    A missing file, a pickle file (`*.bin`, refused, never loaded) or an unreadable file is BadInput.
    """

    def __init__(self, folder: Path, stem: str, stack: ExitStack):
        self.folder = Path(folder)
        single, index = self.folder / f"{stem}.safetensors", self.folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [self.folder / f for f in dict.fromkeys(weight_map.values())]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BadInput(f"{index}: not a safetensors index ({e})") from None
        else:
            refuse_pickles(self.folder)
            raise BadInput(f"{self.folder}: no {single.name} or {index.name}")
        from safetensors import safe_open

        dtypes = _dtypes()
        # tensor name -> (file descriptor, byte offset, dtype, shape)
        self._where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        for path in files:
            if not path.is_file():
                raise BadInput(f"{self.folder}: shard {path.name} named in the index is missing")
            try:
                with safe_open(str(path), framework="pt"):  # safetensors checks the header and the offsets
                    pass
                start, header = _header(path)
            except Exception as e:  # a truncated or foreign file
                raise BadInput(f"{path}: not a readable safetensors file ({e})") from None
            fd = os.open(path, os.O_RDONLY)
            stack.callback(os.close, fd)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in dtypes:
                    raise BadInput(f"{path}: tensor {name} has dtype {info['dtype']}, which torch cannot hold")
                self._where[name] = (fd, start + info["data_offsets"][0], dtypes[info["dtype"]], tuple(info["shape"]))

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][3]

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][2]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor."""
        fd, offset, dtype, shape = self._where[name]
        return _read(fd, offset, dtype, shape, f"{self.folder}: tensor {name}")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the tensor (its first dimension), reading only those bytes."""
        fd, offset, dtype, shape = self._where[name]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}:{stop} of tensor {name} of shape {list(shape)}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        return _read(fd, offset + start * row_bytes, dtype, (stop - start, *shape[1:]), f"{self.folder}: tensor {name}")


def _read(fd: int, offset: int, dtype: torch.dtype, shape: Sequence[int], what: str) -> torch.Tensor:
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
        if n == 0:
            raise BadInput(f"{what}: the file ends before the tensor does")
        done += n
    return buffer.view(dtype).view(tuple(shape))


class SafetensorsWriter:
    """Writes tensors to `folder` in a fixed order, each whole or in row pieces, as they are produced.

    `entries` are (name, shape, dtype) of every tensor. They are written in the order `order` gives: the
    entries by decreasing element size (so every tensor starts aligned to its own size, as safetensors
    lays files out), otherwise as given. Shards hold at most `max_shard_bytes` (a larger tensor gets a
    shard to itself); None: one file. `write` takes the next piece: the tensor's next rows (or all of it),
    in order. `close` checks that everything was written and writes the index of a sharded output.
    """

    def __init__(
        self,
        folder: Path,
        stem: str,
        entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
        max_shard_bytes: int | None,
        metadata: dict[str, str] | None = None,
    ):
        dtype_names = {dtype: name for name, dtype in _dtypes().items()}
        self.folder = Path(folder)
        ordered = sorted(entries, key=lambda e: -e[2].itemsize)  # stable: ties keep the given order
        self.order = [name for name, _, _ in ordered]
        self._shape = {name: tuple(shape) for name, shape, _ in ordered}
        self._dtype = {name: dtype for name, _, dtype in ordered}
        self._nbytes = {name: math.prod(shape) * dtype.itemsize for name, shape, dtype in ordered}
        shards: list[list[str]] = [[]]
        size = 0
        for name in self.order:
            if max_shard_bytes is not None and shards[-1] and size + self._nbytes[name] > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += self._nbytes[name]
        n = len(shards)
        self._files = [self.folder / f"{stem}.safetensors"] if n == 1 else [
            self.folder / f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
        ]  # fmt: skip
        self._index = self.folder / f"{stem}.safetensors.index.json" if n > 1 else None
        self._headers = []
        for names in shards:
            header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
            offset = 0
            for name in names:
                header[name] = {
                    "dtype": dtype_names[self._dtype[name]],
                    "shape": list(self._shape[name]),
                    "data_offsets": [offset, offset + self._nbytes[name]],
                }
                offset += self._nbytes[name]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            self._headers.append(struct.pack("<Q", len(raw)) + raw)
        self._shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self._next = 0  # index in `order` of the tensor being written
        self._done = 0  # bytes of it written so far
        self._shard = -1  # index of the open shard
        self._file: Any = None
        self._skip_empty()

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append `piece`: the next rows of tensor `name` (the whole tensor for a 0-d one)."""
        import torch

        shape = self._shape.get(name)
        if (
            shape is None
            or piece.dtype != self._dtype[name]
            or piece.dim() != len(shape)
            or piece.shape[1:] != shape[1:]
        ):
            raise ValueError(
                f"SafetensorsWriter: a piece {piece.dtype} {list(piece.shape)} does not fit tensor {name}"
                + ("" if shape is None else f" {self._dtype[name]} {list(shape)}")
            )
        if self._nbytes[name] == 0:  # nothing to write
            return
        if self._next >= len(self.order) or name != self.order[self._next]:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"SafetensorsWriter: got tensor {name}, expected {expected} (write in `order`)")
        data = piece.contiguous().reshape(-1).view(torch.uint8)
        if self._done + data.numel() > self._nbytes[name]:
            raise ValueError(f"SafetensorsWriter: tensor {name}: more rows than its shape {list(shape)}")
        self._open_shard(self._shard_of[name])
        self._file.write(data.numpy())
        self._done += data.numel()
        if self._done == self._nbytes[name]:
            self._next, self._done = self._next + 1, 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        """Tensors with no entries have no bytes to write."""
        while self._next < len(self.order) and self._nbytes[self.order[self._next]] == 0:
            self._next += 1

    def _open_shard(self, shard: int) -> None:
        """Make `shard` the open file (every shard before it is complete: open and close any left)."""
        while self._shard < shard:
            if self._file is not None:
                self._file.close()
            self._shard += 1
            self._file = open(self._files[self._shard], "wb")  # noqa: SIM115 (closed by the next shard or close)
            self._file.write(self._headers[self._shard])

    def close(self) -> None:
        """Finish: every tensor must have been written; the index of a sharded output is written last."""
        if self._next < len(self.order):
            raise ValueError(f"SafetensorsWriter: tensor {self.order[self._next]} was not (fully) written")
        self._open_shard(len(self._files) - 1)  # shards of empty tensors only, or no tensors at all
        self._file.close()
        if self._index is not None:
            weight_map = {name: self._files[i].name for name, i in self._shard_of.items()}
            index = {"metadata": {"total_size": sum(self._nbytes.values())}, "weight_map": weight_map}
            self._index.write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the open file after a failure (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
