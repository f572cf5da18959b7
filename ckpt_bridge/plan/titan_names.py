"""TorchTitan-native weights named as Hugging Face's: the plan of a TorchTitan model's own adapter (``to_hf``),
composed before an HF export's plan, and which ``--titan-model`` maps a source's keys when none was given.

The model definitions themselves are :mod:`ckpt_bridge.models.titan`; this is the planning built on them
(``to_hf_plan``, ``plan_hf_export``), so models/ imports nothing of plan/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..formats.config_files import config_dir
from ..models.config_fit import read_fitting_config
from ..models.config_parity import load_hf_config
from ..models.titan import KINDS, TitanModelError, adapter_in_manifest, recorded_titan_model, titan_model
from .hf_target import plan_hf_export
from .state_dict_adapter import to_hf_plan


def working_titan_model(reader: Any, cfg_dir: str | Path | None) -> str | None:
    """The ``--titan-model`` whose adapter maps ``reader``'s keys onto the HF class, if one does (for errors)."""
    if cfg_dir is None:
        return None

    try:
        hf = load_hf_config(cfg_dir)
    except Exception:  # noqa: BLE001 - the caller reports the config itself
        return None
    for name, kind in KINDS.items():
        if hf.model_type not in kind.hf_model_types:
            continue
        try:
            names = to_hf_plan(reader, titan_model(name, cfg_dir).adapter)
            plan_hf_export(names.targets(), Path(cfg_dir), where=str(reader.path))
        except Exception:  # noqa: BLE001 - this family's adapter does not fit these keys
            continue
        return name
    return None


def unrebuilt_adapter(reader: Any, cfg_dir: Path, m: dict) -> TitanModelError:
    """The manifest names an adapter that ckpt-bridge cannot rebuild by itself: what to pass instead."""
    rec = m.get("titan_adapter") if isinstance(m.get("titan_adapter"), dict) else {}
    named = [x.group(1) for n in m.get("notes", []) if isinstance(n, str)
             for x in [re.search(r"(\w+StateDictAdapter)\.from_hf", n)] if x]
    what = rec.get("class") or (named[0] if named else "a TorchTitan StateDictAdapter")
    name = working_titan_model(reader, cfg_dir)
    how = (f"pass --titan-model {name}" if name else
           f"none of --titan-model {', '.join(KINDS)} maps its keys: convert it from Python with that model's "
           f"own adapter (its to_hf)")
    return TitanModelError(f"{reader.path}: written through {what} (model=/sd_adapter=), which the manifest does "
                           f"not name a --titan-model for; {how}")


def native_titan_model(reader: Any, cfg_dir: Path | None) -> str:
    """The TorchTitan family whose ``StateDictAdapter`` names ``reader``'s native keys: of the families built
    from the config's ``model_type`` (``KINDS``), the one whose ``to_hf`` maps every key onto the HF class."""
    reader.check()  # a damaged save is its own one-line error, not "no family maps these keys"
    if cfg_dir is None:
        raise TitanModelError(f"{reader.path}: holds a TorchTitan model's own weights ({reader.format}) and no Hugging "
                              f"Face config; pass --config HF_DIR (the model the run started from)")
    name = working_titan_model(reader, cfg_dir)
    if name is None:
        raise TitanModelError(f"{reader.path}: holds TorchTitan-native keys, but the adapter of none of "
                              f"{', '.join(KINDS)} maps them onto the model of {Path(cfg_dir) / 'config.json'}; "
                              f"pass the config the run started from, or --titan-model NAME")
    return name


def hf_names(reader: Any, config: str | Path | None, titan_model_name: str | None) -> Any:
    """The plan naming ``reader``'s tensors as Hugging Face's when it holds a TorchTitan model's own names
    (to be composed with the HF export's plan), else None.

    The model is ``titan_model_name`` or the one the to-dcp manifest recorded;
    its config is built from the HF config (``config``, or the manifest's
    source dir), and its adapter's ``to_hf`` is applied as plan transforms.
    """
    name = titan_model_name or recorded_titan_model(reader)
    if name is None:
        m = reader.manifest()
        if adapter_in_manifest(m):
            cfg_dir, _ = config_dir(reader, config)
            raise unrebuilt_adapter(reader, cfg_dir, m)
        if getattr(reader, "key_names", "hf") != "titan":
            return None
    cfg_dir, _ = config_dir(reader, config)
    if name is None:  # the reader's format holds TorchTitan-native keys (verl's TorchTitan engine, ...)
        name = native_titan_model(reader, cfg_dir)
    if cfg_dir is None:
        raise TitanModelError(f"{reader.path}: holds TorchTitan {name} weights; pass --config HF_DIR (the Hugging "
                              f"Face config they follow) so its adapter can name them")

    read_fitting_config(cfg_dir, reader.tensors())  # before the config is parsed and the model built
    return to_hf_plan(reader, titan_model(name, cfg_dir).adapter)
