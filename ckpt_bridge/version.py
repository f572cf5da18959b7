"""The package version and the dependency releases CI tests, in a leaf module: code that records the version (the
to-dcp manifest) or reports on the installed releases (``ckpt-bridge --version``, ``inspect``) need not import the
package facade ``ckpt_bridge/__init__.py`` (which imports the commands), nor torch or transformers themselves.

pyproject.toml caps no dependency above: a plan is checked against the installed library's own model classes
and conversions, so a release newer than any tested here fails loudly (a missing or unexpected key, a refused
config), never silently.  What a user is owed is to be told that such a release is untested: :func:`untested`.
"""

from __future__ import annotations

import re

__version__ = "0.1.0"

# The releases CI runs, one table (move it with the tests that run them):
#   torch: the pinned one (requirements.lock) and tests/test_torch_versions.py's VERSIONS;
#   transformers: the pinned one and tests/test_transformers_versions.py's VERSIONS;
#   peft: the pinned one (the LoRA tests) and the overlay of the newest transformers in that matrix.
# tests/test_versions_table.py checks this table against those lists and requirements.lock.
TESTED: dict[str, tuple[str, ...]] = {
    "torch": ("2.11.0", "2.13.0", "2.15.0"),
    "transformers": ("4.57.6", "5.10.4", "5.25.0"),
    "peft": ("0.21.2", "0.22.0"),
}


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.13.0+cpu"`` -> (2, 13, 0); ``"5.26.0.dev0"`` -> (5, 26, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def installed(name: str) -> str | None:
    """The version of ``name`` this process would import (its dist-info first on sys.path), None if absent.
    Read from package metadata: nothing is imported."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def status(name: str, version: str) -> str:
    """``"tested"``, ``"within the tested range"`` (between two tested releases, e.g. a patch release) or
    ``"untested: newer than the newest tested X"`` / ``"untested: older than the oldest tested X"``.  Only the
    release numbers count: a local build of a tested release (``2.13.0+cpu``) is that release."""
    tested = sorted(TESTED[name], key=release)
    have = release(version)
    if any(release(t) == have for t in tested):
        return "tested"
    if have > release(tested[-1]):
        return f"untested: newer than the newest tested {tested[-1]}"
    if have < release(tested[0]):
        return f"untested: older than the oldest tested {tested[0]}"
    return "within the tested range"


def untested() -> dict[str, str]:
    """``{name: "VERSION (untested: why)"}`` for each installed dependency of :data:`TESTED` outside the releases
    CI tests (newer than the newest, or older than the oldest)."""
    out = {}
    for name in TESTED:
        version = installed(name)
        if version is not None and (s := status(name, version)).startswith("untested"):
            out[name] = f"{version} ({s.removeprefix('untested: ')})"
    return out


def describe() -> str:
    """What ``ckpt-bridge --version`` prints: our version, then each dependency's installed release and whether
    CI tests it."""
    lines = [f"ckpt-bridge {__version__}"]
    for name, tested in TESTED.items():
        version = installed(name)
        if version is None:
            lines.append(f"  {name:<13} not installed")
            continue
        lines.append(f"  {name:<13} {version:<12} {status(name, version)} (CI tests {', '.join(tested)})")
    return "\n".join(lines)
