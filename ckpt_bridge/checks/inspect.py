"""``inspect``: what a checkpoint is, why we think so, and what is wrong with it,
all from metadata (no tensor data is read).  The CLI exits 2 when the report
lists any problem, 0 only when there is none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.config_fit import read_fitting_config
from ..formats.detect import detect_format, open_reader
from ..errors import BridgeError
from ..formats.megatron import MegatronReader
from ..formats.verl_fsdp import VerlFSDPReader
from ..plan.megatron import check_save_config
from ..plan.lora import describe as describe_lora
from ..version import untested


def inspect(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """A report dict: format, evidence, tensors/parameters/bytes/dtypes, details, problems."""
    fmt = detect_format(path)
    report: dict[str, Any] = {"path": str(path), "format": fmt}
    with open_reader(path, trust_pickle=trust_pickle) as reader:
        report["resolved_path"] = str(reader.path)
        problems = reader.problems()
        infos = {}
        try:
            if isinstance(reader, VerlFSDPReader):
                infos = reader.rank0_tensors() if 0 in reader.files["model"].get(reader.world_size, {}) else {}
                if not problems:
                    for r in range(1, reader.world_size):  # a refused/corrupt rank file: one problem, not one per key
                        try:
                            reader._sd(r)
                        except BridgeError as e:
                            problems.append(str(e))
                if not problems:
                    for key in infos:  # cross-rank placement checks: metadata only
                        try:
                            reader.layout(key)
                        except BridgeError as e:
                            problems.append(str(e))
                    report["placements"] = reader.placement_summary()
            elif not problems:
                infos = reader.tensors()
        except BridgeError as e:
            problems.append(str(e))
        report["evidence"] = {"files": reader.evidence.files, "notes": reader.evidence.notes}
        report["tensors"] = len(infos)
        report["parameters"] = sum(i.numel for i in infos.values())
        report["bytes"] = sum(i.nbytes for i in infos.values())
        dtypes: dict[str, int] = {}
        for i in infos.values():
            name = str(i.dtype).replace("torch.", "")
            dtypes[name] = dtypes.get(name, 0) + 1
        report["dtypes"] = dtypes
        try:
            report["details"] = reader.describe()
        except BridgeError as e:
            problems.append(str(e))
            report["details"] = {}
        lora = describe_lora(infos, reader.path) if infos else None
        if lora is not None:
            report["lora"] = lora
        cfg = reader.hf_config_dir()
        report["config"] = str(cfg / "config.json") if cfg else None
        if cfg is not None and not problems:
            try:  # what to-hf / to-dcp refuse in a config (auto_map, model_type, sizes vs tensors): the same gate
                read_fitting_config(cfg, reader.model_tensors())
                if isinstance(reader, MegatronReader):  # and its transformer_config.json against config.json
                    check_save_config(reader, cfg)
            except BridgeError as e:
                problems.append(str(e))
        report["problems"] = list(dict.fromkeys(problems))  # each problem once
    # a dependency release CI never ran (pyproject caps none): not a problem of the checkpoint, said beside it
    report["untested"] = untested()
    return report


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.2f} {prefix}{unit}"
        n /= 1000
    return str(n)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['resolved_path']}"]
    # labels padded to one column: "  label  value"
    ev = r["evidence"]
    lines.append(f"  format      {r['format']}   (evidence: {', '.join(ev['files']) or '-'})")
    for note in ev["notes"]:
        lines.append(f"              {note}")
    lines.append(
        f"  tensors     {r['tensors']}   parameters {_size(r['parameters'], '').strip()}   bytes {_size(r['bytes'])}"
    )
    if r["dtypes"]:
        lines.append("  dtypes      " + ", ".join(f"{k}: {v}" for k, v in sorted(r["dtypes"].items())))
    for k, v in (r.get("placements") or {}).items():
        lines.append(f"  layout      {v:>4} x {k}")
    for k, v in (r.get("details") or {}).items():
        lines.append(f"  {k:<17} {v}")
    if r.get("lora"):
        lines.append(f"  lora        {_lora_line(r['lora'])}")
    lines.append(f"  config      {r['config'] or 'none found (to-hf needs --config)'}")
    for name, what in (r.get("untested") or {}).items():
        lines.append(f"  untested    {name} {what}")
    if r["problems"]:
        lines.append(f"  problems    {len(r['problems'])}")
        lines += [f"    - {p}" for p in r["problems"]]
    else:
        lines.append("  problems    none")
    return "\n".join(lines)


def _lora_line(d: dict[str, Any]) -> str:
    if "problem" in d:
        return f"LoRA keys, but: {d['problem']}"
    scale = "rsLoRA " if d["rslora"] else ""
    base = ("base inside (to-hf merges it)" if d["base_inside"]
            else "LoRA-only save, base not inside (to-hf needs --base HF_DIR to merge)")
    mts = f", modules_to_save: {', '.join(d['modules_to_save'])}" if d["modules_to_save"] else ""
    return (f"{scale}r={d['r']} alpha={d['alpha']} on {d['modules']} module(s) ({', '.join(d['targets'])}){mts}; "
            f"{base}; settings from {Path(d['settings_from']).name}")
