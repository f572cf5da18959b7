"""``ckpt-bridge <verb>``: inspect, to-hf, to-dcp, verify, watch.

Errors from bad input print one line (no traceback) and exit 2; a verification
that finds a difference exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from . import cyclic_gc
from .errors import BridgeError, Terminated, disk_full, is_disk_full, one_line, root_cause

EPILOG = """\
examples:
  # what is this checkpoint, and is anything wrong with it?
  ckpt-bridge inspect checkpoints/global_step_200/actor
  # merge a verl FSDP checkpoint into a Hugging Face model dir (trained dtype kept)
  ckpt-bridge to-hf checkpoints/global_step_200 --out exports/step200-hf
  # the same in bf16, 2 GB shards
  ckpt-bridge to-hf checkpoints/global_step_200/actor --out exports/step200-bf16 --dtype bf16 --max-shard-size 2GB
  # a verl LoRA run: merged model in OUT, PEFT adapter in OUT/lora_adapter (--lora merge|adapter for one)
  ckpt-bridge to-hf checkpoints/global_step_200 --out exports/step200-lora
  # did the export keep every weight? (exit 0 equal, 1 different, 2 bad input)
  ckpt-bridge verify checkpoints/global_step_200/actor exports/step200-bf16 --cast-to bf16
  # bootstrap TorchTitan/flame from a Hugging Face model, with two fresh aux heads
  ckpt-bridge to-dcp models/OLMo-2-1B --out bootstrap/olmo2 --aux future_predictor:mlp --aux action_layer:linear:16
  # will the trainer's model-only load take it, and is it the same model? (loss on a text file)
  ckpt-bridge verify bootstrap/olmo2 --against models/OLMo-2-1B --loss some_text.txt

exit codes: 0 ok, 1 verification found differences, 2 bad input or any other failure (one line naming the
file/key/rank; --debug adds the traceback), 130 interrupted (nothing partial is left), 143 / 129 stopped by
SIGTERM / SIGHUP (nothing partial is left); a closed stdout (| head) does not change the exit code

