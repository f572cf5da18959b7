"""TorchTitan / flame entry points for training scripts.

    from ckpt_bridge.integrations.torchtitan import set_initial_load, after_load

    set_initial_load(config, "/models/OLMo-2-1B", aux=["future_predictor", "action_layer:linear:16"])
    ...build model (meta) -> parallelize -> to_empty -> CheckpointManager(config.checkpoint, ...).load()
    after_load(model_parts, "/models/OLMo-2-1B")

``set_initial_load`` converts the Hugging Face model once (cached by the
content of its files plus every option that changes the output) and points
the trainer's checkpoint config at the result; ``after_load`` recomputes the
non-persistent buffers no checkpoint holds (rotary ``inv_freq``) and refuses
a model whose config differs from the HF one.  The conversion itself is
:func:`ckpt_bridge.commands.to_dcp.to_dcp`; nothing format-specific lives here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ckpt_bridge.plan.aux_modules import as_specs
from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.confine import is_inside
from ckpt_bridge.errors import BridgeError, OutputError
from ckpt_bridge.writers.marker import read_marker
from ckpt_bridge.formats.dcp_files import MANIFEST, rng_files, write_rng
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.models.custom_code import as_modules, code_flags, code_key
from ckpt_bridge.models.after_load import AfterLoadReport, ConfigMismatchError, after_load  # noqa: F401 - re-exported
from ckpt_bridge.models.titan_eras import install_origin, torchtitan_version

log = logging.getLogger("ckpt_bridge")

__all__ = ["set_initial_load", "after_load", "AfterLoadReport", "ConfigMismatchError", "cache_root", "attach", "HFExport",
           "ExportHook", "rng_state", "restore_rng_state"]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("CKPT_BRIDGE_CACHE") or Path.home() / ".cache" / "ckpt-bridge") / "dcp"


def _file_digest(path: Path, memo: dict[str, str]) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so a restart does not re-read gigabytes."""
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if tag not in memo:
        with open(path, "rb") as f:
            memo[tag] = hashlib.file_digest(f, "sha256").hexdigest()
    return memo[tag]


def source_digest(hf_dir: str | Path, memo_file: Path | None = None) -> str:
    """One digest of the weights and config of a Hugging Face model dir (content, not paths)."""
    hf = Path(hf_dir)
    kind, files = weight_files(hf)
    if not kind or not (hf / "config.json").is_file():
        raise BridgeError(f"{hf}: not a Hugging Face model dir (needs config.json and model weights)")
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    h = hashlib.sha256()
    for f in sorted(set(files) | {hf / "config.json"}):
        h.update(f.name.encode() + b"\0" + _file_digest(f, memo).encode() + b"\0")
    if memo_file is not None:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            tmp.replace(memo_file)
        except OSError:
            pass  # no memo on a read-only cache: we just hash again next time
    return h.hexdigest()


def _checkpoint_section(config: Any) -> Any:
    """The checkpoint config: ``config.checkpoint`` of a job/trainer config, or the section itself."""
    section = getattr(config, "checkpoint", config)
    if not (hasattr(section, "initial_load_path") or hasattr(section, "load_step")):
        raise BridgeError(f"set_initial_load: {type(config).__name__} has no checkpoint.initial_load_path (nor the "
                          f"checkpoint.load_step of older TorchTitan); pass the trainer's JobConfig (or its "
                          f"checkpoint section)")
    return section


SEED_MARK = ".ckpt-bridge-seed"  # in a step-0 we placed: which conversion it holds (so we never touch others')


def _step0(config: Any, section: Any) -> Path:
    """``<job.dump_folder>/<checkpoint.folder>/step-0``: where a trainer without initial_load_path seeds from."""
    job = getattr(config, "job", None)
    if job is None or not hasattr(job, "dump_folder"):
        raise BridgeError(f"set_initial_load: this TorchTitan has no checkpoint.initial_load_path, so the seed goes to "
                          f"<job.dump_folder>/<checkpoint.folder>/step-0; pass the whole JobConfig, not "
                          f"{type(config).__name__}")
    return Path(job.dump_folder, section.folder, "step-0").absolute()


