"""Which DCP keys a trainer's model-only load will request.

The answer moved twice in torchtitan's history (see DESIGN.md): ``{"model":
state_dict}`` -> ``model.<fqn>`` (nested) up to 2025-06-12, flat ``<fqn>`` from
commit cddd7dc / 0.1.0 on.  Rather than keep a table of versions, ``auto``
asks the installed trainer: we build its own ``CheckpointManager`` around the
target model (meta tensors are fine: nothing is read or allocated) and take
``_states_to_load(model_only=True)``, flattened the way DCP flattens it.  A
forced ``nested`` / ``flat`` layout is for a trainer that is not installed
here (an older flame pin on the cluster).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import BridgeError
from .formats.base import TensorInfo

LAYOUTS = ("auto", "nested", "flat")
NEST = "model"  # the top-level state name torchtitan has always used for the model
TESTED_TORCHTITAN = ("0.3.0",)

WHO_LOADS = {
    "nested": "nested: torchtitan before 2025-06-13 (flame pins up to 5e2033c) loads {'model': ...}, keys model.<fqn>",
    "flat": "flat: torchtitan >= 0.1.0 (commit cddd7dc, flame 0b44d4c) loads <fqn>",
}
LAYOUT_HELP = "; ".join(WHO_LOADS.values())


@dataclass
class RequestedKeys:
    """The keys a model-only load requests: DCP key -> model fqn and (shape, dtype)."""

    layout: str  # "flat" | "nested"
    fqn_of: dict[str, str]  # DCP key -> the trainer model's own state-dict name
    info: dict[str, TensorInfo]  # DCP key -> global shape, the trainer tensor's dtype
    trainer: str  # "torchtitan 0.3.0", or "a nested loader (forced)"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "trainer": self.trainer, "reason": self.reason, "keys": len(self.fqn_of)}


def _parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _state_dict(parts: list[nn.Module]) -> dict[str, Any]:
    return {k: v for m in parts for k, v in m.state_dict().items()}


def torchtitan_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        return None


def _flatten(states: dict[str, Any]) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """DCP's flattening: Stateful values become their state_dict(), nested dicts join with dots."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    plain = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in states.items()}
    flat, mapping = flatten_state_dict(plain)
    return {k: (v, tuple(mapping.get(k, (k,)))) for k, v in flat.items()}


def _ask_torchtitan(parts: list[nn.Module]) -> tuple[dict[str, tuple[Any, tuple[str, ...]]], str]:
    version = torchtitan_version()
    if version is None:
        raise BridgeError(f"--layout auto asks the installed torchtitan, and none is installed here; "
                          f"pass --layout nested or --layout flat ({LAYOUT_HELP})")
    # torchtitan logs "Checkpointing active..." at INFO; this is not a training run.
    logging.getLogger("torchtitan").setLevel(logging.WARNING)
    try:
        from torchtitan.components.checkpoint import CheckpointManager

        with tempfile.TemporaryDirectory(prefix="ckpt-bridge-ask-") as tmp:
            config = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                              initial_load_model_only=False)
            mgr = CheckpointManager(config, dataloader=None, model_parts=parts, optimizers=None,
                                    lr_schedulers=None, states={}, sd_adapter=None, base_folder=tmp)
            states = mgr._states_to_load(model_only=True)
            flat = _flatten(states)
    except BridgeError:
        raise
    except Exception as e:  # noqa: BLE001 - an API we do not know: say so and offer the manual switch
        raise BridgeError(
            f"torchtitan {version}: could not ask its CheckpointManager which keys a model-only load requests "
            f"({type(e).__name__}: {e}); tested with torchtitan {', '.join(TESTED_TORCHTITAN)}. "
            f"Pass --layout nested or --layout flat ({LAYOUT_HELP})"
        ) from None
    return flat, version


def requested_keys(model: nn.Module | list[nn.Module], layout: str = "auto") -> RequestedKeys:
    """The DCP keys (with the trainer model's fqn, shape and dtype) a model-only load of ``model`` requests.

    ``layout``: ``auto``/``installed`` asks the installed torchtitan's CheckpointManager;
    ``nested``/``flat`` force the layout of an older/newer trainer.
    """
    parts = _parts(model)
    if layout in ("auto", "installed"):
        flat, version = _ask_torchtitan(parts)
        nested = any(len(path) > 1 and path[0] == NEST for _, path in flat.values())
        kind = "nested" if nested else "flat"
        fqn_of = {k: (".".join(path[1:]) if nested else k) for k, (_, path) in flat.items()}
        values = {k: v for k, (v, _) in flat.items()}
        trainer = f"torchtitan {version}"
        reason = (f"the installed torchtitan {version}'s CheckpointManager._states_to_load(model_only=True) "
                  f"requests {len(fqn_of)} {kind} keys")
    elif layout in ("nested", "flat"):
        sd = _state_dict(parts)
        kind = layout
        fqn_of = {(f"{NEST}.{k}" if layout == "nested" else k): k for k in sd}
        values = {dk: sd[fqn] for dk, fqn in fqn_of.items()}
        trainer = f"a {layout} loader (forced)"
        reason = f"--layout {layout} ({WHO_LOADS[layout]})"
    else:
        raise BridgeError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    info = {}
    for k, v in values.items():
        if not hasattr(v, "shape"):
            raise BridgeError(f"the trainer requests a non-tensor model entry {k!r} ({type(v).__name__}); "
                              f"ckpt-bridge writes tensors only")
        info[k] = TensorInfo(k, tuple(v.shape), v.dtype)
    return RequestedKeys(kind, fqn_of, info, trainer, reason)
