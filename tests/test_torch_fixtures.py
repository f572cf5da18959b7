"""Checkpoints written by other torch releases, read under the pinned torch: the committed fixtures of
tests/fixtures/torch-<version>/ (real verl FSDP2 / HSDP / Shard(1) saves and a to-dcp DCP written under that
torch by ckpt_bridge.testing.torch_fixtures) export bit for bit to their live model's save_pretrained.
The reverse direction (saves written here, read under other torches) is tests/test_torch_versions.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge import meshes
from ckpt_bridge import safeload
from ckpt_bridge.cli import main
from ckpt_bridge.compare import bits_equal
from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = sorted(p.name.removeprefix("torch-") for p in FIXTURES.glob("torch-*") if (p / "info.json").is_file())
VERL_CASES = {"fsdp": ("fsdp",), "hsdp": ("ddp", "fsdp"), "shard1": ("fsdp",)}


def fixture(version: str, case: str) -> Path:
    return FIXTURES / f"torch-{version}" / case


def assert_same_weights(out: Path, ref_dir: Path) -> None:
    got, ref = load_file(out / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert bits_equal(got[k], ref[k]), k


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_fixtures_cover_the_versions_ci_tests():
    # the oldest and newest torch of pyproject's range, and the pinned one
    assert {"2.11.0", "2.13.0", "2.15.0"} <= set(VERSIONS)
    for v in VERSIONS:
        info = json.loads((FIXTURES / f"torch-{v}" / "info.json").read_text())
        assert info["torch"].split("+")[0] == v


@pytest.mark.parametrize("case", sorted(VERL_CASES))
@pytest.mark.parametrize("version", VERSIONS)
def test_verl_save_of_each_torch_exports_bit_exactly(capsys, tmp_path, version, case):
    src = fixture(version, case)
    ref_dir = src / "reference" / "global_step_1"
    reader = VerlFSDPReader(src / "global_step_1")
    # the mesh really is what the case says, read from the pickle of that torch
    k = "model.embed_tokens.weight"
    grid, names, saved_rank = meshes.rank_grid(reader._sd(0)[k].device_mesh)
    world = reader.world_size
    assert names == VERL_CASES[case] and saved_rank == 0
    assert torch.equal(grid.flatten(), torch.arange(world)) and grid.dim() == len(names)
    if case == "shard1":
        kinds = {str(p) for key in reader.tensors() for p in reader.layout(key).placements}
        assert {"Shard(0)", "Shard(1)"} <= kinds
    reader.close()
    out = tmp_path / "hf"
    code, text = run(capsys, "to-hf", src / "global_step_1", "--out", out, "--quiet")
    assert code == 0, text
    assert_same_weights(out, ref_dir / "hf")
    # extra state: every rank's rng and the scheduler, as the ranks held them when verl saved
    merged = safeload.load(out / "extra_state_merged.pt", mmap=False, allow_numpy=True)
    assert sorted(merged["rng"]) == list(range(world))
    for r in range(world):
        state = torch.load(ref_dir / f"rank{r}_state.pt", weights_only=False)
        assert torch.equal(merged["rng"][r]["cpu"], state["rng_cpu"])
        assert merged["lr_scheduler"] == state["lr_scheduler"]
    code, text = run(capsys, "verify", src / "global_step_1", ref_dir / "hf")  # the rank files against the reference
    assert code == 0, text


@pytest.mark.parametrize("version", VERSIONS)
def test_dcp_of_each_torch_reads_and_exports(capsys, tmp_path, version):
    dcp = fixture(version, "dcp")
    md = safeload.load_dcp_metadata(dcp / ".metadata")
    assert len(md.state_dict_metadata) == 16
    code, text = run(capsys, "verify", dcp, "--against", fixture(version, "fsdp") / "reference/global_step_1/hf")
    assert code == 0, text
    out = tmp_path / "hf"
    code, text = run(capsys, "to-hf", dcp, "--out", out, "--quiet")
    assert code == 0, text
    assert_same_weights(out, fixture(version, "fsdp") / "reference/global_step_1/hf")
    code, text = run(capsys, "inspect", dcp)
    assert code == 0, text


def test_dcp_metadata_of_torch_2_15_needs_our_reader():
    """torch <= 2.14's own reader refuses 2.15's 6-field TensorProperties; ours keeps the fields it has."""
    if torch.__version__.startswith(("2.15", "2.16")):
        pytest.skip("the running torch reads 2.15 metadata itself")
    path = fixture("2.15.0", "dcp") / ".metadata"
    with open(path, "rb") as f, pytest.raises(ValueError, match="too many values to unpack"):
        pickle.load(f)  # what torch's FileSystemReader.read_metadata does
    md = safeload.load_dcp_metadata(path)
    props = next(iter(md.state_dict_metadata.values())).properties
    assert type(props).__name__ == "TensorProperties" and props.dtype == torch.float32


def test_dcp_metadata_naming_an_unknown_dcp_class_says_newer_torch(tmp_path):
    raw = (fixture("2.13.0", "dcp") / ".metadata").read_bytes()
    needle = b"TensorStorageMetadata"
    assert needle in raw
    bad = tmp_path / ".metadata"
    bad.write_bytes(raw.replace(needle, b"TensorStorageMetadatX"))
    with pytest.raises(Exception) as e:
        safeload.load_dcp_metadata(bad)
    msg = str(e.value)
    assert "newer torch" in msg and "corrupt" not in msg and "\n" not in msg


# ------------------------------------------------------------------ the rank grid, against torch's own code

def _save_mesh(path: Path, layout, rank_map: torch.Tensor, rank: int) -> None:
    """torch.save a DeviceMesh's fields as torch pickles them (its __getstate__ is its __dict__)."""
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.__new__(DeviceMesh)
    mesh.__dict__.update(_layout=layout, _rank_map=rank_map, _mesh_dim_names=None, _rank=rank, _device_type="cpu")
    torch.save({"m": mesh}, path)


