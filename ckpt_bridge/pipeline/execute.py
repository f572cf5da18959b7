"""Executing a checked plan (:mod:`ckpt_bridge.plan.core`): one transform at a time, the next one's inputs
read ahead in a thread (:mod:`.stream`).  The plan says what each output is made of; running it is the
pipeline's part, so the plan folder imports nothing of the pipeline."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..formats.base import TensorInfo
from ..plan.core import Plan, Transform
from .stream import read_ahead


def execute(plan: Plan | list[Transform], read: Callable[..., torch.Tensor],
            dtype_of: Callable[[TensorInfo], torch.dtype | None] = lambda info: None, *, ahead: bool = True,
            buffer: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
            ) -> Iterator[tuple[Transform, dict[str, torch.Tensor]]]:
    """Stream ``plan``: yield ``(transform, {target: tensor})`` one transform at a time.

    ``read(key, dtype)`` is a reader's ``read``; ``dtype_of(target info)`` is the
    dtype a target is written in (None: as produced).  A rename reads straight
    into that dtype (the readers cast while copying, no second buffer); other
    ops see the stored dtype and their outputs are cast afterwards, so a fold
    or a fuse computes on the trained values (a rename whose stored copies are
    compared, ``same_as``, too: they are compared as stored).  The next transform's inputs
    are read in a background thread while the caller writes this one's
    outputs (see :mod:`ckpt_bridge.pipeline.stream`); drop the tensors before asking
    for the next item.  ``ahead=False`` reads in the caller's thread (a sink
    whose own writes bound the run gains nothing from the overlap).
    ``buffer(shape, dtype)``: a reused buffer a rename is read into, when
    ``read`` takes ``out=`` (a fresh buffer faults in every page on first
    touch); the caller guarantees it is free again by the time it is reused.
    """
    transforms = plan.transforms if isinstance(plan, Plan) else plan
    if buffer is not None and not _takes_out(read):
        buffer = None

    def run(t: Transform) -> dict[str, torch.Tensor]:
        if t.fn is None and not t.same_as:
            o = t.outputs[0]
            if buffer is not None:
                dt = dtype_of(o) or o.dtype
                return t.apply({t.inputs[0]: read(t.inputs[0], dt, out=buffer(o.shape, dt))})
            return t.apply({t.inputs[0]: read(t.inputs[0], dtype_of(o))})
        out = t.apply({k: read(k, None) for k in t.inputs})
        for o in t.outputs:
            dt = dtype_of(o)
            if dt is not None and out[o.key].dtype != dt:
                out[o.key] = out[o.key].to(dt)
        return out

    if ahead:
        yield from read_ahead(transforms, run)
    else:
        for t in transforms:
            yield t, run(t)


def _takes_out(read: Callable) -> bool:
    import inspect

    try:
        return "out" in inspect.signature(read).parameters
    except (TypeError, ValueError):
        return False


