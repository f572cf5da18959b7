"""weights_only loading: the numpy allowlist is exact, anything else is refused."""

import random

import numpy as np
import pytest
import torch

from ckpt_bridge import safeload
from ckpt_bridge.errors import CheckpointFormatError, UnsafePickleError


def test_verl_style_rng_state_needs_and_gets_only_the_numpy_allowlist(tmp_path):
    f = tmp_path / "extra_state_world_size_1_rank_0.pt"
    rng = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    torch.save({"lr_scheduler": {"last_epoch": 3}, "rng": rng}, f)
    with pytest.raises(UnsafePickleError, match=r"extra_state_world_size_1_rank_0.pt.*--trust-pickle"):
        safeload.load(f, mmap=False)
    st = safeload.load(f, mmap=False, allow_numpy=True)
    assert st["rng"]["numpy"][0] == "MT19937"
    assert np.array_equal(st["rng"]["numpy"][1], rng["numpy"][1])
    assert torch.equal(st["rng"]["cpu"], rng["cpu"])


class Payload:
    """Stands for any object a pickle could smuggle in."""

    def __init__(self, n):
        self.n = n


def test_other_globals_are_refused_even_with_numpy_allowed(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": Payload(7)}, f)
    with pytest.raises(UnsafePickleError, match=r"evil.pt: refusing to unpickle .*Payload"):
        safeload.load(f, allow_numpy=True)
    assert safeload.load(f, trust_pickle=True)["obj"].n == 7


def test_truncated_file_is_a_format_error_naming_the_file(tmp_path):
    f = tmp_path / "model_world_size_2_rank_1.pt"
    torch.save({"w": torch.randn(100, 100)}, f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="model_world_size_2_rank_1.pt.*truncated"):
        safeload.load(f)