@pytest.mark.parametrize("n,sizes,strides,rank", [
    (4, (4,), (1,), 2),          # FSDP
    (6, (2, 3), (3, 1), 4),      # HSDP
    (4, (2, 2), (1, 2), 1),      # a transposed mesh
    (4, (2,), (2,), 3),          # mesh["ddp"] sliced from a 2x2: the copy holding rank 3
    (6, (3,), (1,), 4),          # mesh["fsdp"] sliced from a 2x3
])
def test_rank_grid_matches_torchs_remap(tmp_path, n, sizes, strides, rank):
    """Our grid from the saved fields equals the one the running torch's own DeviceMesh code computes."""
    from torch.distributed._mesh_layout import _MeshLayout
    from torch.distributed.device_mesh import DeviceMesh

    rank_map = torch.arange(n).flip(0).contiguous()  # ranks not in position order
    layout = _MeshLayout.from_sizes_strides(sizes, strides)
    expect = DeviceMesh._get_mesh_tensor_from_full_mesh(layout.remap_to_tensor(rank_map), rank)
    _save_mesh(tmp_path / "mesh.pt", layout, rank_map, rank)
    saved = safeload.load(tmp_path / "mesh.pt", mmap=False)["m"]
    assert isinstance(saved, meshes.SavedDeviceMesh)
    grid, _, saved_rank = meshes.rank_grid(saved)
    assert saved_rank == rank and torch.equal(grid, expect)


