"""Run real multi-rank jobs (torchrun, CPU/gloo) for tests, demos and benchmarks.

``make_verl_checkpoint(root, model="llama", mesh="2")`` launches
``python -m torch.distributed.run ... -m ckpt_bridge.testing.verl_save`` and
returns ``root/global_step_{steps}/actor``: a checkpoint written by verl
0.9.1's own ``FSDPCheckpointManager``.  ``reference_dir(actor)`` is where the
live model's full state dict, logits and per-rank RNG/scheduler state were
written at save time (see ``verl_save``'s docstring for the layout).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ckpt_bridge.testing.verl_save import source_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[2]
VERL_SAVE_MODULE = "ckpt_bridge.testing.verl_save"

# Filled by make_verl_checkpoint: (root, nproc, wall seconds, reused?)
BUILD_LOG: list[dict] = []


class TorchrunError(RuntimeError):
    """A torchrun job failed or timed out; the message ends with the tail of its stderr."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(env: dict | None) -> dict:
    out = dict(os.environ)
    out.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "RAY_DEDUP_LOGS": "0",
        }
    )
    paths = [str(REPO_ROOT)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if env:
        out.update({k: str(v) for k, v in env.items()})
    return out


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def run_torchrun(module_args: list[str], nproc: int, timeout: float, env: dict | None = None,
                 retries: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc ... -m <module_args>``.

    ``module_args[0]`` is the module, the rest its arguments.  Runs with
    OMP_NUM_THREADS=1 and master 127.0.0.1 on a free port (retried if another
    process grabbed the port first).  Returns the CompletedProcess (text
    stdout/stderr); raises ``TorchrunError`` with the stderr tail on a non-zero
    exit or after ``timeout`` seconds (the whole process group is killed).
    """
    child_env = _child_env(env)
    for attempt in range(retries + 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            "-m", *[str(a) for a in module_args],
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                                cwd=str(REPO_ROOT), start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise TorchrunError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{_tail(err)}") from None
        if proc.returncode == 0:
            return subprocess.CompletedProcess(cmd, 0, out, err)
        port_clash = "address already in use" in err.lower() or "EADDRINUSE" in err
        if not (port_clash and attempt < retries):
            raise TorchrunError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{_tail(err)}")
    raise AssertionError("unreachable")


def mesh_nproc(mesh: str | int) -> int:
    n = 1
    for p in str(mesh).lower().split("x"):
        n *= int(p)
    return n


def _wanted_info(model, mesh, shard_dim, steps, dtype, tokenizer, save_steps, hf_model) -> dict:
    return {
        "model": model,
        "mesh": str(mesh),
        "shard_dim": int(shard_dim),
        "steps": int(steps),
        "dtype": dtype,
        "tokenizer": bool(tokenizer),
        "hf_model": bool(hf_model),
        "save_steps": sorted(save_steps) if save_steps else [int(steps)],
        "fingerprint": source_fingerprint(),
    }


_OUR_ENTRIES = ("base_model", "reference", "run_info.json", "latest_checkpointed_iteration.txt", "COMPLETE")


def _clear_partial(root: Path) -> None:
    for p in root.iterdir():
        if p.name in _OUR_ENTRIES or p.name.startswith("global_step_"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            raise FileExistsError(f"{root}: refusing to overwrite {p.name}, which make_verl_checkpoint did not write")


def make_verl_checkpoint(root: Path, model: str = "llama", mesh: str = "2", shard_dim: int = 0, steps: int = 1,
                         dtype: str = "fp32", tokenizer: bool = True, *, save_steps: list[int] | None = None,
                         hf_model: bool = False, timeout: float | None = None) -> Path:
    """Write a real verl FSDP2 checkpoint under ``root``; return ``root/global_step_{steps}/actor``.

    ``mesh`` is ``"N"`` (1-D ``('fsdp',)``) or ``"AxB"`` (HSDP ``('ddp','fsdp')``); the
    job runs ``prod(mesh)`` processes.  A ``root`` that already holds a
    complete run with the same arguments is reused as is.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # one builder per root, even across concurrent pytest sessions sharing CKPT_BRIDGE_TEST_CACHE
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _make_verl_checkpoint_locked(root, model, str(mesh), shard_dim, steps, dtype, tokenizer,
                                            save_steps, hf_model, timeout)


def _make_verl_checkpoint_locked(root, model, mesh, shard_dim, steps, dtype, tokenizer, save_steps, hf_model,
                                 timeout) -> Path:
    nproc = mesh_nproc(mesh)
    want = _wanted_info(model, mesh, shard_dim, steps, dtype, tokenizer, save_steps, hf_model)
    actor = root / f"global_step_{steps}" / "actor"
    info_path = root / "run_info.json"
    if (root / "COMPLETE").is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in want} == want:
            BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": 0.0, "reused": True, **want})
            return actor
    root.mkdir(parents=True, exist_ok=True)
    _clear_partial(root)
    args = [VERL_SAVE_MODULE, "--model", model, "--out", str(root), "--mesh", mesh, "--shard-dim", str(shard_dim),
            "--steps", str(steps), "--dtype", dtype]
    if save_steps:
        args += ["--save-steps", ",".join(str(s) for s in save_steps)]
    if not tokenizer:
        args.append("--no-tokenizer")
    if hf_model:
        args.append("--hf-model")
    if timeout is None:
        timeout = 180 + 20 * nproc
    t = time.perf_counter()
    run_torchrun(args, nproc=nproc, timeout=timeout)
    wall = time.perf_counter() - t
    BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": round(wall, 2), "reused": False, **want})
    if not (actor / f"model_world_size_{nproc}_rank_0.pt").is_file():
        raise TorchrunError(f"torchrun succeeded but {actor} has no rank files")
    return actor


def make_verl_family_checkpoints(root: Path, models: list[str], mesh: str = "2", steps: int = 1,
                                 timeout: float | None = None) -> dict[str, Path]:
    """Real verl FSDP2 checkpoints of several presets from ONE torchrun job: ``{preset: actor dir}``.

    Each preset gets ``root/<preset>/`` laid out as :func:`make_verl_checkpoint`'s
    root (its reference also holds ``hf/``, ``save_pretrained`` of the live model).
    Starting torchrun and importing verl cost far more than a tiny model's save,
    so the family matrix shares one job.  Reused when ``root`` holds a complete
    run of the same presets, mesh and harness sources.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    want = {"models": list(models), "mesh": str(mesh), "steps": int(steps), "fingerprint": source_fingerprint()}
    actors = {m: root / m / f"global_step_{steps}" / "actor" for m in models}
    nproc = mesh_nproc(mesh)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info_path = root / "run_info.json"
        if (root / "COMPLETE").is_file() and info_path.is_file():
            info = json.loads(info_path.read_text())
            if {k: info.get(k) for k in want} == want:
                BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": 0.0, "reused": True,
                                  "model": ",".join(models), "mesh": str(mesh), "shard_dim": 0, "dtype": "fp32",
                                  "steps": steps})
                return actors
        if root.exists():
            for p in root.iterdir():
                if p.name in models or p.name in _OUR_ENTRIES:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                else:
                    raise FileExistsError(f"{root}: refusing to overwrite {p.name}, which this harness did not write")
        args = [VERL_SAVE_MODULE, "--model", ",".join(models), "--out", str(root), "--mesh", str(mesh),
                "--steps", str(steps)]
        t = time.perf_counter()
        run_torchrun(args, nproc=nproc, timeout=timeout or 240 + 20 * len(models))
        wall = time.perf_counter() - t
        info = json.loads(info_path.read_text())
        info.update(want)  # steps is not written by verl_save's summary
        info_path.write_text(json.dumps(info))
        BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": round(wall, 2), "reused": False,
                          "model": ",".join(models), "mesh": str(mesh), "shard_dim": 0, "dtype": "fp32",
                          "steps": steps})
    for m, actor in actors.items():
        if not (actor / f"model_world_size_{nproc}_rank_0.pt").is_file():
            raise TorchrunError(f"torchrun succeeded but {actor} ({m}) has no rank files")
    return actors


def make_verl_lora_checkpoints(root: Path, cases: list[str], nproc: int = 2, timeout: float = 300) -> Path:
    """Real verl FSDP2 saves of PEFT-wrapped tiny models, every case of ``verl_save.LORA_CASES``
    named in ``cases`` built by ONE torchrun job into ``root/<case>/`` (reused when complete).

    Each case dir holds ``base_model/``, ``global_step_2/actor`` and ``reference/`` (``model.safetensors``:
    the live model's full PEFT state dict; ``peft_config/``; ``logits.pt``: tokens + logits of the
    unmerged model), and ``init_adapter/`` when the case starts from an adapter.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    want = {"lora": ",".join(cases), "fingerprint": source_fingerprint()}
    # the same row shape as make_verl_checkpoint's (tests/conftest.py prints them)
    row = {"model": "lora:" + want["lora"], "mesh": str(nproc), "shard_dim": 0, "dtype": "fp32", "steps": 2}
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = root / "run_info.json"
        if (root / "COMPLETE").is_file() and info.is_file():
            if {k: json.loads(info.read_text()).get(k) for k in want} == want:
                BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": 0.0, "reused": True, **row})
                return root
        if root.exists():
            shutil.rmtree(root)  # only ever a root this function built (the cache dir names it)
        root.mkdir(parents=True)
        t = time.perf_counter()
        run_torchrun([VERL_SAVE_MODULE, "--lora", want["lora"], "--out", str(root)], nproc=nproc, timeout=timeout)
        BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": round(time.perf_counter() - t, 2),
                          "reused": False, **row})
    return root


