"""Which TorchTitan era is installed, found by asking it (or reading it), never from a version table.

TorchTitan changed how a model-only load is requested and configured several
times, and version strings do not follow the behaviour (commit e320a37 already
says 0.1.0 yet still loads ``{"model": ...}``).  So we look at what the
installed code *does*:

* **its own API**, when it imports: build its ``CheckpointManager`` the way
  that era's trainer does (``CheckpointManager.Config`` in 0.3.0; a
  ``JobConfig`` from the era's ``ConfigManager`` / argparse ``JobConfig`` plus
  ``init_ft_manager`` before that), around the meta model, and call its
  ``_states_to_load`` with "model only" (``model_only=True``, or ``step=0`` in
  the eras that decided by step).  Nested ``{"model": ...}`` or flat keys is
  then a fact, not a guess.
* **its source**, when it does not import (0.2.x imports triton at package
  import): parse ``CheckpointManager._states_to_load`` with ``ast`` and see
  whether the model-only branch returns ``{MODEL: self.states[MODEL]}``
  (nested) or ``self.states[MODEL].state_dict()`` (flat).

The same look tells how the trainer is pointed at a seed checkpoint: eras with
``checkpoint.initial_load_path`` (and ``initial_load_model_only`` or, at
0b44d4c, ``initial_load_model_weights_only``), and older ones that only load
``<job.dump_folder>/<checkpoint.folder>/step-<N>`` with ``load_step``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import BridgeError

NEST = "model"
# checkpoint-config fields whose presence tells the era how a seed checkpoint is given
ERA_FIELDS = ("initial_load_path", "initial_load_model_only", "initial_load_model_weights_only",
              "initial_load_in_hf", "load_step", "folder", "enable", "enable_checkpoint")
WHO_LOADS = {
    "nested": "nested: TorchTitan whose step-0 load requests {'model': state_dict} (up to commit e320a37, the "
              "parent of cddd7dc; flame pins up to 5e2033c) - keys model.<fqn>",
    "flat": "flat: TorchTitan whose model-only load requests the bare state dict (cddd7dc and later: flame's "
            "0b44d4c, the releases 0.1.0, 0.2.x, 0.3.0) - keys <fqn>",
}
LAYOUT_HELP = "; ".join(WHO_LOADS.values())


@dataclass
class TitanEra:
    """What the installed TorchTitan does with a model-only load, and how it is told where to find one."""

    version: str  # "0.1.0"
    origin: str  # "commit e320a37" / "" when pip metadata does not say
    layout: str  # "nested" | "flat"
    how: str  # "asked" | "source"
    evidence: str  # one sentence: what we called or read, and what it returned
    fields: frozenset[str] = field(default_factory=frozenset)  # ERA_FIELDS the checkpoint config has
    states: dict[str, Any] | None = None  # the requested states (asked only), DCP-flattened by the caller

    @property
    def name(self) -> str:
        return f"torchtitan {self.version}" + (f" ({self.origin})" if self.origin else "")

    @property
    def initial_load(self) -> bool:
        """True when the trainer reads a seed checkpoint from checkpoint.initial_load_path."""
        return "initial_load_path" in self.fields

    @property
    def model_only_field(self) -> str | None:
        for f in ("initial_load_model_only", "initial_load_model_weights_only"):
            if f in self.fields:
                return f
        return None

    @property
    def enable_field(self) -> str:
        return "enable_checkpoint" if "enable_checkpoint" in self.fields else "enable"

    def describe(self) -> str:
        load = (f"seed via checkpoint.initial_load_path + {self.model_only_field}" if self.initial_load else
                "no initial_load_path: seed at <dump_folder>/<checkpoint.folder>/step-0 with load_step 0")
        return f"{self.name}: {self.layout} layout; {load} ({self.evidence})"


# ---------------------------------------------------------------- where it is, which commit


def install_origin() -> str:
    """The commit (or archive) pip recorded for the installed torchtitan, when it recorded one."""
    try:
        raw = metadata.distribution("torchtitan").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return ""
    if not raw:
        return ""
    info = json.loads(raw)
    commit = (info.get("vcs_info") or {}).get("commit_id")
    if commit:
        return f"commit {commit[:7]}"
    m = re.search(r"[-_.]([0-9a-f]{7,40})(?:\.tar\.gz|\.zip|/?$)", info.get("url", ""))
    return f"commit {m.group(1)[:7]}" if m else Path(info.get("url", "")).name


def torchtitan_version() -> str | None:
    try:
        return metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        return None


def package_dir() -> Path | None:
    """The installed torchtitan package directory, found without importing it."""
    spec = importlib.util.find_spec("torchtitan")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- asking its own API


def _era_job_config(tmp: str) -> Any:
    """A default JobConfig built by the era's own parser (tyro ConfigManager, or the argparse JobConfig)."""
    for mod_name in ("torchtitan.config", "torchtitan.config_manager"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(mod_name)
            break
    else:
        raise ImportError("neither torchtitan.config nor torchtitan.config_manager imports")
    if hasattr(mod, "ConfigManager"):
        job = mod.ConfigManager().parse_args([])
    else:  # 5e2033c-era: JobConfig parses itself (argparse) and sets one attribute object per section
        job = mod.JobConfig()
        job.parse_args([])
    job.job.dump_folder = tmp
    return job


def _ft_manager(job: Any) -> Any:
    from torchtitan.components import ft

    return ft.init_ft_manager(job) if hasattr(ft, "init_ft_manager") else ft.FTManager(None)


def build_manager(parts: list[nn.Module], config: Any, base_folder: str) -> Any:
    """The era's real CheckpointManager around ``parts``, constructed the way that era's trainer does.

    ``config``: the era's own config object - the ``CheckpointManager.Config``
    (0.3.0) or the whole ``JobConfig`` (older eras, which read
    ``job.dump_folder`` and ``job.checkpoint`` themselves).
    """
    from torchtitan.components.checkpoint import CheckpointManager

    if hasattr(CheckpointManager, "Config"):
        return CheckpointManager(config, dataloader=None, model_parts=parts, optimizers=None, lr_schedulers=None,
                                 states={}, sd_adapter=None, base_folder=base_folder)
    offer = {"dataloader": None, "model_parts": parts, "optimizers": None, "lr_schedulers": None, "states": {},
             "job_config": config, "checkpoint_config": getattr(config, "checkpoint", config),
             "sd_adapter": None, "base_folder": base_folder}
    kwargs: dict[str, Any] = {}
    for name, p in list(inspect.signature(CheckpointManager.__init__).parameters.items())[1:]:
        if name in offer:
            kwargs[name] = offer[name]
        elif name == "ft_manager":
            kwargs[name] = _ft_manager(config) if p.default is inspect.Parameter.empty else None
        elif p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"CheckpointManager.__init__ needs {name!r}, which ckpt-bridge does not know how to give")
    return CheckpointManager(**kwargs)


