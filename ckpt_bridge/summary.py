"""What ``to_hf`` returns (also for a LoRA checkpoint): a leaf module, so the HF export and the LoRA export
both build it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
