"""Hugging Face model directories: ``model.safetensors``, sharded safetensors
with ``model.safetensors.index.json``, or ``pytorch_model*.bin``.

safetensors files are memory-mapped by ``safe_open`` and read one tensor at a
time; ``.bin`` files go through the weights-only loader with ``mmap=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import jsonfiles
from . import pages
from .. import safeload
from ..confine import confined
from ..errors import CheckpointFormatError
from ..jsonfiles import read_json
from .base import Reader, TensorInfo

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


def weight_files(path: Path) -> tuple[str, list[Path]]:
    """("safetensors"|"bin"|"", files) for a directory, preferring safetensors like transformers does."""
    for index, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        if (path / index).is_file():
            weight_map = read_json(path / index, jsonfiles.INDEX, required=("weight_map",))["weight_map"]
            # file names come from the index: confined to this folder (no "../../x.safetensors")
            return kind, [confined(path, f, source=path / index, what="weight_map file")
                          for f in dict.fromkeys(weight_map.values())]
    if (path / "model.safetensors").is_file():
        return "safetensors", [path / "model.safetensors"]
    if (path / "pytorch_model.bin").is_file():
        return "bin", [path / "pytorch_model.bin"]
    return "", []


def legacy_notes(files: list[Path]) -> list[str]:
    """What inspect says about legacy (non-zip) torch.save files: they cannot be memory-mapped."""
    return [f"{f.name}: legacy (non-zip) torch.save format: loaded whole into memory (no mmap), weights-only"
            for f in files if f.is_file() and safeload.is_legacy_format(f)]


def _safetensors_map(f: Path) -> tuple[Any, dict[str, tuple[int, int]]]:
    """(a private mapping of ``f``, {key: (start, stop) absolute byte range}) - (None, {}) if unreadable.

    ``safe_open`` has already checked the header against the file; the ranges
    are checked again against the size, since a read through a mapping past
    the end of the file is SIGBUS, not an error.
    """
    import json
    import mmap
    import struct

    try:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return None, {}
            header = json.loads(fh.read(n))
            base = 8 + n
            spans = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()
                     if k != "__metadata__"}
            if any(not (base <= a <= b <= size) for a, b in spans.values()) or size == 0:
                return None, {}
            # ACCESS_COPY: a private mapping torch can view without a read-only warning; nothing writes to it
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY), spans
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None, {}


def is_hf_dir(path: Path) -> bool:
    return Path(path).is_dir() and bool(weight_files(Path(path))[0])


# to-hf --aux separate writes the aux modules beside the model as aux_modules.safetensors (+ aux_modules.json)
AUX_FILE = "aux_modules"


class HFReader(Reader):
    format = "hf"
    reads_rows = True
    confines_config = False

    def __init__(self, path: Path, *, trust_pickle: bool = False):
        super().__init__(path)
        self.trust_pickle = trust_pickle
        self.kind, self.files = weight_files(self.path)
        if not self.kind:
            raise CheckpointFormatError(f"{self.path}: no model.safetensors, index or pytorch_model.bin here")
        self.evidence.files = [p.name for p in self.files[:4]]
        if (self.path / "config.json").is_file():
            self.evidence.files.append("config.json")
        self._problems = [f"{p}: listed in the index but missing" for p in self.files if not p.is_file()]
        if self.kind == "bin":
            self.evidence.notes += legacy_notes(self.files)
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] | None = None
        self._bins: dict[Path, dict[str, Any]] = {}
        self._maps: dict[Path, tuple[Any, dict[str, tuple[int, int]]]] = {}

    def problems(self) -> list[str]:
        return list(self._problems)

    def aux_file(self) -> Path | None:
        f = self.path / f"{AUX_FILE}.safetensors"
        return f if f.is_file() else None

    def tensors(self) -> dict[str, TensorInfo]:
        if self._info is not None:
            return self._info
        if self._problems:
            raise CheckpointFormatError(self._problems[0])
        info: dict[str, TensorInfo] = {}
        for f in self.files:
            if self.kind == "safetensors":
                # The header alone gives shapes and dtypes; no tensor bytes are read.
                try:
                    with safe_open(f, framework="pt") as st:
                        header = {k: (st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape()))
                                  for k in st.keys()}
                except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a bad or truncated file
                    raise CheckpointFormatError(f"{f}: not a readable safetensors file ({e})") from None
                for k, (dt_name, shape) in header.items():
                    if dt_name not in _ST_DTYPES:
                        raise CheckpointFormatError(f"{f}: key {k!r} has unsupported dtype {dt_name}")
                    info[k] = TensorInfo(k, shape, _ST_DTYPES[dt_name])
                    self._where[k] = f
            else:
                for k, v in self._bin(f).items():
                    if isinstance(v, torch.Tensor):
                        info[k] = TensorInfo(k, tuple(v.shape), v.dtype)
                        self._where[k] = f
        self._info = info
        return info

    def _bin(self, f: Path) -> dict[str, Any]:
        if f not in self._bins:
            self._bins[f] = safeload.load(f, mmap=True, trust_pickle=self.trust_pickle)
        return self._bins[f]

    def read(self, key: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``key`` as a new tensor (in ``dtype``), or copied into ``out`` (a caller's reused buffer)."""
        self.tensors()
        f = self._where[key]
        if self.kind == "safetensors":
            src = self._mapped(f, key)
            if src is None:  # an unusual layout: the safetensors library's own copy
                with safe_open(f, framework="pt") as st:
                    src = st.get_tensor(key)
        else:
            src = self._bin(f)[key]
        if out is None:
            out = torch.empty(src.shape, dtype=dtype or src.dtype)
        out.copy_(src)  # one pass over the file's pages, casting on the way
        pages.release(src)
        return out

    def read_rows(self, key: str, out: torch.Tensor, start: int, stop: int) -> bool:
        """Rows [start, stop) of ``key`` into ``out`` (cast on the way); False if not mapped (read whole)."""
        self.tensors()
        src = self._mapped(self._where[key], key) if self.kind == "safetensors" else None
        if src is None:
            return False
        part = src[start:stop]
        out.copy_(part)
        pages.release(part)
        return True

    def _mapped(self, f: Path, key: str) -> torch.Tensor | None:
        """``key`` as a view of the file's mapping (no copy), or None if its bytes cannot be viewed directly.

        Reading through the mapping casts straight from the page cache: the
        safetensors library's ``get_tensor`` would first copy the bytes into a
        new tensor, and the cast then makes a second one.
        """
        if f not in self._maps:
            self._maps[f] = _safetensors_map(f)
        mm, spans = self._maps[f]
        span = spans.get(key)
        info = self._info[key]
        if mm is None or span is None or span[0] % info.dtype.itemsize:
            return None
        start, stop = span
        if stop - start != info.nbytes or info.nbytes == 0:
            return None
        return torch.frombuffer(mm, dtype=torch.uint8, count=stop - start, offset=start).view(info.dtype
                                                                                             ).view(info.shape)

    def close(self) -> None:
        self._maps.clear()  # a mapping goes when its last view does
        super().close()

    def source_files(self) -> list[Path]:
        return [Path(f) for f in self.files] or super().source_files()

    def hf_config_dir(self) -> Path | None:
        return self.path if (self.path / "config.json").is_file() else None

    def describe(self) -> dict[str, Any]:
        return {"weights": self.kind, "files": len(self.files), "config": (self.path / "config.json").is_file()}


class SafetensorsFileReader(HFReader):
    """One ``.safetensors`` file on its own (e.g. a reference state dict)."""

    format = "safetensors-file"
    confines_config = True

    def __init__(self, path: Path, *, trust_pickle: bool = False):
        Reader.__init__(self, path)
        self.trust_pickle = trust_pickle
        self.kind, self.files = "safetensors", [self.path]
        self.evidence.files = [self.path.name]
        self._problems = []
        self._where = {}
        self._info = None
        self._bins = {}
        self._maps = {}

    def source_files(self) -> list[Path]:
        return [Path(f) for f in self.files] or super().source_files()

    def hf_config_dir(self) -> Path | None:
        return None
