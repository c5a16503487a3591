"""The built-in tiny Wan2.1 model and loading of diffusers-format model folders (validation before weights)."""

import json
import shutil

import pytest
import torch

from atlasvid_dist.config.model import MODEL_PRESETS
from atlasvid_dist.errors import ModelLoadError
from atlasvid_dist.models.loading import check_safetensors_file, load_components, read_model_spec, validate_model_dir
from atlasvid_dist.models.tiny import (
    build_tiny_components,
    build_tiny_tokenizer,
    build_tiny_transformer,
    save_tiny_pipeline,
)

WEIGHTED = ("transformer", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A private copy of the tiny folder that a test may damage."""
    return shutil.copytree(tiny_dir, tmp_path / "model")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 6, 32, generator=g)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the tiny model ------------------------------------------------------------------------------------------


def test_build_is_deterministic_and_leaves_global_rng(tiny):
    state = torch.random.get_rng_state()
    again, other = build_tiny_components(0), build_tiny_components(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in WEIGHTED:
        assert _same_weights(tiny[name], again[name]), name
        assert not _same_weights(tiny[name], other[name]), name
    assert _same_weights(build_tiny_transformer(0), tiny["transformer"])


def test_tiny_shapes_fit_together(tiny):
    tr, vae, te = tiny["transformer"].config, tiny["vae"].config, tiny["text_encoder"].config
    assert tr.in_channels == tr.out_channels == vae.z_dim == 16
    assert tr.text_dim == te.d_model == 32
    assert (tr.num_layers, tr.num_attention_heads, tr.attention_head_dim) == (2, 2, 12)
    sched = tiny["scheduler"].config
    assert sched.prediction_type == "flow_prediction" and sched.use_flow_sigmas and sched.flow_shift == 3.0


@torch.no_grad()
@pytest.mark.slow  # a VAE decode of a full clip
def test_tiny_vae_decodes_frames_that_vary(tiny):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 1, 16, 3, 4, 4, generator=g) * 2  # (B, C, f, h, w) latents
    x1, x2 = tiny["vae"].decode(z1).sample, tiny["vae"].decode(z2).sample
    assert x1.shape == (1, 3, 9, 32, 32)
    assert x1.std(dim=(3, 4)).min() > 0.1, "frames are nearly constant"
    assert (x1 - x2).abs().mean() > 0.1, "decoded frames barely depend on the latent"


def test_tokenizer_round_trips_offline(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompts = ["a red fox in snow, 4K", "ünïcode prompt"]
    a = tok(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    b = again(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    n = int(a.attention_mask[0].sum())
    assert a.input_ids[0, n - 1] == tok.eos_token_id == 1 and a.input_ids[0, n] == tok.pad_token_id == 0
    assert tok.decode(a.input_ids[1], skip_special_tokens=True) == prompts[1]
    assert tok.unk_token_id not in a.input_ids


# --- folders -------------------------------------------------------------------------------------------------


def test_saved_folder_is_diffusers_wan_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    for name in WEIGHTED:
        assert list((tiny_dir / name).glob("*.safetensors")), name
        assert not list((tiny_dir / name).glob("*.bin")), name
    validate_model_dir(tiny_dir)


@torch.no_grad()
def test_folder_loads_identical_to_memory(tiny_dir):
    mem, disk = load_components("tiny"), load_components(str(tiny_dir))
    assert mem.source == "tiny" and disk.source == str(tiny_dir)
    for name in WEIGHTED:
        assert _same_weights(getattr(mem, name), getattr(disk, name)), name
    x, t, enc = _inputs()
    out_mem = mem.transformer(x, t, enc, return_dict=False)[0]
    torch.testing.assert_close(disk.transformer(x, t, enc, return_dict=False)[0], out_mem, rtol=0, atol=0)
    ids = mem.tokenizer(["a cat"], padding="max_length", max_length=8, return_tensors="pt")
    assert torch.equal(
        disk.tokenizer(["a cat"], padding="max_length", max_length=8, return_tensors="pt").input_ids, ids.input_ids
    )
    torch.testing.assert_close(
        disk.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state,
        mem.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state,
        rtol=0,
        atol=0,
    )
    assert type(disk.scheduler) is type(mem.scheduler)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(disk.scheduler.config) == public(mem.scheduler.config)


@pytest.mark.slow  # a diffusers WanPipeline run
def test_folder_runs_in_diffusers_wan_pipeline(tiny_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_dir, local_files_only=True)
    video = pipe(
        "a red fox",
        negative_prompt="",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 3, 16, 16) and torch.isfinite(video).all()
    assert video.std() > 0.01


def test_tiny_in_bfloat16_keeps_float32_modules_like_a_folder():
    parts = load_components("tiny", dtype=torch.bfloat16)
    assert parts.source == "tiny"
    assert parts.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert parts.transformer.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert parts.vae.decoder.conv_in.weight.dtype == torch.float32


def test_model_spec_from_folder(tiny_dir):
    spec, preset = read_model_spec(tiny_dir), MODEL_PRESETS["tiny"]
    assert (spec.num_layers, spec.num_heads, spec.head_dim, spec.ffn_dim, spec.text_dim, spec.in_channels) == (
        preset.num_layers,
        preset.num_heads,
        preset.head_dim,
        preset.ffn_dim,
        preset.text_dim,
        preset.in_channels,
    )


# --- broken folders: each is refused before weights load, naming the file or field ----------------------------


def _truncate(root):
    f = next((root / "transformer").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])


def _garbage(root):
    next((root / "vae").glob("*.safetensors")).write_bytes(b"\x00not a safetensors file at all" * 10)


def _pickle_only(root):
    for f in (root / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))


def _missing_shard(root):
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}})
    )


def _edit(part, file, **fields):
    def edit(root):
        path = root / part / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


def _shape_lies(root):
    """A header whose shape no longer matches its byte range (same file size, so only the header is wrong)."""
    f = next((root / "transformer").glob("*.safetensors"))
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert header["blocks.0.attn1.to_q.weight"]["shape"] == [24, 24]
    header["blocks.0.attn1.to_q.weight"]["shape"] = [24, 25]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])


BROKEN = {
    "missing model_index": (lambda r: (r / "model_index.json").unlink(), "model_index.json"),
    "model_index garbage": (lambda r: (r / "model_index.json").write_text("{nope"), "model_index.json"),
    "model_index lacks vae": (lambda r: (r / "model_index.json").write_text(json.dumps({"transformer": []})), "'vae'"),
    "missing subfolder": (lambda r: shutil.rmtree(r / "vae"), "vae"),
    "missing config": (lambda r: (r / "transformer" / "config.json").unlink(), "config.json"),
    "missing tokenizer files": (lambda r: [p.unlink() for p in (r / "tokenizer").iterdir()], "tokenizer"),
    "truncated safetensors": (_truncate, "diffusion_pytorch_model.safetensors"),
    "garbage safetensors": (_garbage, "diffusion_pytorch_model.safetensors"),
    "header shape lies": (_shape_lies, "'blocks.0.attn1.to_q.weight' has 2304 bytes"),
    "pickle weights only": (_pickle_only, "pickle"),
    "sharded index names a missing shard": (_missing_shard, "00002-of-00002"),
    "channel mismatch": (_edit("vae", "config.json", z_dim=8), "z_dim=8"),
    "text dim mismatch": (_edit("text_encoder", "config.json", d_model=64), "d_model=64"),
    "wrong transformer class": (
        _edit("transformer", "config.json", _class_name="FluxTransformer2DModel"),
        "_class_name",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_is_refused_naming_file_or_field(model_copy, case):
    damage, needle = BROKEN[case]
    damage(model_copy)
    for call in (validate_model_dir, load_components):
        with pytest.raises(ModelLoadError) as err:
            call(str(model_copy))
        assert needle in str(err.value), (call.__name__, str(err.value))
        assert err.value.exit_code == 2


def test_bad_scheduler_class_is_refused_on_load(model_copy):
    _edit("scheduler", "scheduler_config.json", _class_name="NotAScheduler")(model_copy)
    with pytest.raises(ModelLoadError, match="_class_name='NotAScheduler'"):
        load_components(str(model_copy))


def test_missing_folder(tmp_path):
    for call in (validate_model_dir, load_components):
        with pytest.raises(ModelLoadError, match="does not exist"):
            call(str(tmp_path / "nowhere"))


def test_safetensors_check_accepts_valid_and_reports_sizes(tiny_dir, tmp_path):
    f = next((tiny_dir / "transformer").glob("*.safetensors"))
    header = check_safetensors_file(f)
    assert "blocks.0.attn1.to_q.weight" in header
    short = tmp_path / "short.safetensors"
    short.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match="short.safetensors: truncated"):
        check_safetensors_file(short)
    tiny_file = tmp_path / "x.safetensors"
    tiny_file.write_bytes(b"abc")
    with pytest.raises(ModelLoadError, match="x.safetensors: not a safetensors file"):
        check_safetensors_file(tiny_file)


class _Moves(torch.nn.Linear):
    """A module that records where it is moved instead of moving (no CUDA here)."""

    def __init__(self):
        super().__init__(2, 2)
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_offloaded_encoders_come_onto_the_device_only_while_they_work():
    from atlasvid_dist.models.loading import on_device

    m = _Moves()
    with on_device(m, "cuda", offload=True) as inside:
        assert inside is m and m.moves == ["cuda"]
    assert m.moves == ["cuda", "cpu"]
    with pytest.raises(RuntimeError), on_device(m, "cuda", offload=True):
        raise RuntimeError("the encode failed")
    assert m.moves[-1] == "cpu"  # back in host memory after a failure too
    m.moves.clear()
    with on_device(m, "cuda", offload=False), on_device(m, "cpu", offload=True):
        pass
    assert m.moves == []  # resident on the device already, or nothing to move on a CPU run


def test_offload_keeps_text_encoder_and_vae_in_host_memory():
    comp = load_components("tiny", device="meta", offload_encoders=True)
    assert next(comp.transformer.parameters()).device.type == "meta"
    for module in (comp.text_encoder, comp.vae):
        assert next(module.parameters()).device.type == "cpu"
