"""Paths read from inside a checkpoint stay inside it.

A checkpoint's own files name other files: an index's ``weight_map``, a DCP
``.metadata``'s ``relative_path``, a to-dcp manifest's ``source.config_dir``,
a ``huggingface/`` folder or a tokenizer file that is really a symlink.  Such
names come from whoever produced the checkpoint, so they are followed only
when they resolve (symlinks included) inside the checkpoint's own folder; a
name like ``../../etc/x`` or ``/home/other`` would otherwise make us read, or
copy into an export, files the user never pointed us at.  Paths the user
passes on the command line are theirs to choose and are not confined.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointFormatError


def is_inside(root: str | Path, path: str | Path) -> bool:
    """True when ``path`` (resolved, symlinks followed) is ``root`` or lies under it."""
    r = os.path.realpath(root)
    p = os.path.realpath(path)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def confined(root: str | Path, name: str | Path, *, source: str | Path, what: str = "path") -> Path:
    """``root / name`` when it resolves inside ``root``; else a one-line refusal naming ``source``.

    ``source`` is the file that recorded ``name`` (the index, manifest, ...),
    so the message says which file to fix.
    """
    if not isinstance(name, (str, os.PathLike)) or str(name) == "":
        raise CheckpointFormatError(f"{source}: {what} {name!r} is not a file name")
    p = Path(root) / name
    if Path(name).is_absolute() or not is_inside(root, p):
        raise CheckpointFormatError(
            f"{source}: {what} {str(name)!r} points outside the checkpoint folder {root}; refused "
            f"(a checkpoint may only name files inside itself)"
        )
    return p
