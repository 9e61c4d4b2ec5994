"""Read a model's safetensors checkpoint one tensor at a time, without memory-mapping it.

A safetensors file is `u64 N` (little endian), an N-byte JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian bytes, offsets
counted from the end of the header.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a read touches stays in the
process's RSS (as shared file pages) until the whole file is unmapped -- for a 5 GB shard that is
5 GB of "resident" memory while streaming through it, the very peak a streamed load exists to avoid.
Here each tensor is `readinto` a fresh buffer of its own: the page cache may keep the file, but
that is the kernel's reclaimable cache, not this process's memory.

`CheckpointFiles` resolves a directory (sharded through `model.safetensors.index.json`, or one
`model.safetensors`) into {tensor name: file}; `read_tensor` reads one.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ModelLoadError):
    """A checkpoint file is missing, unreadable, or does not hold what the model needs; names the file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class CheckpointFiles:
    """All tensors of a local safetensors checkpoint: name -> TensorInfo, in file order."""

    directory: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    index: Path | None = None  # the index file, for a sharded checkpoint

    @classmethod
    def open(cls, directory: str | Path) -> CheckpointFiles:
        directory = Path(directory)
        index = directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]  # name -> shard file name
            files = list(dict.fromkeys(weight_map.values()))
        elif (directory / SINGLE_NAME).is_file():
            weight_map, files, index = None, [SINGLE_NAME], None
        else:
            found = sorted(p.name for p in directory.glob("*"))[:12]
            raise CheckpointError(
                f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (files here: {found}). Streamed loading reads "
                "safetensors checkpoints only; convert a .bin checkpoint with transformers' save_pretrained."
            )
        checkpoint = cls(directory=directory, index=index if weight_map is not None else None)
        for name in files:
            for key, info in read_header(directory / name).items():
                if weight_map is None or weight_map.get(key) == name:
                    checkpoint.tensors[key] = info
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in checkpoint.tensors)
            if missing:
                raise CheckpointError(
                    f"{index}: lists {len(missing)} tensors that are not in the shard it names, e.g. "
                    f"{missing[0]!r} in {weight_map[missing[0]]}. The download is incomplete or the files were mixed "
                    "up; download the model again."
                )
        return checkpoint

    def where(self, key: str) -> str:
        """The file to name in an error about tensor `key` (its shard, else the index or the single file)."""
        if key in self.tensors:
            return str(self.tensors[key].file)
        return str(self.index or self.directory / SINGLE_NAME)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of one safetensors file, in the order of the data in the file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    header.pop("__metadata__", None)
    out = {}
    for key, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if meta["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {meta['dtype']}, which lorakit cannot read")
        begin, end = meta["data_offsets"]
        out[key] = TensorInfo(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, 8 + n + end)
    return out


def read_tensor(info: TensorInfo, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor, read into memory of its own (no mapping of the file stays behind), or into the front of
    `buffer` (uint8, at least info.nbytes) -- valid until that buffer is next used."""
    expected = math.prod(info.shape) * torch.empty((), dtype=info.dtype).element_size()
    if expected != info.nbytes:
        raise CheckpointError(f"{info.file}: a tensor of shape {info.shape} and {info.dtype} needs {expected} bytes, "
                              f"the header gives {info.nbytes}; the file is corrupt")
    raw = torch.empty(info.nbytes, dtype=torch.uint8) if buffer is None else buffer[: info.nbytes]  # (nbytes,)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        view, done = memoryview(raw.numpy()), 0
        while done < info.nbytes:  # readinto may return less than asked (large reads, signals)
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{info.file}: ends before the tensor at bytes {info.start}-{info.end}; "
                                      "the file is truncated, download it again")
            done += got
    return raw.view(info.dtype).view(info.shape)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in a layout fixed up front (names, dtypes, shapes), so
    that at most one tensor is ever held: the header goes first, each `write` appends the next tensor.

        with SafetensorsWriter(path, [(name, dtype, shape), ...], metadata) as out:
            for name, ... : out.write(name, tensor)       # in the order given
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.order, self.next = Path(path), [name for name, _, _ in layout], 0
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format asks
        self.layout = {name: (dtype, tuple(shape)) for name, dtype, shape in layout}
        self.file = open(self.path, "wb")  # noqa: SIM115 -- closed in __exit__
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected or (tensor.dtype, tuple(tensor.shape)) != self.layout[name]:
            raise ValueError(f"{self.path}: expected {expected!r} {self.layout.get(expected)} next, got {name!r} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # little endian, as the CPU
        self.file.write(memoryview(data.numpy()))
        self.next += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None and self.next != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensors were never written, "
                             f"first {self.order[self.next]!r}")
