"""LoRA adapters on the tiny Wan transformer: diffusers file format both ways, exact effect, per-stage switching,
and refusal of adapters that do not fit."""

import json
import os
import stat

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atlasvid_dist.errors import ConfigError, ModelLoadError
from atlasvid_dist.models.lora import active_adapter, adapter_names, load_lora, save_lora, set_active_adapter
from atlasvid_dist.models.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA = 4, 8


def _with_adapter(name="s1", seed=1, config=None):
    """A tiny transformer carrying a non-trivial adapter (random A and B, as after training)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**config) if config else build_tiny_transformer(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False), adapter_name=name
        )
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapter file written by save_lora, with the transformer that wrote it."""
    model = _with_adapter()
    return save_lora(model, "s1", tmp_path_factory.mktemp("lora") / "s1.safetensors")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([400.0]), torch.randn(1, 6, 32, generator=g)


@torch.no_grad()
def _run(model, inputs):
    return model(*inputs, return_dict=False)[0]


@torch.no_grad()
def _merged(file, scale):
    """Reference: a fresh tiny transformer with W + scale * B @ A written into its weights."""
    model = build_tiny_transformer(0)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
    modules = {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
    assert len(modules) == TINY_TRANSFORMER_CONFIG["num_layers"] * 2 * len(TARGETS)  # attn1 and attn2
    for m in modules:
        a, b = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]  # (r, in), (out, r)
        model.get_submodule(m).weight += scale * (b @ a)
    return model


def test_saved_file_is_diffusers_wan_format(saved):
    with safe_open(str(saved), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.blocks.") for k in keys)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in keys
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == RANK and config["transformer.lora_alpha"] == ALPHA
    b = load_file(str(saved))["transformer.blocks.0.attn1.to_q.lora_B.weight"]
    assert b.abs().max() > 0  # a trained-like adapter, not peft's zero-B start


def test_loaded_adapter_equals_manually_merged_weights(saved, inputs):
    model = build_tiny_transformer(0)
    base = _run(model, inputs)
    load_lora(model, saved, "s1")
    assert adapter_names(model) == ["s1"] and active_adapter(model) == "s1"
    out = _run(model, inputs)
    assert (out - base).abs().max() > 1e-2, "adapter has no effect"
    torch.testing.assert_close(out, _run(_merged(saved, ALPHA / RANK), inputs), rtol=0, atol=1e-5)


def test_diffusers_pipeline_reads_our_file(saved, inputs):
    from diffusers import WanPipeline

    from atlasvid_dist.models.tiny import build_tiny_components

    ours = build_tiny_transformer(0)
    load_lora(ours, saved, "s1")
    pipe = WanPipeline(**build_tiny_components(0))
    pipe.load_lora_weights(str(saved), adapter_name="s1")
    torch.testing.assert_close(_run(pipe.transformer, inputs), _run(ours, inputs), rtol=0, atol=0)


def test_unprefixed_keys_from_save_lora_adapter_load_the_same(saved, tmp_path, inputs):
    writer = _with_adapter()
    writer.save_lora_adapter(tmp_path, adapter_name="s1")  # diffusers' model-level format: no "transformer."
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert not any(k.startswith("transformer.") for k in f.keys())
    a, b = build_tiny_transformer(0), build_tiny_transformer(0)
    load_lora(a, tmp_path, "s1")  # a folder holding diffusers' default file name
    load_lora(b, saved, "s1")
    torch.testing.assert_close(_run(a, inputs), _run(b, inputs), rtol=0, atol=0)


def test_file_without_metadata_uses_scale_one(saved, tmp_path, inputs):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(saved)), str(bare))  # keys only, as many trainers write them
    model = build_tiny_transformer(0)
    load_lora(model, bare, "bare")
    torch.testing.assert_close(_run(model, inputs), _run(_merged(bare, 1.0), inputs), rtol=0, atol=1e-5)


def test_switch_active_adapter_per_stage(saved, tmp_path, inputs):
    other = save_lora(_with_adapter("s2", seed=2), "s2", tmp_path / "s2.safetensors")
    model = build_tiny_transformer(0)
    base = _run(model, inputs)
    set_active_adapter(model, None)  # no adapters yet: a no-op
    load_lora(model, saved, "stage1")
    out1 = _run(model, inputs)
    load_lora(model, other, "stage2")
    assert active_adapter(model) == "stage2"
    out2 = _run(model, inputs)
    assert (out1 - out2).abs().max() > 1e-2
    set_active_adapter(model, "stage1")
    torch.testing.assert_close(_run(model, inputs), out1, rtol=0, atol=0)
    set_active_adapter(model, None)
    assert active_adapter(model) is None
    torch.testing.assert_close(_run(model, inputs), base, rtol=0, atol=0)
    set_active_adapter(model, "stage2")
    torch.testing.assert_close(_run(model, inputs), out2, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="'nope'"):
        set_active_adapter(model, "nope")
    with pytest.raises(ModelLoadError, match="already loaded"):
        load_lora(model, saved, "stage1")


