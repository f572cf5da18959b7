"""Reading the JSON files of a checkpoint, with their structure checked in one place.

Every JSON file we act on (``config.json``, ``model.safetensors.index.json``,
``fsdp_config.json``, the to-dcp manifest) comes from the checkpoint, so valid
JSON of the wrong shape (a list where an object belongs, a number where a file
name belongs) must be a one-line error naming the file and the field, not a
``TypeError`` three calls later.  A shape maps a dotted field path to a check
and what the field should be; ``[]`` in a path means "every element of this
list".

Numbers get their own kinds (:func:`integer`, :func:`number`): JSON lets a
checkpoint say ``NaN``, ``Infinity``, ``true`` or ``4.7`` where a count or a
scale belongs, and Python would happily fold ``alpha = NaN`` into every weight
or truncate ``r: 4.7`` to 4.  A numeric field of a checkpoint's JSON is read
through one of these, never with a bare ``int()`` / ``float()``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointFormatError

Check = tuple  # (ok(value) -> bool, what it should be[, normalise(value) -> value])


def is_(*types: type) -> Check:
    names = " or ".join({"str": "a string", "int": "an integer", "dict": "an object", "list": "a list",
                         "float": "a number", "bool": "true/false", "NoneType": "null"}.get(t.__name__, t.__name__) for t in types)
    return (lambda v: isinstance(v, types) and not (bool not in types and isinstance(v, bool)), names)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range_text(lo: float | None, hi: float | None) -> str:
    return "".join(t for t in ((f" >= {lo}" if lo is not None else ""), (f" <= {hi}" if hi is not None else "")))


def integer(lo: int | None = None, hi: int | None = None, *, null: bool = False) -> Check:
    """A JSON integer in [lo, hi]: not a bool, not a float with a fraction (``4.0`` is read as 4), not NaN/Inf."""
    def ok(v: Any) -> bool:
        if v is None:
            return null
        return (_is_number(v) and float(v).is_integer() and (lo is None or v >= lo)
                and (hi is None or v <= hi))
    return (ok, f"an integer{_range_text(lo, hi)}{' or null' if null else ''}",
            lambda v: v if v is None else int(v))


def number(lo: float | None = None, hi: float | None = None, *, null: bool = False) -> Check:
    """A finite JSON number in [lo, hi] (not a bool, not NaN or Infinity)."""
    def ok(v: Any) -> bool:
        if v is None:
            return null
        return _is_number(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    return (ok, f"a finite number{_range_text(lo, hi)}{' or null' if null else ''}")


def map_to(value: Check) -> Check:
    """An object whose every value fits ``value`` (keys are strings in JSON)."""
    ok, what = value[0], value[1]
    conv = value[2] if len(value) > 2 else None
    return (lambda v: isinstance(v, dict) and all(ok(x) for x in v.values()), f"an object of names -> {what}",
            (lambda v: {k: conv(x) for k, x in v.items()}) if conv else None)


def list_to(item: Check) -> Check:
    """A list whose every element fits ``item``."""
    ok, what = item[0], item[1]
    conv = item[2] if len(item) > 2 else None
    return (lambda v: isinstance(v, list) and all(ok(x) for x in v), f"a list of {what}",
            (lambda v: [conv(x) for x in v]) if conv else None)


def any_of(*checks: Check) -> Check:
    """The first of ``checks`` that accepts the value decides (and normalises it, if that check does)."""
    def normalise(v: Any) -> Any:
        c = next(c for c in checks if c[0](v))
        return c[2](v) if len(c) > 2 and c[2] is not None else v
    return (lambda v: any(c[0](v) for c in checks), " or ".join(c[1] for c in checks), normalise)


def map_of(key: type, value: type) -> Check:
    return (lambda v: isinstance(v, dict) and all(isinstance(k, key) and isinstance(x, value) for k, x in v.items()),
            f"an object of {key.__name__} -> {value.__name__}")


def list_of(item: type) -> Check:
    return (lambda v: isinstance(v, list) and all(isinstance(x, item) for x in v), f"a list of {item.__name__}")


def _values(doc: Any, path: list[str], where: str, parent: Any = None, at: Any = None) -> list[tuple]:
    """(dotted name, value, container, index) of every present value at ``path`` (missing fields skipped)."""
    if not path:
        return [(where, doc, parent, at)]
    head, rest = path[0], path[1:]
    if head == "[]":
        if not isinstance(doc, list):
            return [(where, _NOT_A_LIST, None, None)]
        return [v for i, x in enumerate(doc) for v in _values(x, rest, f"{where}[{i}]", doc, i)]
    if not isinstance(doc, dict) or head not in doc:
        return []
    return _values(doc[head], rest, f"{where}.{head}" if where else head, doc, head)


_NOT_A_LIST = object()


def check_shape(doc: Any, shape: dict[str, Check], path: Path, required: tuple[str, ...] = (),
                fix: str = "restore the file from its source") -> Any:
    """Raise :class:`CheckpointFormatError` naming ``path`` and the field if ``doc`` does not fit ``shape``.

    Values of checks that normalise (the integer kinds) are replaced in ``doc``.
    """
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{path}: holds a JSON {type(doc).__name__}, not an object; restore the file "
                                    f"from its source")
    for name in required:
        if name not in doc:
            raise CheckpointFormatError(f"{path}: has no field {name!r}; {fix}")
    for dotted, check in shape.items():
        ok, what = check[0], check[1]
        normalise = check[2] if len(check) > 2 else None
        for name, value, parent, at in _values(doc, dotted.split("."), ""):
            if value is _NOT_A_LIST or not ok(value):
                raise CheckpointFormatError(f"{path}: field {name!r} should be {what}, got {_short(value)}; "
                                            f"{fix}")
            if normalise is not None and parent is not None:
                parent[at] = normalise(value)  # 4.0 -> 4: what the field means, in the type its readers use
    return doc


def _short(value: Any) -> str:
    text = "a list" if value is _NOT_A_LIST else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: str | Path, shape: dict[str, Check] | None = None, required: tuple[str, ...] = (),
              fix: str = "restore the file from its source") -> Any:
    """A JSON object from ``path`` (UTF-8), checked against ``shape``; one-line errors otherwise."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{path}: not UTF-8 text (byte {e.start}); restore the file from its source"
                                    ) from None
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        import json

        doc = json.loads(text)
    except ValueError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e}); restore the file from its source") from None
    return check_shape(doc, shape or {}, path, required, fix)


