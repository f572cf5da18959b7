"""Issue 26, the safety half: hostile placement stand-ins (D2), megatron-core 0.15's MCoreMetadata (D3), the
trainer-keys cache (D5, M2), a mesh claiming 10^10 positions (D6), and malformed DTensors / cache entries that
must be one line naming the file (M1).

The verl inputs are copies of the committed real verl FSDP2 save of ``tests/fixtures/torch-2.13.0/fsdp``
(2 ranks, 19 KB rank files), edited by pickling objects under torch's own global names; nothing here mocks
torch, verl or megatron-core.
"""

from __future__ import annotations

import copyreg
import dataclasses
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_bridge import safeload
from ckpt_bridge.cli import main as cli

FIXTURE = Path(__file__).parent / "fixtures" / f"torch-{torch.__version__.split('+')[0]}" / "fsdp"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"no committed verl fixture for torch "
                                                                 f"{torch.__version__} ({FIXTURE})")

CONSTRUCTED: list[str] = []  # every Marker built, by any route


class Marker:
    """The class a hostile file names: building it (or dropping it) records it, and touches a file."""

    path = ""

    def __new__(cls, *a, **k):
        CONSTRUCTED.append("new")
        return super().__new__(cls)

    def __setstate__(self, state):
        CONSTRUCTED.append("setstate")

    def __del__(self):
        CONSTRUCTED.append("del")
        if Marker.path:
            Path(Marker.path).touch()


MARKER_NAME = f"{Marker.__module__}.{Marker.__qualname__}"


class PickledAs:
    """Pickles as ``NEWOBJ cls`` + BUILD ``state``: how torch pickles a placement, with any state we like."""

    def __init__(self, cls: type, state: dict):
        self._cls, self._state = cls, state

    @property  # type: ignore[misc]
    def __class__(self):  # pickle checks obj.__class__ is the NEWOBJ class
        return self._cls

    def __reduce_ex__(self, protocol):
        return (copyreg.__newobj__, (self._cls,), self._state)


def run(capsys, args: list[str]) -> tuple[int, list[str]]:
    """Exit code and the lines on stderr (``inspect`` lists the problems it finds on stdout: those lines then)."""
    capsys.readouterr()
    code = cli(args)
    got = capsys.readouterr()
    err = got.err.strip().splitlines()
    if not err and args[0] == "inspect":
        err = [line.strip() for line in got.out.splitlines() if line.strip().startswith("- ")]
    return code, err


def copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "verl" / "global_step_1"
    shutil.copytree(FIXTURE / "global_step_1", dst)
    return dst / "actor"


def resave(path: Path, mutate, *, saved_dtensors: bool = True) -> None:
    obj = safeload.load(path, mmap=False, allow_numpy=True, saved_dtensors=saved_dtensors)
    mutate(obj)
    torch.save(obj, path)


def assert_one_line(code: int, err: list[str], *names: str, problems: bool = False) -> str:
    """Exit 2 and one line naming ``names`` (``problems``: inspect's problem list, each line naming them)."""
    assert code == 2 and err and (problems or len(err) == 1), err
    for line in err:
        assert "unexpected" not in line and "report it" not in line, err
        for n in names:
            assert n in line, (n, err)
    return err[0]


# ------------------------------------------------------------------------------------------------------- D2

