"""Every TorchTitan era, for real: the PyPI releases 0.1.0 (flat, ``initial_load_model_weights_only``), 0.2.2
and 0.3.0 (the venv's; flat, ``initial_load_model_only``), and, from source tarballs in ``$CKPT_BRIDGE_UPSTREAM``
(not on PyPI; skipped without it), the nested era's e320a37 (versioned 0.1.0) and 5e2033c (0.0.2) and flame's
pin 0b44d4c (flat, ``initial_load_model_weights_only``); each but 0.3.0 installed as an overlay.

Per era one torchrun job (``ckpt_bridge.testing.titan_era_check``; three at a time): ``to-dcp --layout
auto`` and ``verify --layout-for installed`` ask that era; the printed flags are parsed by that era's own
config parser; its real CheckpointManager loads our output into a meta-built -> to_empty model on 1 rank and on
2 FSDP2 ranks (torch.equal with the HF files and the seeded aux heads; after_load gives the HF loss);
set_initial_load sets that era's own fields (or places step-0) and never touches a step-0 it did not create.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_bridge.testing import upstream
from ckpt_bridge.testing.harness import run_torchrun
from ckpt_bridge.testing.overlays import OverlayError, overlay_env
from ckpt_bridge.testing.upstream import UpstreamMissing, tarball
from ckpt_bridge.models.titan_eras import read_source


@dataclass(frozen=True)
class Era:
    layout: str  # the keys its trainer loads
    seed: str  # how a seed is given: "step-0" (placed under the dump folder) or the model-only field it sets
    config_module: str  # where its own config class lives


ERAS = {
    "0.1.0": Era("flat", "initial_load_model_weights_only", "torchtitan.config_manager"),
    "0.2.2": Era("flat", "initial_load_model_only", "torchtitan.config.job_config"),
    "0.3.0": Era("flat", "initial_load_model_only", "torchtitan.components.checkpointer.dcp"),
    "e320a37": Era("nested", "step-0", "torchtitan.config_manager"),
    "5e2033c": Era("nested", "step-0", "torchtitan.config_manager"),
    "0b44d4c": Era("flat", "initial_load_model_weights_only", "torchtitan.config_manager"),
}
AUX = ["future_predictor", "action_layer:linear:16"]


def is_release(era: str) -> bool:
    return era == upstream.VENV_RELEASE or era in upstream.RELEASES


def era_name(era: str) -> str:
    """How ckpt-bridge names the installed era: a release by its version, a source install by its commit."""
    return f"torchtitan {era}" if is_release(era) else f"(commit {era})"


def _tarball(era: str) -> Path:
    try:
        return tarball(f"torchtitan-{era}")
    except UpstreamMissing as e:
        pytest.skip(str(e))


def era_overlay(era: str, deps: bool = True) -> Path | None:
    try:
        return upstream.era_overlay(era, deps)
    except UpstreamMissing as e:
        pytest.skip(str(e))
    except OverlayError as e:
        pytest.fail(f"cannot build the torchtitan {era} overlay: {e}")


@pytest.fixture(scope="session")
def era_results(trained_olmo2, tmp_path_factory):
    """era -> the JSON of its titan_era_check torchrun job, or the exception (UpstreamMissing: a skip)."""

    def one(era: str) -> dict | BaseException:
        try:
            d = upstream.era_overlay(era)
            work = tmp_path_factory.mktemp(f"era-{era}")
            out = work / "result.json"
            args = ["ckpt_bridge.testing.titan_era_check", "--hf", str(trained_olmo2), "--work", str(work / "w"),
                    "--out", str(out)]
            for a in AUX:
                args += ["--aux", a]
            run_torchrun(args, nproc=2, timeout=400, env=overlay_env(d) if d is not None else None)
            return json.loads(out.read_text())
        except BaseException as e:  # noqa: BLE001 - reported (or skipped) by the test that needs it
            return e

    with ThreadPoolExecutor(3) as pool:  # 2 ranks each on 2 cores: three jobs overlap their start-up
        return dict(zip(ERAS, pool.map(one, ERAS)))


def _result(era_results, era: str) -> dict:
    r = era_results[era]
    if isinstance(r, UpstreamMissing):
        pytest.skip(str(r))
    if isinstance(r, BaseException):
        raise r
    return r


@pytest.mark.parametrize("era", list(ERAS))
def test_layout_auto_and_verify_ask_the_installed_era(era_results, era):
    r = _result(era_results, era)
    layout = ERAS[era].layout
    assert r["to_dcp_exit"] == 0, r["to_dcp_err"]
    assert r["to_dcp"]["layout"] == layout
    assert r["to_dcp"]["trainer"].endswith(era_name(era))
    # it says which era and why: what it called on that era's own CheckpointManager
    call = "_states_to_load(step=0)" if layout == "nested" else "_states_to_load(model_only=True)"
    assert call in r["to_dcp"]["reason"]
    assert r["verify_exit"] == 0 and "result: OK" in r["verify_out"]
    assert "loader: torchtitan" in r["verify_out"] and f"{era_name(era).lstrip('(')}, {layout})" in r["verify_out"]


@pytest.mark.parametrize("era", list(ERAS))
@pytest.mark.parametrize("ranks", ["load1", "load2"])
def test_era_checkpoint_manager_loads_our_output_exactly(era_results, era, ranks):
    r = _result(era_results, era)[ranks]
    assert r["world"] == (1 if ranks == "load1" else 2) and r["loaded"] is True
    assert r["era"].endswith(era_name(era)) and r["era_layout"] == ERAS[era].layout
    assert r["config_type"] == ERAS[era].config_module  # that era's own config class
    assert r["different"] == [] and r["not_in_model"] == [] and r["not_in_source"] == []
    assert len(r["equal"]) == r["keys_in_model"] == 25 + 4
    assert r["loss_hf"] < 2.6  # the model learned the corpus: a broken RoPE shows
    assert abs(r["loss_after_load"] - r["loss_hf"]) <= 1e-5
    before = r["loss_before_after_load"]
    assert not math.isfinite(before) or before - r["loss_hf"] > 0.2
    if ERAS[era].seed == "step-0":
        assert r["initial_load_path"] is None and r["load_step"] == 0
    else:
        assert r["initial_load_path"] == r["dcp"]


@pytest.mark.parametrize("era", list(ERAS))
def test_printed_flags_parse_with_that_eras_own_parser(era_results, era):
    r = _result(era_results, era)
    (parsed,) = r["flags_parsed"]
    fields = parsed["fields"]
    # the printed flags alone turn the checkpoint on (0.2.x / 0.3.0's default config has it off: a trainer run
    # with the flags but without the switch would load nothing and start from random weights)
    assert fields.get("enable_checkpoint", fields.get("enable")) is True
    seed = ERAS[era].seed
    if seed == "step-0":
        assert fields["load_step"] == 0 and "initial_load_path" not in fields
        assert "step-0" in r["to_dcp"]["flags"][0]
    else:
        assert fields["initial_load_path"] == str(Path(r["to_dcp"]["flags"][0].split()[-2]))
        assert fields[seed] is True
        other = {"initial_load_model_only", "initial_load_model_weights_only"} - {seed}
        assert not other & {t.removeprefix("--checkpoint.") for t in parsed["tokens"]}


@pytest.mark.parametrize("era", list(ERAS))
def test_set_initial_load_sets_that_eras_fields(era_results, era):
    s = _result(era_results, era)["set_initial_load"]
    assert s["new_attributes"] == []  # nothing invented on that era's config
    after = s["fields_after"]
    seed = ERAS[era].seed
    assert after.get("enable_checkpoint", after.get("enable")) is True
    if seed == "step-0":
        assert s["fields_before"]["load_step"] == -1 and after["load_step"] == 0
        assert s["step0_placed"] and s["step0_mark"] and s["step0_same_inodes"] and s["second_call_ok"]
        assert "already exists and is not this conversion" in s["foreign_refused"]
        assert s["foreign_untouched"] == ["theirs.txt"]
    else:
        assert s["fields_before"][seed] is False and after[seed] is True
        assert Path(after["initial_load_path"]).is_absolute() and not s["step0_placed"]


# ---------------------------------------------------------------- when the era does not import: its source


def _era_source(era: str, tmp_path: Path) -> Path:
    """The era's torchtitan package directory: installed (a release) or unpacked from its tarball."""
    if era == upstream.VENV_RELEASE:
        import torchtitan

        return Path(torchtitan.__file__).parent
    if is_release(era):
        return era_overlay(era) / "torchtitan"
    with tarfile.open(_tarball(era)) as tf:
        members = [m for m in tf.getmembers() if "/torchtitan/components/" in m.name or
                   m.name.endswith("/torchtitan/config_manager.py")]
        tf.extractall(tmp_path, members=members, filter="data")
    (pkg,) = tmp_path.glob("*/torchtitan")
    return pkg


