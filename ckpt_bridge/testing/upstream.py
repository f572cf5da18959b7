"""Old TorchTitan / flame code as test fixtures: where it comes from, and its overlays (see ``overlays``).

* TorchTitan releases on PyPI (0.1.0, 0.2.2) are installed by name into a
  cached overlay; 0.3.0 is the venv's own.  A clone with nothing beside it has
  these.
* Code that was never released (flame, and the TorchTitan commits of the
  nested era, e320a37 / 5e2033c, and flame's pin 0b44d4c) comes from source
  tarballs in the directory named by ``$CKPT_BRIDGE_UPSTREAM``, and only from
  there.  Without it the tests that need them are skipped, saying so
  (:class:`UpstreamMissing`).

Either way the code is installed with ``pip --target`` into a cached overlay,
never copied into the project.
"""

from __future__ import annotations

import os
from pathlib import Path

from .overlays import overlay

ENV = "CKPT_BRIDGE_UPSTREAM"
# the small packages these eras import at package import (tokenizers, blob io, tables); tyro etc. are in the venv
ERA_DEPS = ["tiktoken==0.14.0", "blobfile==3.3.0", "pycryptodomex==3.24.2", "lxml==6.1.3", "tabulate==0.10.0"]
# flame's convert scripts `import fla` (flash-linear-attention), which imports triton (pinned in the venv)
FLA = ["flash-linear-attention==0.6.0", "fla-core==0.6.0"]
# TorchTitan releases on PyPI that are eras of their own (0.0.2 is an empty placeholder); the venv has 0.3.0
RELEASES = ("0.1.0", "0.2.2")
VENV_RELEASE = "0.3.0"


class UpstreamMissing(FileNotFoundError):
    """A source tarball that is not on PyPI is not available here (the tests skip with this message)."""


def upstream_dir() -> Path | None:
    """``$CKPT_BRIDGE_UPSTREAM``, or None when it is not set."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


def tarball(name: str) -> Path:
    """``$CKPT_BRIDGE_UPSTREAM/<name>.tar.gz``; :class:`UpstreamMissing` says what is missing and why."""
    root = upstream_dir()
    if root is None:
        raise UpstreamMissing(f"{name}.tar.gz is not on PyPI: set {ENV} to a directory holding it to run this test")
    path = root / f"{name}.tar.gz"
    if not path.is_file():
        raise UpstreamMissing(f"{ENV}={root} has no {name}.tar.gz")
    return path


def era_overlay(era: str, deps: bool = True) -> Path | None:
    """TorchTitan ``era`` (a PyPI release or a commit; plus, unless ``deps=False``, what it imports) as an
    overlay directory; None for the venv's own release."""
    if era == VENV_RELEASE:
        return None
    spec = f"torchtitan=={era}" if era in RELEASES else str(tarball(f"torchtitan-{era}"))
    return overlay([spec, *(ERA_DEPS if deps else [])], name=f"torchtitan-{era}")
