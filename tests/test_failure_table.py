"""Section 7's failure table: every failure is exactly one line on stderr and exit 2 (130 on Ctrl-C),
nothing partial is left next to --out, and the source files are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_bridge.cli import main as cli
from ckpt_bridge.formats.dcp_files import MANIFEST

PY = sys.executable


def tree_hash(d: Path) -> dict[str, str]:
    if d.is_file():
        return {d.name: hashlib.sha256(d.read_bytes()).hexdigest()}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def assert_fails(capsys, args: list[str], *, code: int = 2, says: str = "", sources: tuple[Path, ...] = ()):
    """Run the CLI in-process; exactly one stderr line containing ``says``; no output or .partial left."""
    hashes = [tree_hash(s) for s in sources]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    capsys.readouterr()
    rc = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (args, err)
    assert len(err) == 1, (args, err)
    assert says in err[0], (args, err[0])
    if out is not None:
        assert not os.path.lexists(out) or out.is_symlink(), out
        parent = out.parent if not out.parent.is_symlink() else out.parent.parent
        assert not [p for p in parent.iterdir() if ".partial-" in p.name], list(parent.iterdir())
    assert [tree_hash(s) for s in sources] == hashes
    return err[0]


@pytest.fixture(scope="module")
def dcp_dir(llama_dcp_with_aux):
    return llama_dcp_with_aux


def copy_dcp(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_distcp_and_offsets_past_the_end(dcp_dir, tmp_path, capsys):
    hf, clean = dcp_dir
    d = copy_dcp(clean, tmp_path / "trunc")
    big = max(d.glob("*.distcp"), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    for args in (["to-hf", str(d), "--out", str(tmp_path / "o")], ["to-hf", str(d), "--out", str(tmp_path / "x"), "--dry-run"],
                 ["verify", str(d), "--against", str(hf)], ["verify", str(d), str(hf)]):
        assert_fails(capsys, args, says=f"{big.name}", sources=(d,))

    d2 = copy_dcp(clean, tmp_path / "offsets")
    with open(d2 / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own clean file
    index, info = next(iter(md.storage_data.items()))
    info.offset = (d2 / info.relative_path).stat().st_size + 4096
    with open(d2 / ".metadata", "wb") as f:
        pickle.dump(md, f)
    line = assert_fails(capsys, ["to-hf", str(d2), "--out", str(tmp_path / "o")], says="truncated or from another save",
                        sources=(d2,))
    assert index.fqn in line


def test_verify_loss_without_a_tokenizer_or_with_too_short_a_text(dcp_dir, tmp_path, capsys):
    """verify --loss against a model dir of weights and config only, and on a text of one token: one line each
    saying which (transformers 5 builds an empty tokenizer from nothing, which gives no tokens at all)."""
    hf, clean = dcp_dir
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for p in hf.iterdir():
        if p.name == "config.json" or p.name.startswith("model"):
            shutil.copy2(p, bare / p.name)
    text = tmp_path / "text.txt"
    text.write_text("hello world, a few words of text")
    line = assert_fails(capsys, ["verify", str(clean), "--against", str(bare), "--loss", str(text)],
                        says=f"--loss needs the model's tokenizer and {bare} has none", sources=(clean, bare))
    assert "tokenizer.json" in line and "copy" in line
    one = tmp_path / "one.txt"
    one.write_text("a")
    assert_fails(capsys, ["verify", str(clean), "--against", str(hf), "--loss", str(one)],
                 says=f"--loss {one}: the tokenizer in {hf} makes 1 token(s) of it; a next-token loss needs at least 2",
                 sources=(clean, hf))
    assert cli(["verify", str(clean), "--against", str(hf), "--loss", str(text)]) == 0  # the same dir with a text


def _hf_with_config(src: Path, dst: Path, raw: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / "config.json").write_bytes(raw)
    return dst


@pytest.mark.parametrize("verb", ["to-hf", "to-dcp"])
def test_bad_config_json(tiny_hf_factory, tmp_path, capsys, verb):
    hf = tiny_hf_factory("llama")
    cfg = json.loads((hf / "config.json").read_text())
    cases = {
        "not UTF-8": (b"\xff\xfe{\x00", "not UTF-8"),
        "not an object": (b"[1, 2]", "not an object"),
        "unknown model_type": (json.dumps({**cfg, "model_type": "llamazilla"}).encode(), "'llamazilla'"),
        "auto_map": (json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}).encode(), "auto_map"),
        "wrong field type": (json.dumps({**cfg, "architectures": "LlamaForCausalLM"}).encode(), "'architectures'"),
    }
    for i, (name, (raw, says)) in enumerate(cases.items()):
        d = _hf_with_config(hf, tmp_path / f"hf{i}", raw)
        assert_fails(capsys, [verb, str(d), "--out", str(tmp_path / "o")], says=says, sources=(d,))


def test_wrong_json_structure_names_the_field(dcp_dir, verl_ckpt, tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("llama")  # sharded: has model.safetensors.index.json
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert_fails(capsys, ["to-hf", str(d), "--out", str(tmp_path / "o")], says="'weight_map'", sources=(d,))

    actor = tmp_path / "verl" / "global_step_1" / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    cfg = json.loads((actor / "fsdp_config.json").read_text())
    (actor / "fsdp_config.json").write_text(json.dumps({**cfg, "world_size": "two"}))
    assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o")], says="'world_size'", sources=(actor,))

    _, clean = dcp_dir
    m = copy_dcp(clean, tmp_path / "manifest")
    doc = json.loads((m / MANIFEST).read_text())
    (m / MANIFEST).write_text(json.dumps({**doc, "aux": {"future_predictor": 1}}))
    for args in (["to-hf", str(m), "--out", str(tmp_path / "o")], ["verify", str(m), "--against", str(hf)],
                 ["to-dcp", str(hf), "--out", str(tmp_path / "o"), "--aux-from", str(m)]):
        assert_fails(capsys, args, says="field 'aux'", sources=(m,))


def test_absurd_aux_size_in_a_manifest_is_refused_before_allocating(dcp_dir, tmp_path, capsys):
    hf, clean = dcp_dir
    m = copy_dcp(clean, tmp_path / "absurd")
    doc = json.loads((m / MANIFEST).read_text())
    doc["aux"][0]["spec"] = "future_predictor:linear:99999999999"  # ~256 TB of fp32 with hidden 64
    (m / MANIFEST).write_text(json.dumps(doc))
    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    for args in (["verify", str(m), "--against", str(hf), "--loss", str(text)],
                 ["to-dcp", str(hf), "--out", str(tmp_path / "o"), "--aux-from", str(m)]):
        line = assert_fails(capsys, args, says="exceeds the model's largest dimension", sources=(m,))
        assert "aux[0].spec" in line


def test_symlink_loop_out_and_complex_tensor(tiny_hf_factory, tmp_path, capsys):
    hf = tiny_hf_factory("llama")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for verb in ("to-hf", "to-dcp"):
        assert_fails(capsys, [verb, str(hf), "--out", str(loop)], says="symlink loop", sources=(hf,))
        assert_fails(capsys, [verb, str(hf), "--out", str(loop / "x")], says="symlink loop", sources=(hf,))

    from ckpt_bridge.formats.hf import HFReader

    r = HFReader(hf)
    sd = {k: r.read(k) for k in r.tensors()}
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = torch.complex(sd[key], sd[key])
    d = tmp_path / "complex"
    d.mkdir()
    shutil.copy(hf / "config.json", d)
    torch.save(sd, d / "pytorch_model.bin")
    line = assert_fails(capsys, ["to-hf", str(d), "--out", str(tmp_path / "o")], says="complex64", sources=(d,))
    assert key in line


# ---------------------------------------------------------------- ENOSPC (a small tmpfs)


@pytest.fixture
def small_fs(tmp_path):
    """A 200 KB tmpfs (the tiny models need ~500 KB).  Needs root and mount permission."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): ENOSPC needs a small file system")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line_with_the_bytes_needed(dcp_dir, tiny_hf_factory, small_fs, capsys):
    hf, d = dcp_dir
    for args in (["to-hf", str(hf), "--out", str(small_fs / "a")],
                 ["to-dcp", str(hf), "--out", str(small_fs / "b")],
                 ["to-hf", str(d), "--out", str(small_fs / "c")]):
        line = assert_fails(capsys, args + ["--quiet"], says="no space left on the device", sources=(hf, d))
        assert "needs" in line and "bytes free" in line and str(small_fs) in line
    assert list(small_fs.iterdir()) == []