@needs_fixture
def test_d2_placement_stand_in_cannot_rename_itself(tmp_path, capsys):
    """An extra_state file holding a Shard whose saved state says ``_saved_as: <Marker>``: the export
    succeeds, its extra_state_merged.pt never names Marker, loads with weights_only=True (numpy allowlist)
    and, even loaded with weights_only=False, builds no Marker.  Before the fix the merged file was pickled
    as Marker (the stand-in's __class__ answered from the file's own state)."""
    from torch.distributed.tensor.placement_types import Shard as TorchShard

    actor = copy_fixture(tmp_path)
    Marker.path = str(tmp_path / "RAN")
    evil = PickledAs(TorchShard, {"dim": 0, "_saved_as": MARKER_NAME, "__class__": MARKER_NAME})
    resave(actor / "extra_state_world_size_2_rank_1.pt", lambda st: st["rng"].__setitem__("evil", evil),
           saved_dtensors=False)
    out = tmp_path / "out"
    code, err = run(capsys, ["to-hf", str(actor), "--out", str(out)])
    assert code == 0, err
    merged = out / "extra_state_merged.pt"
    with zipfile.ZipFile(merged) as z:
        blob = b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    # no class is named (a GLOBAL opcode is "c<module>\n<name>\n"); the stand-in's name is a string now
    assert Marker.__qualname__.encode() not in blob and b"placement_types\nShard" not in blob
    plain = safeload.load_plain(merged)  # torch.load(weights_only=True), exactly numpy's rng globals allowed
    assert plain["rng"][1]["evil"] == {"class": "torch.distributed.tensor.placement_types.Shard",
                                       "fields": {"dim": 0}}
    # the rest of the state is what the rank files hold (the numpy rng array as saved)
    src = safeload.load(FIXTURE / "global_step_1" / "actor" / "extra_state_world_size_2_rank_0.pt",
                        mmap=False, allow_numpy=True)
    assert (plain["rng"][0]["numpy"][1] == src["rng"]["numpy"][1]).all()
    assert plain["lr_scheduler"] == src["lr_scheduler"]
    torch.load(merged, weights_only=False)  # what trainer_state.json used to recommend: still builds nothing
    assert CONSTRUCTED == [] and not Path(Marker.path).exists()
    trainer = json.loads((out / "trainer_state.json").read_text())
    assert "weights_only=False" not in json.dumps(trainer) and "weights_only=True" in trainer["restore"]
    assert any("held a torch.distributed.tensor.placement_types.Shard" in w for w in trainer["warnings"])


def test_d2_megatron_common_pt(megatron_ckpts, tmp_path, capsys):
    """The same stand-in in a Megatron save's optimizer/dist_ckpt/common.pt (its lr_scheduler): the export's
    merged extra state is plain data and builds no Marker."""
    from torch.distributed.tensor.placement_types import Shard as TorchShard

    root = megatron_ckpts["qwen3_pp2"]
    src = tmp_path / "ckpt" / "global_step_1"
    shutil.copytree(root / "global_step_1", src)
    common = src / "actor" / "optimizer" / "dist_ckpt" / "common.pt"
    state = torch.load(common, weights_only=False)  # our own copy of a real save
    state["lr_scheduler"]["evil"] = PickledAs(TorchShard, {"dim": 0, "_saved_as": MARKER_NAME})
    torch.save(state, common)
    Marker.path = str(tmp_path / "RAN")
    out = tmp_path / "out"
    code, err = run(capsys, ["to-hf", str(src), "--out", str(out), "--config", str(root / "base_model")])
    assert code == 0, err
    plain = safeload.load_plain(out / "extra_state_merged.pt")
    assert plain["lr_scheduler"]["evil"] == {"class": "torch.distributed.tensor.placement_types.Shard",
                                             "fields": {"dim": 0}}
    torch.load(out / "extra_state_merged.pt", weights_only=False)
    assert CONSTRUCTED == [] and not Path(Marker.path).exists()


def test_d2_stand_ins_take_their_identity_from_their_type():
    """Direct: a stand-in whose saved fields name another class still re-pickles only as the torch class it
    stands for, and dunder fields are not taken from the file."""
    import torch.distributed.tensor  # noqa: F401  (the real classes the stand-ins answer as)
    from ckpt_bridge import meshes

    s = meshes.Shard.__new__(meshes.Shard)
    s.__setstate__({"dim": 1, "_saved_as": MARKER_NAME, "__reduce_ex__": print})
    assert s.__dict__ == {"dim": 1} and meshes.saved_as(s) == "torch.distributed.tensor.placement_types.Shard"
    assert MARKER_NAME.encode() not in pickle.dumps(s)
    assert safeload.plain_data({"p": s}, where="x") == {"p": {"class": meshes.saved_as(s), "fields": {"dim": 1}}}


def test_plain_data_bounds_cycles_and_depth():
    from ckpt_bridge.errors import CheckpointFormatError

    loop: list = []
    loop.append(loop)
    with pytest.raises(CheckpointFormatError, match="contains itself"):
        safeload.plain_data({"a": loop}, where="f.pt")
    deep: list = []
    for _ in range(safeload.MAX_PLAIN_DEPTH + 5):
        deep = [deep]
    with pytest.raises(CheckpointFormatError, match="deeper"):
        safeload.plain_data(deep, where="f.pt")
    shared = [1, 2]
    out = safeload.plain_data({"x": shared, "y": shared}, where="f.pt")
    assert out["x"] is out["y"]


