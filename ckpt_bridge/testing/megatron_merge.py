"""Run verl 0.9.1's OWN Megatron merger on CPU (test-only: needs megatron-core), verl's code unchanged.

    torchrun --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=PORT \\
        -m ckpt_bridge.testing.megatron_merge merge --backend megatron --local_dir ACTOR --target_dir OUT \\
        --use_cpu_initialization

The arguments are ``python -m verl.model_merger``'s own; this module only installs CPU stand-ins for what the
merger expects of a GPU machine, then calls ``verl.model_merger.__main__.main()``:

- verl's device layer: a ``cpu`` platform through verl's own plugin registry (``verl.plugin.platform``):
  device name ``cpu``, device module ``torch.cpu``, backend ``gloo`` (the merger asks for NCCL through it and
  calls ``set_device("cpu:0")``);
- ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed``: the rng tracker that the merger's
  ``model_parallel_cuda_manual_seed(0)`` fills (``get_rng_state`` raises on a CPU build);
- transformer_engine is GPU-only and not installed, so the merger's ``use_transformer_engine=True`` layer spec
  becomes megatron-core's local spec: the spec the tiny saves were built with (megatron_save.py), whose layer
  norms are the separate ``input_layernorm`` / ``pre_mlp_layernorm`` the merger's name table also maps.

That is all it takes at one rank: ``torch.cuda.synchronize`` / ``current_device`` and ``device="cuda"``
constructors, which the saves needed (megatron_save.py), are never reached by the merger's load (checked).

The merger rebuilds the model at TP=1, PP=world and lets ``dist_checkpointing.load`` reshard the save; run it
with one rank (PP=1), so it writes through ``save_pretrained`` as it does on one GPU.  It reads the HF config
and tokenizer from ``ACTOR/model/huggingface`` (a ``use_dist_checkpointing`` save without a bridge leaves that
folder empty: the caller puts them there).  ``__main__`` guard: megatron's writer machinery may re-import us.
"""

from __future__ import annotations

import functools

import torch

def _cpu_platform() -> None:
    """verl's device layer answers "cpu" / torch.cpu / gloo (its plugin registry is the extension point)."""
    from verl.plugin.platform.platform_cuda import PlatformCUDA
    from verl.plugin.platform.platform_manager import set_platform

    class PlatformCPU(PlatformCUDA):
        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def device_module(self):
            return torch.cpu

        def is_available(self) -> bool:
            return True

        def current_device(self) -> int:
            return 0

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def communication_backend_name(self) -> str:
            return "gloo"

    set_platform(PlatformCPU())


def _local_layer_spec() -> None:
    """transformer_engine's layer spec -> megatron-core's local spec (TE needs a GPU and is not installed)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from verl.models.mcore import model_initializer

    te_or_local = gpt_layer_specs.get_gpt_decoder_block_spec

    @functools.wraps(te_or_local)
    def local(config, use_transformer_engine, *a, **k):
        return te_or_local(config, False, *a, **k)

    # verl binds the name at import (`from ... import get_gpt_decoder_block_spec`), so rebind it there too
    gpt_layer_specs.get_gpt_decoder_block_spec = local
    model_initializer.get_gpt_decoder_block_spec = local


def cpu_stand_ins() -> None:
    # model_parallel_cuda_manual_seed's rng tracker keeps "CUDA" generator states: the CPU one's stand in
    # (no dropout or random init runs: every weight is loaded)
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *a, **k: None
    _cpu_platform()
    _local_layer_spec()


def main() -> None:
    cpu_stand_ins()
    from verl.model_merger.__main__ import main as merger_main

    merger_main()  # reads sys.argv: the merger's own command line


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
