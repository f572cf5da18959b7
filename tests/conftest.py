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
