"""Issue 20: the write-back of finished output is started during the stream (writers/writeback.py), so the flush
before the final rename waits only for the tail.  Advisory: the output and its flush are unchanged."""

from __future__ import annotations

import os
import sys
import time

import pytest

from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.pipeline import pieces
from ckpt_bridge.writers import dcp as dcp_writer
from ckpt_bridge.writers import writeback


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_binding_and_the_thread(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * (1 << 20))
    fd = os.open(f, os.O_RDONLY)
    try:  # the ctypes signature is right: 0 on a real file, both for a range and for "to the end"
        assert writeback._sync_file_range(fd, 4096, 8192, writeback._SYNC_FILE_RANGE_WRITE) == 0
        assert writeback._sync_file_range(fd, 0, 0, writeback._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)
    writeback.start_writeback(tmp_path / "gone")  # a removed file is skipped, the thread carries on
    writeback.start_writeback(f, 0, 4096)
    deadline = time.monotonic() + 10
    while not writeback._requests.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writeback._requests.empty()
    assert not (tmp_path / "gone").exists()  # opened read-only: nothing created


def test_dcp_files_are_handed_to_writeback_as_the_writer_moves_on(tiny_hf_factory, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(dcp_writer, "start_writeback", lambda path: seen.append(os.path.basename(path)))
    monkeypatch.setattr(pieces, "PIECE_BYTES", 4096)
    monkeypatch.setattr(dcp_writer, "FILE_BYTES", 16 << 10)
    to_dcp(tiny_hf_factory("llama_tied"), tmp_path / "dcp", progress=False)
    n = len(list((tmp_path / "dcp").glob("*.distcp")))
    assert n > 3
    # each file once, in the order written (named in the part folder, before the merge renames them); the last
    # one is left to the final flush
    assert seen == [f"__0_{i}.distcp" for i in range(n - 1)]