FAILED_CONSUMER = """
import sys, torch
from ckpt_bridge.pipeline.stream import read_ahead
def read(k):  # a read that spends its time inside torch's C++ code, as DCP's reader does
    a = torch.randn(300, 300)
    for _ in range(10):
        a = a @ a / (a @ a).norm()
    return a
kept = []
def export():
    stream = read_ahead(list(range(20)), read)
    for k, t in stream:
        raise OSError(28, "No space left on device")  # the writer fails at the first tensor
try:
    export()
except OSError as e:
    kept.append(e)  # its traceback keeps the generator (and its reader thread) alive, as the CLI's did
sys.exit(2)
"""


def test_failed_export_exits_without_sigabrt():
    """DCP -> HF on a full disk used to abort at exit (SIGABRT, "terminate called without an active
    exception"): the failed export's read-ahead thread was still inside DCP's C++ reader when the interpreter
    killed it.  The same situation, deterministic: the worker must finish its read and return."""
    p = subprocess.run([PY, "-c", FAILED_CONSUMER], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "terminate called" not in p.stderr, (p.returncode, p.stderr)


# ---------------------------------------------------------------- Ctrl-C

SLOW_TO_DCP = """
import sys, time
from ckpt_bridge.formats.hf import HFReader
read, read_rows = HFReader.read, HFReader.read_rows
def slow(self, key, dtype=None):  # slow the source down so the signal lands inside DCP's writer
    time.sleep(0.2)
    return read(self, key, dtype)
def slow_rows(self, key, out, start, stop):  # renames reach DCP's writer as row pieces
    time.sleep(0.2)
    return read_rows(self, key, out, start, stop)
HFReader.read, HFReader.read_rows = slow, slow_rows
from ckpt_bridge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_to_dcp(tiny_hf_factory, tmp_path):
    hf = tiny_hf_factory("llama")
    out = tmp_path / "o"
    p = subprocess.Popen([PY, "-c", SLOW_TO_DCP, "to-dcp", str(hf), "--out", str(out), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".o.partial-*/**/*.distcp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.partial-*/**/*.distcp")), "to-dcp never started writing"
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    err = stderr.strip().splitlines()
    assert p.returncode == 130 and len(err) == 1 and "interrupted" in err[0], (p.returncode, stderr)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- issue 19 rows 1-5 (rel-lora): chunk coverage


def _rewrite_chunks(d: Path, edit) -> str:
    """Apply ``edit(key, tensor_md, storage_data)`` to the largest 2-D tensor of ``d/.metadata``; its key."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(d / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own clean file
    key, tmd = max(((k, v) for k, v in md.state_dict_metadata.items()
                    if isinstance(v, TensorStorageMetadata) and len(v.size) == 2), key=lambda kv: kv[1].size.numel())
    edit(key, tmd, md.storage_data)
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return key


def test_dcp_chunks_that_do_not_cover_a_tensor_are_refused(dcp_dir, tmp_path, capsys):
    """Row 1: a tensor's only chunk rewritten to its first half exported zeros for the rest, exit 0."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    hf, clean = dcp_dir
    d = copy_dcp(clean, tmp_path / "gap")
    rows = {}

    def halve(key, tmd, storage):
        (c,) = tmd.chunks
        rows["n"] = tmd.size[0]
        tmd.chunks = [ChunkStorageMetadata(c.offsets, torch.Size([tmd.size[0] // 2, *tmd.size[1:]]))]

    key = _rewrite_chunks(d, halve)
    n = rows["n"]
    for args in (["to-hf", str(d), "--out", str(tmp_path / "o")], ["to-hf", str(d), "--out", str(tmp_path / "o"),
                                                                   "--dry-run"],
                 ["verify", str(d), "--against", str(hf)]):
        line = assert_fails(capsys, args, says=f"no chunk holds rows {n // 2}-{n - 1}", sources=(d,))
        assert repr(key) in line and ".metadata" in line
    assert cli(["inspect", str(d)]) == 2  # inspect lists the problem
    assert f"{key!r}: no chunk holds rows {n // 2}-{n - 1}" in capsys.readouterr().out

    d2 = copy_dcp(clean, tmp_path / "overlap")

    def overlap(key, tmd, storage):  # a second chunk over rows the first already holds (same stored bytes)
        (c,) = tmd.chunks
        half = tmd.size[0] // 2
        tmd.chunks = [c, ChunkStorageMetadata(torch.Size([half, 0]), torch.Size([half, *tmd.size[1:]]))]
        storage[MetadataIndex(key, torch.Size([half, 0]))] = storage[MetadataIndex(key, c.offsets)]

    key = _rewrite_chunks(d2, overlap)
    line = assert_fails(capsys, ["to-hf", str(d2), "--out", str(tmp_path / "o")], says="both hold rows", sources=(d2,))
    assert repr(key) in line


def test_chunk_coverage_rule():
    """The one coverage rule (ckpt_bridge.formats.chunks): gaps and overlaps named as regions, in the grid and in the
    sweep used for layouts whose grid would be huge; cheap for a huge tensor."""
    import time

    from ckpt_bridge.formats import chunks

    rows = [((0, 0), (32, 64)), ((32, 0), (32, 64))]
    tiles = [((0, 0), (4, 3)), ((4, 0), (4, 3)), ((0, 3), (4, 3)), ((4, 3), (4, 3))]
    brick = [((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 2)), ((2, 2), (2, 4))]
    for shape, boxes in (((64, 64), rows), ((8, 6), tiles), ((4, 6), brick), ((4, 4), [((0, 0), (4, 4)),
                                                                                     ((4, 0), (0, 4))])):
        assert chunks.coverage(shape, boxes).exact
    big = (1 << 40, 1 << 20)  # 2**60 elements: only the chunk boundaries are looked at
    t = time.perf_counter()
    c = chunks.coverage(big, [((0, 0), (1 << 39, 1 << 20))] + [(((1 << 39) + i, 0), (1, 1 << 20)) for i in range(999)])
    assert time.perf_counter() - t < 1.0
    assert c.problem([]) == f"no chunk holds rows {(1 << 39) + 999}-{(1 << 40) - 1} of {big}"
    gap = chunks.coverage((8, 6), tiles[:3])
    assert gap.problem(tiles[:3]) == "no chunk holds [4:8, 3:6] of (8, 6)" and gap.gap_elements == 12
    both = [((0, 0), (40, 64)), ((32, 0), (32, 64))]
    assert chunks.coverage((64, 64), both).problem(both) == ("chunks at offsets (0, 0) and (32, 0) both hold "
                                                              "rows 32-39 of (64, 64)")
    assert "outside" in chunks.coverage((4,), [((2,), (3,))]).problem([((2,), (3,))])
    old = chunks.GRID_CELLS_MAX
    chunks.GRID_CELLS_MAX = 0
    try:
        assert chunks.coverage((4, 6), brick).exact
        assert chunks.coverage((8, 6), tiles[:3]).problem(tiles[:3]) == "no chunk holds 12 of its 48 elements of (8, 6)"
        assert "both hold rows 32-39" in chunks.coverage((64, 64), both).problem(both)
    finally:
        chunks.GRID_CELLS_MAX = old


# ---------------------------------------------------------------- issue 19 rows 2-5 (rel-lora): LoRA exports


def lora_actor(lora_root: Path, case: str, tmp_path: Path) -> Path:
    """A copy of a real verl LoRA save's actor dir (session fixture ``lora_root``), safe to damage."""
    dst = tmp_path / case / "global_step_2" / "actor"
    shutil.copytree(lora_root / case / "global_step_2" / "actor", dst)
    return dst


@pytest.mark.parametrize("field,value,says", [
    ("lora_alpha", float("nan"), "field 'lora_alpha' should be a finite number, got nan"),
    ("lora_alpha", float("inf"), "field 'lora_alpha' should be a finite number, got inf"),
    ("lora_alpha", True, "field 'lora_alpha' should be a finite number, got True"),
    ("r", 4.7, "field 'r' should be an integer >= 1, got 4.7"),
    ("r", "4", "field 'r' should be an integer >= 1, got '4'"),
    ("r", None, "has no field 'r'"),
])
def test_lora_numbers_are_checked(lora_root, tmp_path, capsys, field, value, says):
    """Row 3: NaN / Infinity alphas folded NaN into every weight; r 4.7 was taken as 4, alpha true as 1; a missing
    r was "unexpected KeyError: 'r'".  In verl's lora_train_meta.json and in an adapter_config.json alike."""
    src = lora_actor(lora_root, "llama", tmp_path)
    meta = json.loads((src / "lora_train_meta.json").read_text())
    bad = {k: v for k, v in meta.items() if k != field} | ({} if value is None else {field: value})
    (src / "lora_train_meta.json").write_text(json.dumps(bad))  # json writes NaN / Infinity as Python reads them
    line = assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "o")], says=says, sources=(src,))
    assert str(src / "lora_train_meta.json") in line
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.parent.mkdir()
    good = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "modules_to_save": ["lm_head"]}
    cfg.write_text(json.dumps({k: v for k, v in good.items() if k != field} | ({} if value is None else {field: value})))
    for args in (["to-hf", str(src), "--out", str(tmp_path / "o"), "--lora-config", str(cfg.parent)],
                 ["to-hf", str(src), "--out", str(tmp_path / "o"), "--lora-config", str(cfg), "--dry-run"]):
        line = assert_fails(capsys, args, says=says, sources=(src, cfg.parent))
        assert str(cfg) in line


PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_config(d: Path, **fields) -> Path:
    d.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": PROJ,
           "modules_to_save": ["lm_head"], **fields}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("fields,says", [
    ({"target_modules": ["q_proj"]}, "does not match 'model.layers.0.mlp.down_proj' (12 of the 14 modules"),
    ({"target_modules": r".*\.q_proj"}, "does not match 'model.layers.0.mlp.down_proj' (12 of the 14 modules"),
    ({"target_modules": PROJ, "layers_to_transform": [1]}, "does not match 'model.layers.0.mlp.down_proj' (7 of"),
    ({"target_modules": PROJ, "exclude_modules": ["model.layers.1.self_attn.q_proj"]},
     "does not match 'model.layers.1.self_attn.q_proj' (1 of"),
    ({"target_modules": PROJ + ["embed_tokens"]}, "also matches 'model.embed_tokens'"),
    ({"modules_to_save": ["embed_tokens"]}, "does not name 'lm_head'"),
])
def test_lora_targets_that_disagree_with_the_tensors_are_refused(lora_root, tmp_path, capsys, fields, says):
    """Row 4: a target_modules naming fewer modules than the tensors hold gave a merged model folding all 14 and an
    adapter PeftModel.from_pretrained applies to q_proj only.  PEFT's own matching rules decide (regex, suffix,
    layers_to_transform, exclude_modules, modules_to_save, all-linear); a config that disagrees is refused."""
    src = lora_root / "llama" / "global_step_2" / "actor"
    cfg = _lora_config(tmp_path / "cfg", **fields)
    for mode in ("both", "adapter", "merge"):
        line = assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "o"), "--lora", mode, "--lora-config",
                                     str(cfg)], says=says, sources=(src, cfg))
        assert str(cfg / "adapter_config.json") in line and "--lora-config" in line