# ------------------------------------------------------------------------------------------------------- D6

def _huge_layout_mesh(mesh):
    """Rewrite a saved 2.13+ mesh's layout to claim 10^5 x 10^5 positions (fields only, a few bytes)."""
    flat = mesh._layout.__dict__["axes"][0]
    flat.__dict__.update(shape=(100_000, 100_000), stride=(100_000, 1))


@needs_fixture
@pytest.mark.parametrize("how", ["layout", "rank_map"])
def test_d6_mesh_claiming_1e10_positions_is_refused_before_enumerating(tmp_path, capsys, how):
    actor = copy_fixture(tmp_path)
    f = actor / "model_world_size_2_rank_0.pt"

    def mutate(sd):
        for v in {id(v._spec.mesh): v for v in sd.values()}.values():  # each saved mesh once
            m = v._spec.mesh
            if how == "layout":
                _huge_layout_mesh(m)
            else:  # a stride-0 view: 10^10 ranks in an 8-byte storage
                m.__dict__["_rank_map"] = torch.zeros(1, dtype=torch.int64).expand(10**10)

    resave(f, mutate, saved_dtensors=False)
    assert f.stat().st_size < 40_000
    for args in (["inspect", str(actor)], ["to-hf", str(actor), "--out", str(tmp_path / "out")]):
        code, err = run(capsys, args)
        assert_one_line(code, err, f.name, "damaged", problems=args[0] == "inspect")
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------- M1

@needs_fixture
@pytest.mark.parametrize("damage", ["shard_dim", "no_spec", "class_swap", "shard_no_dim"])
def test_m1_malformed_dtensors_are_one_line_naming_the_file(tmp_path, capsys, damage):
    actor = copy_fixture(tmp_path)
    key = "model.embed_tokens.weight"
    for f in (actor / "model_world_size_2_rank_1.pt", actor / "model_world_size_2_rank_0.pt"):  # both ranks alike
        _damage(f, key, damage)
    for args in (["to-hf", str(actor), "--out", str(tmp_path / "out")], ["inspect", str(actor)]):
        code, err = run(capsys, args)
        assert_one_line(code, err, "model_world_size_2_rank_", problems=args[0] == "inspect")
        assert not (tmp_path / "out").exists()


def _damage(f: Path, key: str, damage: str) -> None:

    def mutate(sd):
        p = sd[key]._spec.placements[0]  # a stand-in (what every load reads placements as)
        if damage == "shard_dim":
            p.__dict__["dim"] = 5
        else:
            p.__dict__.clear()

    if damage in ("no_spec", "class_swap"):
        # edit the DTensor's pickled state (_local_tensor, _spec) as torch writes it
        from torch.distributed.tensor import DTensor

        real = safeload.load(f, mmap=False)
        orig = DTensor.__reduce_ex__

        def edited(self, proto):
            func, (rebuild, cls, args, state) = orig(self, proto)[:2]
            parts = [dict(x or {}) for x in (state if isinstance(state, tuple) else (state, None))]
            if damage == "no_spec":
                for x in parts:
                    x.pop("_spec", None)
            else:  # torch's own rebuild would setattr it: the wrapper becomes another class
                parts[0]["__class__"] = torch.nn.Parameter
            return func, (rebuild, cls, args, tuple(parts) if isinstance(state, tuple) else parts[0])

        DTensor.__reduce_ex__ = edited
        try:
            torch.save(real, f)
        finally:
            DTensor.__reduce_ex__ = orig
    else:
        resave(f, mutate, saved_dtensors=False)


# ------------------------------------------------------------------------------------------------------- D3

def _mcore_015_metadata_class():
    """megatron-core 0.15.0's ``MCoreMetadata``, reproduced: megatron/core/dist_checkpointing/strategies/torch.py
    at tag core_v0.15.0, lines 461-467 (``@dataclass class MCoreMetadata(Metadata)`` with one field
    ``mcore_data: Optional[Dict[str, Dict[str, Any]]] = None``), pickled under that module's name.  The installed
    megatron-core 0.16.1 keeps the name only as an empty class (its torch.py lines 86-90), so it cannot write one."""
    from dataclasses import dataclass
    from typing import Any, Dict, Optional

    from torch.distributed.checkpoint.metadata import Metadata

    @dataclass
    class MCoreMetadata(Metadata):
        mcore_data: Optional[Dict[str, Dict[str, Any]]] = None

    MCoreMetadata.__module__ = "megatron.core.dist_checkpointing.strategies.torch"
    MCoreMetadata.__qualname__ = "MCoreMetadata"
    return MCoreMetadata