documentation: README.md and docs/ in the ckpt-bridge repository (docs/errors.md: errors and exit codes)
"""


TITAN_HELP = ("TorchTitan's own model definition the trainer builds (llama3, qwen3): its keys are written/checked, "
              "the weights pass through its StateDictAdapter, its config is derived from the HF config and checked")


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickles beyond tensors and numpy rng state (only for files you trust): in torch "
                        "files, verl rank and extra_state files, .bin weights, DCP .metadata, DCP non-tensor "
                        "entries and the save hook's rng files")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit 2, like every other error (``--help`` keeps the full text)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        print(f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


class _Version(argparse.Action):
    """``--version``: ours, and each dependency's installed release against the ones CI tests (version.py),
    computed only when asked."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import describe

        print(describe())
        parser.exit(0)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ckpt-bridge",
        description="Move model checkpoints between Hugging Face transformers, TorchTitan/flame and verl: "
        "exactly (bit-for-bit unless you ask for a cast) and streaming (one tensor in memory at a time).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="on failure, also print the Python traceback")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="print the version, and the installed torch / transformers / peft and whether CI tests them")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    pi = sub.add_parser(
        "inspect",
        help="detect a checkpoint's format and report its contents and problems (reads no tensor data)",
        description="Detect the format (verl FSDP actor dir, Hugging Face dir, DCP step folder, torch-save file), "
        "say which files decided it, and list tensors, parameters, bytes, dtypes, layout and every problem "
        "visible without reading tensor data: missing ranks, mixed world sizes, missing .metadata, "
        "placements that disagree across ranks. Exit 0 when no problem is found, 2 when the report lists any.",
        epilog="reference: docs/inspect.md in the ckpt-bridge repository",
    )
    pi.add_argument("path", help="checkpoint directory or file")
    _common(pi, "the report")

    ph = sub.add_parser(
        "to-hf",
        help="export a checkpoint to a Hugging Face model directory",
        description="Merge a checkpoint into a directory that AutoModelForCausalLM.from_pretrained loads. "
        "verl FSDP: SRC is global_step_N (the actor is used) or global_step_N/actor|critic; shards are "
        "placed from the saved DTensor placements and device mesh, never guessed. Output: sharded "
        "safetensors (+ index), config.json (dtype = what was written), generation_config.json, tokenizer "
        "files, and extra_state_merged.pt + lr_scheduler_state.json (lr scheduler, every rank's rng, step). "
        "The output appears only when complete.",
        epilog="example:\n  ckpt-bridge to-hf ckpts/global_step_200 --out exports/step200-hf --dtype bf16\n"
        "reference: docs/to-hf.md, docs/megatron.md (verl Megatron), docs/lora.md (LoRA runs), docs/workers.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ph.add_argument("src", help="source checkpoint (verl global_step_N[/actor], HF dir, DCP folder, torch file)")
    ph.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist unless --overwrite)")
    ph.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                    help="dtype of floating tensors in the export (default: keep the trained dtype)")
    ph.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="safetensors shard size (default 5GB)")
    ph.add_argument("--config", metavar="PATH", help="config.json (or a dir with one) when the checkpoint has none "
                    "inside it (a path recorded in a to-dcp manifest is not followed; the error names it)")
    ph.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer files from DIR (default: the config's dir)")
    ph.add_argument("--aux", default="separate", choices=["separate", "drop", "inline"],
                    help="auxiliary modules (prefixes a to-dcp manifest names, --aux-prefix, or any top-level "
                    "prefix the HF model lacks): separate (default: aux_modules.safetensors), drop, or inline")
    ph.add_argument("--models", default="main", metavar="main[,NAME...]",
                    help="several models in one DCP checkpoint: main,ema writes model.safetensors and ema.safetensors")
    ph.add_argument("--base", metavar="DIR", help="base model dir: its other components (VAE files, processor "
                    "configs, ...) are copied unchanged; it also supplies config.json (and, for a LoRA-only "
                    "checkpoint, the base weights); never written to")
    ph.add_argument("--lora", default="both", choices=["merge", "adapter", "both"],
                    help="a LoRA checkpoint (PEFT keys, lora_train_meta.json): merge = a plain HF model with every "
                    "adapter folded in exactly as PEFT's merge_and_unload; adapter = a PEFT adapter dir "
                    "(PeftModel.from_pretrained(base, OUT)); both (default) = merged model in OUT, adapter in "
                    "OUT/lora_adapter. A save_lora_only checkpoint merges onto --base DIR (or the local base "
                    "it records); without one it writes the adapter alone")
    ph.add_argument("--lora-config", metavar="PATH", help="the run's adapter_config.json (or its dir) when the "
                    "checkpoint lacks it: verl's lora_train_meta.json records r, alpha and task type only, so an "
                    "rsLoRA / rank_pattern run started from an adapter (model.lora_adapter_path) needs it")
    ph.add_argument("--aux-prefix", action="append", default=[], metavar="NAME",
                    help="treat keys under NAME. as an auxiliary module (repeatable)")
    ph.add_argument("--titan-model", metavar="NAME", help="SRC is a DCP of TorchTitan's own NAME model (llama3, qwen3): "
                    "map its names back with the model's StateDictAdapter.to_hf (default: what the to-dcp manifest "
                    "recorded; needs the HF config: --config or the manifest's source dir)")
    ph.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    ph.add_argument("--dry-run", action="store_true", help="check everything the real run reads (structure, "
                    "layouts, key plan, config, extra state of every rank, --out) and print the key plan; write "
                    "nothing, read no tensor data")
    ph.add_argument("--allow-missing-rng", action="store_true", help="a DCP step whose saved rng lacks a rank: "
                    "export anyway, recording a warning in trainer_state.json (default: refuse)")
    ph.add_argument("--quiet", action="store_true", help="no progress bar")
    _team_args(ph)
    _common(ph, "the summary")

    pt = sub.add_parser(
        "to-dcp",
        help="write any checkpoint to-hf reads as the DCP folder a TorchTitan/flame model-only load accepts",
        description="Write SRC's weights (streamed, one tensor in memory) as a torch.distributed.checkpoint "
        "folder holding exactly the keys the trainer's model-only load requests. --layout auto asks the installed "
        "torchtitan of any era - its own CheckpointManager, or its source when it does not import - and says "
        "which era it found: nested (model.<fqn>) up to commit e320a37 (already versioned 0.1.0; flame pins up to "
        "5e2033c), flat (<fqn>) from cddd7dc on (flame's 0b44d4c, 0.2.x, 0.3.0). The printed flags use that era's "
        "names (initial_load_model_only / initial_load_model_weights_only, or step-0 + load_step 0). Auxiliary modules "
        "(--aux) are added freshly initialised (seeded) or copied (--aux-from); the ones SRC holds are carried unchanged. "
        "SRC is anything to-hf reads: an HF dir, a verl FSDP actor or step dir, a verl Megatron save, a DCP step "
        "folder of any era, a TorchTitan-native DCP (--source-titan-model), a torch file (--config); a LoRA run is "
        "merged first (to-hf --lora merge). A manifest with the source "
        "files' sha256, the HF config, the layout decision and the aux specs is written next to the weights.",
        epilog="examples:\n"
        "  ckpt-bridge to-dcp models/OLMo-2-1B --out bootstrap/olmo2\n"
        "  ckpt-bridge to-dcp models/OLMo-2-1B --out bootstrap/olmo2-aux --aux future_encoder:mlp \\\n"
        "      --aux future_predictor:linear --aux action_layer:linear:16 --seed 7\n"
        "  ckpt-bridge to-dcp models/OLMo-2-1B --out DUMP/checkpoint/step-0 --layout nested   # flame pin <= 5e2033c\n"
        "  ckpt-bridge to-dcp models/Llama-3.2-1B --out bootstrap/llama --titan-model llama3   # torchtitan's llama3\n"
        "then (0.2.x/0.3.0): --checkpoint.enable --checkpoint.initial_load_path $(realpath bootstrap/olmo2) "
        "--checkpoint.initial_load_model_only\n(the command prints the flags of the torchtitan installed here), "
        "and call ckpt_bridge.integrations.torchtitan.after_load(model, HF_DIR) after the load.\n"
        "reference: docs/to-dcp.md (the TorchTitan eras table)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pt.add_argument("src", metavar="SRC", help="any checkpoint to-hf reads (HF dir, verl FSDP / Megatron save, DCP "
                    "folder, TorchTitan-native DCP, torch file)")
    pt.add_argument("--out", required=True, metavar="DIR", help="output DCP folder (must not exist unless --overwrite)")
    pt.add_argument("--layout", default="auto", choices=["auto", "nested", "flat"],
                    help="auto (default): ask the installed torchtitan (any era); nested: trainers up to e320a37 "
                    "(flame <= 5e2033c); flat: cddd7dc and later (flame 0b44d4c, 0.2.x, 0.3.0)")
    pt.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "keep"],
                    help="dtype of floating tensors written (default fp32, the usual master-weight dtype)")
    pt.add_argument("--aux", action="append", default=[], metavar="NAME[:linear|mlp][:hidden|vocab|N]",
                    help="add an auxiliary module under prefix NAME (repeatable); linear: Linear(hidden, OUT); "
                    "mlp: Linear(hidden, intermediate) -> GELU -> Linear(intermediate, OUT); OUT defaults to hidden")
    pt.add_argument("--seed", type=int, default=0, help="seed of the aux modules' init (default 0)")
    pt.add_argument("--aux-from", metavar="PATH", help="copy the aux modules' weights from this checkpoint "
                    "(DCP, HF dir, safetensors or torch file) instead of initialising them")
    pt.add_argument("--config", metavar="PATH", help="config.json (or a dir with one) when SRC has none "
                    "(a torch file, a bare DCP)")
    pt.add_argument("--titan-model", metavar="NAME", help=TITAN_HELP + " (default: the HF model class itself)")
    pt.add_argument("--source-titan-model", metavar="NAME", help="SRC holds TorchTitan NAME's own keys (llama3, "
                    "qwen3); its adapter's to_hf names them (default: what SRC's to-dcp manifest recorded)")
    pt.add_argument("--extra-state", action="store_true", help="copy SRC's lr_scheduler / rng / step into "
                    "OUT/source_extra_state (the files to-hf writes); a model-only load does not read them")
    pt.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    pt.add_argument("--dry-run", action="store_true", help="check all, print the plan of transforms; write nothing")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    _team_args(pt)
    _common(pt, "the summary")

    pv = sub.add_parser(
        "verify",
        help="compare two checkpoints tensor by tensor, or a DCP against its HF source (exit 0 ok, 1 different, "
        "2 bad input)",
        description="Compare two checkpoints of any supported formats: missing/unexpected keys, shape and dtype "
        "differences, max abs difference. Exact by default; --cast-to / --atol for exports that changed dtype; "
        "--logits also loads both with transformers and compares logits on a fixed token batch. "
        "With --against HF_DIR, A is a DCP folder checked for a trainer's model-only load: how many of the keys "
        "the loader requests it has (--layout-for), whether its values equal HF_DIR's, and with --loss TEXTFILE "
        "the loss of both models on the same tokens.",
        epilog="examples:\n"
        "  ckpt-bridge verify ckpts/global_step_200/actor exports/step200-hf\n"
        "  ckpt-bridge verify bootstrap/olmo2 --against models/OLMo-2-1B --layout-for nested\n"
        "  ckpt-bridge verify bootstrap/olmo2 --against models/OLMo-2-1B --loss corpus.txt\n"
        "reference: docs/verify.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pv.add_argument("a", metavar="A", help="checkpoint (with --against: a DCP folder)")
    pv.add_argument("b", metavar="B", nargs="?", help="checkpoint to compare with (omit with --against)")
    pv.add_argument("--atol", type=float, default=0.0, help="allowed max abs difference (default 0: exact)")
    pv.add_argument("--cast-to", choices=["bf16", "fp16", "fp32"], help="cast floating tensors of both sides first")
    pv.add_argument("--logits", action="store_true", help="also compare logits of both as transformers models")
    pv.add_argument("--against", metavar="HF_DIR", help="check DCP folder A against the HF model it came from")
    pv.add_argument("--layout-for", default="installed", choices=["installed", "nested", "flat"],
                    help="with --against: the loader to check for (installed: ask the installed torchtitan)")
    pv.add_argument("--titan-model", metavar="NAME", help="with --against: " + TITAN_HELP +
                    " (default: what the to-dcp manifest recorded)")
    pv.add_argument("--loss", metavar="TEXTFILE", help="with --against: compare the loss of both on this text")
    pv.add_argument("--loss-tokens", type=int, default=2048, help="tokens of TEXTFILE used by --loss (default 2048)")
    pv.add_argument("--loss-atol", type=float, default=1e-5, help="allowed |loss difference| (default 1e-5)")
    _common(pv, "the result")

    pw = sub.add_parser(
        "watch",
        help="export each new verl save step to Hugging Face format, from outside the training job",
        description="Follow ROOT/latest_checkpointed_iteration.txt (ROOT = verl's trainer.default_local_dir) and "
        "export each new global_step_N/<role> with to-hf, for verl versions (or the legacy trainer) without the "
        "checkpoint_callback_class hook. Idempotent: a step whose export exists is skipped; an interrupted export "
        "(a .partial dir whose process is gone) is redone, and so is an export lacking a part saved after it "
        "(extra_state). A step whose rank files are not all visible yet, or (past latest_checkpointed_iteration.txt) "
        "whose files still change between polls, is retried on the next poll. Exports go to "
        "global_step_N/<role>_hf (survives max_actor_ckpt_to_keep, which deletes global_step_N/actor only) or "
        "under --out-root; a location on or inside a source checkpoint is refused (exit 2) before anything runs.",
        epilog="examples:\n"
        "  ckpt-bridge watch checkpoints/my_run                      # until Ctrl-C, polling every 30 s\n"
        "  ckpt-bridge watch checkpoints/my_run --once --all         # export every saved step, then exit\n"
        "  ckpt-bridge watch checkpoints/my_run --out-root /exports --keep 3 --dtype bf16\n"
        "reference: docs/save-hooks.md (watch, the verl callback, the torchtitan hook)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pw.add_argument("root", metavar="ROOT", help="verl checkpoint root (holds latest_checkpointed_iteration.txt)")
    pw.add_argument("--role", default="actor", choices=["actor", "critic"], help="which model to export")
    pw.add_argument("--out-root", metavar="DIR", help="put exports under DIR/global_step_N/<role>")
    pw.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"])
    pw.add_argument("--all", action="store_true", help="also export older saved steps not exported yet")
    pw.add_argument("--once", action="store_true", help="one pass, then exit (exit 1 if an export failed)")
    pw.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    pw.add_argument("--lora", default="both", choices=["merge", "adapter", "both"],
                    help="LoRA runs: what each export holds (see to-hf --lora; default both)")
    pw.add_argument("--keep", type=int, default=0, help="keep only the newest K exports (default 0: keep all); only "
                    "directories carrying ckpt_bridge_export.json are ever deleted")
    for verb in ("inspect", "to-hf", "to-dcp", "verify", "watch"):  # every verb that builds or checks a model
        _code_flags(sub.choices[verb])
    for sp in sub.choices.values():  # --debug also after the verb
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure, also print the Python traceback")
    return p


def _code_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--custom-import", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: an installed package that registers model classes with transformers' "
                        "Auto classes (flash-linear-attention's models: --custom-import fla); repeatable")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model code a checkpoint ships (config.json auto_map), as transformers' "
                        "trust_remote_code=True does; off by default: only for checkpoints you trust")


