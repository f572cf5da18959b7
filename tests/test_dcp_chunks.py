"""Issue 20: to-dcp writes a tensor larger than a piece as several DCP chunks (row blocks with offsets), fed from
row pieces read straight from the source, and the trainer loads it exactly as it loads the one-item output.

PIECE_BYTES is forced down so the tiny models' tensors are larger than a piece (a 251 x 64 fp32 embedding is
64 KB: 16 chunks of 4 KB); the comparisons are torch.equal against the unchunked output and the HF files."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge import safeload
from ckpt_bridge.cli import main as cli
from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.formats.hf import weight_files
from ckpt_bridge.pipeline import pieces
from ckpt_bridge.writers import dcp as dcp_writer

PIECE = 4096
AUX = ["future_predictor:linear"]


def chunk_counts(dcp_dir: Path) -> dict[str, int]:
    md = safeload.load_dcp_metadata(dcp_dir / ".metadata")
    return {k: len(m.chunks) for k, m in md.state_dict_metadata.items() if hasattr(m, "chunks")}


def dcp_load(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor through DCP's own loader (dcp.load into empty tensors, as a trainer's load does)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = safeload.load_dcp_metadata(dcp_dir / ".metadata")
    state = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=True)
    return state


def record_crcs(dcp_dir: Path) -> set[int]:
    """The CRC32 fields of every record of every item's torch.save archive (as DCP's metadata places them)."""
    md = safeload.load_dcp_metadata(dcp_dir / ".metadata")
    out = set()
    for info in md.storage_data.values():
        with open(dcp_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            out |= {z.CRC for z in zipfile.ZipFile(io.BytesIO(f.read(info.length))).infolist()}
    return out


def test_no_zip_crc32_is_scoped_and_restored():
    """The CRC setting is torch's process-wide config: restored after the write, also when it fails."""
    assert torch.serialization.get_crc32_options() is True
    with pytest.raises(OSError):
        with dcp_writer.no_zip_crc32():
            assert torch.serialization.get_crc32_options() is False
            raise OSError("disk full")
    assert torch.serialization.get_crc32_options() is True


def titan_state(hf: Path, dcp_dir: Path, dump: Path) -> dict[str, torch.Tensor]:
    """The trainer's own load: torchtitan's CheckpointManager, model-only, into the flame-style model."""
    from torchtitan.components.checkpoint import CheckpointManager
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckpt_bridge.plan.aux_modules import attach_aux

    cfg = AutoConfig.from_pretrained(hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    attach_aux(model, AUX, cfg)
    model.to_empty(device="cpu")
    mc = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                  initial_load_path=str(dcp_dir.absolute()), initial_load_model_only=True)
    mgr = CheckpointManager(mc, dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None,
                            states={}, sd_adapter=None, base_folder=str(dump))
    try:
        assert mgr.load() is True
    finally:
        mgr.close()
    return dict(model.state_dict())


def test_chunked_output_loads_through_the_trainer_exactly_like_one_item_per_tensor(gloo1, tiny_hf_factory,
                                                                                   tmp_path, monkeypatch):
    hf = tiny_hf_factory("llama_tied")
    to_dcp(hf, tmp_path / "whole", aux=AUX, progress=False)
    monkeypatch.setattr(pieces, "PIECE_BYTES", PIECE)
    monkeypatch.setattr(dcp_writer, "FILE_BYTES", 16 << 10)
    to_dcp(hf, tmp_path / "chunked", aux=AUX, progress=False)

    whole, chunked = chunk_counts(tmp_path / "whole"), chunk_counts(tmp_path / "chunked")
    assert set(whole.values()) == {1}
    emb = "model.embed_tokens.weight"
    src = {}
    for f in weight_files(hf)[1]:
        src.update(load_file(f))
    rows = PIECE // (src[emb].shape[1] * 4)
    assert chunked[emb] == math.ceil(src[emb].shape[0] / rows) > 1  # one chunk per piece of rows
    assert sum(n > 1 for n in chunked.values()) >= 10  # every tensor above 4 KB
    # consecutive items share a file (16 KB here): fewer files than items, none far past the size
    files = sorted((tmp_path / "chunked").glob("*.distcp"))
    assert 1 < len(files) < sum(chunked.values()) / 3
    assert max(f.stat().st_size for f in files) < 2 * (16 << 10) + 4 * (1 << 10) * len(files)

    # written without zip CRC32s (torch.load never checks them): the loads below prove every loader reads them
    assert record_crcs(tmp_path / "chunked") == {0} and record_crcs(tmp_path / "whole") == {0}
    assert torch.serialization.get_crc32_options() is True  # the user's torch.save setting is back

    a = titan_state(hf, tmp_path / "whole", tmp_path / "d1")
    b = titan_state(hf, tmp_path / "chunked", tmp_path / "d2")
    assert set(a) == set(b) and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in src.items():
        assert torch.equal(b[k], v), k

    # DCP's own loader, our verify and the way back to HF read it the same
    la, lb = dcp_load(tmp_path / "whole"), dcp_load(tmp_path / "chunked")
    assert all(torch.equal(la[k], lb[k]) for k in la) and set(la) == set(lb)
    assert cli(["verify", str(tmp_path / "chunked"), "--against", str(hf)]) == 0
    for name in ("whole", "chunked"):
        assert cli(["to-hf", str(tmp_path / name), "--out", str(tmp_path / f"hf-{name}"), "--quiet"]) == 0
    back = sorted(p.name for p in (tmp_path / "hf-whole").glob("*.safetensors"))
    assert back and all((tmp_path / "hf-whole" / n).read_bytes() == (tmp_path / "hf-chunked" / n).read_bytes()
                        for n in back)


