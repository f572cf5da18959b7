"""verl save callback: a merged Hugging Face export (+ extra state) of every saved step.

    trainer.checkpoint_callback_class=ckpt_bridge.integrations.verl.HFExportCallback

verl 0.9.1's v1 PPO trainer calls ``on_save`` on the driver after the actor
(and critic) saves and ``latest_checkpointed_iteration.txt``.  An exception
there aborts training, so this callback never raises: it checks that every
rank file is visible (on multi-node runs the driver sees them only on shared
storage) and that the export location is not on or around a source checkpoint,
then starts ``ckpt-bridge to-hf`` in a separate background process
(the next step is not delayed) and logs how earlier exports ended.

A verl Megatron save (sync or ``async_save``) is exported once its ``ckpt_contents.json`` exists (rank 0
writes it after every shard): a step saved before that is kept pending and started at a later ``on_save``
or in ``wait()`` (:mod:`ckpt_bridge.formats.megatron_ready`).

Settings: keyword arguments of a subclass's ``super().__init__``, or
environment variables (a Hydra override cannot add keys to verl's struct
config): ``CKPT_BRIDGE_EXPORT_ROLES`` (``actor``; ``actor,critic``),
``CKPT_BRIDGE_EXPORT_ROOT`` (default: ``global_step_N/<role>_hf``, which
survives verl's rotation because ``max_actor_ckpt_to_keep`` deletes only
``global_step_N/actor``), ``CKPT_BRIDGE_EXPORT_DTYPE`` (``keep``),
``CKPT_BRIDGE_EXPORT_KEEP`` (rotate exports beyond the newest K; 0 = keep all),
``CKPT_BRIDGE_EXPORT_LORA`` (LoRA runs: ``both`` = merged model + PEFT adapter, ``merge``, ``adapter``),
``CKPT_BRIDGE_EXPORT_CUSTOM_IMPORT`` (modules, comma-separated: ``--custom-import``; default: the module that
registered the model's class in the trainer's process), ``CKPT_BRIDGE_EXPORT_TRUST_REMOTE_CODE`` (``1``).
For verl versions without the hook, run ``ckpt-bridge watch ROOT`` instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ckpt_bridge.errors import BridgeError
from ckpt_bridge.formats.megatron_ready import is_complete as megatron_complete, is_megatron_save
from ckpt_bridge.commands.watch import export_dir, rotate, step_action
from ckpt_bridge.models.custom_code import as_modules, code_flags
from ckpt_bridge.pipeline.atomic import busy

log = logging.getLogger("ckpt_bridge")

try:  # verl is optional for the library; the callback needs it
    from verl.trainer.ppo.checkpoint_callback import CheckpointCallback
except ImportError:  # pragma: no cover - verl without the hook: use `ckpt-bridge watch`
    class CheckpointCallback:  # type: ignore[no-redef]
        def __init__(self, config=None):
            self.config = config


class HFExportCallback(CheckpointCallback):
    def __init__(self, config: Any = None, *, roles: tuple[str, ...] | None = None,
                 out_root: str | Path | None = None, dtype: str | None = None, keep: int | None = None,
                 lora: str | None = None, custom_import: tuple[str, ...] | None = None,
                 trust_remote_code: bool | None = None):
        super().__init__(config)
        env = os.environ
        self.roles = tuple(roles or [r for r in env.get("CKPT_BRIDGE_EXPORT_ROLES", "actor").split(",") if r])
        self.out_root = out_root if out_root is not None else env.get("CKPT_BRIDGE_EXPORT_ROOT") or None
        self.dtype = dtype or env.get("CKPT_BRIDGE_EXPORT_DTYPE", "keep")
        self.keep = keep if keep is not None else int(env.get("CKPT_BRIDGE_EXPORT_KEEP", "0"))
        self.lora = lora or env.get("CKPT_BRIDGE_EXPORT_LORA", "both")  # LoRA runs: merge | adapter | both
        # a model class not built into transformers (default: the module registering it in this process)
        self.custom_import = as_modules(custom_import if custom_import is not None else
                                        [m for m in env.get("CKPT_BRIDGE_EXPORT_CUSTOM_IMPORT", "").split(",") if m])
        self.trust_remote_code = bool(trust_remote_code if trust_remote_code is not None else
                                      env.get("CKPT_BRIDGE_EXPORT_TRUST_REMOTE_CODE", "") in ("1", "true"))
        self.running: list[tuple[int, str, Path, subprocess.Popen, Path, Path]] = []
        self.finished: list[dict[str, Any]] = []
        self.pending: list[tuple[int, Path, str]] = []  # Megatron saves waiting for their ckpt_contents.json

    def on_save(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False,
                **kwargs: Any) -> None:
        try:
            self._reap()
            self._start_pending()
            step_dir = Path(checkpoint_dir)
            megatron = [r for r in self.roles if is_megatron_save(step_dir / r)]
            for role in megatron:  # complete when its manifest appears, async or not
                self.pending.append((global_step, step_dir, role))
            self._start_pending()
            if len(megatron) == len(self.roles):
                return
            if async_save:
                log.warning("ckpt-bridge: step %s was saved asynchronously and may not be durable yet; not exporting "
                            "it here (run `ckpt-bridge watch %s` to export it once it is)", global_step,
                            Path(checkpoint_dir).parent)
                return
            for role in self.roles:
                if role not in megatron:
                    self._start(global_step, step_dir, role)
        except Exception:  # noqa: BLE001 - an exception here would abort verl's training
            log.exception("ckpt-bridge: HF export callback failed for step %s (training continues)", global_step)

    def _start(self, step: int, step_dir: Path, role: str) -> None:
        src = step_dir / role
        try:  # the same rules as `ckpt-bridge watch`: location, completeness, our own marker
            action, out, why = step_action(step_dir.parent, step, role, self.out_root)
        except BridgeError as e:  # an export location on/around a source checkpoint: refused, nothing started
            action, out, why = "refuse", export_dir(step_dir, role, self.out_root), str(e)
        if action == "skip":
            return
        if action in ("export", "redo") and busy(out):  # `ckpt-bridge watch` (or a restart of us) is on it
            log.info("ckpt-bridge: step %s %s is being exported by another process; not starting a second", step, role)
            return
        if action in ("wait", "refuse"):
            log.error("ckpt-bridge: not exporting step %s %s: %s", step, role, why)
            self.finished.append({"step": step, "role": role, "out": str(out), "ok": False, "message": why})
            return
        # The log goes to the temp dir, never into the checkpoint; it is removed after a success.
        fd, name = tempfile.mkstemp(prefix=f"ckpt-bridge-export-step{step}-{role}-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
        # --overwrite only to redo our own export that lacked a part; anything else at `out` was refused above
        cmd = [sys.executable, "-m", "ckpt_bridge", "to-hf", str(src), "--out", str(out), "--dtype", self.dtype,
               "--lora", self.lora, "--quiet"] + (["--overwrite"] if action == "redo" else [])
        cmd += code_flags(self.custom_import, self.trust_remote_code, src / "huggingface" / "config.json")
        with open(log_file, "w") as lf:
            # Its own session: the export is not killed by a Ctrl-C meant for the trainer's foreground.
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((step, role, out, proc, log_file, step_dir.parent))
        log.info("ckpt-bridge: exporting step %s %s -> %s in the background (pid %s)", step, role, out, proc.pid)

    def _start_pending(self) -> None:
        """Start the exports of pending Megatron saves whose ckpt_contents.json has appeared."""
        still = []
        for step, step_dir, role in self.pending:
            if megatron_complete(step_dir / role):
                self._start(step, step_dir, role)
            elif (step_dir / role).is_dir():
                still.append((step, step_dir, role))
        self.pending = still

    def _reap(self, block: bool = False) -> None:
        still = []
        for step, role, out, proc, log_file, root in self.running:
            code = proc.wait() if block else proc.poll()
            if code is None:
                still.append((step, role, out, proc, log_file, root))
                continue
            text = log_file.read_text().strip() if log_file.is_file() else ""
            ok = code == 0
            self.finished.append({"step": step, "role": role, "out": str(out), "ok": ok,
                                  "message": text.splitlines()[-1] if text else f"exit code {code}"})
            if ok:
                log.info("ckpt-bridge: exported step %s %s -> %s", step, role, out)
                log_file.unlink(missing_ok=True)
                if self.keep:
                    rotate(root, role, self.keep, self.out_root)
            else:
                log.error("ckpt-bridge: export of step %s %s failed (training continues; log %s): %s", step, role,
                          log_file, self.finished[-1]["message"])
        self.running = still

    def wait(self, timeout: float = 600.0, poll: float = 1.0) -> list[dict[str, Any]]:
        """Block until every started export has finished (end of training, tests); returns all outcomes.
        Pending Megatron saves are polled for their ckpt_contents.json up to ``timeout`` seconds."""
        import time

        deadline = time.monotonic() + timeout
        self._start_pending()
        while self.pending and time.monotonic() < deadline:
            time.sleep(poll)
            self._start_pending()
        for step, step_dir, role in self.pending:
            why = f"{step_dir / role}: no ckpt_contents.json after {timeout:.0f}s: the save did not complete"
            log.error("ckpt-bridge: not exporting step %s %s: %s", step, role, why)
            self.finished.append({"step": step, "role": role, "out": str(export_dir(step_dir, role, self.out_root)),
                                  "ok": False, "message": why})
        self.pending = []
        self._reap(block=True)
        return list(self.finished)