def test_lora_targets_by_regex_and_omitted_give_an_adapter_that_equals_the_merge(lora_root, tmp_path):
    """Row 4, the configs that do match: a regex naming exactly the adapted modules, and a config that leaves
    target_modules out (then the adapter dir says what the tensors hold).  PeftModel.from_pretrained of the
    adapter dir gives the live model's logits and the merged model is PEFT's own merge."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    case = lora_root / "llama"
    ref = torch.load(case / "reference" / "logits.pt")
    peft_merged = None
    for i, fields in enumerate(({"target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"},
                                {"target_modules": "all-linear"},  # every Linear but the output embedding
                                {"target_modules": None, "modules_to_save": None})):
        cfg = _lora_config(tmp_path / f"cfg{i}", **fields)
        out = tmp_path / f"out{i}"
        assert cli(["to-hf", str(case / "global_step_2" / "actor"), "--out", str(out), "--lora-config", str(cfg),
                    "--quiet"]) == 0
        written = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
        assert written["target_modules"] == fields["target_modules"] or sorted(written["target_modules"]) == sorted(PROJ)
        base = AutoModelForCausalLM.from_pretrained(case / "base_model", dtype=torch.float32)
        adapter = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
        with torch.no_grad():
            assert torch.equal(adapter(input_ids=ref["tokens"]).logits, ref["logits"])
            if peft_merged is None:
                peft_merged = adapter.merge_and_unload().state_dict()
        got = load_file(out / "model.safetensors")
        assert got.keys() <= peft_merged.keys() and all(torch.equal(v, peft_merged[k]) for k, v in got.items())


def test_lora_only_base_recorded_outside_the_checkpoint_needs_base(lora_root, tmp_path, capsys):
    """Row 5: a save_lora_only checkpoint whose huggingface/config.json _name_or_path names a local model dir
    elsewhere: that dir's weights were read into the export with no --base.  Now only --base reads it."""
    src = lora_actor(lora_root, "qwen2_lora_only", tmp_path)
    base = lora_root / "qwen2_lora_only" / "base_model"
    cfg = json.loads((src / "huggingface" / "config.json").read_text())
    (src / "huggingface" / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(base)}))
    for mode in ("both", "merge"):
        line = assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "o"), "--lora", mode],
                            says=f"pass --base {base}", sources=(src, base))
        assert str(src / "huggingface" / "config.json") in line  # the file that named it
    assert cli(["to-hf", str(src), "--out", str(tmp_path / "a"), "--lora", "adapter", "--quiet"]) == 0
    assert not (tmp_path / "a" / "model.safetensors").exists()
    assert cli(["to-hf", str(src), "--out", str(tmp_path / "m"), "--base", str(base), "--quiet"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_base_of_another_architecture_is_refused(lora_root, dcp_dir, tmp_path, capsys):
    """Row 5, second half: --base of a Llama model for a Qwen2 LoRA (and for a Llama DCP, a Qwen2 base) used to
    replace the checkpoint's config with the base's, exit 0."""
    src = lora_root / "qwen2_lora_only" / "global_step_2" / "actor"
    llama_base = lora_root / "llama" / "base_model"
    line = assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "o"), "--base", str(llama_base)],
                        says="architectures 'LlamaForCausalLM'", sources=(src, llama_base))
    assert "'Qwen2ForCausalLM'" in line and str(src / "huggingface" / "config.json") in line
    _, dcp = dcp_dir
    qwen_base = lora_root / "qwen2_lora_only" / "base_model"
    line = assert_fails(capsys, ["to-hf", str(dcp), "--out", str(tmp_path / "o"), "--base", str(qwen_base)],
                        says="architectures 'Qwen2ForCausalLM'", sources=(dcp, qwen_base))
    assert "'LlamaForCausalLM'" in line
