"""Auxiliary modules: heads a trainer adds next to the Hugging Face model
(``future_encoder``, ``future_predictor``, ``action_layer``, ...).

A bootstrap checkpoint must already hold them, or the trainer's load fails on
the missing keys (DCP raises) or, worse, someone drops them from the request
and they silently start from whatever memory ``to_empty()`` left.  Each spec
builds one ``nn.Module`` that lives under its own top-level prefix of the
model (``future_predictor.weight``), with shapes from the HF config:

- ``linear``: ``Linear(hidden_size, out)``
- ``mlp``: ``Linear(hidden_size, intermediate_size) -> GELU -> Linear(intermediate_size, out)``
  (keys ``NAME.up.*`` and ``NAME.down.*``)
- a factory ``Callable[[config], nn.Module]`` from Python, for anything else.

``out`` is ``hidden`` (default), ``vocab`` or a number.  Fresh weights are
deterministic: every module gets its own generator seeded from (seed, name),
so adding a head does not change the others.  Trainer code builds the same
structure with :func:`attach_aux` (on the meta device for a meta build).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import BridgeError, KeyPlanError
from ..formats.base import Reader
from .conversions import Conversions
from .hf_target import expected_model, hf_conversions, value_head
from .planner import canonical_key, canonicalize

KINDS = ("linear", "mlp")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class AuxMLP(nn.Module):
    """The ``mlp`` head: up-projection, GELU, down-projection."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


@dataclass
class AuxSpec:
    name: str
    kind: str = "linear"  # linear | mlp | factory
    out: str | int = "hidden"
    factory: Callable[[Any], nn.Module] | None = field(default=None, repr=False)
    origin: str = field(default="--aux", repr=False, compare=False)  # where the spec came from, for errors

    def describe(self) -> str:
        if self.factory is not None:
            return f"{self.name} (factory {getattr(self.factory, '__qualname__', repr(self.factory))})"
        return f"{self.name}:{self.kind}:{self.out}"


def parse_aux(text: str, origin: str = "--aux") -> AuxSpec:
    """``NAME[:linear|mlp][:OUT]`` with OUT ``hidden``, ``vocab`` or an integer; ``origin`` names where the
    text came from (``--aux``, or a manifest's field) in errors."""
    parts = text.split(":")
    name = parts[0]
    kind = parts[1] if len(parts) > 1 and parts[1] else "linear"
    out: str | int = parts[2] if len(parts) > 2 and parts[2] else "hidden"
    if len(parts) > 3 or not _NAME.match(name) or kind not in KINDS:
        raise BridgeError(
            f"{origin} {text!r}: expected NAME[:{'|'.join(KINDS)}][:hidden|vocab|N] with NAME a Python identifier, "
            f"e.g. --aux future_predictor:mlp or --aux action_layer:linear:16"
        )
    if isinstance(out, str) and out not in ("hidden", "vocab"):
        if not out.isdigit() or int(out) < 1:
            raise BridgeError(f"{origin} {text!r}: output size {out!r} is not hidden, vocab or a positive integer")
        out = int(out)
    return AuxSpec(name, kind, out, origin=origin)


def as_specs(aux: Any) -> list[AuxSpec]:
    """Accept strings, AuxSpec objects, or a {name: factory} mapping (the Python API)."""
    if not aux:
        return []
    if isinstance(aux, dict):
        return [AuxSpec(name, "factory", factory=fn) if callable(fn) else parse_aux(f"{name}:{fn}")
                for name, fn in aux.items()]
    specs = [a if isinstance(a, AuxSpec) else parse_aux(str(a)) for a in aux]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BridgeError(f"--aux {dup[0]!r} given twice")
    return specs


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


# Every config field a ``linear`` / ``mlp`` aux module reads (through _cfg): these, as a dict, build and init
# the same module as the whole HF config does (a factory gets the real config).
AUX_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "initializer_range")


