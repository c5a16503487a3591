"""Adapters written by peft's own ``save_pretrained`` (adapter_model.safetensors + adapter_config.json) load through
our loader with exactly peft's effect, and --lora-stage1/--lora-stage2 accept such a folder."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from atlasvid_dist.cli.main import main
from atlasvid_dist.errors import ModelLoadError
from atlasvid_dist.models.lora import load_lora
from atlasvid_dist.models.tiny import build_tiny_transformer
from tests.test_generate import SMALL_ARGS

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"]


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 6, 32, generator=g)


@torch.no_grad()
def _run(model, inputs):
    return model(*inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory, inputs):
    """(folder written by PeftModel.save_pretrained, output of the peft-wrapped tiny transformer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        peft_model = get_peft_model(
            build_tiny_transformer(0), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, init_lora_weights=False)
        )
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder, _run(peft_model.get_base_model(), inputs)


def test_peft_folder_loads_with_peft_effect(peft_saved, inputs):
    folder, want = peft_saved
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    base = _run(build_tiny_transformer(0), inputs)
    model = build_tiny_transformer(0)
    load_lora(model, folder, "stage2")
    got = _run(model, inputs)
    assert (want - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow  # a generate run
def test_cli_accepts_peft_folder(peft_saved, tmp_path):
    folder, _ = peft_saved
    out = tmp_path / "o.mp4"
    with pytest.raises(SystemExit) as e:
        main(["generate", *SMALL_ARGS, "--out", str(out), "--lora-stage1", str(folder), "--lora-stage2", str(folder)])
    assert e.value.code in (0, None) and out.exists()


def test_peft_folder_of_other_kind_or_pickle_is_refused(peft_saved, tmp_path):
    folder, _ = peft_saved
    other = tmp_path / "loha"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(ModelLoadError, match="peft_type"):
        load_lora(build_tiny_transformer(0), other, "s")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(config))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="adapter_model.bin: pickle"):
        load_lora(build_tiny_transformer(0), pickled, "s")
