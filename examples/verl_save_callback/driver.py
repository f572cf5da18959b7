"""What verl's v1 PPO trainer does on the driver after each save, with our callback plugged in.

In a real run you only set (plus CKPT_BRIDGE_EXPORT_* environment variables if the defaults do not suit):

    python -m verl.trainer.main_ppo ... trainer.checkpoint_callback_class=ckpt_bridge.integrations.verl.HFExportCallback

verl builds the callback with ``build_checkpoint_callback(config)`` and calls
``on_save(trainer, global_step, checkpoint_dir)`` after the actor/critic saves. Here the saves come
from verl's real FSDPCheckpointManager (run.sh step 1) and this script plays the driver.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback

root = Path(sys.argv[1])
cfg = OmegaConf.create({"trainer": {"checkpoint_callback_class": "ckpt_bridge.integrations.verl.HFExportCallback",
                                    "default_local_dir": str(root)}})
callback = build_checkpoint_callback(cfg)
for step_dir in sorted(root.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])):
    step = int(step_dir.name.rsplit("_", 1)[1])
    t0 = time.perf_counter()
    callback.on_save(trainer=None, global_step=step, checkpoint_dir=str(step_dir))
    print(f"on_save(step {step}) returned after {time.perf_counter() - t0:.2f}s (the export runs in the background)")
for outcome in callback.wait():  # a real run never waits; this demo does, to show the results
    print(f"step {outcome['step']} {outcome['role']}: {'ok' if outcome['ok'] else 'FAILED'} -> {outcome['out']}")