# The fields each file's readers use.
INDEX = {"weight_map": map_of(str, str), "metadata": is_(dict)}
FSDP_CONFIG = {"world_size": integer(1)}
# the numbers our own code reads from config.json (aux head sizes and init); transformers checks the rest
CONFIG = {"model_type": is_(str), "architectures": list_of(str), "hidden_size": integer(1, null=True),
          "vocab_size": integer(1, null=True),
          "intermediate_size": any_of(integer(1, null=True), list_of(int)),  # per layer in a few families
          "initializer_range": number(0, null=True)}
# PEFT's adapter_config.json (LoraConfig.to_dict) and verl's lora_train_meta.json, as far as a merge reads them
_STRINGS = any_of(is_(str), list_of(str), is_(type(None)))
ADAPTER_CONFIG = {"peft_type": is_(str), "task_type": is_(str, type(None)), "r": integer(1),
                  "lora_alpha": number(), "use_rslora": is_(bool), "use_dora": is_(bool),
                  "fan_in_fan_out": is_(bool), "rank_pattern": any_of(map_to(integer(1)), is_(type(None))),
                  "alpha_pattern": any_of(map_to(number()), is_(type(None))), "target_modules": _STRINGS,
                  "modules_to_save": any_of(list_of(str), is_(type(None))), "lora_bias": is_(bool), "bias": is_(str),
                  "base_model_name_or_path": is_(str, type(None)), "exclude_modules": _STRINGS,
                  "layers_to_transform": any_of(integer(0), list_to(integer(0)), is_(type(None))),
                  "layers_pattern": _STRINGS}
LORA_META = {"r": integer(1), "lora_alpha": number(), "task_type": is_(str, type(None))}
MANIFEST = {"source": is_(dict), "source.path": is_(str), "source.config_dir": is_(str),
            "source.files": is_(list), "hf_config": is_(dict), "layout": is_(dict), "aux": is_(list),
            "aux.[].name": is_(str), "aux.[].spec": is_(str), "aux.[].kind": is_(str),
            "aux.[].keys": map_of(str, list), "aux.[].sha256": is_(str), "dropped": is_(list),
            "hf_config_dir": is_(str)}


