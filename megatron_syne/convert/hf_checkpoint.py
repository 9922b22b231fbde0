"""Hugging Face safetensors checkpoints, read and written one tensor at a time.

Reading: a directory with ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Only the headers are read up front (and checked against the
file sizes); a tensor is read from disk when asked for, so memory holds one tensor, not the
model.

Writing: the safetensors format is an 8-byte header length, a JSON header with every tensor's
dtype, shape and byte range, then the raw bytes. Since the converter knows every name and
shape before it produces any data, the header is written first and each tensor's bytes are
appended as soon as it is produced: a shard is never assembled in memory. Shards are written
under temporary names and renamed only when all of them and the index are complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_syne.convert.arch import ConversionError
from megatron_syne.utils.io import atomic_open, temporary_path_for

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Tensors HF checkpoints may carry that are recomputed, not learned (older Llama exports).
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


_FROM_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _SafetensorsFile:
    """One safetensors file: the header parsed and checked, tensors read on demand.

    Tensors are read with plain file reads into fresh tensors rather than through a memory
    map: mapped pages would count towards the converter's resident memory until the kernel
    reclaims them, which makes the streaming bound invisible in RSS measurements.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise ConversionError(
                f"{path}: cannot be read as safetensors ({exc}); the file is truncated or "
                "corrupt, download it again"
            ) from None
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _FROM_ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ConversionError(
                    f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; supported: "
                    f"{sorted(_FROM_ST_DTYPES)}"
                )
            begin, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            if stop - begin != _tensor_nbytes(shape, dtype):
                raise ConversionError(
                    f"{path}: tensor {name!r}: byte range does not match its shape"
                )
            self.entries[name] = (dtype, shape, begin, stop)
            end = max(end, stop)
        if self.data_start + end != size:
            raise ConversionError(
                f"{path}: cannot be read as safetensors (header describes "
                f"{self.data_start + end} bytes, file has {size}); the file is truncated or "
                "corrupt, download it again"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, stop = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buffer) != stop - begin:
                raise ConversionError(f"{self.path}: short read of {name!r}; the file is truncated")
        return tensor


class HFCheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = Path(hf_dir)
        self._handles: dict[str, _SafetensorsFile] = {}
        if not self.hf_dir.is_dir():
            raise ConversionError(f"{self.hf_dir}: not a directory (--hf-dir)")
        index = self.hf_dir / INDEX_NAME
        single = self.hf_dir / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(
                    f"{index}: not a valid safetensors index ({exc!r}); it needs a 'weight_map' "
                    "object mapping tensor names to shard files"
                ) from None
            self.weight_map: dict[str, str] = dict(weight_map)
        elif single.is_file():
            self.weight_map = dict.fromkeys(self._shard_handle(SINGLE_NAME).keys(), SINGLE_NAME)
        else:
            found = sorted(p.name for p in self.hf_dir.iterdir())[:20]
            hint = ""
            if any(n.endswith(".bin") or n.endswith(".pth") for n in found):
                hint = (
                    " This looks like a pickle (.bin/.pth) checkpoint: re-save it with "
                    "`model.save_pretrained(dir, safe_serialization=True)` first."
                )
            raise ConversionError(
                f"{self.hf_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found (files: {found}).{hint}"
            )
        missing = sorted({f for f in self.weight_map.values() if not (self.hf_dir / f).is_file()})
        if missing:
            raise ConversionError(
                f"{self.hf_dir / INDEX_NAME}: lists shard file(s) that do not exist in {self.hf_dir}: {missing}. "
                "Download the complete checkpoint (every shard the index names)."
            )

    def _shard_handle(self, shard: str) -> _SafetensorsFile:
        if shard not in self._handles:
            self._handles[shard] = _SafetensorsFile(self.hf_dir / shard)
        return self._handles[shard]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle_for(self, name: str) -> _SafetensorsFile:
        shard = self.weight_map.get(name)
        if shard is None:
            raise ConversionError(f"{self.hf_dir}: tensor {name!r} is not in the checkpoint")
        handle = self._shard_handle(shard)
        if name not in handle.entries:
            raise ConversionError(
                f"{self.hf_dir / shard}: the index maps {name!r} to this shard but the shard does "
                "not contain it; the index and shards are from different downloads"
            )
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle_for(name).entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from its shard into fresh memory."""
        return self._handle_for(name).read(name)

    def validate(self, expected_shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Check names and shapes against ``expected_shapes`` without reading data.

        Returns the names that are skipped on purpose (recomputed buffers such as RoPE
        ``inv_freq``); raises ConversionError listing every missing, unexpected or misshapen
        tensor otherwise.
        """
        problems = []
        for name, shape in expected_shapes.items():
            if name not in self.weight_map:
                problems.append(f"missing tensor {name} (expected shape {list(shape)})")
                continue
            found = self.shape(name)
            if found != tuple(shape):
                problems.append(f"{name}: shape {list(found)}, expected {list(shape)}")
        ignored = [n for n in self.weight_map if n.endswith(IGNORABLE_SUFFIXES)]
        unexpected = sorted(set(self.weight_map) - set(expected_shapes) - set(ignored))
        for name in unexpected[:20]:
            problems.append(
                f"unexpected tensor {name} (the Megatron Llama model has no such weight)"
            )
        if len(unexpected) > 20:
            problems.append(f"... and {len(unexpected) - 20} more unexpected tensors")
        if problems:
            raise ConversionError(
                f"{self.hf_dir}: the checkpoint does not match its config.json:\n  - "
                + "\n  - ".join(problems)
            )
        return ignored


