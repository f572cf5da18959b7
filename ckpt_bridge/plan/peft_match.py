"""Which modules a PEFT LoRA config adapts, by PEFT's own matching rules (peft 0.21).

``PeftModel.from_pretrained`` decides from ``adapter_config.json`` alone which
modules get a LoRA layer, then loads the tensors it has names for: a config
naming fewer modules than the checkpoint's tensors hold silently drops their
adapters, one naming more adds fresh ones.  The merged model folds what the
tensors hold, so the two outputs of ``--lora both`` disagree unless the config
matches the tensors exactly.  We check that with PEFT's rules, repeated here
because the export path never imports PEFT:

* ``target_modules`` (``tuners_utils.check_target_module_exists``): a string is
  a regex the whole module name must match (``re.fullmatch``), ``"all-linear"``
  every ``nn.Linear`` / ``Conv1D`` but the output embedding
  (``_maybe_include_all_linear_layers``); a list matches a module named exactly
  so, or ending in ``.<entry>`` (then ``layers_to_transform`` /
  ``layers_pattern`` restrict the layer index);
* ``exclude_modules`` (regex, or exact / ``.<entry>`` suffix) and every module
  inside a ``modules_to_save`` entry are never adapted;
* ``modules_to_save`` (``other._set_trainable``): a module whose name ends
  with an entry (no dot boundary); sequence / token classification tasks add
  ``classifier`` and ``score`` (``PeftModelForSequenceClassification``).
"""

from __future__ import annotations

import re
from typing import Any, Collection

ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND
CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
CLASSIFIER_MODULES = ("classifier", "score")


def modules_to_save(config: dict[str, Any]) -> list[str]:
    names = list(config.get("modules_to_save") or [])
    if config.get("task_type") in CLASSIFIER_TASKS:
        names += [n for n in CLASSIFIER_MODULES if n not in names]
    return names


def is_target(config: dict[str, Any], key: str, all_linear: Collection[str] = ()) -> bool:
    """Does PEFT put a LoRA layer on module ``key`` (an in-memory module name) under ``config``?"""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, key):
        return False
    if isinstance(exclude, list) and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save(config)):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return key in all_linear if targets.lower() == ALL_LINEAR else re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _in_layers(config, key)


def _in_layers(config: dict[str, Any], key: str) -> bool:
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def is_saved(config: dict[str, Any], key: str) -> bool:
    """Does PEFT keep a trained copy of module ``key`` (``modules_to_save``)?"""
    return any(key.endswith(m) for m in modules_to_save(config))


def mismatch(config: dict[str, Any], adapted: Collection[str], copies: Collection[str], modules: Collection[str],
             all_linear: Collection[str], complete: bool) -> str | None:
    """What PEFT would do differently from the tensors, in words, or None.

    ``adapted``: modules holding lora_A / lora_B; ``copies``: modules holding a modules_to_save copy;
    ``modules``: every module name we know (the model's, when ``complete``; otherwise only the checkpoint's,
    and modules the config matches beyond them cannot be seen).
    """
    unmatched = sorted(m for m in adapted if not is_target(config, m, all_linear))
    if unmatched:
        return (f"target_modules {config.get('target_modules')!r} does not match {unmatched[0]!r} "
                f"({len(unmatched)} of the {len(adapted)} modules holding LoRA tensors are not matched): "
                f"PeftModel.from_pretrained would drop their adapters, which the merged model folds")
    extra = sorted(m for m in set(modules) - set(adapted) if is_target(config, m, all_linear)) if complete else []
    if extra:
        return (f"target_modules {config.get('target_modules')!r} also matches {extra[0]!r} ({len(extra)} "
                f"module(s) holding no LoRA tensors): PeftModel.from_pretrained would give them fresh adapters")
    unsaved = sorted(c for c in copies if not is_saved(config, c))
    if unsaved:
        return (f"modules_to_save {config.get('modules_to_save')!r} does not name {unsaved[0]!r}, whose trained "
                f"copy the checkpoint holds: PeftModel.from_pretrained would drop it, the merged model keeps it")
    return None


__all__ = ["is_saved", "is_target", "mismatch", "modules_to_save"]
