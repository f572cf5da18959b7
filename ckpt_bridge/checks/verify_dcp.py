"""``verify DCP --against HF_DIR``: will the trainer's model-only load take this
checkpoint, and does it hold the HF model's values?

Three questions, answered in this order:

1. **Keys.**  Which keys does the loader request (``--layout-for installed``
   asks the installed torchtitan; ``nested`` / ``flat`` name an older/newer
   one), and how many of them does the checkpoint have with the right shape?
   DCP raises on the first missing key (``CheckpointException``, a
   ``BaseException``) and ignores everything unrequested, so "0 of 123 would
   load" is the real answer to "why did my run start at loss 5".
2. **Values.**  Every HF tensor against the DCP tensor at the same model fqn
   (under the checkpoint's own layout, so a wrong layout still gets its values
   checked), exactly after casting the HF side to the DCP dtype (``to-dcp
   --dtype`` is an asked-for cast; fp32 <- bf16 is lossless).  Aux modules,
   which HF does not have, are checked against the sha256 the to-dcp manifest
   recorded.
3. **Loss** (``--loss TEXTFILE``).  The HF model (``from_pretrained``) and the
   same class loaded from the DCP through ``dcp.load`` (what torchtitan does),
   followed by ``after_load``, on the same tokens.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..plan.aux_modules import as_specs, attach_aux, parse_aux
from ..compare import bits_equal, diff
from ..models.config_fit import read_fitting_config
from ..plan.conversions import Conversions
from ..plan.aux_modules import tensor_sha256
from ..plan.trainer_target import plan_dcp
from ..formats.dcp_files import read_manifest
from ..formats.config_files import side_files
from ..errors import BridgeError, CheckpointFormatError, few
from ..formats.dcp import DCPReader, is_dcp_dir
from ..formats.hf import HFReader, is_hf_dir
from ..models.after_load import after_load, load_hf_config
from ..models.hf import from_config, is_language_model, load_pretrained, tie_groups
from ..models.titan import HFStyleLM, adapter_in_manifest
from ..plan.titan_names import unrebuilt_adapter
from ..models.titan import titan_model as build_titan_model
from ..pipeline.execute import execute
from ..plan.core import Plan, compose
from ..plan.hf_target import build_meta_model
from ..plan.planner import canonical_key
from ..plan.state_dict_adapter import from_hf_plan
from ..plan.trainer_keys import NEST, requested_keys
from .loss import text_loss, text_values

LAYOUT_FOR = ("installed", "nested", "flat")


@dataclass
class DCPVerifyResult:
    dcp: str
    hf: str
    checkpoint_layout: str = ""
    layout_for: str = ""
    trainer: str = ""
    loader_layout: str = ""
    requested: int = 0
    satisfied: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    compared: int = 0
    equal: int = 0
    cast_note: str = ""
    value_diffs: list[tuple[str, float]] = field(default_factory=list)
    diff_notes: dict[str, str] = field(default_factory=dict)
    not_in_dcp: list[str] = field(default_factory=list)
    aux: dict[str, bool] = field(default_factory=dict)  # aux module -> values match the manifest hash
    unknown_extra: list[str] = field(default_factory=list)
    loss_hf: float | None = None
    loss_dcp: float | None = None
    loss_atol: float = 1e-5
    loss_tokens: int = 0
    value_diff: float | None = None  # a value model (critic): max |value_hf - value_dcp| over the tokens
    titan_model: str | None = None  # the trainer model is TorchTitan's own (llama3, qwen3, ...)
    hf_named: bool = False  # the checkpoint holds Hugging Face names the titan model does not request

    @property
    def keys_ok(self) -> bool:
        return self.requested > 0 and self.satisfied == self.requested

    @property
    def loss_ok(self) -> bool | None:
        if self.loss_hf is None or self.loss_dcp is None:
            return None
        if self.value_diff is not None:
            return self.value_diff <= self.loss_atol
        return abs(self.loss_hf - self.loss_dcp) <= self.loss_atol

    @property
    def ok(self) -> bool:
        return (self.keys_ok and not self.value_diffs and not self.not_in_dcp and all(self.aux.values())
                and not self.unknown_extra and self.loss_ok is not False)

    def headline(self) -> str:
        s = f"{self.satisfied} of {self.requested} model keys would load"
        if self.keys_ok:
            return s + f" (checkpoint {self.checkpoint_layout}; loader: {self.trainer}, {self.loader_layout})"
        if self.hf_named:
            return (s + f": the checkpoint holds Hugging Face names and TorchTitan's {self.titan_model} requests its "
                    f"own (rewrite it with: ckpt-bridge to-dcp HF_DIR --out NEW --titan-model {self.titan_model})")
        if self.checkpoint_layout in ("nested", "flat") and self.checkpoint_layout != self.loader_layout:
            return (s + f": the checkpoint is {self.checkpoint_layout}, this trainer loads {self.loader_layout} "
                    f"(rewrite it with: ckpt-bridge to-dcp HF_DIR --out NEW --layout {self.loader_layout})")
        return s + f": missing {few(self.missing + self.wrong_shape)}"

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(ok=self.ok, keys_ok=self.keys_ok, loss_ok=self.loss_ok, headline=self.headline())
        return d


def _checkpoint_fqns(r: DCPReader) -> dict[str, str]:
    """model fqn (canonical) -> DCP key, under the checkpoint's own layout."""
    layout = r.layout()
    out = {}
    for k in r.model_keys():
        fqn = k[len(NEST) + 1:] if layout == "nested" and k.startswith(NEST + ".") else k
        out.setdefault(canonical_key(fqn), k)
    return out


