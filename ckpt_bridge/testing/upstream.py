"""Old TorchTitan / flame sources as test fixtures: where they are, and their overlays (see ``overlays``).

The tarballs are public code kept next to the checkout (``../shared/upstream``,
or ``$CKPT_BRIDGE_UPSTREAM``); they are installed with ``pip --target`` into a
cached overlay, never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

from .overlays import REPO_ROOT, overlay

UPSTREAM = Path(os.environ.get("CKPT_BRIDGE_UPSTREAM") or REPO_ROOT.parents[1] / "shared" / "upstream")
# the small packages these eras import at package import (tokenizers, blob io, tables); tyro etc. are in the venv
ERA_DEPS = ["tiktoken==0.14.0", "blobfile==3.3.0", "pycryptodomex==3.24.2", "lxml==6.1.3", "tabulate==0.10.0"]
# flame's convert scripts `import fla` (flash-linear-attention), which imports triton
FLA = ["triton==3.9.0", "flash-linear-attention==0.6.0", "fla-core==0.6.0"]


def tarball(name: str) -> Path:
    """``UPSTREAM/<name>.tar.gz``; FileNotFoundError names the path when it is missing."""
    path = UPSTREAM / f"{name}.tar.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the old TorchTitan/flame sources are test fixtures")
    return path


def era_overlay(commit: str, deps: bool = True) -> Path:
    """torchtitan at ``commit`` (plus, unless ``deps=False``, what it imports) as an overlay directory."""
    return overlay([str(tarball(f"torchtitan-{commit}")), *(ERA_DEPS if deps else [])], name=f"torchtitan-{commit}")