# ---------------------------------------------------------------- issue 19, rows 6-12 (rel-misc)

def _run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ckpt_bridge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _edited_config(src: Path, dst: Path, **fields) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    return _hf_with_config(src, dst, json.dumps({**cfg, **fields}).encode())


@pytest.mark.parametrize("fields, says", [
    ({"num_hidden_layers": 1000000000}, "num_hidden_layers = 1000000000, but the checkpoint's"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers = 1000000000.0 is not an integer"),
    ({"hidden_size": 4096}, "hidden_size = 4096, but no tensor has a dimension of that size"),
    ({"vocab_size": 0}, "vocab_size = 0 must be at least 1"),
    ({"pad_token_id": 300}, "pad_token_id = 300 is outside the vocabulary"),
], ids=["layers-1e9-int", "layers-1e9-float", "hidden", "vocab-0", "pad-id"])
def test_issue19_config_that_describes_another_model(tiny_hf_factory, dcp_dir, verl_ckpt, tmp_path, capsys,
                                                     fields, says):
    """Row 6 (and 10): refused in one line before transformers parses the config or any model is built, in every
    direction that builds one; it used to run without an end (1e9 layers) or print transformers' warnings."""
    hf = tiny_hf_factory("llama")
    bad = _edited_config(hf, tmp_path / "bad", **fields)
    _, dcp = dcp_dir
    t0 = time.monotonic()
    for args in (["to-dcp", str(bad), "--out", str(tmp_path / "o")],
                 ["to-dcp", str(bad), "--out", str(tmp_path / "o"), "--titan-model", "llama3"],
                 ["to-hf", str(bad), "--out", str(tmp_path / "o")],
                 ["to-hf", str(verl_ckpt("llama", "2")), "--config", str(bad), "--out", str(tmp_path / "o")],
                 ["to-hf", str(dcp), "--config", str(bad), "--out", str(tmp_path / "o")],
                 ["verify", str(bad), str(hf), "--logits"],
                 ["verify", str(dcp), "--against", str(bad)]):
        assert_fails(capsys, args, says=says, sources=(bad,))
    rc, problems = _inspect_problems(capsys, bad)  # inspect: the same refusal, listed
    assert rc == 2 and says in problems, problems
    assert time.monotonic() - t0 < 60
    # transformers' own log lines (its handler writes to the real stderr): a subprocess sees them all
    r = _run("to-dcp", bad, "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


def _inspect_problems(capsys, d: Path) -> tuple[int, str]:
    from ckpt_bridge.cli import main

    capsys.readouterr()
    rc = main(["inspect", str(d), "--json"])
    return rc, "\n".join(json.loads(capsys.readouterr().out)["problems"])


@pytest.mark.parametrize("fields", [{"auto_map": {"AutoModelForCausalLM": "m.M"}}, {"model_type": "llamazilla"},
                                    {"hidden_size": -64}, {"num_hidden_layers": 1000000000}],
                         ids=["auto_map", "model_type", "negative-hidden", "layers"])
def test_issue19_inspect_lists_what_to_hf_and_to_dcp_refuse(tiny_hf_factory, verl_ckpt, tmp_path, capsys, fields):
    """Row 11: inspect used to say "problems none" (exit 0); it now lists the very line to-hf / to-dcp print."""
    bad = _edited_config(tiny_hf_factory("llama"), tmp_path / "bad", **fields)
    rc, problems = _inspect_problems(capsys, bad)
    for verb in ("to-hf", "to-dcp"):
        line = assert_fails(capsys, [verb, str(bad), "--out", str(tmp_path / "o")], sources=(bad,))
        assert rc == 2 and line.split("error: ", 1)[1] in problems, (line, problems)
    actor = tmp_path / "verl" / "global_step_1" / "actor"  # a real verl save carrying that config
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    cfg = json.loads((actor / "huggingface" / "config.json").read_text())
    (actor / "huggingface" / "config.json").write_text(json.dumps({**cfg, **fields}))
    rc, problems = _inspect_problems(capsys, actor)
    line = assert_fails(capsys, ["to-hf", str(actor), "--out", str(tmp_path / "o")], sources=(actor,))
    assert rc == 2 and line.split("error: ", 1)[1] in problems, (line, problems)


def test_issue19_usage_errors_are_one_line(tiny_hf_dir, tmp_path):
    """Row 9: argparse's usage errors: one line naming the help to read, exit 2; --help unchanged."""
    for args, says in ((["to-hf", tiny_hf_dir, "--out", tmp_path / "o", "--lora", "bogus"], "argument --lora"),
                       (["to-hf", tiny_hf_dir, "--out", tmp_path / "o", "--workers", "abc"], "'abc'"),
                       (["to-dcp", tiny_hf_dir], "--out"), (["frobnicate"], "invalid choice")):
        r = _run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
        verb = "ckpt-bridge" + (f" {args[0]}" if args[0] != "frobnicate" else "")
        assert lines[0].startswith(f"{verb}: error: ") and lines[0].endswith(f"see {verb} --help"), lines[0]
    r = _run("to-hf", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: ckpt-bridge to-hf") and "--workers N" in r.stdout
    assert "--worker " not in r.stdout and "RANK/SIZE" not in r.stdout  # the internal flag stays hidden
    assert not (tmp_path / "o").exists()


def test_issue19_worker_coordination_is_not_in_the_environment(tiny_hf_dir, tmp_path):
    """Row 12: a stray CKPT_BRIDGE_WORKER made a plain to-hf pwrite into another directory's files; the hidden
    --worker flag works only for a process whose parent is writing that --out."""
    victim = tmp_path / "victim"
    shutil.copytree(tiny_hf_dir, victim)
    before = tree_hash(victim)
    env = dict(os.environ, CKPT_BRIDGE_WORKER=json.dumps({"rank": 1, "size": 2, "tmp": str(victim)}))
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run("to-hf", tiny_hf_dir, "--out", ref, "--quiet").returncode == 0
    r = _run("to-hf", tiny_hf_dir, "--out", out, "--quiet", env=env)
    assert r.returncode == 0 and tree_hash(victim) == before, r.stderr
    assert {k: v for k, v in tree_hash(out).items() if k != "ckpt_bridge_export.json"} == \
        {k: v for k, v in tree_hash(ref).items() if k != "ckpt_bridge_export.json"}
    for spec in ("1/2", "0/2", "x"):  # by hand: refused, nothing written
        r = _run("to-hf", tiny_hf_dir, "--out", tmp_path / "w", "--worker", spec)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "internal flag" in r.stderr
    assert not (tmp_path / "w").exists() and tree_hash(victim) == before


def test_issue19_workers_capped_by_cpus_and_items(verl_ckpt, tmp_path, capsys, caplog, monkeypatch):
    """Row 7: --workers 500 started ~360 processes (OOM killer); now one per usable CPU (and per work item), with
    a note, and the bytes of a one-process export.  A worker that cannot be started leaves nothing."""
    from ckpt_bridge.pipeline import team as team_mod
    from ckpt_bridge.cli import main

    src = verl_ckpt("llama", "2")
    started = []
    real_popen = subprocess.Popen

    def spy(*a, **k):
        started.append(a[0])
        return real_popen(*a, **k)

    monkeypatch.setattr(team_mod.subprocess, "Popen", spy)
    assert main(["to-hf", str(src), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["to-hf", str(src), "--out", str(tmp_path / "many"), "--quiet", "--workers", "500"]) == 0
    cpus = team_mod.usable_cpus()
    assert len(started) == min(cpus, 29) - 1, started
    assert f"note: --workers 500: using {cpus} process(es), one per CPU" in caplog.text
    assert tree_hash(tmp_path / "one").keys() == tree_hash(tmp_path / "many").keys()
    one, many = tree_hash(tmp_path / "one"), tree_hash(tmp_path / "many")
    assert all(one[k] == many[k] for k in one if k != "ckpt_bridge_export.json")

    t = team_mod.Team(size=8, kind="local")  # the cap by work items, decided by the leader before starting any
    t.fit(3)
    assert (t.size, t.kind) == (3, "local")
    t.fit(0)
    assert (t.size, t.kind) == (1, "solo")

    def no_fork(*a, **k):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(team_mod, "usable_cpus", lambda: 4)
    monkeypatch.setattr(team_mod.subprocess, "Popen", no_fork)
    assert_fails(capsys, ["to-hf", str(src), "--out", str(tmp_path / "o"), "--workers", "4"],
                 says="Resource temporarily unavailable", sources=(src,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "one"]  # no partial, no lock file


WATCH_HELD = """
import sys, time
from pathlib import Path
from ckpt_bridge.commands import to_hf as export
from ckpt_bridge.cli import main
go, ready = Path(sys.argv[1]), Path(sys.argv[2])
original = export._write_configs
def held(*a, **k):  # weights written, the step's lock held: wait until the test lets go
    ready.touch()
    while not go.exists():
        time.sleep(0.02)
    return original(*a, **k)
export._write_configs = held
sys.exit(main(sys.argv[3:]))
"""


def test_issue19_two_watchers_on_one_root(verl_ckpt, tmp_path):
    """Row 8: two `watch --once --all` on one root at once.  One holds step 1 (mid-export) while the other
    runs: the second skips step 1 and exports step 2; the first then finishes step 1 and skips step 2.  Both
    exit 0, each step is exported once and equals a plain to-hf, and nothing is left (no .conflict-PID copy,
    no .partial, no lock file)."""
    root = tmp_path / "run"
    shutil.copytree(verl_ckpt("llama", "2").parent.parent, root, ignore=shutil.ignore_patterns("reference", "base_model"))
    shutil.copytree(root / "global_step_1", root / "global_step_2")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    go, ready = tmp_path / "go", tmp_path / "ready"
    first = subprocess.Popen([PY, "-c", WATCH_HELD, str(go), str(ready), "watch", str(root), "--once", "--all"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = _run("watch", root, "--once", "--all")
    go.touch()
    out1, err1 = first.communicate(timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "step 1: skipped" in second.stdout and "another ckpt-bridge process is exporting it" in second.stdout
    assert "step 2: exported" in second.stdout
    assert first.returncode == 0, out1 + err1
    assert "step 1: exported" in out1 and "step 2: skipped" in out1, out1
    ref = tmp_path / "ref"
    assert _run("to-hf", root / "global_step_1" / "actor", "--out", ref, "--quiet").returncode == 0
    for step in (1, 2):
        step_dir = root / f"global_step_{step}"
        names = [p.name for p in step_dir.iterdir()]
        assert "actor_hf" in names and not [n for n in names if ".conflict-" in n or n.startswith(".")], names
        got = tree_hash(step_dir / "actor_hf")
        want = tree_hash(ref)
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] for k in want if k.endswith(".safetensors")), step