@dataclass
class _PlannedShard:
    file_name: str
    names: list[str]
    header: bytes
    data_bytes: int


def _tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel * torch.empty((), dtype=dtype).element_size()


def _safetensors_header(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
) -> tuple[bytes, int]:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = _tensor_nbytes(shape, dtype)
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, offset


class StreamingSafetensorsWriter:
    """Write a (sharded) HF safetensors checkpoint whose tensors arrive one by one, in order.

    ``entries`` lists every tensor ``(name, shape, dtype)`` in the order :meth:`write` will
    receive them; shards are cut greedily at ``max_shard_bytes`` (a tensor larger than that gets
    a shard of its own). One shard is written as ``model.safetensors`` with no index.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 2 * 1024**3,
    ):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be > 0")
        for _, _, dtype in entries:
            if dtype not in _ST_DTYPES:
                raise ConversionError(f"cannot write dtype {dtype} to safetensors")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = _tensor_nbytes(entry[1], entry[2])
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        n = len(groups)
        self.shards: list[_PlannedShard] = []
        for i, group in enumerate(groups):
            file_name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, data_bytes = _safetensors_header(group)
            self.shards.append(_PlannedShard(file_name, [e[0] for e in group], header, data_bytes))
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in entries]
        self._position = 0
        self._shard_index = -1
        self._shard_written = 0
        self._file = None
        self._tmp_paths: list[Path] = []
        self.total_bytes = sum(s.data_bytes for s in self.shards)

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        shard = self.shards[self._shard_index]
        tmp = temporary_path_for(self.out_dir / shard.file_name)
        self._tmp_paths.append(tmp)
        self._file = open(tmp, "wb")  # noqa: SIM115 (closed in _close_shard / abort)
        self._file.write(shard.header)
        self._shard_written = 0

    def _close_shard(self) -> None:
        shard = self.shards[self._shard_index]
        if self._shard_written != shard.data_bytes:
            raise RuntimeError(
                f"{shard.file_name}: wrote {self._shard_written} of {shard.data_bytes} bytes"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next planned entry (same name, shape, dtype)."""
        if self._position >= len(self._expected):
            raise RuntimeError(f"unexpected tensor {name!r}: all planned tensors are written")
        exp_name, exp_shape, exp_dtype = self._expected[self._position]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, exp_shape, exp_dtype):
            raise RuntimeError(
                f"out-of-plan tensor {name} {tuple(tensor.shape)} {tensor.dtype}; "
                f"expected {exp_name} {exp_shape} {exp_dtype}"
            )
        if self._file is None:
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data)
        self._shard_written += data.nbytes
        self._position += 1
        if name == self.shards[self._shard_index].names[-1]:
            self._close_shard()

    def finish(self) -> Path:
        """Rename the shards into place and write the index; returns the output directory."""
        if self._position != len(self._expected):
            missing = [e[0] for e in self._expected[self._position : self._position + 5]]
            raise RuntimeError(
                f"{len(self._expected) - self._position} tensors not written, e.g. {missing}"
            )
        for tmp, shard in zip(self._tmp_paths, self.shards):
            os.replace(tmp, self.out_dir / shard.file_name)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {n: s.file_name for s in self.shards for n in s.names},
            }
            with atomic_open(self.out_dir / INDEX_NAME) as f:
                json.dump(index, f, indent=2)
        return self.out_dir

    def abort(self) -> None:
        """Close and delete the temporary shards (after an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for tmp in self._tmp_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def streaming_safetensors_writer(
    out_dir: str | os.PathLike,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    max_shard_bytes: int,
) -> Iterator[StreamingSafetensorsWriter]:
    """:class:`StreamingSafetensorsWriter` that cleans its temporary files on error."""
    writer = StreamingSafetensorsWriter(out_dir, entries, max_shard_bytes)
    try:
        yield writer
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


__all__ = [
    "HFCheckpointReader",
    "StreamingSafetensorsWriter",
    "streaming_safetensors_writer",
    "write_json",
]
