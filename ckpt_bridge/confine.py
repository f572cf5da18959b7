"""Paths read from inside a checkpoint stay inside it.

A checkpoint's own files name other files: an index's ``weight_map``, a DCP
``.metadata``'s ``relative_path``, a to-dcp manifest's ``source.config_dir``.
Such names come from whoever produced the checkpoint, so they are followed
only when they stay inside the checkpoint's folder (:func:`confined`): a name
like ``../../etc/x`` or ``/home/other`` would otherwise make us read, or copy
into an export, files the user never pointed us at.  Files a trainer
checkpoint carries for the export (verl's ``huggingface/`` config and
tokenizer) must also *resolve* inside it, symlinks followed
(:func:`is_inside`), since they are copied into the output.  Paths the user
passes on the command line, and a Hugging Face dir the user names, are theirs
to choose and are not confined.
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


def names_inside(name: str | os.PathLike) -> bool:
    """True when a relative name stays inside the folder it is joined to (no absolute path, no escaping ``..``).

    Judged on the name alone: a symlink that is itself an entry of the folder
    is the folder's own content (every file of a Hugging Face cache snapshot
    is a link into ``../../blobs``), while ``../x`` in a file is a redirection.
    """
    n = os.path.normpath(str(name))
    return not os.path.isabs(str(name)) and n != ".." and not n.startswith(".." + os.sep)


def confined(root: str | Path, name: str | Path, *, source: str | Path, what: str = "path") -> Path:
    """``root / name`` when the name stays inside ``root``; else a one-line refusal naming ``source``.

    ``source`` is the file that recorded ``name`` (the index, manifest, ...),
    so the message says which file to fix.
    """
    if not isinstance(name, (str, os.PathLike)) or str(name) == "":
        raise CheckpointFormatError(f"{source}: {what} {name!r} is not a file name")
    p = Path(root) / name
    if not names_inside(name):
        raise CheckpointFormatError(
            f"{source}: {what} {str(name)!r} points outside the checkpoint folder {root}; refused "
            f"(a checkpoint may only name files inside itself)"
        )
    return p
