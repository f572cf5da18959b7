"""``make demo`` / ``python -m ckpt_bridge.demo``: the mission end to end on built-in tiny models.

TorchTitan half (continued pretraining of OLMo-2 from Hugging Face weights, with aux heads):

1. a tiny OLMo-2 trained on the shipped corpus stands in for the released HF model;
2. on 2 FSDP2 CPU ranks (gloo, torchrun): ``set_initial_load`` converts it (``to-dcp``, the layout the
   installed torchtitan requests) with future_encoder, future_predictor and action_layer heads;
   meta build -> ``fully_shard`` -> ``to_empty`` -> torchtitan's own ``CheckpointManager.load()`` ->
   ``after_load``; the loaded model's loss on the corpus is compared with the HF model's;
3. a few training steps; every save runs the ckpt-bridge save hook, which exports a Hugging Face dir
   with the lr_scheduler and every rank's rng;
4. each export is checked bit for bit against the live model's full state dict at that save, and the
   saved rng of every rank must reproduce that rank's next random draws.

verl half:

5. a tiny OLMo-2 trained with FSDP2 on 2 CPU ranks and saved by verl's real ``FSDPCheckpointManager``;
6. the ckpt-bridge save callback (built by verl's own ``build_checkpoint_callback``) exports it;
7. ``verify`` against the live model's full state dict, and logits of ``from_pretrained`` vs the live model.

One table at the end says what was checked.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

AUX = ["future_predictor", "future_encoder:mlp", "action_layer:linear:16"]
LOSS_TOL = 1e-5  # FSDP2 on 2 ranks vs one process: same math, reductions may differ in the last bits


@dataclass
class Table:
    rows: list[tuple[str, str, bool]] = field(default_factory=list)

    def add(self, what: str, result: str, ok: bool) -> bool:
        self.rows.append((what, result, ok))
        print(f"  {'ok ' if ok else 'BAD'} {what}: {result}", flush=True)
        return ok

    def print(self) -> bool:
        width = max(len(r[0]) for r in self.rows)
        print("\nckpt-bridge demo: what was checked")
        for what, result, ok in self.rows:
            print(f"  {'ok ' if ok else 'BAD'}  {what:<{width}}  {result}")
        ok = all(r[2] for r in self.rows)
        print("all checks passed" if ok else "SOME CHECKS FAILED")
        return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ckpt_bridge.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="keep everything here (default: a temporary dir, removed at the end)")
    ap.add_argument("--ranks", type=int, default=2, help="FSDP2 ranks of both trainers (default 2)")
    ap.add_argument("--steps", type=int, default=4, help="TorchTitan training steps (a save every 2)")
    ap.add_argument("--only", choices=["titan", "verl"], help="run one half only")
    args = ap.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    table = Table()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckpt-bridge-demo-") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "titan"):
            titan_half(root / "titan", args.ranks, args.steps, table)
        if args.only in (None, "verl"):
            verl_half(root / "verl", args.ranks, table)
    table.add("wall time", f"{time.perf_counter() - t0:.0f} s", True)
    return 0 if table.print() else 1


def titan_half(work: Path, ranks: int, steps: int, table: Table) -> None:
    from safetensors.torch import load_file

    from .testing.harness import run_torchrun
    from .testing.tiny_olmo2 import train_tiny_olmo2

    hf = work / "olmo2-hf"
    print(f"[1/7] a tiny OLMo-2 trained on the shipped corpus -> {hf}", flush=True)
    if not (hf / "config.json").is_file():
        train_tiny_olmo2(hf)
    print(f"[2/7] TorchTitan on {ranks} FSDP2 CPU ranks: set_initial_load (to-dcp + {len(AUX)} aux heads) -> "
          f"meta build -> fully_shard -> to_empty -> CheckpointManager.load -> after_load", flush=True)
    print(f"[3/7] {steps} training steps, a save every 2 steps, each exported to HF by the save hook", flush=True)
    run = Path(tempfile.mkdtemp(dir=work, prefix="run-"))  # a fresh trainer folder: nothing to resume from
    result = run / "result.json"
    cmd = ["ckpt_bridge.testing.titan_save", "--hf", str(hf), "--dump", str(run), "--out", str(result),
           "--steps", str(steps), "--interval", "2", "--loss-tokens", "1024"]
    for a in AUX:
        cmd += ["--aux", a]
    run_torchrun(cmd, nproc=ranks, timeout=600)
    recs = json.loads(result.read_text())
    table.add("to-dcp (set_initial_load)", _layout_row(run / "bootstrap"), True)
    loaded, ref_loss = recs[0]["loss_loaded"], recs[0]["loss_hf"]
    table.add("TorchTitan loads the to-dcp output", f"first-step loss {loaded:.6f} vs HF model {ref_loss:.6f} "
              f"(diff {abs(loaded - ref_loss):.1e})",
              abs(loaded - ref_loss) <= LOSS_TOL)

    print("[4/7] each HF export against the live model at that save; rng of every rank", flush=True)
    exports = recs[0]["exports"]
    table.add("save hook exports", f"steps {[e['step'] for e in exports]}, all ok: "
              f"{all(e['ok'] for e in exports)}", bool(exports) and all(e["ok"] for e in exports))
    for e in exports:
        step, export = e["step"], Path(e["out"])
        ref = load_file(run / "reference" / f"step-{step}.safetensors")
        got = {**load_file(export / "model.safetensors"), **load_file(export / "aux_modules.safetensors")}
        same = sum(torch.equal(got[k], ref[k]) for k in ref if k in got)
        table.add(f"step {step} export vs live model", f"{same}/{len(ref)} tensors bit-identical "
                  f"(aux heads in aux_modules.safetensors)", same == len(ref) == len(got))
        table.add(f"step {step} rng + lr_scheduler", _rng_reproduces(export, recs, step), _rng_ok(export, recs, step))


def _layout_row(cache: Path) -> str:
    """What the bootstrap DCP holds, from the manifest to-dcp wrote next to it."""
    from .formats.dcp_files import MANIFEST

    m = json.loads(next(cache.rglob(MANIFEST)).read_text())
    layout = m.get("layout", {})
    aux = ", ".join(a["name"] for a in m.get("aux", []))
    return f"{layout.get('layout')} layout asked of {layout.get('trainer')}; aux heads {aux}"


def _rng_ok(export: Path, recs: list[dict], step: int) -> bool:
    return _rng_reproduces(export, recs, step).startswith("every rank")


def _rng_reproduces(export: Path, recs: list[dict], step: int) -> str:
    """Restore each rank's saved rng from the export and compare its next draws with the run's."""
    from .integrations.torchtitan import restore_rng_state
    from .testing.titan_save import draws
    from . import safeload

    extra = safeload.load(export / "extra_state_merged.pt", mmap=False, allow_numpy=True)  # plain data
    bad = []
    for rec in recs:
        restore_rng_state(extra["rng"][rec["rank"]])
        if draws() != rec["draws"][str(step + 1)]:
            bad.append(rec["rank"])
    sched = extra.get("lr_scheduler") or {}
    if bad or not sched:
        return f"rank(s) {bad} do not reproduce their draws" if bad else "no lr_scheduler state"
    return f"every rank ({len(recs)}) reproduces its next draws; lr_scheduler state saved"


def verl_half(work: Path, ranks: int, table: Table) -> None:
    from omegaconf import OmegaConf
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback

    from . import verify
    from .testing.harness import make_verl_checkpoint, reference_dir

    print(f"[5/7] verl: a tiny OLMo-2, 2 steps of FSDP2 on {ranks} CPU ranks, saved by FSDPCheckpointManager",
          flush=True)
    actor = make_verl_checkpoint(work / "ckpt", model="olmo2", mesh=str(ranks), steps=2)
    step_dir = actor.parent
    print("[6/7] the ckpt-bridge save callback, built by verl's build_checkpoint_callback", flush=True)
    cfg = OmegaConf.create({"trainer": {"checkpoint_callback_class": "ckpt_bridge.integrations.verl.HFExportCallback"}})
    cb = build_checkpoint_callback(cfg)
    cb.on_save(trainer=None, global_step=2, checkpoint_dir=str(step_dir))
    outcome = cb.wait()
    table.add("verl callback export", "; ".join(f"step {o['step']} {o['role']}: {'ok' if o['ok'] else o['message']}"
                                                 for o in outcome), [o["ok"] for o in outcome] == [True])
    export = step_dir / "actor_hf"
    print(f"[7/7] ckpt-bridge verify {export} <live model>", flush=True)
    ref = reference_dir(actor, 2)
    v = verify(export, ref / "model.safetensors")
    table.add("verl export vs live model", f"{v.equal}/{v.compared} tensors bit-identical", v.ok)
    diff = _logits_vs_live(export, ref)
    table.add("verl export logits vs live model", f"max abs diff {diff:.1e}", diff <= 1e-5)


def _logits_vs_live(hf_dir: Path, ref: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokens = torch.load(ref / "tokens.pt", weights_only=True)
    live = torch.load(ref / "logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(tokens).logits
    return float((logits.float() - live.float()).abs().max())


if __name__ == "__main__":
    sys.exit(main())
