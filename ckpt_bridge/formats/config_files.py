"""Where a source's Hugging Face config lives, and which files beside it travel with the model.

:func:`config_dir`: the directory holding the config.json an export follows (the checkpoint's own, confined to
the checkpoint folder, or ``--config``).  :func:`is_side_file`: the ONE rule for what a model dir holds beside
its weights and configs (tokenizer, processor, chat templates, ...), used for what is copied into an export
(:mod:`ckpt_bridge.writers.side_files`), kept in a to-dcp folder and hashed in its manifest, and checked by
``verify --against``.  Reading-side knowledge: models, plans and writers all ask it, so it sits in formats/.
"""

from __future__ import annotations

from pathlib import Path

from ..confine import is_inside
from ..errors import BridgeError, CheckpointFormatError
from .base import Reader
from .dcp_files import MANIFEST
from .hf import AUX_FILE


def config_dir(reader: Reader, config: str | Path | None) -> tuple[Path | None, Path | None]:
    """(directory holding config.json, explicit config.json file or None).

    Without ``config`` the checkpoint's own config dir is used, and every file
    we would read or copy from it (config, generation config, tokenizer) must
    resolve inside the checkpoint folder (see :mod:`ckpt_bridge.confine`).
    """
    if config is None:
        d = reader.hf_config_dir()
        # A config dir a trainer checkpoint carries must not pull files from elsewhere into the export
        # (an HF model dir is the user's own choice: Reader.confines_config).
        if d is not None and reader.confines_config:
            root = reader.path if reader.path.is_dir() else reader.path.parent
            for f in [d / "config.json", d / "generation_config.json", *side_files(d)]:
                if f.exists() and not is_inside(root, f):
                    raise CheckpointFormatError(
                        f"{f}: resolves outside the checkpoint folder {root} (a symlink?); refused; pass "
                        f"--config/--tokenizer explicitly to use files from elsewhere")
        return d, None
    p = Path(config)
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    if p.is_file():
        return p.parent, p
    raise BridgeError(f"--config {p}: neither a config.json file nor a directory containing one")


# What is not a processor / tokenizer file: weights and their indexes in any format, trainer state, and
# the files an export writes itself.  Everything else beside the config travels (tokenizer, processor,
# video / image preprocessor, chat templates and additional_chat_templates/, README / LICENSE, ...), so a
# new processor file needs no change here.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp",
                    ".index.json", ".npz", ".pkl")
_WRITTEN_HERE = ("config.json", "generation_config.json", "lr_scheduler_state.json", "trainer_state.json",
                 MANIFEST, f"{AUX_FILE}.json")


def is_side_file(p: Path) -> bool:
    if p.name.startswith(".") or p.name in _WRITTEN_HERE or p.name.endswith(_WEIGHT_SUFFIXES):
        return False
    if p.is_dir():  # e.g. additional_chat_templates/; a folder holding weights is a checkpoint, not a processor
        return not any(q.is_file() and (q.name.endswith(_WEIGHT_SUFFIXES) or q.name == ".metadata")
                       for q in p.rglob("*"))
    return p.is_file()


def side_files(d: Path) -> list[Path]:
    """The side files and folders of ``d`` that travel with a model (see :func:`is_side_file`)."""
    return [p for p in sorted(d.iterdir()) if is_side_file(p)]