def _team_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="split the writing over N local processes (default 1); the output is byte-identical. "
                        "Pays off with cores and disk bandwidth to spare: each process re-plans (about 1-2 s of "
                        "start-up) and the page cache is shared")
    p.add_argument("--distributed", action="store_true",
                   help="run under torchrun: every rank writes its share of the output files (on storage all "
                        "ranks see), rank 0 writes the index and renames the result into place; "
                        "e.g. torchrun --nnodes 2 --nproc-per-node 4 ... -m ckpt_bridge.cli to-hf SRC --out DIR "
                        "--distributed")
    p.add_argument("--worker", metavar="RANK/SIZE", help=argparse.SUPPRESS)  # internal: a --workers process


def _fast_allocations() -> None:
    """Transparent huge pages for torch's large CPU buffers and sleeping OpenMP threads, unless set otherwise.

    Every tensor an export reads, casts or fuses is a fresh allocation, and its
    first touch faults in 4 KiB pages: casting a 1 GB fp32 tensor to bf16 into
    a new buffer took 0.63 s, 0.17 s with 2 MiB pages (0.06 s into a reused
    buffer).  torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first
    allocation, so this must run before torch is imported; the CLI imports
    torch lazily, after this.  (Python API callers set it themselves.)
    """
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # The casts run on torch's OpenMP threads, which spin between kernels by default; on the 2 cores of a
    # small node that spinning took 1.6 s of CPU from the thread doing the writes (and from a training job
    # next to us) in a 1.24B export.  Idle threads sleep instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def entry() -> None:
    """The process's entry point (``ckpt-bridge``, ``python -m ckpt_bridge``, a ``--workers`` process): :func:`main`,
    then the process ends without finalizing the interpreter (stdout and stderr flushed, then ``os._exit``).

    By then the command is over: its output complete, flushed and renamed into place, or removed after a
    failure.  What finalizing did was a last full garbage collection over every object torch and transformers
    made, and the teardown of their modules: 0.7 s of a 1.24B verl -> HF export (a sixth of it), 1.35 s of a
    to-dcp, for nothing.  Nothing we start needs an exit handler: the threads still alive then are idle (or
    only advisory, :mod:`~ckpt_bridge.writers.writeback`), and ``--workers`` processes were waited for.
    Argument errors and ``--help`` (``SystemExit``) leave the usual way.  :func:`main` is for in-process callers.
    """
    import os

    _stop_on_signals()
    sys.stdout, sys.stderr = _ReaderGone(sys.stdout), _ReaderGone(sys.stderr)
    code = main(ending=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more can be said there
            pass
    os._exit(code)


_STOPPING: list[int] = []  # the signal that stopped this process (its handler raises once)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop the command as Ctrl-C does: :class:`~.errors.Terminated` is a KeyboardInterrupt,
    so the temporary ``.NAME.partial-PID`` output is removed and ``--workers`` are stopped before the process
    exits with 128 + signum.  Without this, ``timeout``, Slurm's scancel / time limit and Kubernetes killed the
    process without any cleanup and left a full-size hidden output until the next run writing to NAME.
    A signal the parent set to be ignored (``nohup``) stays ignored."""
    import signal

    def stop(signum, frame):
        if _STOPPING:  # the cleanup the first one started is not interrupted by a second one
            return
        _STOPPING.append(signum)
        raise Terminated(signum, signal.Signals(signum).name)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, stop)


class _ReaderGone:
    """``sys.stdout`` / ``sys.stderr`` of the CLI process: once the program reading the pipe is gone (``| head``,
    ``| true``: EPIPE) or the terminal hung up (EIO), what is still to be printed is dropped and the command
    goes on to its own exit code.  A closed stdout is not a failed command: an export already renamed into
    place used to be reported as "BrokenPipeError ...; check the path" with exit 2 (see docs/errors.md)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._gone(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._gone(e)

    def _gone(self, e: OSError) -> None:
        import errno
        import os

        if not isinstance(e, BrokenPipeError) and e.errno != errno.EIO:
            raise e
        # the bytes still in the stream's buffer go to /dev/null from now on, instead of failing every flush
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None, *, ending: bool = False) -> int:
    """Run one command; returns its exit code.  ``ending``: the process ends right after (:func:`entry`), so the
    garbage collector paused for the command is not turned back on."""
    _fast_allocations()
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --workers' processes repeat
    if not args.verb:
        _parser().print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.verb == "watch":  # long-running: the collector stays on
            return _run(args)
        with cyclic_gc.paused(restore=not ending):  # see cyclic_gc: its passes in the imports
            return _run(args)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(e, SystemExit):
            raise
        if args.debug:
            traceback.print_exc()
        message, code = _failure(e)
        print(f"ckpt-bridge {args.verb}: {message}", file=sys.stderr)
        return code


def _run(args: argparse.Namespace) -> int:
    from .models.custom_code import code_scope

    # the modules first, before anything is planned; the opt-in held for the whole command
    with code_scope(getattr(args, "custom_import", ()), getattr(args, "trust_remote_code", False)):
        return _run_verb(args)


def _run_verb(args: argparse.Namespace) -> int:
    if args.verb == "inspect":
        from .checks.inspect import format_report, inspect

        report = inspect(args.path, trust_pickle=args.trust_pickle)
        print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
        return 2 if report["problems"] else 0
    if args.verb == "to-hf":
        return _to_hf(args)
    if args.verb == "to-dcp":
        return _to_dcp(args)
    if args.verb == "verify":
        return _verify(args)
    if args.verb == "watch":
        return _watch(args)
    return 2


def _failure(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for any exception: 2 for bad input and every unexpected failure,
    1 only for VerificationFailed, 130 for Ctrl-C (also when DCP wrapped it in a CheckpointException, or
    torch's zip writer turned it into a RuntimeError), 128 + signum for SIGTERM / SIGHUP, 141 (SIGPIPE's)
    for a pipe closed under an in-process caller."""
    cause = root_cause(e)  # a Ctrl-C anywhere in the exception's chain wins (see errors.interrupt_in)
    if isinstance(cause, Terminated):
        return f"stopped by {cause.name}; no output was left behind", cause.exit_code
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted; no output was left behind", 130
    if isinstance(cause, BrokenPipeError):  # in-process callers; the CLI process drops output to a closed pipe
        return "stopped: the program reading the output closed the pipe", 141
    if isinstance(cause, BridgeError):
        return "error: " + " ".join(str(cause).split("\n")), cause.exit_code
    if is_disk_full(cause):
        where = cause.filename or "the output"
        return "error: " + str(disk_full(cause, where, None)), 2
    if isinstance(cause, MemoryError):
        return ("error: out of memory (a tensor larger than this machine's RAM, or a corrupt size in the "
                "input); rerun with --debug to see where"), 2
    loop = _symlink_loop(cause)
    if loop:
        return f"error: {loop}: is a symlink loop (a link that leads back to itself); remove it or use another path", 2
    if isinstance(cause, OSError):
        return f"error: {one_line(cause)}; check the path and its permissions", 2
    return (f"error: unexpected {one_line(cause)}; rerun with --debug for the traceback and report it "
            f"if the input looks fine"), 2


def _symlink_loop(e: BaseException) -> str | None:
    """The path of a symlink loop: pathlib's resolve() raises RuntimeError("Symlink loop from '...'") up to
    Python 3.12 and OSError(ELOOP) after."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return str(e.filename)
    if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop from "):
        return str(e)[len("Symlink loop from "):].strip("'\"")
    return None


def _print_dropped(dropped: list[tuple[str, str]], each: int = 3) -> None:
    """What was not written, one line per key; a reason shared by more than ``each`` keys (megatron's
    per-rank ``_extra_state`` entries, a trainer's optimizer-only buffers) is one line with a count."""
    by_reason: dict[str, list[str]] = {}
    for src, why in dropped:
        by_reason.setdefault(why, []).append(src)
    for why, keys in by_reason.items():
        if len(keys) <= each:
            for src in keys:
                print(f"  not written: {src} ({why})")
        else:
            print(f"  not written: {len(keys)} entries ({why}), e.g. {keys[0]}")


def _in_team(args: argparse.Namespace, convert, options):
    """(the team of ``--workers`` / ``--distributed`` processes, ``convert``'s result in this process)."""
    from .pipeline.team import from_cli

    team = from_cli(args.workers, args.distributed, args.argv, out=args.out, worker=args.worker)
    try:
        return team, convert(args.src, args.out, options, team=team)
    finally:
        team.close()


def _to_hf(args: argparse.Namespace) -> int:
    from .commands.to_hf import to_hf
    from .options import ToHF

    team, s = _in_team(args, to_hf, ToHF.from_args(args))
    if not team.leader:  # rank 0 reports the export
        return 0
    if args.dry_run:  # the same checks as the real run (extra state and --out included), no tensor data read
        print(f"# {s.source_format} {s.source} -> {s.model_class} (config {s.config})")
        print("\n".join(s.plan_lines))
        for w in s.warnings:
            print(f"ckpt-bridge to-hf: warning: {w}", file=sys.stderr)
        return 0
    for w in s.warnings:
        print(f"ckpt-bridge to-hf: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(s.as_dict(), indent=2, default=str))
        return 0
    print(f"wrote {s.out}  ({s.model_class}, {s.dtype or 'adapter dtype kept'})")
    if s.lora:
        print(f"  LoRA r={s.lora['r']} alpha={s.lora['alpha']}{' rsLoRA' if s.lora['rslora'] else ''}, "
              f"{s.lora['modules']} module(s) ({', '.join(s.lora['targets'])}); --lora {s.lora['mode']}"
              + (f", adapter in {s.out}/lora_adapter" if s.lora["mode"] == "both" else ""))
        for note in s.lora["notes"]:
            print(f"  note: {note}")
    print(f"  {s.tensors} tensors, {s.parameters:,} parameters, {s.bytes_written / 1e6:.1f} MB in "
          f"{sum(f.endswith('.safetensors') for f in s.files)} safetensors file(s), {s.seconds:.1f} s")
    _print_dropped([(src, why) for src, why in s.dropped if not why.startswith("aux module")])
    for name, keys in s.aux.items():
        where = {"separate": "aux_modules.safetensors", "drop": "not written", "inline": "in the main weights"}
        print(f"  aux module {name}: {len(keys)} tensor(s), {where[s.aux_mode]}")
    if s.extra_state:
        print(f"  extra state: extra_state_merged.pt, lr_scheduler_state.json, trainer_state.json "
              f"(global step {s.global_step})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.logits or args.loss:  # a model whose forward cannot run here (fla: GPU kernels), said first
        from .models.custom_code import check_forward_runs

        check_forward_runs([args.against, args.a, args.b])
    if args.against:
        from .checks.verify_dcp import format_dcp_result, verify_dcp

        if args.b:
            raise BridgeError("give either B or --against HF_DIR, not both")
        res = verify_dcp(args.a, args.against, layout_for=args.layout_for, loss_text=args.loss,
                         loss_tokens=args.loss_tokens, loss_atol=args.loss_atol, trust_pickle=args.trust_pickle,
                         titan_model=args.titan_model)
        print(json.dumps(res.as_dict(), indent=2, default=str) if args.json else format_dcp_result(res))
        return 0 if res.ok else 1
    if not args.b:
        raise BridgeError("verify needs two checkpoints A B, or A --against HF_DIR")
    if args.titan_model:
        raise BridgeError("--titan-model works with --against HF_DIR (a DCP folder checked for that model's load)")
    if args.loss:
        raise BridgeError("--loss works with --against HF_DIR (a DCP folder checked against its HF source)")
    from .checks.verify import format_result, verify

    res = verify(args.a, args.b, atol=args.atol, cast_to=args.cast_to, logits=args.logits,
                 trust_pickle=args.trust_pickle)
    print(json.dumps(res.as_dict(), indent=2, default=str) if args.json else format_result(res))
    return 0 if res.ok else 1


def _watch(args: argparse.Namespace) -> int:
    from .commands.watch import watch

    def show(ev) -> None:
        print(f"step {ev.step}: {ev.status}  {ev.out}" + (f"  ({ev.message})" if ev.message else ""), flush=True)

    events = watch(args.root, role=args.role, out_root=args.out_root, dtype=args.dtype, every_step=args.all,
                   once=args.once, interval=args.interval, keep=args.keep, on_event=show, lora=args.lora,
                   custom_import=tuple(args.custom_import), trust_remote_code=args.trust_remote_code)
    if args.once and not events:
        print(f"nothing to export: no {args.root}/latest_checkpointed_iteration.txt yet")
    return 1 if any(e.status == "failed" for e in events) else 0


def _to_dcp(args: argparse.Namespace) -> int:
    from .commands.to_dcp import to_dcp
    from .options import ToDCP

    team, res = _in_team(args, to_dcp, ToDCP.from_args(args))
    if not team.leader:  # rank 0 reports the export
        return 0
    if args.dry_run:
        print(f"# {res.requested.layout} layout ({res.requested.reason}); {len(res.targets()) + len(res.aux)} keys, "
              f"model {res.model_class}")
        print("\n".join(res.lines()))
        for note in res.notes:
            print(f"# {note}")
        return 0
    if args.json:
        print(json.dumps({**res.as_dict(), "flags": res.flags()}, indent=2, default=str))
        return 0
    print(f"wrote {res.out}  ({res.layout} layout, {res.dtype})")
    print(f"  layout: {res.reason}")
    print(f"  {res.tensors} tensors: {res.from_source} from {res.source}, {res.aux_tensors} in aux modules "
          f"({', '.join(res.aux) or 'none'}); {res.bytes_written / 1e6:.1f} MB in {res.seconds:.1f} s")
    _print_dropped(res.dropped)
    if res.left_behind:
        print(f"  not carried (a model-only DCP): {', '.join(res.left_behind)} of {res.source_format}"
              + (f"; copied to {res.extra_state}" if res.extra_state else "; --extra-state copies it beside"))
    print(f"  manifest: {res.manifest}")
    print("to start training from it:")
    for line in res.flags():
        print(f"  {line}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    entry()
