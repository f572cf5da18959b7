"""Which DCP keys a trainer's model-only load will request.

The answer moved in torchtitan's history: ``{"model": state_dict}`` ->
``model.<fqn>`` (nested) up to commit e320a37, flat ``<fqn>`` from cddd7dc on,
and the version string does not follow (e320a37 already says 0.1.0).  So
``auto`` asks the installed trainer, of whatever era (see ``titan_eras``): its
own ``CheckpointManager`` built around the target model (meta tensors are
fine: nothing is read or allocated) hands over the states its model-only load
would request, flattened here the way DCP flattens them; when it does not
import, its source says nested or flat.  A forced ``nested`` / ``flat`` layout
is for a trainer that is not installed here (an older flame pin on the cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import BridgeError
from ..formats.base import TensorInfo
from ..models.titan_eras import WHO_LOADS, TitanEra, installed_era

LAYOUTS = ("auto", "nested", "flat")
NEST = "model"  # the top-level state name torchtitan has always used for the model


@dataclass
class RequestedKeys:
    """The keys a model-only load requests: DCP key -> model fqn and (shape, dtype)."""

    layout: str  # "flat" | "nested"
    fqn_of: dict[str, str]  # DCP key -> the trainer model's own state-dict name
    info: dict[str, TensorInfo]  # DCP key -> global shape, the trainer tensor's dtype
    trainer: str  # "torchtitan 0.3.0", or "a nested loader (forced)"
    reason: str
    era: TitanEra | None = None  # the installed trainer, when --layout auto asked it

    def as_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "trainer": self.trainer, "reason": self.reason, "keys": len(self.fqn_of)}


def _parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _state_dict(parts: list[nn.Module]) -> dict[str, Any]:
    return {k: v for m in parts for k, v in m.state_dict().items()}


def _flatten(states: dict[str, Any]) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """DCP's flattening: Stateful values become their state_dict(), nested dicts join with dots."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    plain = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in states.items()}
    flat, mapping = flatten_state_dict(plain)
    return {k: (v, tuple(mapping.get(k, (k,)))) for k, v in flat.items()}


def requested_keys(model: nn.Module | list[nn.Module], layout: str = "auto") -> RequestedKeys:
    """The DCP keys (with the trainer model's fqn, shape and dtype) a model-only load of ``model`` requests.

    ``layout``: ``auto``/``installed`` asks the installed torchtitan's CheckpointManager;
    ``nested``/``flat`` force the layout of an older/newer trainer.
    """
    parts = _parts(model)
    if layout in ("auto", "installed"):
        era = installed_era(parts)
        kind = era.layout
        if era.states is not None:  # asked: the keys are exactly what its _states_to_load handed DCP
            flat = _flatten(era.states)
            fqn_of = {k: (".".join(path[1:]) if kind == "nested" else k) for k, (_, path) in flat.items()}
            values = {k: v for k, (v, _) in flat.items()}
        else:  # read from source: the layout is known, the keys are the model's own state dict
            sd = _state_dict(parts)
            fqn_of = {(f"{NEST}.{k}" if kind == "nested" else k): k for k in sd}
            values = {dk: sd[fqn] for dk, fqn in fqn_of.items()}
        trainer = era.name
        reason = f"the installed {era.describe()}: {len(fqn_of)} {kind} keys"
    elif layout in ("nested", "flat"):
        sd = _state_dict(parts)
        kind = layout
        fqn_of = {(f"{NEST}.{k}" if layout == "nested" else k): k for k in sd}
        values = {dk: sd[fqn] for dk, fqn in fqn_of.items()}
        trainer = f"a {layout} loader (forced)"
        era = None
        reason = f"--layout {layout} ({WHO_LOADS[layout]})"
    else:
        raise BridgeError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    info = {}
    for k, v in values.items():
        if not hasattr(v, "shape"):
            raise BridgeError(f"the trainer requests a non-tensor model entry {k!r} ({type(v).__name__}); "
                              f"ckpt-bridge writes tensors only")
        info[k] = TensorInfo(k, tuple(v.shape), v.dtype)
    return RequestedKeys(kind, fqn_of, info, trainer, reason, era)
