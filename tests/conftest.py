import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_wan(num_layers: int = 2, seed: int = 0):
    """diffusers' own test shapes (the package's tiny config), with a chosen depth and seed."""
    from diffusers import WanTransformer3DModel

    from atlasvid_dist.models.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": num_layers}).eval()


@pytest.fixture(scope="session")
def tiny_wan():
    return make_tiny_wan()


@pytest.fixture(autouse=True)
def _auto_device_is_cpu(monkeypatch):
    """The suite is written for the CPU: device 'auto' (generate's default) means cpu in-process here, also on a
    machine with CUDA; tests of CUDA name it (tests/test_cli_options.py checks what 'auto' picks)."""
    from atlasvid_dist.config import generate

    monkeypatch.setattr(generate, "auto_device", lambda: "cpu")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