def _target_model(hf_dir: Path, manifest: dict | None):
    model = build_meta_model(hf_dir)
    specs = [parse_aux(a["spec"], origin=f"the to-dcp manifest's aux[{i}].spec")
             for i, a in enumerate((manifest or {}).get("aux", [])) if a.get("kind") != "factory" and a.get("spec")]
    if specs:
        attach_aux(model, specs, model.config)
    return model, specs


def _titan_target(hf_dir: Path, manifest: dict | None, titan_model: str | None):
    """(TorchTitan model built for hf_dir, its meta module with the manifest's aux modules, aux specs), or None.

    The trainer model is TorchTitan's own when ``--titan-model`` names it or the
    to-dcp manifest recorded it; its keys and its adapter's ``from_hf`` decide.
    """
    name = titan_model or (manifest or {}).get("titan_model")
    if not name:
        return None

    tm = build_titan_model(name, hf_dir)
    model = tm.build("meta")
    specs = [parse_aux(a["spec"]) for a in (manifest or {}).get("aux", []) if a.get("kind") != "factory" and a.get("spec")]
    if specs:

        attach_aux(model, specs, load_hf_config(hf_dir))
    return tm, model, specs


def verify_dcp(dcp_dir: str | Path, hf_dir: str | Path, *, layout_for: str = "installed",
               loss_text: str | Path | None = None, loss_tokens: int = 2048, loss_atol: float = 1e-5,
               trust_pickle: bool = False, titan_model: str | None = None) -> DCPVerifyResult:
    """``titan_model``: the trainer model is TorchTitan's own (``llama3``, ``qwen3``; default: what the
    to-dcp manifest recorded): its keys are requested and HF values pass through its adapter's ``from_hf``."""
    dcp_dir, hf_dir = Path(dcp_dir), Path(hf_dir)
    if not is_dcp_dir(dcp_dir):
        raise CheckpointFormatError(f"{dcp_dir}: not a DCP folder (no .metadata or .distcp files)")
    if not is_hf_dir(hf_dir) or not (hf_dir / "config.json").is_file():
        raise CheckpointFormatError(f"--against {hf_dir}: not a Hugging Face model dir (config.json + weights)")
    if layout_for not in LAYOUT_FOR:
        raise BridgeError(f"--layout-for {layout_for!r}: choose one of {', '.join(LAYOUT_FOR)}")
    res = DCPVerifyResult(str(dcp_dir), str(hf_dir), layout_for=layout_for, loss_atol=loss_atol)
    r = DCPReader(dcp_dir, trust_pickle=trust_pickle)
    if r.problems():
        raise CheckpointFormatError(r.problems()[0])
    hf = HFReader(hf_dir, trust_pickle=trust_pickle)
    manifest = read_manifest(dcp_dir)
    res.checkpoint_layout = r.layout()
    dcp_info = r.tensors()

    read_fitting_config(hf_dir, hf.tensors())  # before any model is built from it

    # 1. keys the loader requests
    titan = _titan_target(hf_dir, manifest, titan_model)
    names = None  # the TorchTitan model's adapter plan, when the DCP holds its names
    if titan is None:

        if adapter_in_manifest(manifest):  # TorchTitan names, and no family recorded to rebuild the adapter
            raise unrebuilt_adapter(r, hf_dir, manifest)
        model, specs = _target_model(hf_dir, manifest)
    else:
        tm, model, specs = titan
        res.titan_model = tm.name

        hf_names = set(canonical_key(k) for k in hf.tensors())
        names = from_hf_plan(hf, tm.adapter)  # HF values under the titan model's names
    req = requested_keys(model, "auto" if layout_for == "installed" else layout_for)
    res.trainer, res.loader_layout, res.requested = req.trainer, req.layout, len(req.fqn_of)
    for key, want in req.info.items():
        have = dcp_info.get(key)
        if have is None:
            res.missing.append(key)
        elif tuple(have.shape) != tuple(want.shape):
            res.wrong_shape.append(key)
        else:
            res.satisfied += 1
    if titan is not None and res.missing:
        have = set(_checkpoint_fqns(r))
        res.hf_named = len(have & hf_names) > len(have) // 2

    # 2. values, under the checkpoint's own layout: the HF side goes through to-dcp's plan (transformers'
    # load-time conversions: per-expert MoE weights fused, ...), one transform at a time
    in_dcp = _checkpoint_fqns(r)
    aux_names = {s.name for s in specs}
    recorded = {a.get("name") for a in (manifest or {}).get("aux", [])}  # a carried module with no spec: by hash
    flat = requested_keys(model, "flat")
    conv = Conversions(model, "load")
    plan = plan_dcp(names.targets() if names is not None else hf.tensors(), flat,
                    {f for f in flat.fqn_of if f.split(".", 1)[0] in aux_names}, tie_groups(model), where=str(hf_dir),
                    load=lambda: conv, known=conv.meta_sd)
    if names is not None:  # read the HF keys: the adapter's transforms compose with the plan's, as in to-dcp
        plan = compose(names, Plan(transforms=plan.transforms), where=str(hf_dir))
    casts = set()

    def dcp_dtype(info):
        dk = in_dcp.get(canonical_key(info.key))
        d = dcp_info[dk].dtype if dk is not None else info.dtype
        if d != info.dtype:
            casts.add(f"{info.dtype} -> {d}".replace("torch.", ""))
        return d if d.is_floating_point else None

    for t, outs in execute(plan, hf.read, dcp_dtype, ahead=False):
        for fqn, h in outs.items():
            dkey = in_dcp.get(canonical_key(fqn))
            if dkey is None:
                res.not_in_dcp.append(fqn)
                continue
            d = r.read(dkey)
            res.compared += 1
            if bits_equal(h, d):  # the same bits: NaN equals the same NaN, -0.0 differs from 0.0
                res.equal += 1
            elif h.shape != d.shape:
                res.value_diffs.append((fqn, float("inf")))
            else:
                dd = diff(h, d)
                res.value_diffs.append((fqn, dd.max_abs))
                res.diff_notes[fqn] = dd.describe() if dd.nonfinite_mismatch or dd.max_abs else \
                    "equal as numbers but the bits differ (-0.0 vs 0.0, or another NaN payload)"
    if casts:
        res.cast_note = f"HF side cast {', '.join(sorted(casts))} before comparing (the dtype to-dcp wrote)"
    hf_info = {canonical_key(k) for k in plan.targets()}
    for rec in (manifest or {}).get("aux", []):
        keys = sorted(rec.get("keys", {}))
        if all(k in in_dcp for k in keys):
            res.aux[rec["name"]] = tensor_sha256([r.read(in_dcp[k]) for k in keys]) == rec.get("sha256")
        else:
            res.aux[rec["name"]] = False
    res.unknown_extra = sorted(f for f in in_dcp if f not in hf_info
                               and f.split(".", 1)[0] not in aux_names | recorded and not f.endswith("inv_freq"))

    # 3. loss on the same tokens
    if loss_text is not None:
        res.loss_hf, res.loss_dcp, res.loss_tokens, res.value_diff = _losses(
            r, hf_dir, specs, Path(loss_text), loss_tokens, titan[0] if titan is not None else None)
    return res


