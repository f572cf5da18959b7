"""Model classes that are not built into transformers: an installed package's (``--custom-import MODULE``, or
one the caller imported already, e.g. flame's ``import fla``) and a checkpoint's own ``auto_map`` code
(``--trust-remote-code``, transformers' opt-in).

Every model class is resolved through transformers' Auto registries (``CONFIG_MAPPING`` with the entries
``AutoConfig.register`` added, each ``AutoModel*`` class's ``_model_mapping``), never through a table of ours:
a package that registers its classes (flash-linear-attention's ``fla`` does on import) works like a built-in
family.  Which code runs is chosen by the user only: the modules they name (or imported themselves), or the
checkpoint's ``auto_map`` code when they pass ``--trust-remote-code``.  A checkpoint's files (its config, a
to-dcp manifest naming the modules it was made with) only shape the refusal's advice.

:func:`code_scope` is the one helper every command enters (the CLI for every verb, ``to_dcp`` / ``to_hf`` for
Python callers and the hooks): it imports the modules first, before anything is planned, and holds the
``--trust-remote-code`` setting.  Classes registered from a checkpoint's code are registered for the scope
only, so a later call in the same process without the opt-in does not find them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import BridgeError
from ..formats.dcp_files import HF_CONFIG_DIR, read_manifest

# flash-linear-attention's model types, as a hint only when fla is not installed (when it is, the installed
# package's own configuration files say which types it defines: :func:`_fla_types`)
FLA_HINT_TYPES = frozenset({
    "abc", "bitnet", "comba", "delta_net", "deltaformer", "forgetting_transformer", "gated_deltanet",
    "gated_deltaproduct", "gla", "gsa", "hgrn", "hgrn2", "kda", "lightnet", "linear_attn", "log_linear_mamba2",
    "mesa_net", "mla", "moba", "mom", "nsa", "path_attn", "retnet", "rodimus", "rwkv6", "rwkv7", "samba",
    "stickbreaking_attn", "transformer", "yoco"})
FLA = ("fla", "flash-linear-attention")  # (import name, distribution)


@dataclass
class _Scope:
    modules: tuple[str, ...] = ()
    records: list[dict[str, Any]] = field(default_factory=list)
    trust_remote_code: bool = False
    undo: list[Any] = field(default_factory=list)  # callables restoring the Auto registries at scope exit


_SCOPE: contextvars.ContextVar[_Scope] = contextvars.ContextVar("ckpt_bridge_model_code", default=_Scope())


@functools.lru_cache(maxsize=None)
def _distributions(top: str) -> tuple[tuple[str, str], ...]:
    """((distribution, version), ...) installed in the site directory that holds package ``top`` and providing
    it (fla is two: flash-linear-attention and fla-core).  Only that directory is read: the whole environment's
    metadata (``packages_distributions``) takes seconds."""
    from importlib import metadata

    mod = sys.modules.get(top)
    where = [str(Path(p).parent) for p in getattr(mod, "__path__", None) or []] or \
        ([str(Path(mod.__file__).parent)] if getattr(mod, "__file__", None) else [])
    if not where:
        return ()
    out = []
    for dist in metadata.distributions(path=list(dict.fromkeys(where))):
        names = (dist.read_text("top_level.txt") or "").split() or \
            {f.parts[0].removesuffix(".py") for f in dist.files or [] if f.parts}
        if top in names and dist.metadata["Name"]:
            out.append((dist.metadata["Name"], dist.version))
    return tuple(sorted(set(out)))


def distribution_of(module: str) -> tuple[str | None, str | None]:
    """(the installed distribution(s) providing ``module``'s top-level package, their version(s)), or
    (None, None); several are joined with ``+``."""
    dists = _distributions(module.split(".")[0])
    if not dists:
        return None, None
    return "+".join(d for d, _ in dists), "+".join(sorted({v for _, v in dists}))


def _record(module: str) -> dict[str, Any]:
    dist, version = distribution_of(module)
    return {"module": module, "distribution": dist, "version": version}


def import_modules(modules: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """Import each module (it registers its model classes with transformers' Auto classes on import); one
    record per module: (module, distribution, version).  A module that is not installed is one line."""
    import logging
    import warnings

    from ..quiet import quieted

    out = []
    for name in modules:
        try:
            # a package's import-time notes (fla: "Triton is not supported on current platform", transformers'
            # GenerationMixin notes) are not our report, which is one line
            pkg_log = logging.getLogger(name.split(".")[0])
            level = pkg_log.level
            with warnings.catch_warnings(), quieted("transformers"):
                warnings.simplefilter("ignore")
                pkg_log.setLevel(logging.ERROR)
                try:
                    importlib.import_module(name)
                finally:
                    pkg_log.setLevel(level)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                hint = " (flash-linear-attention: pip install flash-linear-attention fla-core)" \
                    if name.split(".")[0] == FLA[0] else ""
                raise BridgeError(f"--custom-import {name}: no module named {e.name!r} is installed{hint}; "
                                  f"install the package that defines the model, or fix the module name") from None
            raise BridgeError(f"--custom-import {name}: importing it failed: it needs {e.name!r}, which is not "
                              f"installed") from None
        except BridgeError:
            raise
        except Exception as e:  # noqa: BLE001 - the package's own import failed: say which and why, in one line
            raise BridgeError(f"--custom-import {name}: importing it failed ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
        out.append(_record(name))
    return out


def as_modules(custom_import: Any) -> tuple[str, ...]:
    """Module names from a name, or a list of names (``custom_import="fla"`` is one module, not three)."""
    if not custom_import:
        return ()
    return (custom_import,) if isinstance(custom_import, str) else tuple(custom_import)


@contextlib.contextmanager
def code_scope(custom_import: Any = (), trust_remote_code: bool = False) -> Iterator[None]:
    """Import ``custom_import`` (module names) and hold ``trust_remote_code`` for the code in the block.

    Nested scopes add to the outer one (the CLI's scope, then the command's own for its options)."""
    outer = _SCOPE.get()
    modules = tuple(dict.fromkeys([*outer.modules, *as_modules(custom_import)]))
    records = import_modules([m for m in modules if m not in outer.modules])
    scope = _Scope(modules, [*outer.records, *records], bool(trust_remote_code or outer.trust_remote_code))
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)
        for undo in reversed(scope.undo):
            undo()


# ---------------------------------------------------------------- the Auto registries


def _auto_modules() -> tuple[Any, Any] | None:
    """(configuration_auto, the transformers module) when transformers is imported; None otherwise.  Nothing
    is registered with a transformers that was never imported, so no import is needed to know that."""
    conf = sys.modules.get("transformers.models.auto.configuration_auto")
    return (conf, sys.modules.get("transformers")) if conf is not None else None


def registered_config_classes() -> dict[str, type]:
    """{model_type: config class} of what was registered with ``AutoConfig`` (not built in)."""
    mods = _auto_modules()
    return dict(getattr(mods[0].CONFIG_MAPPING, "_extra_content", {})) if mods else {}


def _auto_classes() -> list[Any]:
    import transformers

    return [getattr(transformers, n) for n in dir(transformers)
            if n.startswith("AutoModel") and hasattr(getattr(transformers, n, None), "_model_mapping")]


def registered_model_classes() -> list[type]:
    """Every model class registered with an ``AutoModel*`` class (not built in)."""
    if _auto_modules() is None:
        return []
    out: list[type] = []
    for auto in _auto_classes():
        for v in getattr(auto._model_mapping, "_extra_content", {}).values():
            for c in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(c, type) and c not in out:
                    out.append(c)
    return out


def model_class_named(name: str, config: Any = None) -> type | None:
    """The model class ``name`` (a config's ``architectures`` entry) as transformers' Auto classes resolve it:
    first the one an Auto class has registered for ``config``'s class (a package may register its own class
    for a built-in model_type: fla's ``mamba`` replaces transformers' MambaConfig and MambaForCausalLM), then
    transformers' own, then any registered class of that name; None if none has it."""
    import transformers

    if config is not None and _auto_modules() is not None:
        for auto in _auto_classes():
            c = getattr(auto._model_mapping, "_extra_content", {}).get(type(config))
            if isinstance(c, type) and c.__name__ == name:
                return c
    cls = getattr(transformers, name, None)
    if isinstance(cls, type):
        return cls
    return next((c for c in registered_model_classes() if c.__name__ == name), None)


def is_builtin(model_type: str) -> bool:
    from ..jsonfiles import transformers_model_types

    return model_type in transformers_model_types()[0]


def code_key() -> str:
    """What the registered (not built-in) model classes are, for cache keys: a plan remembered for one
    package's class is never reused for another's (model_type, defining module, its distribution's version
    or, for a checkpoint's own code, the source file's sha256)."""
    parts = []
    for mt, cls in sorted(registered_config_classes().items()):
        mod = getattr(cls, "__module__", "")
        dist, version = distribution_of(mod)
        if version is None:
            src = getattr(sys.modules.get(mod), "__file__", None)
            try:
                version = hashlib.sha256(Path(src).read_bytes()).hexdigest()[:16] if src else None
            except OSError:
                version = None
        parts.append(f"{mt}={mod}@{dist}:{version}")
    return ";".join(parts)


# ---------------------------------------------------------------- the gate


def _fla_types() -> frozenset[str] | None:
    """The model types the installed flash-linear-attention defines, read from its configuration files
    (importing fla takes seconds and triton); None when fla is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(FLA[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    types = set()
    for root in spec.submodule_search_locations:
        for f in Path(root, "models").glob("*/configuration_*.py"):
            try:
                types.update(re.findall(r"""^\s+model_type\s*=\s*['"](\w+)['"]""", f.read_text(), re.M))
            except OSError:
                continue
    return frozenset(types)


def _manifest_hint(cfg_path: Path) -> str | None:
    """What the to-dcp manifest beside a DCP's kept ``hf_config/`` says the model was converted with."""
    d = cfg_path.parent
    if d.name != HF_CONFIG_DIR:
        return None
    try:
        m = read_manifest(d.parent)
    except BridgeError:
        return None
    code = (m or {}).get("model_code") or {}
    mods = [r.get("module") for r in code.get("custom_import") or [] if isinstance(r, dict) and r.get("module")]
    if mods:
        return ("its to-dcp manifest records it was converted with " + " ".join(f"--custom-import {m}" for m in mods)
                + ": pass the same flag" + ("s" if len(mods) > 1 else ""))
    if code.get("trust_remote_code"):
        return "its to-dcp manifest records it was converted with --trust-remote-code: pass it again"
    return None


def refusal(cfg: dict[str, Any], path: Path) -> str:
    """Why this config's model cannot be built here, and what can work (one line)."""
    mt = cfg.get("model_type")
    auto_map = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else None
    scope = _SCOPE.get()
    imported = ", ".join(scope.modules)
    manifest = _manifest_hint(path)
    fla_types = _fla_types()
    is_fla = mt in (fla_types if fla_types is not None else FLA_HINT_TYPES)
    if imported:
        have = sorted(registered_config_classes())
        listed = ", ".join(have[:6]) + (f" and {len(have) - 6} more" if len(have) > 6 else "")
        what = (f"--custom-import {imported} registered no model for model_type {mt!r} (registered: "
                f"{listed or 'none'})")
    else:
        what = f"model_type {mt!r} is not built into transformers and no installed package registered it"
    ways = []
    if manifest:
        ways.append(manifest)
    if is_fla and FLA[0] not in scope.modules and not manifest:
        ways.append(f"{mt!r} is a flash-linear-attention model: pass --custom-import fla"
                    + ("" if fla_types is not None else " (pip install flash-linear-attention fla-core)"))
    if auto_map and not (manifest and "trust-remote-code" in manifest):
        ways.append("its config.json has auto_map (model code shipped with the checkpoint): pass "
                    "--trust-remote-code to run that code")
    if not ways:
        ways.append("pass --custom-import MODULE naming the installed package that defines it (it must register "
                    "the classes with transformers' AutoConfig / AutoModelForCausalLM), or fix model_type")
    return f"{path}: {what}; " + "; or ".join(ways)


def _load_remote(cfg: dict[str, Any], path: Path, scope: _Scope) -> None:
    """Register the classes of the checkpoint's ``auto_map`` code with transformers' Auto classes, for the
    scope only (transformers' own dynamic-module loader imports them: the user passed --trust-remote-code)."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map, mt = cfg["auto_map"], cfg["model_type"]
    where = str(path.parent)
    try:
        classes = {name: get_class_from_dynamic_module(ref, where) for name, ref in auto_map.items()
                   if isinstance(ref, str) and hasattr(transformers, name)}
    except Exception as e:  # noqa: BLE001 - the checkpoint's code failed to import: one line
        raise BridgeError(f"{path}: its auto_map code failed to import ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    conf_cls = classes.pop("AutoConfig", None)
    if conf_cls is None:
        raise BridgeError(f"{path}: auto_map names no AutoConfig class; transformers needs one to read the config")
    conf_map = sys.modules["transformers.models.auto.configuration_auto"].CONFIG_MAPPING
    prev = conf_map._extra_content.get(mt, None)
    conf_map._extra_content[mt] = conf_cls
    scope.undo.append(lambda: conf_map._extra_content.pop(mt, None) if prev is None
                      else conf_map._extra_content.__setitem__(mt, prev))
    for name, cls in classes.items():
        mapping = getattr(getattr(transformers, name), "_model_mapping", None)
        if mapping is None:
            continue
        mapping._extra_content[conf_cls] = cls
        scope.undo.append(lambda m=mapping: m._extra_content.pop(conf_cls, None))


def resolve_model_code(cfg: dict[str, Any], path: Path) -> None:
    """The gate before a config is parsed: its model_type is built into transformers, or registered by code
    the user chose (a module imported by them or by ``--custom-import``), or it has ``auto_map`` code and the
    user passed ``--trust-remote-code`` (registered here for the scope).  Otherwise one line saying what can
    work.  A built-in type whose config carries auto_map runs that code only with the opt-in."""
    mt = cfg.get("model_type")
    if not isinstance(mt, str):
        return  # the JSON shape check names it
    auto_map = cfg.get("auto_map")
    scope = _SCOPE.get()
    if isinstance(auto_map, dict) and auto_map and scope.trust_remote_code:
        _load_remote(cfg, path, scope)
        return
    if mt in registered_config_classes():
        return  # the user's imported code defines it: that class, never the checkpoint's code
    if is_builtin(mt):
        if isinstance(auto_map, dict) and auto_map:
            raise BridgeError(f"{path}: uses auto_map (model code shipped with the checkpoint) for the built-in "
                              f"model_type {mt!r}; pass --trust-remote-code to run that code, or remove auto_map "
                              f"to use transformers' own {mt!r} class")
        return
    raise BridgeError(refusal(cfg, path))


def record_for_manifest(model_type: str | None) -> dict[str, Any] | None:
    """What a to-dcp manifest records of the code the model came from (None for a built-in family): the
    modules imported for it (or the package defining its registered class) with versions, and whether it was
    the checkpoint's own code.  Only informs a later refusal: it never chooses what runs."""
    scope = _SCOPE.get()
    cls = registered_config_classes().get(model_type) if model_type else None
    if cls is None:
        return None
    module = getattr(cls, "__module__", "")
    if module.startswith("transformers_modules"):
        return {"model_type": model_type, "trust_remote_code": True, "class": f"{module}.{cls.__name__}"}
    mods = scope.records or [_record(module.split(".")[0])]
    return {"model_type": model_type, "custom_import": mods, "class": f"{module}.{cls.__name__}"}


def forward_needs_gpu(cls: type) -> str | None:
    """Why ``cls``'s forward cannot run here, or None: flash-linear-attention's layers run triton GPU kernels
    (their modules build on a CPU; their forward does not)."""
    module = getattr(cls, "__module__", "") or ""
    if module.split(".")[0] != FLA[0]:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (f"{cls.__name__} is a flash-linear-attention model: its forward runs fla's triton GPU kernels and "
            f"this machine has no CUDA GPU; --logits / --loss need one (the tensors are compared without them)")


def modules_registering(cfg_file: str | Path) -> list[str]:
    """The module that defines the class registered in this process for ``cfg_file``'s model_type (none for a
    built-in or unregistered type, or a checkpoint's own code): what a subprocess of this process (a save
    hook's export) imports to see the same class.  Importing it imports its parent packages, which is where
    packages register (``fla/models/gla/__init__.py``)."""
    import json

    try:
        mt = json.loads(Path(cfg_file).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return []
    cls = registered_config_classes().get(mt) if isinstance(mt, str) else None
    module = getattr(cls, "__module__", "") if cls is not None else ""
    return [module] if module and not module.startswith("transformers_modules") else []


def code_flags(custom_import: Any = (), trust_remote_code: bool = False, cfg_file: str | Path | None = None
               ) -> list[str]:
    """The CLI flags giving a child process the same model code: the modules named, else the one registering
    ``cfg_file``'s model_type here, and the opt-in."""
    mods = list(as_modules(custom_import)) or (modules_registering(cfg_file) if cfg_file is not None else [])
    return [a for m in mods for a in ("--custom-import", m)] + (["--trust-remote-code"] if trust_remote_code else [])


def check_forward_runs(model_dirs: list[str | Path | None]) -> None:
    """Before ``verify --logits / --loss`` reads anything else: refuse in one line when the class a model dir's
    config names cannot run its forward here (:func:`forward_needs_gpu`)."""
    import json

    for d in model_dirs:
        cfg = Path(d) / "config.json" if d is not None else None
        if cfg is None or not cfg.is_file():
            continue
        try:
            archs = json.loads(cfg.read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            continue  # the config's own check names what is wrong with it
        cls = model_class_named(archs[0]) if archs and isinstance(archs[0], str) and _auto_modules() else None
        why = forward_needs_gpu(cls) if cls is not None else None
        if why:
            raise BridgeError(f"{cfg.parent}: {why}")