def _place_step0(out: Path, step0: Path) -> None:
    """Make ``step0`` hold the conversion ``out``: hard links (copies across filesystems), never over others' files.

    Hard links, not a symlink: torchtitan's ``keep_latest_k`` purge rmtree's
    old steps, which unlinks our links and leaves the cache intact (and fails
    on a symlink).  A step-0 we did not create is refused, not replaced.
    """
    import shutil

    if step0.exists() or step0.is_symlink():
        mark = step0 / SEED_MARK
        if mark.is_file() and mark.read_text().strip() == str(out):
            return  # ours, from an earlier start of this run
        raise BridgeError(f"set_initial_load: {step0} already exists and is not this conversion (no matching "
                          f"{SEED_MARK}); the trainer would load it instead of the HF model. Move it away or use "
                          f"another job.dump_folder")
    step0.parent.mkdir(parents=True, exist_ok=True)
    tmp = step0.parent / f".ckpt-bridge-seed-tmp-{os.getpid()}"  # no "step-N" in it: the trainer never sees it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in out.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        (tmp / SEED_MARK).write_text(f"{out}\n")
        tmp.rename(step0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _later_steps(folder: Path) -> list[int]:
    """Saved steps after 0 (torchtitan's own test: a step-N dir with .metadata)."""
    import re

    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for d in folder.iterdir() for m in [re.search(r"step-(\d+)", d.name)]
                  if m and int(m.group(1)) > 0 and (d / ".metadata").is_file())


