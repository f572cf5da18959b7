"""Paths read from a checkpoint's own files resolve inside the checkpoint or are refused with one line: a to-dcp
manifest's source.config_dir, an index's weight_map, a DCP .metadata's data file names, files symlinked out of
verl's huggingface/ dir.  A recorded source outside is used only when passed explicitly."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from ckpt_bridge.cli import main
from ckpt_bridge.commands.to_dcp import to_dcp
from ckpt_bridge.formats.dcp_files import HF_CONFIG_DIR, MANIFEST


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_refusal(capsys, out: Path, *argv, match: str) -> str:
    code, _, err = run_cli(capsys, "to-hf", *argv, "--out", out, "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and match in lines[0], err
    assert not out.exists()
    return lines[0]


@pytest.fixture(scope="module")
def dcp_dir(tiny_hf_factory, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("confine") / "dcp"
    to_dcp(tiny_hf_factory("olmo2"), d, progress=False)
    return d


@pytest.fixture
def secret(tmp_path) -> Path:
    """A directory the user never named: a config.json and tokenizer-like files that must not leak."""
    s = tmp_path / "secret"
    s.mkdir()
    (s / "tokenizer.json").write_text('{"secret": true}')
    (s / "vocab.txt").write_text("secret")
    return s


@pytest.mark.parametrize("recorded", ["absolute", "dotdot", "kept-dotdot"])
def test_manifest_config_dir_outside_is_not_followed(dcp_dir, tiny_hf_factory, secret, tmp_path, capsys, recorded):
    hf = tiny_hf_factory("olmo2")
    shutil.copy2(hf / "config.json", secret / "config.json")
    d = tmp_path / "dcp"
    shutil.copytree(dcp_dir, d)
    shutil.rmtree(d / HF_CONFIG_DIR)  # only the recorded paths are left to (not) follow
    m = json.loads((d / MANIFEST).read_text())
    m["source"]["config_dir"] = str(secret) if recorded == "absolute" else "../secret"
    if recorded == "kept-dotdot":
        m[HF_CONFIG_DIR + "_dir"] = "../secret"
    (d / MANIFEST).write_text(json.dumps(m))
    msg = assert_one_line_refusal(capsys, tmp_path / "out", d, match="outside the checkpoint and not followed")
    assert f"--config {m['source']['config_dir']}" in msg
    # passed explicitly, the same directory is the user's choice
    assert run_cli(capsys, "to-hf", d, "--out", tmp_path / "out", "--quiet", "--config", hf)[0] == 0
    assert not (tmp_path / "out" / "vocab.txt").exists()


def test_to_dcp_output_converts_back_from_its_own_config_copy(dcp_dir, tiny_hf_factory, tmp_path, capsys):
    """to-dcp keeps config + tokenizer in OUT/hf_config: the DCP converts back with no --config, even after
    the source dir moved away, and no path outside the checkpoint is read."""
    d = tmp_path / "dcp"
    shutil.copytree(dcp_dir, d)
    m = json.loads((d / MANIFEST).read_text())
    m["source"]["config_dir"] = str(tmp_path / "moved-away")
    (d / MANIFEST).write_text(json.dumps(m))
    assert run_cli(capsys, "to-hf", d, "--out", tmp_path / "out", "--quiet")[0] == 0
    hf = tiny_hf_factory("olmo2")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "olmo2"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_manifest_config_dir_inside_the_checkpoint_is_used(dcp_dir, tiny_hf_factory, tmp_path, capsys):
    d = tmp_path / "dcp"
    shutil.copytree(dcp_dir, d)
    shutil.copytree(tiny_hf_factory("olmo2"), d / "hf", ignore=shutil.ignore_patterns("*.safetensors*"))
    m = json.loads((d / MANIFEST).read_text())
    m["source"]["config_dir"] = "hf"
    (d / MANIFEST).write_text(json.dumps(m))
    assert run_cli(capsys, "to-hf", d, "--out", tmp_path / "out", "--quiet")[0] == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_index_weight_map_outside_the_folder_is_refused(tiny_hf_dir, tmp_path, capsys):
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, d)
    index = d / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    first = next(iter(idx["weight_map"]))
    shutil.copy2(d / idx["weight_map"][first], tmp_path / "x.safetensors")
    idx["weight_map"][first] = "../x.safetensors"  # a real file, but outside the checkpoint
    index.write_text(json.dumps(idx))
    assert_one_line_refusal(capsys, tmp_path / "out", d, match="'../x.safetensors' points outside the checkpoint")
    code, _, err = run_cli(capsys, "inspect", d)
    assert code == 2 and "outside the checkpoint" in err


def test_dcp_metadata_naming_a_file_outside_is_refused(dcp_dir, tiny_hf_factory, tmp_path, capsys):
    from torch.distributed.checkpoint import FileSystemReader

    d = tmp_path / "dcp"
    shutil.copytree(dcp_dir, d)
    md = FileSystemReader(str(d)).read_metadata()
    idx, info = next(iter(md.storage_data.items()))
    shutil.copy2(d / info.relative_path, tmp_path / "elsewhere.distcp")
    md.storage_data[idx] = type(info)(relative_path="../elsewhere.distcp", offset=info.offset, length=info.length)
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)
    assert_one_line_refusal(capsys, tmp_path / "out", d, "--config", tiny_hf_factory("olmo2"),
                            match="points at '../elsewhere.distcp', outside the checkpoint folder")


def test_verl_tokenizer_symlinked_out_of_the_checkpoint_is_refused(verl_ckpt, secret, tmp_path, capsys):
    actor = tmp_path / "actor"
    shutil.copytree(verl_ckpt("llama", "2"), actor)
    tok = actor / "huggingface" / "tokenizer.json"
    tok.unlink()
    tok.symlink_to(secret / "tokenizer.json")
    assert_one_line_refusal(capsys, tmp_path / "out", actor, match="tokenizer.json: resolves outside the checkpoint")
    # a huggingface/ dir that is itself a link elsewhere is not used as the config dir
    shutil.rmtree(actor / "huggingface")
    shutil.copy2(verl_ckpt("llama", "2") / "huggingface" / "config.json", secret / "config.json")
    (actor / "huggingface").symlink_to(secret)
    assert_one_line_refusal(capsys, tmp_path / "out", actor, match="no config.json found")


def test_hub_cache_snapshot_of_links_into_blobs_is_read(tiny_hf_dir, tmp_path, capsys):
    """A Hugging Face cache snapshot: every file is a symlink into ../../blobs.  The names in its index stay
    inside the folder, so it is read (confinement judges names from files, not the folder's own entries)."""
    blobs, snap = tmp_path / "models--x" / "blobs", tmp_path / "models--x" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_hf_dir.iterdir():
        shutil.copy2(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert run_cli(capsys, "inspect", snap)[0] == 0
    assert run_cli(capsys, "to-hf", snap, "--out", tmp_path / "out", "--quiet")[0] == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