def test_unknown_mesh_form_is_one_line():
    m = meshes.SavedDeviceMesh()
    m.__setstate__({"_device_type": "cpu", "_topology": object()})
    with pytest.raises(meshes.MeshFormError) as e:
        meshes.rank_grid(m)
    assert "newer torch" in str(e.value) and "_topology" in str(e.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_trust_pickle_reads_other_torches_too(version):
    """--trust-pickle (plain pickle) goes through the same stand-ins and the same tolerant DCP reader."""
    reader = VerlFSDPReader(fixture(version, "hsdp") / "global_step_1", trust_pickle=True)
    ref = load_file(fixture(version, "hsdp") / "reference/global_step_1/hf/model.safetensors")
    for key in reader.tensors():
        assert bits_equal(reader.read(key), ref[key]), key
    reader.close()
    md = safeload.load_dcp_metadata(fixture(version, "dcp") / ".metadata", trust_pickle=True)
    assert len(md.state_dict_metadata) == 16


@pytest.mark.parametrize("version", VERSIONS)
def test_torch_file_of_each_torch_exports(capsys, tmp_path, version):
    ref = fixture(version, "fsdp") / "reference/global_step_1/hf"
    out = tmp_path / "hf"
    code, text = run(capsys, "to-hf", FIXTURES / f"torch-{version}" / "torch_file.pt", "--config", ref, "--out", out,
                     "--quiet")
    assert code == 0, text
    assert_same_weights(out, ref)


# ------------------------------------------------------------------ DTensors read as saved data (issue 20)

_EXPORT_WITHOUT_DTENSOR = """
import sys
from ckpt_bridge.cli import main
from ckpt_bridge.formats.verl_fsdp import VerlFSDPReader
# the reader alone first: the export's model-key cache may be cold, and transformers' modeling code imports
# torch.distributed.tensor itself
with VerlFSDPReader(sys.argv[2]) as reader:
    for key in reader.tensors():
        reader.read(key)
print("imported torch.distributed.tensor:", "torch.distributed.tensor" in sys.modules)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_verl_export_reads_dtensors_without_importing_torch_distributed_tensor(tmp_path, version):
    """The merge reads each DTensor's local shard, placements and mesh from the pickle as plain fields (stand-ins
    by name, every torch's form): in a fresh process, reading every tensor of the HSDP save never imports
    torch.distributed.tensor (~0.5 s of a 1.24B export), and the export is bit for bit."""
    import subprocess
    import sys

    src = fixture(version, "hsdp")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-c", _EXPORT_WITHOUT_DTENSOR, "to-hf", str(src / "global_step_1"),
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "imported torch.distributed.tensor: False" in r.stdout, r.stdout
    assert_same_weights(out, src / "reference/global_step_1/hf")


def test_a_saved_dtensor_is_data_only():
    """What the merge reads is what torch saved (shape, dtype, local shard, placements equal to torch's own,
    the mesh); an op or a second save would silently be wrong, so both are refused."""
    from torch.distributed.tensor import Replicate, Shard

    path = fixture("2.13.0", "hsdp") / "global_step_1/actor/model_world_size_4_rank_1.pt"
    saved = safeload.load(path, mmap=False, saved_dtensors=True)
    real = safeload.load(path, mmap=False)
    key = "model.embed_tokens.weight"
    v, dt = saved[key], real[key]
    assert type(v) is meshes.SavedDTensor and meshes.is_dtensor(v) and meshes.is_dtensor(dt)
    assert (tuple(v.shape), v.dtype) == (tuple(dt.shape), dt.dtype)
    assert bits_equal(v._local_tensor, dt.to_local())
    assert v.placements == (Replicate(), Shard(0)) == tuple(dt.placements)
    grid, names, rank = meshes.rank_grid(v.device_mesh)
    assert torch.equal(grid, dt.device_mesh.mesh) and names == ("ddp", "fsdp") and rank == 1
    with pytest.raises(TypeError, match="_local_tensor"):
        v.sum()
    with pytest.raises(TypeError):
        v + 1
    with pytest.raises(TypeError, match="cannot be saved again"):
        torch.save(v, Path("/dev/null"))


_LOAD_WITHOUT_ONE_STAND_IN = """
import sys
from ckpt_bridge import safeload
from ckpt_bridge import meshes
del meshes.DTENSOR_STAND_INS["torch.distributed.tensor._dtensor_spec.ShardOrderEntry"]
sd = safeload.load(sys.argv[1], mmap=False, saved_dtensors=True)
v = sd["model.embed_tokens.weight"]
print("read as:", type(v).__name__, meshes.is_dtensor(v), tuple(v._local_tensor.shape))
"""


def test_a_dtensor_part_the_stand_ins_do_not_know_is_read_by_the_running_torch():
    """A newer torch may pickle a DTensor spec field of a class we have no stand-in for (simulated: one stand-in
    taken out, in a fresh process where torch.distributed.tensor is not imported): the file is valid, so it is
    read with the running torch's real DTensor classes, as before the stand-ins, not refused as unsafe."""
    import subprocess
    import sys

    path = fixture("2.13.0", "hsdp") / "global_step_1/actor/model_world_size_4_rank_1.pt"
    r = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_ONE_STAND_IN, str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    real = safeload.load(path, mmap=False)["model.embed_tokens.weight"]
    assert f"read as: DTensor True {tuple(real.to_local().shape)}" in r.stdout, r.stdout