def new_config(base_folder: str) -> Any:
    """A fresh config object of the installed era, checkpointing on (what ``build_manager`` takes)."""
    from torchtitan.components.checkpoint import CheckpointManager

    if hasattr(CheckpointManager, "Config"):
        return CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                        initial_load_model_only=False)
    job = _era_job_config(base_folder)
    section = job.checkpoint  # 0.2.x calls the switch `enable`: setting the older name would invent a field
    setattr(section, "enable_checkpoint" if hasattr(section, "enable_checkpoint") else "enable", True)
    return job


def _model_only_call(mgr: Any) -> tuple[dict[str, Any], str]:
    params = list(inspect.signature(mgr._states_to_load).parameters)
    if params[:1] == ["model_only"]:
        return mgr._states_to_load(model_only=True), "_states_to_load(model_only=True)"
    if params[:1] == ["step"]:  # the eras that decided by step: step 0 is the model-only seed load
        return mgr._states_to_load(step=0), "_states_to_load(step=0)"
    raise TypeError(f"_states_to_load({', '.join(params)}): neither model_only nor step")


@contextlib.contextmanager
def _quiet():
    """Older eras log to the root logger ("Tokenizer path ... does not exist!"): not news for a layout question."""
    loggers = [logging.getLogger(), logging.getLogger("torchtitan")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ask(parts: list[nn.Module]) -> TitanEra:
    """Import the installed torchtitan, build its CheckpointManager around ``parts`` and ask it."""
    with _quiet(), tempfile.TemporaryDirectory(prefix="ckpt-bridge-ask-") as tmp:
        config = new_config(tmp)
        mgr = build_manager(parts, config, tmp)
        try:
            states, call = _model_only_call(mgr)
        finally:
            with contextlib.suppress(Exception):
                mgr.close()
    section = getattr(config, "checkpoint", config)
    nested = set(states) == {NEST} and not hasattr(states[NEST], "shape")
    return TitanEra(torchtitan_version() or "?", install_origin(), "nested" if nested else "flat", "asked",
                    f"its CheckpointManager.{call} requests " +
                    ("{'model': ...}" if nested else f"{len(states)} bare model entries"),
                    frozenset(f for f in ERA_FIELDS if hasattr(section, f)), states)


# ---------------------------------------------------------------- reading its source


def _is_states_model(node: ast.AST) -> bool:
    """``self.states[MODEL]`` or ``self.states["model"]``."""
    return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "states" and (
                (isinstance(node.slice, ast.Name) and node.slice.id == "MODEL")
                or (isinstance(node.slice, ast.Constant) and node.slice.value == NEST)))


def _source_layout(fn: ast.FunctionDef) -> tuple[str, str]:
    """nested/flat from the body of ``_states_to_load``: what does its model-only path hand DCP?"""
    for node in ast.walk(fn):
        # {MODEL: self.states[MODEL]}: the wrapper under its "model" name -> keys model.<fqn>
        if isinstance(node, ast.Dict) and any(_is_states_model(v) for v in node.values):
            return "nested", "builds {MODEL: self.states[MODEL]}"
    for node in ast.walk(fn):
        # self.states[MODEL].state_dict(): the bare state dict -> keys <fqn>
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "state_dict"
                and _is_states_model(node.func.value)):
            return "flat", "returns self.states[MODEL].state_dict()"
    raise ValueError("neither {MODEL: self.states[MODEL]} nor self.states[MODEL].state_dict() in it")