def _measure(model, tok, text: str, max_tokens: int) -> tuple[float, torch.Tensor | None]:
    """A language model's next-token loss; a critic's mean value and its per-token values."""

    if is_language_model(model):
        return text_loss(model, tok, text, max_tokens=max_tokens), None
    values = text_values(model, tok, text, max_tokens=max_tokens)
    return float(values.mean()), values


def _no_tokenizer(hf_dir: Path, names: list[str]) -> BridgeError:
    return BridgeError(f"--loss needs the model's tokenizer and {hf_dir} has none ({', '.join(names)}): copy the "
                       f"tokenizer files of the model it came from (tokenizer.json, tokenizer_config.json, ...) into "
                       f"it")


def _loss_tokenizer(hf_dir: Path) -> Any:
    """The tokenizer of ``hf_dir``; a one-line error when it has none (transformers 5 then builds an empty one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # noqa: BLE001 - no tokenizer in the dir, or a broken one
        if (hf_dir / "tokenizer.json").is_file():
            # tokenizer_config.json of the other major (5.x names "TokenizersBackend", unknown to 4.x): the
            # token ids come from tokenizer.json alone, which both read the same
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
        if not side_files(hf_dir):
            raise _no_tokenizer(hf_dir, ["no tokenizer or vocabulary file"]) from None
        raise BridgeError(f"--loss: cannot load the tokenizer in {hf_dir} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    # The files the tokenizer class reads its vocabulary from (its own vocab_files_names): with none of them
    # present, from_pretrained made a tokenizer without a vocabulary, which gives no tokens at all.
    names = sorted(set(getattr(tok, "vocab_files_names", {}).values()))
    if names and not any((hf_dir / n).is_file() for n in names):
        raise _no_tokenizer(hf_dir, [f"no {' / '.join(names)}"])
    return tok


def _losses(r: DCPReader, hf_dir: Path, specs, text_file: Path, max_tokens: int, titan: Any = None
            ) -> tuple[float, float, int, float | None]:
    """(HF side, checkpoint side, tokens, max |value diff| for a value model else None).

    ``titan``: the trainer model is TorchTitan's own (built meta -> to_empty as its trainer does)."""
    import torch.distributed.checkpoint as dcp

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BridgeError(f"--loss {text_file}: cannot read it as UTF-8 text ({e})") from None
    tok = _loss_tokenizer(hf_dir)
    n_text = len(tok(text, add_special_tokens=False)["input_ids"])
    if n_text < 2:
        raise BridgeError(f"--loss {text_file}: the tokenizer in {hf_dir} makes {n_text} token(s) of it; a "
                          f"next-token loss needs at least 2: give a longer text")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # Both sides are the class config.json names (causal LM, VLM on text tokens, token classification).
    hf_model = load_pretrained(hf_dir)
    loss_hf, values_hf = _measure(hf_model, tok, text, max_tokens)
    n_tokens = min(len(tok(text)["input_ids"]), max_tokens)
    del hf_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The checkpoint side: the same class from the config, filled by dcp.load under the checkpoint's
        # own layout (what the trainer does), then after_load.
        if titan is None:
            model = from_config(load_hf_config(hf_dir))
        else:  # TorchTitan's own model, as its trainer builds it (meta -> to_empty), loaded the same way
            model = titan.build("meta").to_empty(device="cpu")
        if specs:
            attach_aux(model, as_specs(specs), load_hf_config(hf_dir))
        sd = model.state_dict()
        fqns = _checkpoint_fqns(r)
        have = {fqns[canonical_key(k)]: v for k, v in sd.items() if canonical_key(k) in fqns}
        state = {NEST: {k[len(NEST) + 1:]: v for k, v in have.items()}} if r.layout() == "nested" else have
        # r's storage reader: the .metadata already read by the restricted unpickler, never pickle.load
        dcp.load(state, storage_reader=r.storage_reader(), no_dist=True)
        if titan is not None:  # state_dict() split the fused qkv into copies: load them back (torchtitan does)
            model.load_state_dict({k: v for k, v in sd.items()}, strict=False)
        after_load(model, hf_dir)
        if titan is not None:

            model = HFStyleLM(model, load_hf_config(hf_dir))
        loss_dcp, values_dcp = _measure(model.eval(), tok, text, max_tokens)
    value_diff = None if values_hf is None else float((values_hf - values_dcp).abs().max())
    return loss_hf, loss_dcp, n_tokens, value_diff


