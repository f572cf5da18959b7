"""Every single-process check of one TorchTitan era, in one process (tests run it under an era overlay).

    PYTHONPATH=OVERLAY python -m ckpt_bridge.testing.titan_era_check --hf HF_DIR --work DIR --out result.json

1. ``ckpt-bridge to-dcp HF --out X`` (``--layout auto``): which era and layout it found, the flags it printed.
2. ``ckpt-bridge verify X --against HF`` (``--layout-for installed``): exit code and report.
3. The flags it printed, parsed by that era's own config parser: the checkpoint fields they set.
4. The 1-rank trainer flow (``titan_load.run``): the era's CheckpointManager loads the seed, after_load, losses.
5. ``set_initial_load`` on the era's JobConfig: the fields it set exist in that era (no invented attribute),
   a second call reuses its own step-0, a foreign step-0 is refused and left untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import warnings
from pathlib import Path
from typing import Any

from ckpt_bridge.errors import BridgeError

FIELDS = ("enable", "enable_checkpoint", "initial_load_path", "initial_load_model_only",
          "initial_load_model_weights_only", "initial_load_in_hf", "load_step", "folder")


def _cli(*argv: str) -> tuple[int, str, str]:
    from ckpt_bridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _section_fields(config: Any) -> dict[str, Any]:
    section = getattr(config, "checkpoint", config)
    return {f: getattr(section, f) for f in FIELDS if hasattr(section, f)}


def _flag_tokens(line: str) -> list[str]:
    """``--checkpoint.X [value]`` tokens of a printed line, from the first one on (prose and cp commands dropped)."""
    words = shlex.split(line.replace("(", " ( "))
    first = next((i for i, w in enumerate(words) if w.startswith("--checkpoint.")), len(words))
    tokens: list[str] = []
    for w in words[first:]:
        if w.startswith("--checkpoint."):
            tokens.append(w)
        elif w == "(" or w.startswith("-"):
            break
        elif tokens and tokens[-1].startswith("--"):
            tokens.append(w)
    return tokens


def _era_parser() -> Any:
    """The installed era's own command-line config parser: a ``ConfigManager`` or the argparse ``JobConfig``."""
    import importlib

    for name in ("torchtitan.config.manager", "torchtitan.config_manager"):  # 0.2.x / 0.3.0, older eras
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        return mod.ConfigManager() if hasattr(mod, "ConfigManager") else mod.JobConfig()
    raise ImportError("neither torchtitan.config.manager nor torchtitan.config_manager imports")


def _parse_flags(line: str) -> dict[str, Any] | None:
    """The printed torchtitan flags of one line, parsed by the installed era's own parser (None: no flags)."""
    import inspect

    tokens = _flag_tokens(line)
    if not tokens:
        return None
    parser = _era_parser()
    if not hasattr(parser, "parse_args") or not hasattr(type(parser), "_load_config"):
        args = tokens  # the eras whose CLI parses --checkpoint.* alone
    else:  # 0.3.0: a trainer config comes from a --module's config_registry; the flags override it
        assert "--module" in inspect.getsource(type(parser)._load_config)
        args = ["--module", "llama3", "--config", "llama3_debugmodel", *tokens]
    job = parser.parse_args(args)
    if job is None:  # 5e2033c: argparse JobConfig parses into itself
        job = parser
    return {"tokens": tokens, "fields": _section_fields(job)}


def _set_initial_load_checks(hf: str, work: Path) -> dict[str, Any]:
    from ckpt_bridge.integrations.torchtitan import SEED_MARK, set_initial_load
    from ckpt_bridge.models.titan_eras import new_config

    res: dict[str, Any] = {}
    dump = work / "sil-dump"
    config = new_config(str(dump))
    section = getattr(config, "checkpoint", config)
    for name in ("initial_load_model_only", "initial_load_model_weights_only"):
        if hasattr(section, name):  # as after --checkpoint.no_<name>: set_initial_load must turn it on
            setattr(section, name, False)
    before = _section_fields(config)
    out = set_initial_load(config, hf, cache_dir=work / "sil-cache")
    res["fields_before"], res["fields_after"] = before, _section_fields(config)
    res["new_attributes"] = sorted(set(res["fields_after"]) - set(before))  # an invented field would show here
    step0 = dump / "checkpoint" / "step-0"
    res["step0_placed"] = (step0 / ".metadata").is_file()
    if res["step0_placed"]:
        res["step0_mark"] = (step0 / SEED_MARK).read_text().strip() == str(out)
        res["step0_same_inodes"] = (step0 / ".metadata").stat().st_ino == (out / ".metadata").stat().st_ino
        set_initial_load(new_config(str(dump)), hf, cache_dir=work / "sil-cache")  # a restart: reuses its own
        res["second_call_ok"] = True
        foreign = work / "foreign-dump"
        (foreign / "checkpoint" / "step-0").mkdir(parents=True)
        (foreign / "checkpoint" / "step-0" / "theirs.txt").write_text("not ours")
        try:
            set_initial_load(new_config(str(foreign)), hf, cache_dir=work / "sil-cache")
            res["foreign_refused"] = ""
        except BridgeError as e:
            res["foreign_refused"] = str(e)
        res["foreign_untouched"] = sorted(p.name for p in (foreign / "checkpoint" / "step-0").iterdir())
    return res


def single_process_checks(hf: str, work: Path, aux: list[str]) -> dict[str, Any]:
    from ckpt_bridge.testing.titan_load import run

    r: dict[str, Any] = {}
    dcp = work / "auto"
    code, out, err = _cli("to-dcp", hf, "--out", str(dcp), "--quiet", "--json")
    r["to_dcp_exit"], r["to_dcp_err"] = code, err.strip().splitlines()[-1:] if err.strip() else []
    summary = json.loads(out) if code == 0 else {}
    r["to_dcp"] = {k: summary.get(k) for k in ("layout", "trainer", "reason", "flags")}
    code, out, err = _cli("verify", str(dcp), "--against", hf)
    r["verify_exit"], r["verify_out"] = code, out
    r["flags_parsed"] = [p for line in summary.get("flags", []) for p in [_parse_flags(line)] if p]
    r["load1"] = run(hf, aux, 0, str(work / "load1-cache"))
    r["set_initial_load"] = _set_initial_load_checks(hf, work)
    return r


def main(argv: list[str] | None = None) -> None:
    """Under torchrun: rank 0 runs the single-process checks first, then every rank the 2-rank FSDP2 load."""
    import os
    import shutil

    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--aux", action="append", default=[])
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    work = Path(args.work)
    rank = int(os.environ.get("RANK", "0"))
    r: dict[str, Any] = {}
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        r = single_process_checks(args.hf, work, args.aux)
    if "WORLD_SIZE" in os.environ:
        from ckpt_bridge.testing.titan_load import run

        dist.init_process_group("gloo")  # the other ranks wait here for rank 0's checks
        loaded = run(args.hf, args.aux, 0, str(work / "load2-cache"))
        if rank == 0:
            r["load2"] = loaded
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        for key in ("load1", "load2"):
            if key in r:
                shutil.rmtree(r[key]["dump"], ignore_errors=True)  # mkdtemp'd by titan_load; seeds are hard links
        Path(args.out).write_text(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    main()