def _write_as_mcore_015(dist_ckpt: Path, monkeypatch) -> None:
    """Rewrite a real dist_ckpt's .metadata as megatron-core 0.15's MCoreSavePlanner.create_global_plan does
    (torch.py, core_v0.15.0, line 545: ``MCoreMetadata(mcore_data=mcore_data, **vars(metadata))``; mcore_data
    is the ChainMap of every rank's ``sh_ten.mcore_metadata``: per key a dict of plain data)."""
    from torch.distributed.checkpoint.metadata import Metadata

    mod = pytest.importorskip("megatron.core.dist_checkpointing.strategies.torch")
    cls = _mcore_015_metadata_class()
    monkeypatch.setattr(mod, "MCoreMetadata", cls)  # so pickle finds the class under megatron's name
    md = safeload.load_dcp_metadata(dist_ckpt / ".metadata")
    mcore_data = {k: {"nd_reformulated_orig_global_shape": None} for k in md.state_dict_metadata}
    # vars() of the Metadata DefaultSavePlanner built: its dataclass fields (what is here beyond them,
    # all_local_plans, megatron-core 0.16 added after the fact)
    fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(Metadata)}
    with open(dist_ckpt / ".metadata", "wb") as f:
        pickle.dump(cls(mcore_data=mcore_data, **fields), f)
    assert b"MCoreMetadata" in (dist_ckpt / ".metadata").read_bytes()


def test_d3_megatron_core_015_metadata_is_read_as_dcp_metadata(megatron_ckpts, tmp_path, monkeypatch, capsys):
    """A dist_ckpt whose .metadata megatron-core 0.15 wrote (v2 layout: model/ and extra/; v1: dist_ckpt/ at
    the actor root) exports bit for bit; before, 'holds a _MegatronPlainData, not DCP Metadata; the save is
    corrupt'.  Such a class called with arguments is not misread as 'a newer torch'."""
    from torch.distributed.checkpoint.metadata import Metadata

    from test_megatron import _assert_equals_reference

    root = megatron_ckpts["llama_tp2pp2"]
    src = tmp_path / "v2" / "global_step_1"
    shutil.copytree(root / "global_step_1", src)
    for d in src.rglob(".metadata"):
        _write_as_mcore_015(d.parent, monkeypatch)
    md = safeload.load_dcp_metadata(src / "actor" / "model" / "dist_ckpt" / ".metadata")
    assert type(md) is Metadata and md.mcore_data and md.state_dict_metadata
    code, err = run(capsys, ["to-hf", str(src), "--out", str(tmp_path / "out2"), "--config", str(root / "base_model")])
    assert code == 0, err
    _assert_equals_reference(tmp_path / "out2", root)

    v1 = tmp_path / "v1" / "global_step_1" / "actor"  # verl <= 0.8: dist_ckpt/ + huggingface/ at the actor root
    v1.mkdir(parents=True)
    shutil.copytree(src / "actor" / "model" / "dist_ckpt", v1 / "dist_ckpt")
    shutil.copytree(root / "base_model", v1 / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy2(src / "actor" / "transformer_config.json", v1 / "transformer_config.json")
    code, err = run(capsys, ["to-hf", str(v1.parent), "--out", str(tmp_path / "out1")])
    assert code == 0, err
    _assert_equals_reference(tmp_path / "out1", root)

    # MCoreMetadata called with arguments (REDUCE), which megatron-core never writes: not "a newer torch"
    bad = tmp_path / "bad.metadata"
    bad.write_bytes(b"\x80\x02cmegatron.core.dist_checkpointing.strategies.torch\nMCoreMetadata\nq\x00K\x01\x85q\x01Rq\x02.")
    from ckpt_bridge.errors import CheckpointFormatError

    with pytest.raises(CheckpointFormatError) as e:
        safeload.load_dcp_metadata(bad)
    assert "newer torch" not in str(e.value) and "never pickles" in str(e.value) and str(bad) in str(e.value)


# ------------------------------------------------------------------------------------------------ D5, M2

def _dcp_tensors(d: Path) -> dict[str, torch.Tensor]:
    from ckpt_bridge.formats.dcp import DCPReader

    r = DCPReader(d)
    return {k: r.read(k) for k in r.tensors()}


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "trainer-keys").glob("*.json"))


