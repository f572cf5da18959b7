"""Package overlays: another version of a package next to the pinned venv, in seconds.

``pip install --no-deps --target DIR SPEC...`` writes a plain directory of
packages; putting DIR first on a subprocess's ``PYTHONPATH`` makes that
process import the overlay's versions instead of the venv's, while everything
else (torch, numpy, ...) still comes from the venv.  Tests use this to run the
same check under the newest transformers 4.x / 5.x or an older TorchTitan
source tree without a second venv.

Every install carries ``-c constraints.txt`` (torch==2.13.0), so no overlay
can pull a CUDA build of torch.  Overlays are cached by their spec under
``$CKPT_BRIDGE_OVERLAYS`` (default ``~/.cache/ckpt-bridge/overlays``), built
under a temporary name and renamed into place, so concurrent test runs and an
interrupted install never see half an overlay.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO_ROOT / "constraints.txt"


class OverlayError(RuntimeError):
    """pip could not build the overlay (no registry, unknown version, ...)."""


def overlay_root() -> Path:
    return Path(os.environ.get("CKPT_BRIDGE_OVERLAYS") or Path.home() / ".cache" / "ckpt-bridge" / "overlays")


def _overlay_target(specs: list[str], deps: bool, name: str | None) -> Path:
    key = hashlib.sha256("\0".join([*specs, f"deps={deps}", CONSTRAINTS.read_text()]).encode()).hexdigest()[:16]
    return overlay_root() / f"{name or 'overlay'}-{key}"


def overlay(specs: list[str], *, deps: bool = False, name: str | None = None, timeout: float = 900) -> Path:
    """A directory holding ``specs`` (pip requirement strings or local source paths), built once.

    ``deps=False`` installs exactly the named packages (``--no-deps``); pass
    the small extra packages an old source tree imports as further specs.
    Returns the directory to put first on ``PYTHONPATH``.
    """
    target = _overlay_target(specs, deps, name)
    if (target / ".complete").is_file():
        return target
    return _build(target, ["-c", str(CONSTRAINTS), *([] if deps else ["--no-deps"]), *specs], None, timeout,
                  " ".join(specs))


def _build(target: Path, args: list[str], env: dict[str, str] | None, timeout: float, what: str) -> Path:
    """``pip install --target`` into a temporary sibling of ``target``, renamed into place when complete.

    One builder per overlay at a time (an exclusive lock beside it): a second process asking for the same
    overlay (the session's background :func:`prefetch`, a test, another engineer's run) waits for the first
    and uses its result instead of downloading the same gigabytes again."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").is_file():
            return target
        # holding the lock, any partial build is a dead builder's (killed mid-install): remove it
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(tmp),
               *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OverlayError(f"pip could not install {what}: {proc.stderr.strip()[-2000:]}")
        (tmp / ".complete").write_text(what + "\n")
        if target.exists():  # an incomplete leftover of an older layout: replaced, never merged into
            shutil.rmtree(target)
        tmp.rename(target)
    return target


def overlay_env(directory: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) with ``directory`` first on PYTHONPATH, then the repo."""
    out = dict(os.environ if env is None else env)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(directory), str(REPO_ROOT), *rest]))
    return out


# ------------------------------------------------------------------ torch overlays

def torch_overlay(version: str, *, timeout: float = 1800) -> Path:
    """A directory holding ``torch==version`` and its dependencies (numpy, nvidia-*, triton), built once.

    Unlike :func:`overlay`, this one installs a different torch on purpose: PyPI's Linux wheels are CUDA
    builds (about 4.7 GB with their nvidia packages) that import and run on a CPU machine.  The install
    runs with ``PIP_CONSTRAINT=/dev/null`` and without ``-c constraints.txt``, so neither the machine's
    pip config nor our torch pin caps it; nothing else sees that setting.  Cached like :func:`overlay`
    (``torch-<version>`` under :func:`overlay_root`); put the result first on a subprocess's PYTHONPATH
    with :func:`overlay_env`.
    """
    target = overlay_root() / f"torch-{version}"
    if (target / ".complete").is_file():
        return target
    env = {**os.environ, "PIP_CONSTRAINT": "/dev/null"}
    return _build(target, [f"torch=={version}", "numpy"], env, timeout, f"torch=={version} numpy")


# ------------------------------------------------------------------ background prefetch
# On a fresh machine the torch overlays are ~4.7 GB of downloads each: started in the background when the session
# starts (tests/conftest.py), they arrive while the CPU-bound tests run instead of after them.  A test module
# lists what it will build as ``OVERLAYS`` (these job dicts, or a function returning them); the builder's lock
# (:func:`_build`) makes a test that needs an overlay still being prefetched wait for it, never build it twice.


def overlay_job(specs: list[str], *, deps: bool = False, name: str | None = None) -> dict:
    """A prefetch job for ``overlay(specs, deps=deps, name=name)``."""
    return {"kind": "overlay", "specs": list(specs), "deps": deps, "name": name}


def torch_job(version: str) -> dict:
    """A prefetch job for ``torch_overlay(version)``."""
    return {"kind": "torch", "version": version}


def is_built(job: dict) -> bool:
    if job["kind"] == "torch":
        return (overlay_root() / f"torch-{job['version']}" / ".complete").is_file()
    return (_overlay_target(job["specs"], job["deps"], job["name"]) / ".complete").is_file()


def prefetch(jobs: list[dict], log: Path) -> subprocess.Popen | None:
    """Build ``jobs`` (those not built yet, in order) in a background process; returns it (None: nothing to do).
    Its own session: stop it with ``os.killpg(proc.pid, SIGTERM)`` (its pip goes too)."""
    todo = [j for j in jobs if not is_built(j)]
    if not todo:
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "ckpt_bridge.testing.overlays", json.dumps(todo)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=overlay_env(REPO_ROOT, None), cwd=str(REPO_ROOT))


def _run_jobs(jobs: list[dict]) -> int:
    import time

    for job in jobs:
        t = time.monotonic()
        try:
            if job["kind"] == "torch":
                torch_overlay(job["version"])
            else:
                overlay(job["specs"], deps=job["deps"], name=job["name"])
            print(f"prefetched {job} in {time.monotonic() - t:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - the test that needs it builds it again and reports
            print(f"prefetch of {job} failed: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_run_jobs(json.loads(sys.argv[1])))