@pytest.mark.parametrize("era", list(ERAS))
def test_layout_read_from_each_eras_source(era, tmp_path):
    e = read_source(_era_source(era, tmp_path))
    assert e.layout == ERAS[era].layout and e.how == "source"
    assert e.initial_load == (ERAS[era].seed != "step-0")
    assert e.model_only_field == (None if ERAS[era].seed == "step-0" else ERAS[era].seed)


@pytest.mark.parametrize("era", ["0.1.0", "e320a37"])
def test_era_that_does_not_import_is_read_from_source(era, trained_olmo2, tmp_path):
    """An era without its tokenizer dependency (tiktoken) fails to import: --layout auto reads its source."""
    env = overlay_env(era_overlay(era, deps=False))
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge", "to-dcp", str(trained_olmo2), "--out",
                           str(tmp_path / "x"), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.splitlines()[0]
    assert head.startswith(f"# {ERAS[era].layout} layout") and era_name(era).strip("()") in head
    assert "its source torchtitan/components/checkpoint.py" in head and "No module named 'tiktoken'" in head


def test_unreadable_trainer_is_one_line_naming_it_and_both_layouts(trained_olmo2, tmp_path):
    """A torchtitan that neither imports nor has a CheckpointManager._states_to_load we can read."""
    site = tmp_path / "site"
    (site / "torchtitan" / "components").mkdir(parents=True)
    (site / "torchtitan" / "__init__.py").write_text("raise ImportError('half-installed')\n")
    meta = site / "torchtitan-9.9.9.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchtitan\nVersion: 9.9.9\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ckpt_bridge", "to-dcp", str(trained_olmo2), "--out", str(out)],
                          capture_output=True, text=True, env=overlay_env(site), timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "torchtitan 9.9.9" in err[0] and "half-installed" in err[0]
    assert "--layout nested" in err[0] and "--layout flat" in err[0] and "e320a37" in err[0]
    assert not out.exists()
