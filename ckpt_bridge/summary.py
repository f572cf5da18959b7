"""What the conversions return: ``to_hf`` (also for a LoRA checkpoint) an :class:`ExportSummary`, ``to_dcp`` a
:class:`DCPExportSummary` (their ``as_dict`` is the CLI's ``--json`` output).  One home, imported by the commands,
importing none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models.titan_eras import seed_flags


@dataclass
class ExportSummary:
    source: str
    source_format: str
    out: str
    tensors: int = 0
    parameters: int = 0
    bytes_written: int = 0
    dtype: str = ""
    files: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_class: str | None = None
    extra_state: bool = False
    global_step: int | None = None
    aux: dict[str, list[str]] = field(default_factory=dict)  # aux module -> keys
    aux_mode: str = "separate"
    config: str = ""
    plan_lines: list[str] = field(default_factory=list)  # --dry-run: the checked key plan
    lora: dict[str, Any] | None = None  # LoRA source: mode, r, alpha, targets, notes (see ckpt_bridge.plan.lora)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DCPExportSummary:
    source: str
    out: str
    layout: str = ""
    trainer: str = ""
    reason: str = ""
    tensors: int = 0
    from_source: int = 0
    aux_tensors: int = 0
    bytes_written: int = 0
    dtype: str = ""
    aux: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    manifest: str = ""
    seconds: float = 0.0
    seed_flags: list[str] = field(default_factory=list)  # in the installed era's words (titan_eras.seed_flags)
    titan_model: str | None = None
    source_format: str = ""
    left_behind: list[str] = field(default_factory=list)  # what the source held beyond the weights, not carried
    extra_state: str | None = None  # --extra-state: where the source's training state was copied

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "seed_flags"}

    def flags(self) -> list[str]:
        """How to point a trainer at this checkpoint (absolute paths: torchtitan 0.3.0 requires them)."""
        return self.seed_flags or seed_flags(str(Path(self.out).absolute()), None, self.layout)
