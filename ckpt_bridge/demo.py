"""``make demo`` / ``python -m ckpt_bridge.demo``: the main job end to end on a
built-in tiny model.

1. build a tiny OLMo-2 from a config (no hub), train a few steps with FSDP2 on
   2 CPU ranks (gloo) and save with verl's real ``FSDPCheckpointManager``;
2. ``inspect`` the verl checkpoint;
3. ``to-hf`` it;
4. ``verify`` the export against the live model's full state dict (bit for bit)
   and compare logits of the export loaded with ``from_pretrained`` against the
   live model's logits;
5. print a table of what was done and checked.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ckpt_bridge.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where to put the checkpoint and export (default: a temp dir, removed)")
    ap.add_argument("--model", default="olmo2", help="tiny model preset (olmo2, llama, llama_tied)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    from . import inspect, to_hf, verify
    from .inspection import format_report
    from .testing.harness import make_verl_checkpoint

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        t = time.perf_counter()
        print(f"[1/4] training a tiny {args.model} for {args.steps} steps with FSDP2 on {args.ranks} CPU ranks, "
              f"saving with verl's FSDPCheckpointManager ...", flush=True)
        actor = make_verl_checkpoint(root / "ckpt", model=args.model, mesh=str(args.ranks), steps=args.steps)
        rows.append(("train + verl save", f"{time.perf_counter() - t:.1f} s", str(actor)))

        print("[2/4] ckpt-bridge inspect", actor, flush=True)
        report = inspect(actor)
        print(format_report(report))
        rows.append(("inspect", f"{report['format']}, world size {report['details']['world_size']}",
                     "no problems" if not report["problems"] else f"{len(report['problems'])} problems"))

        out = root / "hf"
        print(f"[3/4] ckpt-bridge to-hf {actor} --out {out}", flush=True)
        s = to_hf(actor, out, overwrite=True, progress=False)
        rows.append(("to-hf", f"{s.tensors} tensors, {s.parameters:,} params, {s.dtype}", f"{s.seconds:.1f} s"))

        ref = root / "ckpt" / "reference" / f"global_step_{args.steps}"
        print(f"[4/4] ckpt-bridge verify {out} {ref / 'model.safetensors'}", flush=True)
        v = verify(out, ref / "model.safetensors")
        rows.append(("verify vs live model", f"{v.equal}/{v.compared} tensors bit-identical",
                     "EQUAL" if v.ok else "DIFFERENT"))
        logits_diff = _logits_vs_live(out, ref)
        rows.append(("logits vs live model", f"max abs diff {logits_diff:.2e}", "ok" if logits_diff <= 1e-5 else "BAD"))

    width = max(len(r[0]) for r in rows)
    print("\nckpt-bridge demo")
    for a, b, c in rows:
        print(f"  {a:<{width}}  {b:<45} {c}")
    ok = v.ok and logits_diff <= 1e-5
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def _logits_vs_live(hf_dir: Path, ref: Path) -> float:
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokens = torch.load(ref / "tokens.pt", weights_only=True)
    live = torch.load(ref / "logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(tokens).logits
    return float((logits.float() - live.float()).abs().max())


if __name__ == "__main__":
    sys.exit(main())
