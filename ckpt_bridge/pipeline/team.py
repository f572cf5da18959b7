"""Several processes writing one export: ``--workers N`` (local) or the ranks of a ``torchrun`` job.

Every process plans the whole export (the plan is deterministic, and a warm
plan costs milliseconds), then writes only its share of the output: a
contiguous run of the plan's transforms, balanced by output bytes and cut at
file boundaries when there are at least as many files as processes (so ranks
on different nodes never write into the same file).  The output files, with
their headers, are created at full size by the coordinator (rank 0) before
anyone writes, and every tensor goes to its planned offset with ``pwrite``:
which process writes a tensor does not change a byte of the output.  The
coordinator waits for the others, then writes the index, configs and the rest
and renames the directory into place, exactly as a single process does.

Two ways to get the processes:

* ``--workers N``: the CLI process is rank 0; once the output files exist it
  starts N-1 copies of its own command line with the hidden flag
  ``--worker RANK/SIZE``, waits for them, and fails the export (leaving no
  output) if any of them fails.  Nothing distributed is involved.  A worker
  writes only into its parent's temporary output dir for the same ``--out``
  (``.NAME.partial-<parent pid>``, which must exist): nothing in the
  environment can point it elsewhere (an inherited ``CKPT_BRIDGE_WORKER``
  once made a plain ``to-hf`` pwrite into another export's files).
  N is capped by the CPUs this process may run on and by the work items
  (transforms): more processes than either only cost memory (500 asked for
  started ~360 processes of 110 MB and met the OOM killer); a note says so.
* ``--distributed`` under ``torchrun``: the ranks meet in a gloo process
  group (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` from torchrun); rank 0
  broadcasts the temporary directory and all ranks gather each other's
  outcome.  The output directory must be on storage every rank sees.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BridgeError, OutputError
from .atomic import AtomicDir, partial_path

log = logging.getLogger("ckpt_bridge")


@dataclass
class Team:
    """The processes sharing one export (``size`` 1: a plain single-process run)."""

    rank: int = 0
    size: int = 1
    kind: str = "solo"  # solo | local | torchrun
    argv: list[str] = field(default_factory=list)  # local: the command line the workers repeat
    tmp: Path | None = None  # local workers: the coordinator's temporary output dir
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def fit(self, items: int) -> None:
        """Local workers: no more processes than work items (the leader decides before starting them)."""
        if self.kind == "local" and self.leader and self.size > max(1, items):
            log.warning("ckpt-bridge: note: --workers %s: using %s process(es), one per item to write (%s)",
                        self.size, max(1, items), items)
            self.size = max(1, items)
            if self.size == 1:
                self.kind = "solo"

    def mine(self, items: list, sizes: list[int], files: list[int] | None = None) -> list:
        """The items this process handles: a contiguous run balanced by output bytes (see :func:`balanced_ranges`);
        ``files[i]`` is the output file item i starts in (None: each item its own), all items when alone."""
        if self.size == 1:
            return list(items)
        files = list(range(len(items))) if files is None else files
        return [items[i] for i in balanced_ranges(sizes, files, self.size)[self.rank]]

    def share(self, tmp: Path | None) -> Path:
        """Rank 0 passes the temporary output dir (its files already created) to the others; they get it back."""
        if self.kind == "local":
            if self.leader:
                self._start_workers(tmp)
                return tmp
            return self.tmp
        if self.kind == "torchrun":
            import torch.distributed as dist

            box = [str(tmp) if self.leader else None]
            try:
                dist.broadcast_object_list(box, src=0)
            except RuntimeError as e:  # rank 0 failed (and exited) before the output dir existed
                raise OutputError(f"rank {self.rank}: rank 0 stopped before creating the output ({type(e).__name__}); "
                                  f"its error says why") from None
            return Path(box[0])
        return tmp

    def finish(self, error: BaseException | None) -> None:
        """Every process's outcome of the write; raises on every rank if any rank failed."""
        if self.kind == "solo":
            if error is not None:
                raise error
            return
        mine = None if error is None else f"{type(error).__name__}: {error}"
        if self.kind == "local":
            if not self.leader:
                if error is not None:
                    raise error
                return
            if error is not None:
                self.stop()
                raise error
            failed = self._wait_workers()
            if failed:
                raise OutputError(f"worker {failed[0][0]} of {self.size} failed: {failed[0][1]}; no output written")
            return
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.size
        dist.all_gather_object(everyone, mine)
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(everyone) if m is not None]
        if bad:
            raise OutputError(f"rank {bad[0][0]} of {self.size} failed: {bad[0][1]}; no output written")

    def close(self) -> None:
        """Leave the torchrun process group before the interpreter exits.  A rank that exits with gloo's threads
        still attached (a worker is done while rank 0 still writes the index) could be killed inside them at
        interpreter exit ("terminate called without an active exception", SIGABRT).  Local: no collective."""
        if self.kind != "torchrun":
            return
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - leaving is best effort; the command's own outcome stands
                pass

    # ----------------------------------------------------------------- local workers
    def _start_workers(self, tmp: Path) -> None:
        for r in range(1, self.size):
            self._procs.append(subprocess.Popen([sys.executable, "-m", "ckpt_bridge.cli", *self.argv,
                                                 "--worker", f"{r}/{self.size}"],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True))

    def _wait_workers(self) -> list[tuple[int, str]]:
        failed = []
        for r, p in enumerate(self._procs, start=1):
            _, err = p.communicate()
            if p.returncode != 0:
                lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
                failed.append((r, lines[-1] if lines else f"exit code {p.returncode}"))
        self._procs = []
        return failed

    def stop(self) -> None:
        """The coordinator failed: the workers' writes are moot (the temporary dir is being removed)."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs = []


@contextmanager
def team_output(out: str | Path, team: Team, *, overwrite: bool, protect: tuple[Path, ...], create: list):
    """The temporary output dir every process writes into; rank 0 owns it (see AtomicDir).

    Rank 0 creates the files of the writers in ``create`` (headers, full size)
    before anyone writes, then shares the dir; the others receive it.  If rank
    0 fails, its local workers are stopped and the dir is removed.
    """

    if not team.leader:
        tmp = team.share(None)
        for w in create:
            w.out_dir = tmp
        yield tmp
        return
    with AtomicDir(out, overwrite=overwrite, protect=protect) as tmp:
        try:
            for w in create:
                w.out_dir = tmp
                w.create_files()
            team.share(tmp)
            yield tmp
        except BaseException:
            team.stop()
            raise


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this OS
        return max(1, os.cpu_count() or 1)


def _worker(spec: str, out: str | Path) -> Team:
    """The hidden ``--worker RANK/SIZE`` of a process started by :meth:`Team._start_workers`: it writes into
    its parent's temporary dir for ``out`` only, and refuses to run if there is none."""

    try:
        rank, size = (int(x) for x in spec.split("/"))
        if not 0 < rank < size:
            raise ValueError
    except ValueError:
        raise BridgeError(f"--worker {spec!r}: internal flag of --workers (RANK/SIZE); do not pass it") from None
    tmp = partial_path(out, os.getppid())
    if tmp.is_symlink() or not tmp.is_dir():
        raise BridgeError(f"--worker {spec}: internal flag of --workers; no export to {out} is being written by "
                          f"this process's parent ({tmp} does not exist); do not pass it")
    return Team(rank=rank, size=size, kind="local", tmp=tmp)