def bf16_llama(d: Path) -> Path:
    """A bf16 llama TorchTitan's llama3 can be (no attention bias)."""
    import transformers

    from ckpt_bridge.testing.tiny_models import save_tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=500000.0, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="40KB")
    save_tiny_tokenizer(d, vocab_size=256)
    return d


def test_whole_fed_tensors_are_cut_into_the_same_chunks(tmp_path, monkeypatch):
    """A bf16 source cast to fp32 in row pieces, and TorchTitan's llama3 adapter (q/k permuted: transforms that
    run whole, then handed to DCP block by block): both load through DCP exactly as the unchunked output."""
    hf = bf16_llama(tmp_path / "hf")
    for name, kw in (("plain", {}), ("titan", {"titan_model": "llama3"})):
        to_dcp(hf, tmp_path / f"{name}-whole", progress=False, **kw)
        with monkeypatch.context() as m:
            m.setattr(pieces, "PIECE_BYTES", PIECE)
            to_dcp(hf, tmp_path / f"{name}-chunked", progress=False, **kw)
        assert max(chunk_counts(tmp_path / f"{name}-chunked").values()) > 1
        a, b = dcp_load(tmp_path / f"{name}-whole"), dcp_load(tmp_path / f"{name}-chunked")
        assert set(a) == set(b) and len(a) > 10
        for k in a:
            assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), (name, k)
    assert "tok_embeddings.weight" in b  # the titan case went through the adapter: TorchTitan's own keys


def test_a_torch_without_the_private_write_data_gets_dcps_own_files(tiny_hf_factory, tmp_path, monkeypatch):
    """Grouping items into files goes through FileSystemWriter's private ``_write_data(planner, file_queue)``.
    A torch where it has another form gets DCP's own ``write_data`` (one part file per item); the coordinator
    then puts the planned files together as it does for several processes: the same output, byte for byte."""
    import torch.distributed.checkpoint as dcp

    hf = tiny_hf_factory("llama_tied")
    monkeypatch.setattr(pieces, "PIECE_BYTES", PIECE)
    monkeypatch.setattr(dcp_writer, "FILE_BYTES", 16 << 10)
    to_dcp(hf, tmp_path / "grouped", progress=False)
    own, queued = dcp.FileSystemWriter._write_data, []

    def other_form(self, planner, file_queue, *, more=None):  # what a later torch might have
        queued.append(file_queue.qsize())
        return own(self, planner, file_queue)

    monkeypatch.setattr(dcp.FileSystemWriter, "_write_data", other_form)
    to_dcp(hf, tmp_path / "fallback", progress=False)
    assert queued == [sum(chunk_counts(tmp_path / "fallback").values())]  # DCP's write_data: a file per item
    names = sorted(p.name for p in (tmp_path / "grouped").iterdir() if p.suffix == ".distcp" or p.name == ".metadata")
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "fallback").iterdir()
                                              if p.suffix == ".distcp" or p.name == ".metadata")
    for n in names:
        assert (tmp_path / "grouped" / n).read_bytes() == (tmp_path / "fallback" / n).read_bytes(), n
