import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_wan(num_layers: int = 2, seed: int = 0):
    """diffusers' own test shapes: 2 heads x 12, text dim 32, ffn 32, 16 latent channels."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                  in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                  num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=64)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_wan():
    return make_tiny_wan()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