def _declared_fields(pkg: Path) -> set[str]:
    """Checkpoint-config field names the era declares: dataclass fields, or argparse "--checkpoint.X" flags."""
    names: set[str] = set()
    for path in [pkg / "config_manager.py", *sorted((pkg / "config").glob("*.py"))]:
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(errors="replace"))
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Checkpoint"):
            names |= {a.target.id for a in cls.body if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)}
        names |= {m.group(1) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  for m in [re.fullmatch(r"--checkpoint\.(\w+)", n.value)] if m}
    return names


def read_source(pkg: Path) -> TitanEra:
    """The era from ``pkg`` (a torchtitan package dir) without importing it."""
    for path in sorted((pkg / "components").rglob("*.py")):
        text = path.read_text(errors="replace")
        if "_states_to_load" not in text:
            continue
        tree = ast.parse(text)
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CheckpointManager"):
            fn = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "_states_to_load"), None)
            if fn is None:
                continue
            layout, what = _source_layout(fn)
            used = ({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | _declared_fields(pkg)) \
                & set(ERA_FIELDS)
            rel = path.relative_to(pkg.parent)
            return TitanEra(torchtitan_version() or "?", install_origin(), layout, "source",
                            f"its source {rel}: CheckpointManager.{fn.name}({ast.unparse(fn.args)}) {what}",
                            frozenset(used))
    raise ValueError(f"no CheckpointManager._states_to_load under {pkg / 'components'}")


# ---------------------------------------------------------------- the one entry point


def installed_era(parts: list[nn.Module] | None = None) -> TitanEra:
    """The installed torchtitan's era: asked when it imports, read from source when it does not.

    ``parts``: the target model (meta is fine); without it a one-layer stand-in
    is asked (the layout does not depend on the model).
    """
    version = torchtitan_version()
    pkg = package_dir()
    if version is None or pkg is None:
        raise BridgeError(f"--layout auto asks the installed torchtitan, and none is installed here; "
                          f"pass --layout nested or --layout flat ({LAYOUT_HELP})")
    if parts is None:
        parts = [nn.Linear(1, 1, device="meta")]
    try:
        return ask(parts)
    except Exception as asked:  # noqa: BLE001 - an era that does not import here: read what it would do
        why = f"{type(asked).__name__}: {str(asked).splitlines()[0] if str(asked) else ''}".rstrip(": ")
    try:
        era = read_source(pkg)
    except Exception as e:  # noqa: BLE001
        name = f"torchtitan {version}" + (f" ({install_origin()})" if install_origin() else "")
        raise BridgeError(f"{name} at {pkg}: cannot tell which keys its model-only load requests: importing it "
                          f"failed ({why}) and its source did not say ({e}); pass --layout nested or --layout flat "
                          f"({LAYOUT_HELP})") from None
    era.evidence += f"; read because it does not import here ({why})"
    return era


# ---------------------------------------------------------------- how to point that era's trainer at a seed


def seed_flags(out: str, era: TitanEra | None, layout: str) -> list[str]:
    """The trainer flags that make the first load read ``out`` (absolute), in the installed era's words.

    ``era`` None (a forced layout, or no torchtitan here): one line per family
    of eras that loads ``layout``.
    """
    after = ("after the load: ckpt_bridge.integrations.torchtitan.after_load(model, HF_DIR) recomputes rotary "
             "inv_freq (never stored anywhere) and checks the config")
    step0 = (f"put it at <job.dump_folder>/<checkpoint.folder>/step-0 (cp -rl {out} DUMP/checkpoint/step-0) and "
             f"pass --checkpoint.enable_checkpoint --checkpoint.load_step 0 (first run only: a resume loads its "
             f"latest step)")
    if era is not None:
        # The switch is printed for every era: 0.2.x / 0.3.0's default config has it off, and a user who runs
        # the printed flags alone would otherwise start from random weights with no error (the loss-4-5 failure).
        enable = f"--checkpoint.{era.enable_field} "
        if era.initial_load:
            line = (f"{enable}--checkpoint.initial_load_path {out}"
                    + (f" --checkpoint.{era.model_only_field}" if era.model_only_field else ""))
        else:
            line = step0
        return [f"{era.name}: {line}", after]
    if layout == "nested":
        return [f"nested-era torchtitan (up to e320a37; flame pins up to 5e2033c): {step0}", after]
    return [f"torchtitan 0.2.x / 0.3.0: --checkpoint.enable --checkpoint.initial_load_path {out} "
            f"--checkpoint.initial_load_model_only",
            f"torchtitan 0.1.0 and flame's pin 0b44d4c: --checkpoint.enable_checkpoint --checkpoint.initial_load_path {out} "
            f"--checkpoint.initial_load_model_weights_only", after]
