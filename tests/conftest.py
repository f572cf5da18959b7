"""Session fixtures: real verl FSDP checkpoints (built once each) and a tiny HF model dir.

``verl_ckpt(model, mesh, shard_dim=0, dtype="fp32", steps=1)`` returns
``ROOT/global_step_{steps}/actor`` of a checkpoint written by verl 0.9.1's
``FSDPCheckpointManager`` under torchrun (see ``ckpt_bridge.testing.verl_save``);
each distinct argument tuple costs one torchrun job per session.  Treat the
returned directories as read-only: copy before damaging.

Set ``CKPT_BRIDGE_TEST_CACHE=/some/dir`` to keep the checkpoints between
sessions (a run is reused only if its arguments and the harness sources match).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_bridge.testing.harness import BUILD_LOG, make_verl_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _private_model_keys_cache(tmp_path_factory):
    """Keep the key-plan expectation cache (keys.expected_model) out of ~/.cache during tests."""
    old = os.environ.get("CKPT_BRIDGE_CACHE")
    os.environ["CKPT_BRIDGE_CACHE"] = str(tmp_path_factory.mktemp("ckpt-bridge-cache"))
    yield
    if old is None:
        os.environ.pop("CKPT_BRIDGE_CACHE", None)
    else:
        os.environ["CKPT_BRIDGE_CACHE"] = old


def _case_name(model: str, mesh: str, shard_dim: int, dtype: str, steps: int) -> str:
    name = f"{model}-mesh{mesh}"
    if shard_dim:
        name += f"-shard{shard_dim}"
    if dtype != "fp32":
        name += f"-{dtype}"
    if steps != 1:
        name += f"-steps{steps}"
    return name


@pytest.fixture(scope="session")
def verl_ckpt(tmp_path_factory):
    """Factory: ``verl_ckpt("llama", "3")`` -> Path of ``.../global_step_1/actor``."""
    cache_env = os.environ.get("CKPT_BRIDGE_TEST_CACHE")
    base = Path(cache_env) if cache_env else tmp_path_factory.mktemp("verl_ckpts")
    built: dict[tuple, Path] = {}

    def get(model: str = "llama", mesh: str | int = "2", shard_dim: int = 0, dtype: str = "fp32",
            steps: int = 1) -> Path:
        key = (model, str(mesh), int(shard_dim), dtype, int(steps))
        if key not in built:
            root = base / _case_name(*key)
            built[key] = make_verl_checkpoint(root, model=model, mesh=str(mesh), shard_dim=int(shard_dim),
                                              steps=int(steps), dtype=dtype)
        return built[key]

    return get


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory) -> Path:
    """Every case of ``verl_save.LORA_CASES`` (real verl saves of PEFT-wrapped tiny models, one torchrun job):
    ``lora_root / case / global_step_2 / actor``, ``base_model``, ``reference``.  Read-only: copy to damage."""
    from ckpt_bridge.testing.harness import make_verl_lora_checkpoints
    from ckpt_bridge.testing.verl_save import LORA_CASES

    cache = os.environ.get("CKPT_BRIDGE_TEST_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("verl_lora")
    return make_verl_lora_checkpoints(base / "lora", list(LORA_CASES))


@pytest.fixture(scope="session")
def megatron_ckpts(tmp_path_factory):
    """``{case: ROOT/<case>}``: real verl MegatronCheckpointManager saves (ckpt_bridge.testing.megatron_save).
    Read-only: copy before damaging."""
    pytest.importorskip("megatron.core", reason="megatron-core (test-only, requirements.lock) is not installed")
    pytest.importorskip("mbridge", reason="mbridge (test-only, requirements.lock) is not installed")
    from ckpt_bridge.testing.harness import make_megatron_checkpoints
    from ckpt_bridge.testing.megatron_save import SESSION_CASES

    cache_env = os.environ.get("CKPT_BRIDGE_TEST_CACHE")
    base = Path(cache_env) if cache_env else tmp_path_factory.mktemp("megatron_ckpts")
    return make_megatron_checkpoints(base / "megatron", SESSION_CASES)


@pytest.fixture(scope="session")
def tiny_hf_factory(tmp_path_factory):
    """Factory: ``tiny_hf_factory("llama_tied", dtype="bf16")`` -> an HF dir (save_pretrained + tokenizer)."""
    import torch

    from ckpt_bridge.testing.tiny_models import save_tiny_hf

    built: dict[tuple, Path] = {}

    def get(model: str = "llama", dtype: str = "fp32", max_shard_size: str | None = "100KB") -> Path:
        key = (model, dtype, max_shard_size)
        if key not in built:
            d = tmp_path_factory.mktemp(f"hf-{model}-{dtype}")
            save_tiny_hf(d, model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                         max_shard_size=max_shard_size)
            built[key] = d
        return built[key]

    return get


@pytest.fixture(scope="session")
def llama_dcp_with_aux(tiny_hf_factory, tmp_path_factory):
    """(HF dir, its to-dcp output with a future_predictor head): the clean DCP the hostile-input tests copy
    and damage.  Session-shared: do not modify it."""
    from ckpt_bridge.commands.to_dcp import to_dcp

    hf = tiny_hf_factory("llama")
    d = tmp_path_factory.mktemp("llama-dcp-aux") / "dcp"
    to_dcp(hf, d, aux=["future_predictor:linear"], progress=False)
    return hf, d


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_factory):
    """A tiny llama saved with ``save_pretrained`` (safetensors, sharded at 100KB: 6 shards + index),
    generation_config.json and tokenizer files.  Session-shared: do not modify it."""
    return tiny_hf_factory("llama")


# What is slow, and why: CPU seconds of the module (self + waited children) on the 2-core box, fresh machine,
# measured 2026-12-07 (DEVELOPERS.md "Test time").  Marked here in one place (`-m "not slow"` skips them for a
# quick loop; CI runs everything).  A module's time includes the session fixtures it is the first to use.
SLOW = {
    "test_verl_to_hf.py": "178 s: verl saves on 1 to 11 ranks (the 11-rank job alone ~95 s), one torchrun each",
    "test_torch_versions.py": "164 s and ~11 min of downloads on a fresh machine: two torch overlays (~4.7 GB of "
                              "CUDA wheels each, prefetched from session start) and a subprocess per version",
    "test_titan_eras.py": "128 s: one 2-rank torchrun job per TorchTitan era, each importing that era's torchtitan",
    "test_harness.py": "70 s: verl saves with HSDP 2x2, Shard(1), bf16 (one torchrun job each)",
    "test_megatron.py": "69 s: one 4-rank torchrun job building megatron-core models for every case",
    "test_workers.py": "57 s: --workers processes and torchrun ranks writing the same bytes",
    "test_titan_models.py": "49 s: torchtitan's own llama3 / qwen3 built and loaded",
    "test_megatron_merger_crosscheck.py": "47 s: verl's own Megatron merger under torchrun, per case",
    "test_families.py": "33 s: one torchrun job saving every family through verl",
    "test_transformers_versions.py": "a subprocess per transformers version: every family and preset rebuilt and "
                                     "compared, plus the LoRA cases",
    "test_titan_export.py": "a real torchtitan training loop with the save hook on 2 ranks",
    "test_flame_interop.py": "flame and old torchtitan from source tarballs, fla overlay",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow(reason): heavy (torchrun jobs, overlays, subprocess per version): "
                                       "tests/conftest.py SLOW says why")


def pytest_collection_modifyitems(items):
    for item in items:
        reason = SLOW.get(item.path.name)
        if reason:
            item.add_marker(pytest.mark.slow(reason=reason))


_PREFETCH: dict = {}


def pytest_collection_finish(session):
    """Start building, in the background, the overlays the selected tests will need (each test module's
    ``OVERLAYS``: ckpt_bridge.testing.overlays.prefetch), so their downloads overlap the tests before them.
    CKPT_BRIDGE_PREFETCH=0 turns it off."""
    if os.environ.get("CKPT_BRIDGE_PREFETCH", "1") == "0" or getattr(session.config.option, "collectonly", False):
        return
    from ckpt_bridge.testing.overlays import overlay_root, prefetch

    jobs, seen = [], set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is None or module.__name__ in seen:
            continue
        seen.add(module.__name__)
        wanted = getattr(module, "OVERLAYS", None)
        jobs += list(wanted() if callable(wanted) else wanted or [])
    if jobs:
        _PREFETCH["proc"] = prefetch(jobs, overlay_root() / "prefetch.log")


def pytest_sessionfinish(session):
    """A prefetch still running when the session ends (``-x``, a -k that skipped its tests) is stopped; what it
    left half-built is removed by the next builder."""
    import signal

    proc = _PREFETCH.pop("proc", None)
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait()


def pytest_terminal_summary(terminalreporter):
    if not BUILD_LOG:
        return
    terminalreporter.write_sep("-", "verl checkpoints built by torchrun")
    for b in BUILD_LOG:
        how = "reused" if b["reused"] else f"{b['seconds']:.1f}s"
        terminalreporter.write_line(
            f"{b['model']:<11} mesh {b['mesh']:<4} shard_dim {b['shard_dim']} {b['dtype']} "
            f"steps {b['steps']}  nproc {b['nproc']:<2}  {how}"
        )
    total = sum(b["seconds"] for b in BUILD_LOG)
    terminalreporter.write_line(f"total torchrun wall time: {total:.1f}s")


@pytest.fixture(scope="session")
def trained_olmo2(tmp_path_factory):
    """A tiny OLMo-2 trained on the shipped corpus (byte tokens; loss far below a random init's):
    save_pretrained + tokenizer + training.json.  Session-shared: do not modify it."""
    from ckpt_bridge.testing.tiny_olmo2 import train_tiny_olmo2

    d = tmp_path_factory.mktemp("olmo2-trained")
    train_tiny_olmo2(d)
    return d


@pytest.fixture(scope="module")
def gloo1(tmp_path_factory):
    """A 1-process gloo group in the test process, as a 1-rank torchtitan trainer would have."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def titan_two_rank_run(tiny_hf_factory, tmp_path_factory):
    """A real 2-rank TorchTitan run under torchrun with the ckpt-bridge save hook (tiny OLMo-2, 4 steps, saves at
    2 and 4): (per-rank records, run dir, HF dir).  Shared by the export and the incomplete-save tests (one
    torchrun job); treat as read-only: copy a step folder before damaging it."""
    import json

    from ckpt_bridge.testing.harness import run_torchrun

    hf = tiny_hf_factory("olmo2")
    tmp = tmp_path_factory.mktemp("titan-two-rank")
    out = tmp / "result.json"
    run_torchrun(["ckpt_bridge.testing.titan_save", "--hf", str(hf), "--dump", str(tmp / "run"),
                  "--out", str(out), "--steps", "4", "--interval", "2"], nproc=2, timeout=400)
    return json.loads(out.read_text()), tmp / "run", hf


# CKPT_BRIDGE_CPU_TIMES=FILE: CPU seconds per test and per module (this process + the children it waited for:
# torchrun ranks, overlay builds, per-version subprocesses), the measure that holds on a machine others share,
# where --durations' wall times do not.  A test's time includes the fixtures it is the first to use.
_CPU: dict = {"rows": [], "start": {}}


def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def pytest_runtest_logstart(nodeid, location):
    if os.environ.get("CKPT_BRIDGE_CPU_TIMES"):
        _CPU["start"][nodeid] = _cpu_now()


def pytest_runtest_logfinish(nodeid, location):
    if nodeid in _CPU["start"]:
        _CPU["rows"].append((nodeid, _cpu_now() - _CPU["start"].pop(nodeid)))


def pytest_unconfigure(config):
    path = os.environ.get("CKPT_BRIDGE_CPU_TIMES")
    if not path or not _CPU["rows"]:
        return
    modules: dict[str, float] = {}
    for nodeid, cpu in _CPU["rows"]:
        modules[nodeid.split("::")[0]] = modules.get(nodeid.split("::")[0], 0.0) + cpu
    lines = ["cpu_s  module"] + [f"{c:6.1f} {m}" for m, c in sorted(modules.items(), key=lambda kv: -kv[1])]
    lines += ["", "cpu_s  test"] + [f"{c:6.1f} {n}" for n, c in sorted(_CPU["rows"], key=lambda r: -r[1])[:60]]
    Path(path).write_text("\n".join(lines) + "\n")
