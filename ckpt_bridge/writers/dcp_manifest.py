"""The to-dcp manifest's contents that come from the source: the hashed source files, the HF files kept in the
DCP folder, the library versions.  (Reading and writing the manifest file itself is
:mod:`ckpt_bridge.formats.dcp_files`; what counts as a side file is :func:`ckpt_bridge.writers.side_files.side_files`.)

Why every source file is hashed whole with sha256, in a second pass (issue 20 weighed the alternatives):

- ``source.files`` is a record for people and tools, not an input: verify-dcp and to-hf read the aux modules'
  own ``sha256`` and the configs, never these digests.  Its one job is to say which bytes were converted,
  so it must name the contents, and sha256 is what the Hugging Face Hub lists for every LFS file: a user
  can check the record against the revision they downloaded.
- size + mtime names a state of one filesystem, not contents (a copy or a re-download changes it, a rewrite
  that keeps it goes unseen); a hash "of the bytes already read" is not a hash of the file either (the
  pipeline reads tensors in the plan's order, rows cast on the way, never the header or dropped keys), and
  hashing in the reader's pass saves only the second read, which the page cache serves, not the CPU.
- a faster hash: on the 2-core bench machine (SHA-NI) hashlib's sha256 is the fastest it has (1.0 GB/s of
  CPU; blake2b 0.84, sha1 0.97, md5 0.62); xxh3 would be faster but is neither a dependency nor a digest
  the Hub lists.
The pass runs in a thread beside the conversion (:func:`ckpt_bridge.commands.to_dcp.to_dcp`), so it costs CPU
time, about 1 s per GB, and no wall time while the conversion waits on the disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..formats.base import Reader
from ..formats.dcp_files import HF_CONFIG_DIR
from ..formats.config_files import side_files
from .side_files import copy_new


def hash_files(paths: list[Path], cfg_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        name = p.relative_to(cfg_dir).as_posix() if p.is_relative_to(cfg_dir) else p.name
        out.append({"name": name, "bytes": p.stat().st_size, "sha256": digest})
    return out


def source_files_of(reader: Reader, cfg_dir: Path) -> list[Path]:
    """The files the manifest hashes: the weights, the configs, and every side file kept beside them in
    ``HF_CONFIG_DIR`` (the one rule of :func:`ckpt_bridge.writers.side_files.side_files`: what is kept is hashed)."""
    files = sorted(reader.source_files())
    configs = [cfg_dir / n for n in ("config.json", "generation_config.json", "model.safetensors.index.json")]
    for p in [*configs, *side_files(cfg_dir)]:
        inside = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        files += [q for q in inside if q not in files]
    return files


def keep_hf_files(cfg_dir: Path, dst: Path) -> str:
    dst.mkdir()
    copy_new([cfg_dir / "config.json", cfg_dir / "generation_config.json", *side_files(cfg_dir)], dst)
    return HF_CONFIG_DIR


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "torchtitan", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out



def _file_sha256(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def provenance(reader: Reader) -> list[dict[str, Any]]:
    """The chain of checkpoints behind the weights, oldest first, ending with the source itself; each ckpt-bridge
    output in it names the record it was read from with that record's sha256 (a to-dcp manifest, whose own chain
    is carried on; a to-hf export's marker).  A to-dcp manifest stores it, so ``verify --against`` and a later
    ``to-hf`` can follow where the weights came from across conversions."""
    from ..formats.dcp_files import MANIFEST
    from .marker import MARKER, read_marker

    root = reader.path if reader.path.is_dir() else None
    here: dict[str, Any] = {"format": reader.format, "path": str(reader.path.absolute())}
    m = reader.manifest()
    if m is not None and root is not None and (root / MANIFEST).is_file():
        before = m.get("provenance")
        if isinstance(before, list):
            chain = [dict(x) for x in before if isinstance(x, dict)]
        else:  # a manifest from before the chain was recorded: its source is the first step
            src = m.get("source") if isinstance(m.get("source"), dict) else {}
            chain = [{"format": src.get("format"), "path": src.get("path"), "files": src.get("files")}]
        return chain + [{**here, "command": m.get("command"), "record": MANIFEST,
                         "record_sha256": _file_sha256(root / MANIFEST)}]
    marker = read_marker(root) if root is not None else None
    if marker is not None:
        return [{"format": marker.get("source_format"), "path": marker.get("source")},
                {**here, "command": marker.get("command", "to-hf"), "record": MARKER,
                 "record_sha256": _file_sha256(root / MARKER)}]
    return [here]


def left_behind(held: list[str], extra_written: bool) -> dict[str, Any]:
    """The manifest's word on what the source held beyond the weights: a model-only DCP carries none of it
    (the trainer starts a fresh optimizer, lr_scheduler and rng); ``--extra-state`` copies the readable part."""
    return {"held": list(held), "carried": False,
            "copied_beside": EXTRA_NOTE if extra_written and held else None,
            "note": "a model-only load reads the weights alone: the trainer starts a fresh optimizer, lr_scheduler "
                    "and rng" if held else "the source held nothing beyond the weights"}


EXTRA_NOTE = "source_extra_state/ (lr_scheduler, rng, step as to-hf writes them; no optimizer)"
