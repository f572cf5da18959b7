"""Reading the JSON files of a checkpoint, with their structure checked in one place.

Every JSON file we act on (``config.json``, ``model.safetensors.index.json``,
``fsdp_config.json``, the to-dcp manifest) comes from the checkpoint, so valid
JSON of the wrong shape (a list where an object belongs, a number where a file
name belongs) must be a one-line error naming the file and the field, not a
``TypeError`` three calls later.  A shape maps a dotted field path to a check
and what the field should be; ``[]`` in a path means "every element of this
list".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointFormatError

Check = tuple[Callable[[Any], bool], str]


def is_(*types: type) -> Check:
    names = " or ".join({"str": "a string", "int": "an integer", "dict": "an object", "list": "a list",
                         "float": "a number", "bool": "true/false", "NoneType": "null"}.get(t.__name__, t.__name__) for t in types)
    return (lambda v: isinstance(v, types) and not (bool not in types and isinstance(v, bool)), names)


def map_of(key: type, value: type) -> Check:
    return (lambda v: isinstance(v, dict) and all(isinstance(k, key) and isinstance(x, value) for k, x in v.items()),
            f"an object of {key.__name__} -> {value.__name__}")


def list_of(item: type) -> Check:
    return (lambda v: isinstance(v, list) and all(isinstance(x, item) for x in v), f"a list of {item.__name__}")


def _values(doc: Any, path: list[str], where: str) -> list[tuple[str, Any]]:
    """(dotted name, value) of every present value at ``path`` (missing fields are skipped)."""
    if not path:
        return [(where, doc)]
    head, rest = path[0], path[1:]
    if head == "[]":
        if not isinstance(doc, list):
            return [(where, _NOT_A_LIST)]
        return [v for i, x in enumerate(doc) for v in _values(x, rest, f"{where}[{i}]")]
    if not isinstance(doc, dict) or head not in doc:
        return []
    return _values(doc[head], rest, f"{where}.{head}" if where else head)


_NOT_A_LIST = object()


def check_shape(doc: Any, shape: dict[str, Check], path: Path, required: tuple[str, ...] = ()) -> Any:
    """Raise :class:`CheckpointFormatError` naming ``path`` and the field if ``doc`` does not fit ``shape``."""
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{path}: holds a JSON {type(doc).__name__}, not an object; restore the file "
                                    f"from its source")
    for name in required:
        if name not in doc:
            raise CheckpointFormatError(f"{path}: has no field {name!r}; restore the file from its source")
    for dotted, (ok, what) in shape.items():
        for name, value in _values(doc, dotted.split("."), ""):
            if value is _NOT_A_LIST or not ok(value):
                raise CheckpointFormatError(f"{path}: field {name!r} should be {what}, got {_short(value)}; "
                                            f"restore the file from its source")
    return doc


def _short(value: Any) -> str:
    text = "a list" if value is _NOT_A_LIST else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: str | Path, shape: dict[str, Check] | None = None, required: tuple[str, ...] = ()) -> Any:
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
    return check_shape(doc, shape or {}, path, required)


# The fields each file's readers use.
INDEX = {"weight_map": map_of(str, str), "metadata": is_(dict)}
FSDP_CONFIG = {"world_size": is_(int)}
CONFIG = {"model_type": is_(str), "architectures": list_of(str), "hidden_size": is_(int, type(None)),
          "vocab_size": is_(int, type(None))}
MANIFEST = {"source": is_(dict), "source.path": is_(str), "source.config_dir": is_(str),
            "source.files": is_(list), "hf_config": is_(dict), "layout": is_(dict), "aux": is_(list),
            "aux.[].name": is_(str), "aux.[].spec": is_(str), "aux.[].kind": is_(str),
            "aux.[].keys": map_of(str, list), "aux.[].sha256": is_(str), "dropped": is_(list),
            "hf_config_dir": is_(str)}


def check_config(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.json beyond its JSON shape: a model transformers knows, without the repo's own code."""
    check_shape(cfg, CONFIG, path, required=("model_type",))
    if "auto_map" in cfg:
        raise CheckpointFormatError(
            f"{path}: uses auto_map (model code shipped with the checkpoint); ckpt-bridge never runs a "
            f"checkpoint's code: convert with a transformers release that has {cfg['model_type']!r} built in, "
            f"or remove auto_map if model_type is a built-in transformers model")
    known, version = transformers_model_types()
    if cfg["model_type"] not in known:
        raise CheckpointFormatError(
            f"{path}: model_type {cfg['model_type']!r} is not a model transformers {version} knows; "
            f"install a transformers release that has it, or fix model_type")
    return cfg


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


def cached_json(path: Path | None, compute: Callable[[], Any], valid: Callable[[Any], bool] = lambda v: True) -> Any:
    """The JSON value stored at ``path``, or ``compute()`` stored there for next time.

    A missing, unreadable or not ``valid`` entry is recomputed; a cache that
    cannot be written (read-only home, ``path`` None) only costs the recomputation.
    """
    import json

    if path is not None:
        try:
            value = json.loads(path.read_text())
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
