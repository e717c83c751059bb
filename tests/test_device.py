import random

import numpy as np
import pytest
import torch

from rl4llm.device import get_device, seed_everything


def test_explicit_cpu():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(" CPU ") == torch.device("cpu")


def test_environment_variable_overrides(monkeypatch):
    monkeypatch.setenv("RL4LLM_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")


def test_default_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("RL4LLM_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert get_device().type == expected


@pytest.mark.parametrize("name", ["gpu", "tpu:0", "cuda:x", ""])
def test_malformed_or_unknown_device_is_an_error(monkeypatch, name):
    monkeypatch.delenv("RL4LLM_DEVICE", raising=False)
    if name == "":
        assert get_device(None).type in {"cpu", "cuda", "mps"}  # empty env var means "choose"
        return
    with pytest.raises(ValueError, match="name="):
        get_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_unavailable_device_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("RL4LLM_DEVICE", "cuda")
    with pytest.raises(ValueError, match="RL4LLM_DEVICE='cuda'.*not available"):
        get_device()


def test_seed_everything_makes_all_generators_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()  # noqa: NPY002

    seed_everything(7)
    a = draw()
    g = seed_everything(7)
    assert draw() == a
    assert torch.rand(2, generator=g).tolist() == torch.rand(2, generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_seed_must_be_a_non_negative_int(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)
