"""Old TorchTitan / flame sources as test fixtures: where they are, and their overlays (see ``overlays``).

The tarballs are public code kept next to the checkout (``../shared/upstream``,
or ``$CKPT_BRIDGE_UPSTREAM``); they are installed with ``pip --target`` into a
cached overlay, never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

from .overlays import REPO_ROOT, overlay



def _find_upstream() -> Path:
    """``$CKPT_BRIDGE_UPSTREAM``, else the nearest ``shared/upstream`` beside the checkout or above it (CI
    clones next to ``shared/``; a git worktree may sit a level deeper)."""
    if os.environ.get("CKPT_BRIDGE_UPSTREAM"):
        return Path(os.environ["CKPT_BRIDGE_UPSTREAM"])
    for d in REPO_ROOT.parents:
        if (d / "shared" / "upstream").is_dir():
            return d / "shared" / "upstream"
    return REPO_ROOT.parent / "shared" / "upstream"


UPSTREAM = _find_upstream()
# the small packages these eras import at package import (tokenizers, blob io, tables); tyro etc. are in the venv
ERA_DEPS = ["tiktoken==0.14.0", "blobfile==3.3.0", "pycryptodomex==3.24.2", "lxml==6.1.3", "tabulate==0.10.0"]
# flame's convert scripts `import fla` (flash-linear-attention), which imports triton (pinned in the venv)
FLA = ["flash-linear-attention==0.6.0", "fla-core==0.6.0"]


def tarball(name: str) -> Path:
    """``UPSTREAM/<name>.tar.gz``; FileNotFoundError names the path when it is missing."""
    path = UPSTREAM / f"{name}.tar.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the old TorchTitan/flame sources are test fixtures")
    return path


def era_overlay(commit: str, deps: bool = True) -> Path:
    """torchtitan at ``commit`` (plus, unless ``deps=False``, what it imports) as an overlay directory."""
    return overlay([str(tarball(f"torchtitan-{commit}")), *(ERA_DEPS if deps else [])], name=f"torchtitan-{commit}")