def _dist_rank() -> tuple[bool, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def set_initial_load(config: Any, hf_dir: str | Path, *, aux: Any = None, seed: int = 0, dtype: str = "fp32",
                     layout: str = "auto", aux_from: str | Path | None = None,
                     model: nn.Module | list[nn.Module] | None = None,
                     cache_dir: str | Path | None = None, titan_model: str | None = None,
                     custom_import: tuple[str, ...] = (), trust_remote_code: bool = False) -> Path:
    """Convert ``hf_dir`` once and make the trainer's first load read it (model only).

    Works with the config of every TorchTitan era, by its own field names:
    with ``checkpoint.initial_load_path`` (0b44d4c, 0.2.x, 0.3.0) it sets that
    (absolute, as 0.3.0 requires) and ``initial_load_model_only`` (at 0b44d4c
    ``initial_load_model_weights_only``) on, ``initial_load_in_hf`` off;
    without it (e320a37, 5e2033c) it places the conversion at
    ``<job.dump_folder>/<checkpoint.folder>/step-0`` (hard links; pass the
    whole JobConfig) and sets ``load_step = 0`` - unless later steps are saved
    there already (a restart resumes from them).  A step-0 it did not create
    is refused, never replaced.  The checkpointer's enable switch is turned
    on.  Returns the DCP folder.  Under ``torch.distributed``,
    rank 0 converts while the others wait at a barrier (the cache must be on a
    filesystem every rank sees).  The cache key is the content of the weight
    files and config, the aux specs, seed, dtype, layout and the trainer
    version; a finished conversion is reused, an interrupted one is redone.
    ``titan_model``: the trainer builds TorchTitan's own model of that name
    (``llama3``, ``qwen3``); the DCP gets its keys through its StateDictAdapter.  ``custom_import`` /
    ``trust_remote_code``: as the CLI flags (a class this process registered already, flame's ``import fla``,
    needs neither).
    """
    section = _checkpoint_section(config)
    step0 = None if hasattr(section, "initial_load_path") else _step0(config, section)
    # a restart of a step-0 era: the trainer resumes from its own latest step; leave step-0 and load_step alone
    reseed = step0 is None or not _later_steps(step0.parent)
    root = cache_root(cache_dir)
    specs = as_specs(aux)
    if any(s.factory is not None for s in specs) and model is None:
        log.info("aux factories are cached by their qualified names; change the name when the module changes")
    key_parts = {
        "source": source_digest(hf_dir, root / "file-hashes.json"),
        "aux": [s.describe() for s in specs],
        "aux_from": str(Path(aux_from).absolute()) if aux_from else None,
        # version and commit: e320a37 (nested) and 0b44d4c (flat) both call themselves 0.1.0
        "seed": seed, "dtype": dtype, "layout": layout, "torchtitan": [torchtitan_version(), install_origin()],
        "titan_model": titan_model,
        "model_code": [list(as_modules(custom_import)), trust_remote_code, code_key()],
        "model_keys": sorted(k for p in ([model] if isinstance(model, nn.Module) else model or [])
                             for k in p.state_dict()),
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    out = (root / digest).absolute()
    distributed, rank = _dist_rank()
    failure = ""
    if rank == 0 and not ((out / ".metadata").is_file() and (out / MANIFEST).is_file()):
        log.info("ckpt-bridge: converting %s -> %s", hf_dir, out)
        try:
            to_dcp(hf_dir, out, layout=layout, dtype=dtype, aux=specs, seed=seed, aux_from=aux_from, model=model,
                   titan_model=titan_model, overwrite=out.exists(), progress=False,
                   custom_import=as_modules(custom_import), trust_remote_code=trust_remote_code)
        except BridgeError as e:
            if not distributed:
                raise
            failure = str(e)
    if rank == 0 and step0 is not None and reseed and not failure:
        try:
            _place_step0(out, step0)
        except BridgeError as e:
            if not distributed:
                raise
            failure = str(e)
    if distributed:
        # Rank 0's outcome goes to every rank, so a failed conversion stops all of them (no hang at a barrier).
        import torch.distributed as dist

        box = [failure]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise BridgeError(f"set_initial_load (rank 0): {box[0]}")
    if not (out / ".metadata").is_file():
        raise BridgeError(f"set_initial_load: {out} is not visible on rank {rank}; put cache_dir on storage every "
                          f"rank shares")
    _point_at(section, out, step0, reseed)
    return out


def _point_at(section: Any, out: Path, step0: Path | None, reseed: bool) -> None:
    """Set the era's own fields so its first load reads ``out``, model only."""
    for enable in ("enable", "enable_checkpoint"):  # a disabled checkpointer loads nothing
        if hasattr(section, enable):
            setattr(section, enable, True)
    if step0 is None:
        section.initial_load_path = str(out)
        # 0b44d4c calls it initial_load_model_weights_only; 0.2.x / 0.3.0 initial_load_model_only
        for name in ("initial_load_model_only", "initial_load_model_weights_only"):
            if hasattr(section, name):
                setattr(section, name, True)
        if hasattr(section, "initial_load_in_hf"):
            section.initial_load_in_hf = False
        return
    if reseed:
        section.load_step = 0  # step 0 is a model-only load in these eras
    else:
        log.info("ckpt-bridge: %s already has saved steps; load_step left at %s (resume)", step0.parent,
                 section.load_step)


# ---------------------------------------------------------------- save-time HF export


@dataclass
class HFExport:
    """What ``attach`` exports after each checkpoint save.

    ``hf_config``: the Hugging Face dir with config.json (and tokenizer) the
    model was built from.  ``every``: export every N-th save (1 = each);
    ``last_only``: only the last step's save.  ``name``: the export's path under
    the checkpoint folder, ``{step}`` filled in.  The default ``hf/step-{step}``
    is deliberately not ``step-{step}-hf``: torchtitan finds checkpoints to load
    and to purge with ``re.search(r"step-(\\d+)", name)``, so a ``step-N-hf``
    folder would count as a checkpoint for ``keep_latest_k`` (and one with an
    index file as a loadable step).  ``titan_model``: the trainer runs
    TorchTitan's own model of that name (``llama3``, ``qwen3``): its adapter's
    ``to_hf`` maps the saved names back.
    """

    hf_config: str | Path
    every: int = 1
    last_only: bool = False
    name: str = "hf/step-{step}"
    dtype: str = "keep"
    aux: str = "separate"
    max_shard_size: str = "5GB"
    save_rng: bool = True
    timeout: float = 3600.0
    titan_model: str | None = None
    custom_import: tuple[str, ...] = ()  # default: the module that registered the model's class in this process
    trust_remote_code: bool = False


@dataclass
class ExportResult:
    step: int
    out: str
    ok: bool
    message: str = ""
    seconds: float = 0.0


def rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch CPU (and CUDA, when present) rng states."""
    import random

    import numpy as np
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (e.g. ``restore_rng_state(extra["rng"][rank])`` on resume)."""
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_TITAN_STEP = re.compile(r"step-(\d+)")  # how torchtitan finds its checkpoints (to load and to purge)


def check_export_name(folder: Path, name: str) -> None:
    """Refuse an ``HFExport.name`` whose exports would be, contain or lie inside a checkpoint ``step-N`` folder.

    A folder whose name torchtitan's ``re.search(r"step-(\\d+)")`` matches
    *is* a checkpoint to it: loaded on resume, deleted by ``keep_latest_k``.
    """
    try:
        out = Path(os.path.normpath(folder.absolute() / name.format(step=1)))
    except (KeyError, IndexError, ValueError) as e:
        raise OutputError(f"HFExport.name {name!r}: not a format string with only {{step}} ({e})") from None
    base = Path(os.path.normpath(folder.absolute()))
    if is_inside(out, base):
        raise OutputError(f"HFExport.name {name!r}: the export {out} is or contains the checkpoint folder {base}; "
                          f"use a subfolder such as 'hf/step-{{step}}'")
    if is_inside(base, out):
        first = out.relative_to(base).parts[0] if out != base else ""
        if _TITAN_STEP.search(first):
            raise OutputError(f"HFExport.name {name!r}: {base / first} is (or would count as) a checkpoint step "
                              f"folder; exports there would be written into, or purged with, the checkpoints; "
                              f"use a subfolder such as 'hf/step-{{step}}'")


class ExportHook:
    """Runs after every checkpoint save of one CheckpointManager (see :func:`attach`)."""

    def __init__(self, manager: Any, export: HFExport):
        import concurrent.futures

        if export.every < 1:
            raise BridgeError(f"HFExport.every={export.every}: must be >= 1")
        if not (Path(export.hf_config) / "config.json").is_file():
            raise BridgeError(f"HFExport.hf_config {export.hf_config}: no config.json there")
        check_export_name(Path(manager.folder), export.name)
        self.manager, self.export = manager, export
        self.saves = 0
        self.results: list[ExportResult] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-bridge-export")
        self._pending: list[concurrent.futures.Future] = []

    def _rank_world(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def after_save(self, step: int, last_step: bool) -> None:
        rank, world = self._rank_world()
        step_dir = Path(self.manager._create_checkpoint_id(step))
        if self.export.save_rng:
            # Every rank writes its own state now (it is what the next step will draw from); torchtitan saves none.
            write_rng(step_dir, rank, rng_state())
        self.saves += 1
        wanted = last_step if self.export.last_only else (last_step or self.saves % self.export.every == 0)
        if rank != 0 or not wanted:
            return
        future = getattr(self.manager, "save_future", None)  # async saves: the DCP write still runs
        out = Path(self.manager.folder) / self.export.name.format(step=step)
        self._pending.append(self._pool.submit(self._run, step, step_dir, out, future, world))

    def _run(self, step: int, step_dir: Path, out: Path, future: Any, world: int) -> ExportResult:
        import subprocess
        import sys
        import time

        t0 = time.monotonic()
        try:
            if future is not None:
                future.result(timeout=self.export.timeout)
            deadline = time.monotonic() + self.export.timeout
            while not (step_dir / ".metadata").is_file() or (
                    self.export.save_rng and len(rng_files(step_dir)) < world):
                if not step_dir.exists():
                    raise RuntimeError(f"{step_dir} was purged (keep_latest_k) before it could be exported")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{step_dir}: save not complete after {self.export.timeout:.0f}s")
                time.sleep(0.2)
            if is_inside(step_dir, out) or is_inside(out, step_dir):
                raise RuntimeError(f"{out}: is, contains or lies inside the checkpoint {step_dir}; not exported")
            if out.exists() and read_marker(out) is None:
                raise RuntimeError(f"{out}: exists and is not a ckpt-bridge export; left alone")
            # A separate process: the export never competes with training for the GIL, and a crash in it
            # cannot take the trainer down.  to-hf writes under a temporary name and renames at the end;
            # --overwrite replaces only our own earlier export of this step (checked just above).
            cmd = [sys.executable, "-m", "ckpt_bridge", "to-hf", str(step_dir), "--out", str(out), "--config",
                   str(self.export.hf_config), "--dtype", self.export.dtype, "--aux", self.export.aux,
                   "--max-shard-size", self.export.max_shard_size, "--quiet"]
            cmd += ["--titan-model", self.export.titan_model] if self.export.titan_model else []
            cfg = Path(self.export.hf_config)  # the child sees the model class this trainer imported
            cmd += code_flags(self.export.custom_import, self.export.trust_remote_code,
                              cfg / "config.json" if cfg.is_dir() else cfg)
            cmd += ["--overwrite"] if out.exists() else []
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.export.timeout)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                                   f"exit code {proc.returncode}")
            res = ExportResult(step, str(out), True, "exported", time.monotonic() - t0)
            log.info("ckpt-bridge: exported step %s -> %s in %.1fs", step, out, res.seconds)
        except Exception as e:  # noqa: BLE001 - logged, never raised into training
            res = ExportResult(step, str(out), False, str(e), time.monotonic() - t0)
            log.warning("ckpt-bridge: HF export of step %s failed (training continues): %s", step, e)
        self.results.append(res)
        return res

    def wait(self, timeout: float | None = None) -> list[ExportResult]:
        """Block until every export started so far has finished; returns all results."""
        import concurrent.futures

        concurrent.futures.wait(self._pending, timeout=timeout)
        return list(self.results)

    def close(self) -> None:
        from ckpt_bridge.patches.torchtitan_save import unwrap_save

        self.wait()
        self._pool.shutdown(wait=True)
        unwrap_save(self.manager)


def attach(manager: Any, export: HFExport) -> ExportHook:
    """Make each save of ``manager`` (a torchtitan ``CheckpointManager``) also produce an HF export.

    Every rank stores its rng state next to the DCP files; rank 0 then waits
    for the save to finish (async modes included) and runs ``ckpt-bridge
    to-hf`` in a background process, into ``<checkpoint folder>/<export.name>``
    (aux modules apart, extra state with every rank's rng).  Failures are
    logged, never raised; call ``hook.close()`` (or ``wait()``) before exit.
    """
    from ckpt_bridge.patches.torchtitan_save import wrap_save

    hook = ExportHook(manager, export)
    wrap_save(manager, hook.after_save)
    return hook
