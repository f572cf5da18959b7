"""After a trainer's checkpoint load: recompute what no checkpoint stores, and
refuse a model whose config is not the one the weights came from.

Non-persistent buffers (rotary ``inv_freq`` / ``original_inv_freq`` and the
like) are never in a state dict, a DCP or a safetensors file.  After the
meta-device build -> ``fully_shard`` -> ``to_empty()`` that flame and
torchtitan use, they hold whatever memory ``to_empty`` handed out, unless
something recomputes them (transformers 4.x and 5.23 ``post_init()`` do not).
The same holds for tensors a module derives at init as plain attributes
(transformers 4.x rotary ``original_inv_freq``: ``to_empty`` leaves it on meta).
Nothing raises: RoPE is simply wrong and the first-step loss is far above the
source model's.  We recompute each one with the model's own code: a fresh
instance of the owning class built from its config with its parameters on the
meta device (cheap), whose constructor computes every buffer exactly as
``from_config`` does on that transformers version; the values are copied over
by module path.  No per-class tables and no calls into rope functions whose
signatures change between versions.  A module with no config anywhere above
it is refused by name (we will not guess a buffer's value).

``to_empty()`` also unties tied weights (a new tensor per module): after it
``lm_head.weight`` and ``embed_tokens.weight`` train apart.  We tie them
again with transformers' own ``tie_weights()`` (the groups come from the fresh
build), and refuse if the two were loaded with different values.

Config parity: a trainer-side config built by hand gives no error, only a
different network (``Olmo2Config`` defaults rope_theta=1e4, rms_norm_eps=1e-5;
the OLMo-2 releases use 5e5 and 1e-6).  We compare the fields that change the
function the weights compute and refuse on any difference.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config_parity import AfterLoadReport, ConfigMismatchError, check_config_parity, load_hf_config  # noqa: F401 - ConfigMismatchError re-exported
from ..errors import BridgeError
from .hf import tie_groups
from .titan import is_titan_model, titan_after_load


def _parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


# ---------------------------------------------------------------- buffers


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters go to the meta device as they are registered; buffers and plain attributes stay real.

    A model built under this costs its buffers only (a few KB), yet every
    buffer and derived attribute is computed by the model's own constructor:
    the same code that runs under ``from_pretrained`` / ``from_config`` on
    every transformers version, whatever the rope functions' signatures.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _tensor_attributes(module: nn.Module) -> list[str]:
    """Plain tensor attributes (neither parameter nor buffer), e.g. transformers 4.x rotary ``original_inv_freq``:
    derived at init, and left on the meta device by ``to_empty``."""
    return sorted(k for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not k.startswith("__"))


def _derived(module: nn.Module) -> list[str]:
    bufs = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
    return sorted(bufs) + _tensor_attributes(module)


class _FreshBuilds:
    """Fresh instances of the model's own classes, built from their configs with parameters on meta.

    For a module with derived state we build its outermost ancestor that has a
    ``config`` (normally the whole ``PreTrainedModel``: one build serves every
    module) and look the module up at the same relative path; an ancestor that
    cannot be rebuilt from its config alone is skipped for the next one down.
    """

    def __init__(self) -> None:
        self._built: dict[int, nn.Module | Exception] = {}

    def _build(self, owner: nn.Module) -> nn.Module | Exception:
        if id(owner) not in self._built:
            try:
                with _parameters_on_meta(), torch.device("cpu"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # a copy: constructors may write into their config (attention implementation, ...)
                    self._built[id(owner)] = type(owner)(copy.deepcopy(owner.config))
            except Exception as e:  # noqa: BLE001 - reported if no other ancestor can stand in
                self._built[id(owner)] = e
        return self._built[id(owner)]

    def twin(self, path: list[tuple[str, nn.Module]]) -> tuple[nn.Module | None, str]:
        """``path``: (name, module) from the model part down to the module.  Its fresh twin, or (None, why)."""
        why = "no config to recompute them from"
        target = path[-1][1]
        for i, (_, owner) in enumerate(path):
            if getattr(owner, "config", None) is None:
                continue
            fresh = self._build(owner)
            if isinstance(fresh, Exception):
                why = f"{type(owner).__name__}({type(owner.config).__name__}) failed: {fresh}"
                continue
            rel = ".".join(n for n, _ in path[i + 1:])
            try:
                twin = fresh.get_submodule(rel) if rel else fresh
            except AttributeError:
                continue
            if type(twin) is type(target):
                return twin, ""
        return None, why


def _module_paths(part: nn.Module):
    """Every module with its (name, module) path from ``part``."""
    stack = [[("", part)]]
    while stack:
        path = stack.pop()
        yield path
        stack.extend(path + [(n, m)] for n, m in reversed(list(path[-1][1].named_children())))


@torch.no_grad()
def _copy_derived(module: nn.Module, twin: nn.Module, names: list[str], where: str) -> list[tuple[str, float]]:
    done = []
    twin_buffers = {id(b): n for n, b in twin.named_buffers(recurse=False)}
    for b in names:
        cur, new = getattr(module, b), getattr(twin, b, None)
        if b not in module._buffers and not isinstance(new, torch.Tensor):
            continue  # a plain attribute the constructor does not set: a runtime cache (rope_deltas), not ours
        if not isinstance(new, torch.Tensor):
            raise BridgeError(f"after_load: {where}.{b} is not set by {type(module).__name__}'s constructor; "
                              f"pass recompute=False and set it yourself")
        if b in module._buffers and cur.device.type != "meta":
            new = new.to(device=cur.device, dtype=cur.dtype)
            if cur.shape != new.shape:
                raise BridgeError(f"after_load: {where}.{b} has shape {tuple(cur.shape)} but its config gives "
                                  f"{tuple(new.shape)}")
            old = cur.detach().double()
            change = float((old - new.double()).abs().nan_to_num(float("inf")).max()) if cur.numel() else 0.0
            cur.copy_(new)
        else:
            # a plain attribute (or a buffer still on meta): the constructor's value, aliasing our buffer where
            # the constructor's aliased its own (4.x: original_inv_freq = inv_freq)
            alias = twin_buffers.get(id(new))
            device = next((t.device for t in module.buffers(recurse=False) if t.device.type != "meta"),
                          torch.device("cpu"))
            value = getattr(module, alias) if alias and alias != b else new.to(device)
            change = float("inf") if cur.device.type == "meta" else float(
                (cur.detach().double().cpu() - value.double().cpu()).abs().max()) if cur.numel() else 0.0
            setattr(module, b, value)
        done.append((f"{where}.{b}" if where else b, change))
    return done


def recompute_buffers(model: nn.Module | list[nn.Module]) -> list[tuple[str, float]]:
    """Recompute every non-persistent buffer and derived tensor attribute in place, with the model's own
    constructor; return (name, max |old - new|) for each."""
    done = []
    for part in _parts(model):
        fresh = _FreshBuilds()
        for path in _module_paths(part):
            module = path[-1][1]
            names = _derived(module)
            if not names:
                continue
            where = ".".join(n for n, _ in path[1:])
            twin, why = fresh.twin(path)
            if twin is None:
                raise BridgeError(f"after_load: {where or type(module).__name__} ({type(module).__name__}) has "
                                  f"non-persistent buffer(s) {', '.join(names)} and {why}; pass recompute=False "
                                  f"and set them yourself")
            done.extend(_copy_derived(module, twin, names, where))
    return done


# ---------------------------------------------------------------- tied weights


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in (a, b)]
    return local[0].shape == local[1].shape and bool(torch.equal(local[0].detach(), local[1].detach()))


@torch.no_grad()
def retie_weights(model: nn.Module | list[nn.Module]) -> list[list[str]]:
    """Tie again what the model's own constructor ties (``to_empty()`` unties it); return the groups re-tied.

    The groups come from a fresh build of the same class (parameters on meta),
    the tying from transformers' own ``tie_weights()``.  Refuses when the tied
    tensors were loaded with different values (tying would silently drop one).
    """
    retied = []
    for part in _parts(model):
        if getattr(part, "config", None) is None or not hasattr(part, "tie_weights"):
            continue
        twin, _ = _FreshBuilds().twin([("", part)])
        want = tie_groups(twin) if twin is not None else []
        params = dict(part.named_parameters(remove_duplicate=False))
        broken = [g for g in want if all(n in params for n in g) and len({id(params[n]) for n in g}) > 1]
        if not broken:
            continue
        for g in broken:
            if not all(_same_values(params[g[0]], params[n]) for n in g[1:]):
                raise BridgeError(f"after_load: {' and '.join(g)} are tied in {type(part).__name__} but were loaded "
                                  f"with different values; the checkpoint does not come from this tied model")
        part.tie_weights()
        params = dict(part.named_parameters(remove_duplicate=False))
        still = [g for g in broken if len({id(params[n]) for n in g}) > 1]
        if still:
            raise BridgeError(f"after_load: {' and '.join(still[0])} should be one tensor and tie_weights() did not "
                              f"tie them; tie them yourself (e.g. lm_head.weight = embed_tokens.weight) before "
                              f"building the optimizer")
        retied.extend(broken)
    return retied


def model_config_of(model: nn.Module | list[nn.Module]) -> Any:
    for part in _parts(model):
        cfg = getattr(part, "config", None)
        if cfg is not None:
            return cfg
    return None


def after_load(model: nn.Module | list[nn.Module], hf_dir: str | Path, *, model_config: Any = None,
               check_config: bool = True, recompute: bool = True, retie: bool = True) -> AfterLoadReport:
    """Call once after the trainer's checkpoint load (every rank), before building the optimizer.

    Refuses (:class:`ConfigMismatchError`, one line) when the model's config
    differs from ``hf_dir``'s on rope_theta, rms_norm_eps, vocab, head_dim,
    tie_word_embeddings or the shape fields; then recomputes every
    non-persistent buffer and derived tensor attribute with the model's own
    constructor, and ties again the weights ``to_empty()`` untied.
    """
    if model_config is None and is_titan_model(model):  # TorchTitan's own model code: its config, its buffers
        return titan_after_load(model, hf_dir, check_config=check_config, recompute=recompute)
    report = AfterLoadReport()
    if check_config:
        cfg = model_config if model_config is not None else model_config_of(model)
        if cfg is None:
            raise BridgeError("after_load: the model has no .config; pass model_config= (its HF-style config)")
        report.checked = check_config_parity(cfg, load_hf_config(hf_dir), where=str(Path(hf_dir) / "config.json"))
    if recompute:
        report.recomputed = recompute_buffers(model)
    if retie:
        report.retied = retie_weights(model)
    return report