def aux_config(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that ``linear`` / ``mlp`` aux modules are built from (absent ones left out,
    so _cfg's defaults apply as they do to the config itself)."""
    missing = object()
    return {n: v for n in AUX_CONFIG_FIELDS if (v := _cfg(config, n, missing)) is not missing}


def out_features(spec: AuxSpec, config: Any) -> int:
    """The head's output size.  An explicit N is bounded by the model's own largest dimension, checked
    before anything is allocated: a spec from a checkpoint's manifest is input like any other, and
    ``action_layer:linear:99999999999`` would otherwise ask for terabytes."""
    if spec.out == "hidden":
        return int(_cfg(config, "hidden_size"))
    if spec.out == "vocab":
        return int(_cfg(config, "vocab_size"))
    dims = {n: _cfg(config, n) for n in ("hidden_size", "intermediate_size", "vocab_size")}
    limit = max((v for v in dims.values() if isinstance(v, int)), default=0)
    if int(spec.out) > limit:
        raise BridgeError(f"{spec.origin} {spec.describe()!r}: output size {int(spec.out):,} exceeds the model's "
                          f"largest dimension ({limit:,}: the max of hidden_size, intermediate_size, vocab_size "
                          f"in its config); give a size up to that (hand-edited or corrupt spec?)")
    return int(spec.out)


def derived_seed(seed: int, name: str) -> int:
    """A per-module seed: stable across runs and Python versions (not ``hash()``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def build_aux(spec: AuxSpec, config: Any) -> nn.Module:
    """The module for ``spec``, on the current default device (meta inside ``torch.device("meta")``)."""
    if spec.factory is not None:
        module = spec.factory(config)
        if not isinstance(module, nn.Module):
            raise BridgeError(f"aux factory for {spec.name!r} returned {type(module).__name__}, not an nn.Module")
        return module
    hidden = int(_cfg(config, "hidden_size"))
    out = out_features(spec, config)
    if spec.kind == "mlp":
        return AuxMLP(hidden, int(_cfg(config, "intermediate_size", 4 * hidden)), out)
    return nn.Linear(hidden, out)


@torch.no_grad()
def init_aux(spec: AuxSpec, config: Any, seed: int) -> tuple[nn.Module, str]:
    """A freshly initialised module on CPU, and a one-line description of the init.

    ``linear`` / ``mlp`` weights ~ N(0, initializer_range) like the HF model's own
    linears, biases zero.  A factory's module keeps its own init, run under a
    forked RNG seeded from (seed, name) so it is deterministic too.
    """
    s = derived_seed(seed, spec.name)
    std = float(_cfg(config, "initializer_range", 0.02) or 0.02)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        with torch.device("cpu"):
            module = build_aux(spec, config)
    if spec.factory is not None:
        return module, f"factory's own init under torch.manual_seed({s})"
    g = torch.Generator().manual_seed(s)
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return module, f"weights normal(0, {std}), biases 0, generator seed {s}"


def attach_aux(model: nn.Module, aux: Any, config: Any = None) -> nn.Module:
    """Add the aux modules to ``model`` as top-level children, on ``model``'s device.

    Trainer code calls this on its (meta-built) model so the keys it requests
    match the bootstrap checkpoint ``to_dcp(..., aux=...)`` wrote.
    """
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise BridgeError("attach_aux: the model has no .config; pass config= (the HF config)")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    for spec in as_specs(aux):
        if hasattr(model, spec.name):
            raise BridgeError(f"attach_aux: the model already has an attribute {spec.name!r}; pick another aux name")
        with torch.device(device):
            model.add_module(spec.name, build_aux(spec, config))
    return model


def tensor_sha256(tensors: list[torch.Tensor]) -> str:
    """The hash an aux module's tensors are recorded under in the to-dcp manifest (checked by verify-dcp)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


AUX_MODES = ("separate", "drop", "inline")


def _loaded_tops(infos: dict, tops: set[str], load: Conversions, exp) -> set[str]:
    """The prefixes among ``tops`` with a key that transformers' load-time rules turn into one of the model's."""
    out = set()
    for k in infos:
        top = k.split(".", 1)[0]
        if top in tops and top not in out:
            name, pattern = load.rename(canonical_key(k))
            if pattern is not None or name in exp.shapes:
                out.add(top)
    return out


def split_aux(infos: dict, reader: Reader, cfg_dir: Path, names: list[str] | None, where: str
              ) -> tuple[dict, dict[str, list[str]]]:
    """(main tensors, {aux module: keys}).

    Aux modules are the prefixes a to-dcp manifest names, the ones passed in
    ``names``, and any top-level prefix the HF model class does not have
    (``future_predictor.weight`` next to ``model.*`` / ``lm_head.*``): they
    would make ``from_pretrained`` warn about unexpected keys, or fail.  A prefix
    transformers' load-time rules map into the model (a base model's ``layers.*``,
    saved without the ``model.`` prefix) is the model's.
    """
    wanted = set(names or [])
    manifest = reader.manifest()
    wanted |= {a["name"] for a in (manifest or {}).get("aux", [])}
    tops = {k.split(".", 1)[0] for k in infos}
    if tops - wanted - {"model", "lm_head"}:  # only then is the model class needed to decide
        overrides = value_head(canonicalize(infos, where), cfg_dir)
        exp = expected_model(cfg_dir, overrides)
        known = {k.split(".", 1)[0] for k in [*exp.shapes, *exp.disk_shapes]}  # in-memory and on-disk names
        if tops - wanted - known:
            known |= _loaded_tops(infos, tops - wanted - known, hf_conversions(cfg_dir, overrides, "load"), exp)
        wanted |= tops - known
    aux: dict[str, list[str]] = {}
    main = {}
    for k, info in infos.items():
        top = k.split(".", 1)[0]
        if top in wanted:
            aux.setdefault(top, []).append(k)
        else:
            main[k] = info
    missing = sorted(n for n in (names or []) if n not in aux)
    if missing:
        raise KeyPlanError(f"{where}: --aux-prefix {missing[0]!r}: no keys start with {missing[0] + '.'!r}")
    return main, aux