def from_cli(workers: int, distributed: bool, argv: list[str], *, out: str | Path = "",
             worker: str | None = None) -> Team:
    """The team this CLI process belongs to: a local worker (``--worker``, from its coordinator), torchrun, or solo."""
    if worker is not None:
        return _worker(worker, out)
    if distributed:
        if workers != 1:
            raise BridgeError("--workers and --distributed: choose one (under torchrun, every rank is a worker)")
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise BridgeError("--distributed: run under torchrun (RANK and WORLD_SIZE are not set), or use --workers N")
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return Team(rank=dist.get_rank(), size=dist.get_world_size(), kind="torchrun")
    if workers < 1:
        raise BridgeError(f"--workers {workers}: give a number of processes, 1 or more")
    cpus = usable_cpus()
    if workers > cpus:
        log.warning("ckpt-bridge: note: --workers %s: using %s process(es), one per CPU this process may use",
                    workers, cpus)
        workers = cpus
    if workers == 1:
        return Team()
    return Team(rank=0, size=workers, kind="local", argv=list(argv))


def balanced_ranges(sizes: list[int], files: list[int], parts: int) -> list[range]:
    """Contiguous ranges of items (one per process) with about equal bytes.

    ``sizes[i]`` is item i's output bytes and ``files[i]`` the output file it
    starts in.  With at least ``parts`` files the cuts are at file boundaries
    (each file written by one process); otherwise at item boundaries.  A
    process may get an empty range (more processes than items).
    """
    n = len(sizes)
    if parts <= 1 or n == 0:
        return [range(n)] + [range(n, n)] * max(0, parts - 1)
    by_file = len(set(files)) >= parts
    cuts = [i for i in range(1, n) if not by_file or files[i] != files[i - 1]]
    total = sum(sizes)
    before, acc = [], 0
    for s in sizes:
        before.append(acc)
        acc += s
    bounds = [0]
    for k in range(1, parts):
        goal = total * k / parts
        best = min((c for c in cuts if c > bounds[-1]), key=lambda c: abs(before[c] - goal), default=n)
        bounds.append(best)
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