# verl's Megatron save manifest (ckpt_contents.json, schema v2) and the TransformerConfig it dumps beside it:
# the fields the Megatron reader and planner read (sizes compared with config.json, the step, the role)
MEGATRON_MANIFEST = {"schema_version": integer(1), "world_size": integer(1), "global_step": integer(0),
                     "arch": is_(str), "role": is_(str), "contents": is_(dict), "backend": is_(dict)}
TRANSFORMER_CONFIG = {f: integer(1, null=True) for f in (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
    "num_moe_experts", "moe_ffn_hidden_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
    "context_parallel_size")}


def check_config(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.json beyond its JSON shape: a model transformers knows, without the repo's own code."""
    check_shape(cfg, CONFIG, path, required=("model_type",))
    # a type registered with transformers' AutoConfig (an imported package's, or auto_map code the user
    # trusted: ckpt_bridge.models.custom_code) is that registered class, not the checkpoint's code
    registered = registered_model_types()
    if "auto_map" in cfg and cfg["model_type"] not in registered:
        raise CheckpointFormatError(
            f"{path}: uses auto_map (model code shipped with the checkpoint); ckpt-bridge runs a checkpoint's "
            f"code only with --trust-remote-code; or remove auto_map if model_type is a built-in transformers model")
    known, version = transformers_model_types()
    if cfg["model_type"] not in known and cfg["model_type"] not in registered:
        raise CheckpointFormatError(
            f"{path}: model_type {cfg['model_type']!r} is not a model transformers {version} has built in; pass "
            f"--custom-import MODULE naming the installed package that defines it, or fix model_type")
    return cfg


def registered_model_types() -> set[str]:
    """The model types registered with transformers' ``AutoConfig`` beyond its built-in ones (none when
    transformers was never imported: nothing can have registered; no import is needed to know)."""
    import sys

    conf = sys.modules.get("transformers.models.auto.configuration_auto")
    return set(getattr(getattr(conf, "CONFIG_MAPPING", None), "_extra_content", None) or ())


def cache_root() -> Path:
    """ckpt-bridge's cache (model expectations, transformers' model types): $CKPT_BRIDGE_CACHE or ~/.cache."""
    import os

    return Path(os.environ.get("CKPT_BRIDGE_CACHE") or Path.home() / ".cache" / "ckpt-bridge")


def transformers_version() -> str | None:
    """The installed transformers' version, without importing it (None if it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


CACHE_ENTRY_MAX_BYTES = 64 << 20


def _read_cache_entry(path: Path) -> str:
    """A cache entry's text: a regular file of at most CACHE_ENTRY_MAX_BYTES, else OSError.  Opened
    non-blocking and checked on the open descriptor, so a FIFO or device planted in the cache never hangs."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > CACHE_ENTRY_MAX_BYTES:
            raise OSError(f"{path}: not a regular file of at most {CACHE_ENTRY_MAX_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(CACHE_ENTRY_MAX_BYTES + 1).decode()
    finally:
        os.close(fd)


def cached_json(path: Path | None, compute: Callable[[], Any], valid: Callable[[Any], bool] = lambda v: True) -> Any:
    """The JSON value stored at ``path``, or ``compute()`` stored there for next time.

    A missing, unreadable or not ``valid`` entry is recomputed; a cache that
    cannot be written (read-only home, ``path`` None) only costs the recomputation.
    """
    import json

    if path is not None:
        try:
            value = json.loads(_read_cache_entry(path))
            if valid(value):
                return value
        except (OSError, ValueError):
            pass
    value = compute()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}-{id(value)}")
            tmp.write_text(json.dumps(value))
            tmp.replace(path)
        except (OSError, TypeError, ValueError):
            pass
    return value


def transformers_model_types() -> tuple[set[str], str]:
    """(the model_type names the installed transformers has built in, its version), cached per version.

    Importing transformers costs about a second; ``inspect`` and a warm
    export only need this list, so it is kept beside the model expectations.
    """
    version = transformers_version() or "unknown"

    def ask() -> list[str]:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return sorted(CONFIG_MAPPING_NAMES)

    names = cached_json(cache_root() / "model-types" / f"transformers-{version}.json", ask,
                        lambda v: isinstance(v, list))
    return set(names), version