def test_save_refuses_unknown_adapter(tmp_path):
    with pytest.raises(ConfigError, match="adapter_name"):
        save_lora(build_tiny_transformer(0), "s1", tmp_path / "x.safetensors")


# --- adapters that do not fit ----------------------------------------------------------------------------------


def _renamed(saved, tmp_path, old, new):
    state = load_file(str(saved))
    state[new] = state.pop(old)
    path = tmp_path / "renamed.safetensors"
    save_file(state, str(path))
    return path


def _unknown_module(saved, tmp_path):
    path = _renamed(
        saved,
        tmp_path,
        "transformer.blocks.0.attn1.to_q.lora_A.weight",
        "transformer.blocks.7.attn1.to_q.lora_A.weight",
    )
    return _renamed(
        path, tmp_path, "transformer.blocks.0.attn1.to_q.lora_B.weight", "transformer.blocks.7.attn1.to_q.lora_B.weight"
    )


def _other_shapes(saved, tmp_path):
    cfg = {**TINY_TRANSFORMER_CONFIG, "attention_head_dim": 8}  # model width 16 instead of 24
    return save_lora(_with_adapter(config=cfg), "s1", tmp_path / "other_shapes.safetensors")


def _garbage(saved, tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json at all")
    return path


def _truncated(saved, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(saved.read_bytes()[:-8])
    return path


def _not_lora(saved, tmp_path):
    path = tmp_path / "full_weight.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(24, 24)}, str(path))
    return path


BAD = {
    "other shapes": (_other_shapes, "other_shapes.safetensors: key 'blocks.0.attn1.to_k.lora_A.weight' has shape"),
    "unknown module": (_unknown_module, "key 'blocks.7.attn1.to_q.lora_A.weight' matches no Linear module"),
    "half a pair": (
        lambda s, t: _renamed(
            s, t, "transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_A.weight2"
        ),
        "blocks.0.attn1.to_q.lora_A.weight2",
    ),
    "not a linear": (
        lambda s, t: _renamed(
            s, t, "transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.norm_q.lora_A.weight"
        ),
        "blocks.0.attn1.norm_q.lora_A.weight",
    ),
    "foreign prefix": (
        lambda s, t: _renamed(
            s, t, "transformer.blocks.0.attn1.to_q.lora_A.weight", "text_encoder.blocks.0.attn1.to_q.lora_A.weight"
        ),
        "key 'text_encoder.blocks.0.attn1.to_q.lora_A.weight' is not for the transformer",
    ),
    "not lora": (_not_lora, "is not a LoRA tensor"),
    "garbage": (_garbage, "garbage.safetensors: not a safetensors file"),
    "truncated": (_truncated, "truncated.safetensors: truncated"),
    "missing": (lambda s, t: t / "absent.safetensors", "absent.safetensors: weight file missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_mismatched_adapter_is_refused_and_model_unchanged(saved, tmp_path, inputs, case):
    make, needle = BAD[case]
    path = make(saved, tmp_path)
    model = build_tiny_transformer(0)
    base = _run(model, inputs)
    with pytest.raises(ModelLoadError) as err:
        load_lora(model, path, "s1")
    assert needle in str(err.value), str(err.value)
    assert adapter_names(model) == []
    torch.testing.assert_close(_run(model, inputs), base, rtol=0, atol=0)


@pytest.fixture
def umask_022():
    """The process umask set to 0o022 (a usual shared-storage setting) for one test, restored after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_follow_the_umask(umask_022, tmp_path):
    """Adapter, training checkpoint and tiny model folder are written through mkstemp/mkdtemp/safetensors (0600,
    renamed into place), yet readable like any file: 0o644 files and 0o755 folders under umask 0o022."""
    from atlasvid_dist.models.tiny import save_tiny_pipeline
    from atlasvid_dist.pipeline.checkpoint import StepCheckpointer

    path = save_lora(_with_adapter("s1"), "s1", tmp_path / "a.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    step = StepCheckpointer(tmp_path / "ckpt").commit(1, {"w": torch.zeros(2)}, {"k": 1})
    assert {stat.S_IMODE(p.stat().st_mode) for p in step.iterdir()} == {0o644}
    folder = save_tiny_pipeline(tmp_path / "tiny")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o644}