def format_dcp_result(res: DCPVerifyResult) -> str:
    model = f"TorchTitan {res.titan_model}, " if res.titan_model else ""
    lines = [f"verify {res.dcp}  against  {res.hf}   ({model}loader: {res.trainer}, --layout-for {res.layout_for})"]
    lines.append(f"  keys: {res.headline()}")
    if res.wrong_shape:
        lines.append(f"  wrong shape: {few(res.wrong_shape)}")
    lines.append(f"  values: compared {res.compared} HF tensors with the checkpoint ({res.checkpoint_layout} layout): "
                 f"{res.equal} equal")
    if res.cast_note:
        lines.append(f"  {res.cast_note}")
    for k, d in res.value_diffs[:8]:
        lines.append(f"  value differs  {k}: " + res.diff_notes.get(k, f"max abs diff {d:.3g}"))
    if res.not_in_dcp:
        lines.append(f"  HF tensors not in the checkpoint ({len(res.not_in_dcp)}): {few(res.not_in_dcp)}")
    for name, ok in res.aux.items():
        lines.append(f"  aux {name}: {'matches the manifest' if ok else 'DIFFERS from the manifest (or missing)'}")
    if res.unknown_extra:
        lines.append(f"  checkpoint keys neither in HF nor a manifest aux module: {few(res.unknown_extra)}")
    if res.value_diff is not None:
        lines.append(f"  values (value head) on {res.loss_tokens} tokens: mean HF {res.loss_hf:.6f}  checkpoint "
                     f"{res.loss_dcp:.6f}  max |diff| {res.value_diff:.2e} ({'ok' if res.loss_ok else 'DIFFERENT'}, "
                     f"atol {res.loss_atol:g})")
    elif res.loss_hf is not None:
        lines.append(f"  loss on {res.loss_tokens} tokens: HF {res.loss_hf:.6f}  checkpoint {res.loss_dcp:.6f}  "
                     f"|diff| {abs(res.loss_hf - res.loss_dcp):.2e} ({'ok' if res.loss_ok else 'DIFFERENT'}, "
                     f"atol {res.loss_atol:g})")
    lines.append("  result: " + ("OK" if res.ok else "PROBLEMS"))
    return "\n".join(lines)