MEGATRON_SAVE_MODULE = "ckpt_bridge.testing.megatron_save"


def make_megatron_checkpoints(root: Path, cases: list[str], nproc: int = 4, timeout: float = 420) -> dict[str, Path]:
    """Real verl ``MegatronCheckpointManager`` saves of every case of ``megatron_save.CASES`` named in
    ``cases``, from ONE torchrun job: ``{case: ROOT/<case>}`` (each with ``base_model/`` = the reference,
    ``global_step_1/actor`` and ``reference/rank{R}_rng.pt``).  Reused when complete for the same cases."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    import hashlib

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(b"".join((here / n).read_bytes() for n in ("megatron_save.py", "tiny_models.py")))
    want = {"cases": ",".join(cases), "fingerprint": digest.hexdigest()[:16]}
    row = {"model": "megatron:" + want["cases"], "mesh": str(nproc), "shard_dim": 0, "dtype": "fp32", "steps": 1}
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = root / "want.json"
        if (root / "COMPLETE").is_file() and info.is_file() and json.loads(info.read_text()) == want:
            BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": 0.0, "reused": True, **row})
            return {c: root / c for c in cases}
        if root.exists():
            shutil.rmtree(root)  # only ever a root this function built (the cache dir names it)
        root.mkdir(parents=True)
        t = time.perf_counter()
        run_torchrun([MEGATRON_SAVE_MODULE, "--cases", want["cases"], "--out", str(root)], nproc=nproc,
                     timeout=timeout)
        info.write_text(json.dumps(want))
        BUILD_LOG.append({"root": str(root), "nproc": nproc, "seconds": round(time.perf_counter() - t, 2),
                          "reused": False, **row})
    return {c: root / c for c in cases}


def reference_dir(actor: Path, step: int | None = None) -> Path:
    """``ROOT/reference/global_step_S`` for ``actor = ROOT/global_step_S/actor`` (or its parent)."""
    actor = Path(actor)
    step_dir = actor.parent if actor.name == "actor" else actor
    name = step_dir.name if step is None else f"global_step_{step}"
    return step_dir.parent / "reference" / name


def load_rank_file(path: Path, mmap: bool = True) -> dict:
    """A verl model/optim rank file, loaded with ``weights_only=True`` (ckpt_bridge.safeload)."""
    from ckpt_bridge import safeload

    return safeload.load(path, mmap=mmap)


def load_extra_state(path: Path) -> dict:
    """A verl extra_state rank file: ``weights_only=True`` plus exactly the numpy RNG globals."""
    from ckpt_bridge import safeload

    return safeload.load(path, mmap=False, allow_numpy=True)


__all__ = [
    "BUILD_LOG",
    "TorchrunError",
    "free_port",
    "load_extra_state",
    "load_rank_file",
    "make_verl_checkpoint",
    "make_verl_family_checkpoints",
    "make_verl_lora_checkpoints",
    "mesh_nproc",
    "reference_dir",
    "make_megatron_checkpoints",
    "run_torchrun",
]
