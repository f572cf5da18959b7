"""The one pipeline every conversion goes through: ``run(reader, plan, sinks, side_files, team)``.

A command (``to_hf``, ``to_dcp``, a LoRA export) only assembles the four parts:

- a **reader** (:mod:`ckpt_bridge.formats`) lists and reads the source tensors;
- a checked **plan** (:mod:`ckpt_bridge.plan.core`) says what each output is made of;
- **sinks** (:class:`Sink`; :mod:`ckpt_bridge.writers`) each claim some of the plan's outputs and write them:
  sharded safetensors, a DCP folder through DCP's own writer, an adapter beside a merged model;
- **side files**: everything that is not a weight (configs, tokenizer, extra state, manifest, marker),
  written by callables after the weights, into the same temporary folder.

``run`` splits the transforms over the processes of a :class:`~ckpt_bridge.pipeline.team.Team`, streams each
sink's share through it (one transform's tensors at a time), lets every process learn whether all the others
succeeded, and on the coordinator closes the sinks and writes the side files.  The folder appears under its
final name only when all of that succeeded (:func:`~ckpt_bridge.pipeline.team.team_output`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from ..dtypes import nbytes
from ..formats.base import Reader, TensorInfo
from ..plan.core import Plan, Transform
from ..progress import Progress
from .pieces import Piece, stream_pieces
from .team import Team, team_output

DtypeOf = Callable[[TensorInfo], "torch.dtype | None"]
SideFile = Callable[[Path], list[str]]  # writes into the temporary output dir, returns the names it wrote


class Source:
    """The reader seen by a sink: its share of the plan as a stream of pieces, in plan order (a sink that is
    asked for data, as DCP's writer asks, takes them from the stream in that order).  Moves the progress bar."""

    def __init__(self, reader: Reader, out_dt: DtypeOf, bar: Progress):
        self.reader, self.out_dt, self.bar = reader, out_dt, bar

    def pieces(self, transforms: list[Transform], *, ahead: bool = True) -> Iterator[Piece]:
        """Outputs in plan order, a large renamed tensor in row pieces through reused buffers, read one ahead in
        a thread unless ``ahead`` is False (a sink that keeps what it wrote until later, like DCP's writer)."""
        for p in stream_pieces(transforms, self.reader, self.out_dt, ahead=ahead):
            self.bar.update(p.tensor.numel() * p.tensor.element_size(), p.key)
            yield p




class Sink(Protocol):
    """Writes the outputs it claims.  ``planned`` lists them in the order they are written (shape and the dtype as
    written); ``create_files`` (coordinator, before any process writes) lays out the files every process then
    writes into; ``write`` streams one process's share into ``tmp`` (from ``source``); ``flush_share`` makes a
    worker's own files durable (the coordinator may be on another node); ``finish`` (coordinator only, after
    every process succeeded) writes what covers all shares (an index, DCP's ``.metadata``) and returns the file
    names.  ``claims``: whether a transform of the plan is this sink's to write; ``shared``: its transforms are split
    over the processes (else the coordinator writes them all);
    ``file_of``: the output file of a key (a share is cut at file boundaries when there are enough files)."""

    shared: bool
    out_dt: DtypeOf  # the dtype each of its targets is written in

    def claims(self, transform: Transform) -> bool: ...

    def planned(self) -> list[TensorInfo]: ...

    def file_of(self, key: str) -> int: ...

    out_dir: Path  # set by team_output to the temporary output dir in every process

    def create_files(self) -> None: ...

    def write(self, tmp: Path, rank: int, transforms: list[Transform], source: Source) -> None: ...

    def flush_share(self, tmp: Path, rank: int) -> None: ...

    def finish(self, tmp: Path, team_size: int) -> list[str]: ...


@dataclass
class RunResult:
    leader: bool
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    tmp: Path | None = None


@dataclass
class Output:
    """Where ``run`` writes: the final folder, whether it may replace an earlier export of ours, and the paths
    it must never write into (the inputs)."""

    path: Path
    overwrite: bool = False
    protect: tuple[Path, ...] = ()


def by_sink(plan: Plan, sinks: list[Sink]) -> list[list[Transform]]:
    """Each sink's transforms, in plan order (the first sink that claims a transform takes it)."""
    out: list[list[Transform]] = [[] for _ in sinks]
    for t in plan.transforms:
        for i, s in enumerate(sinks):
            if s.claims(t):
                out[i].append(t)
                break
        else:
            raise ValueError(f"{t.line()}: no sink claims it")
    return out


def _mine(transforms: list[Transform], sink: Sink, team: Team) -> list[Transform]:
    """The transforms this process runs for ``sink``, cut at output-file boundaries where there are enough files."""
    if not sink.shared:
        return list(transforms) if team.leader else []
    if team.size == 1:
        return list(transforms)
    sizes = [sum(nbytes(o.shape, sink.out_dt(o) or o.dtype) for o in t.outputs) for t in transforms]
    files = [sink.file_of(t.outputs[0].key) for t in transforms]
    return team.mine(transforms, sizes, files)


def run(reader: Reader, plan: Plan, sinks: list[Sink], side_files: list[SideFile], team: Team, *, output: Output,
        label: str, progress: bool | None = None) -> RunResult:
    """Stream ``plan`` from ``reader`` into ``sinks``, then write ``side_files``; see the module docstring.
    ``label`` names the work on the progress bar."""
    per_sink = by_sink(plan, sinks)
    team.fit(max(1, sum(len(ts) for s, ts in zip(sinks, per_sink) if s.shared)))  # no more processes than work
    mine = [_mine(ts, s, team) for s, ts in zip(sinks, per_sink)]
    total = sum(nbytes(o.shape, s.out_dt(o) or o.dtype) for s, ts in zip(sinks, mine) for t in ts for o in t.outputs)
    bar = Progress(total, label, enabled=progress)
    result = RunResult(leader=team.leader)
    with team_output(output.path, team, overwrite=output.overwrite, protect=output.protect, create=sinks) as tmp:
        result.tmp = tmp
        error = None
        try:
            for s, ts in zip(sinks, mine):  # every sink, with an empty share too: it learns what it does not write
                s.write(tmp, team.rank, ts, Source(reader, s.out_dt, bar))
            if not team.leader:  # its own files flushed: rank 0 may be on another node
                for s in sinks:
                    s.flush_share(tmp, team.rank)
        except BaseException as e:  # noqa: BLE001 - every process learns whether all the others succeeded
            error = e
        finally:
            bar.close()
        team.finish(error)
        if not team.leader:
            return result
        for s in sinks:
            result.files += s.finish(tmp, team.size)
        result.bytes_written = sum(nbytes(i.shape, i.dtype) for s in sinks for i in s.planned())
        for write in side_files:
            result.files += write(tmp)
    return result