def test_d5_cache_key_follows_the_checkpointer_source(tmp_path, monkeypatch):
    """The key changes when a file that decides torchtitan's requests changes while its version and
    __init__.py do not (a git checkout / submodule bump), and only then: a copy of the installed torchtitan's
    real source, one line of components/checkpoint.py edited."""
    from ckpt_bridge.models import titan_eras
    from ckpt_bridge.plan import trainer_expectation as te

    pkg = titan_eras.package_dir()
    if pkg is None:
        pytest.skip("torchtitan is not installed")
    copy = tmp_path / "torchtitan"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__", "models", "experiments"))
    monkeypatch.setattr(titan_eras, "package_dir", lambda: copy)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = te._cache_file(cfg, [], "auto")
    (copy / "README.txt").write_text("not source")  # a file that decides nothing: same key
    assert te._cache_file(cfg, [], "auto") == before
    ckpt = copy / "components" / "checkpoint.py"
    ckpt.write_text(ckpt.read_text() + "\n# bumped\n")
    assert te._cache_file(cfg, [], "auto") != before
    # the key is one list of fields: one line adds a dependency
    assert te._torchtitan_key() in te.cache_key_fields(b"{}", [], "auto")


def test_m2_edited_or_mistyped_cache_entries_are_recomputed(tiny_hf_factory, tmp_path, monkeypatch, capsys):
    """to-dcp with a cold cache is the reference.  Then the remembered entry is edited: two fqns swapped
    (same shape, and different shapes), wrong types in valid JSON, a FIFO in its place.  Each later to-dcp
    recomputes (never crashes, never hangs) and writes the reference's tensors bit for bit."""
    import os
    import signal

    cache = tmp_path / "cache"
    monkeypatch.setenv("CKPT_BRIDGE_CACHE", str(cache))
    hf = tiny_hf_factory("llama")
    ref = tmp_path / "ref"
    assert cli(["to-dcp", str(hf), "--out", str(ref), "--quiet"]) == 0
    want = _dcp_tensors(ref)
    (entry,) = _entries(cache)
    clean = json.loads(entry.read_text())
    keys = clean["keys"]
    by_fqn = {k[1]: i for i, k in enumerate(keys)}
    q = next(f for f in by_fqn if f.endswith("layers.0.self_attn.q_proj.weight"))
    o = q.replace("q_proj", "o_proj")
    g = q.replace("self_attn.q_proj", "mlp.gate_proj")

    def swapped(a: str, b: str) -> dict:
        d = json.loads(json.dumps(clean))
        ia, ib = by_fqn[a], by_fqn[b]
        d["keys"][ia][1], d["keys"][ib][1] = d["keys"][ib][1], d["keys"][ia][1]
        return d

    edits = {
        "swap same shape": swapped(q, o),
        "swap shapes": swapped(q, g),
        "era fields an int": {**clean, "era": {**(clean["era"] or {}), "fields": 5}},
        "shape of strings": {**clean, "keys": [[k[0], k[1], [str(n) for n in k[2]], k[3]] for k in keys]},
        "tie groups of ints": {**clean, "tie_groups": [[1, 2]]},
    }
    assert keys[by_fqn[q]][2] == keys[by_fqn[o]][2] and keys[by_fqn[q]][2] != keys[by_fqn[g]][2]

    def alarm(*_):
        raise TimeoutError("reading the cache entry hung")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for name, value in [*edits.items(), ("fifo", None)]:
            entry.unlink()
            if value is None:
                os.mkfifo(entry)
            else:
                entry.write_text(json.dumps(value))
            out = tmp_path / name.replace(" ", "_")
            signal.alarm(60)
            code, err = run(capsys, ["to-dcp", str(hf), "--out", str(out), "--quiet"])
            signal.alarm(0)
            assert code == 0, (name, err)
            got = _dcp_tensors(out)
            assert sorted(got) == sorted(want), name
            assert all(torch.equal(got[k], want[k]) for k in want), name
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
