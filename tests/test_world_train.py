"""`atlasvid-dist world train`: the shapes model's recipe end to end at the tiny budget (a model folder that
load_components and generate read), exact resume from a stage checkpoint, and refusal of a used folder."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from atlasvid_dist.cli.main import app
from atlasvid_dist.models.loading import DEFAULTS_FILE
from atlasvid_dist.world.model import build_world_tokenizer

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def transformer_weights(folder):
    return load_file(str(next((folder / "transformer").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "shapes"
    r = cli("world", "train", "--output", out, "--budget", "tiny", "--seed", 3)
    assert r.exit_code == 0, r.output
    return out


def test_tokenizer_is_word_level_over_the_world():
    tok = build_world_tokenizer()
    ids = tok("a red square moving right").input_ids
    assert len(ids) == 6 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok("a purple kite").input_ids[1] == tok.unk_token_id


def test_vae_init_makes_the_latent_depend_on_the_frame():
    """init_vae's point: at init the latent of a world frame must vary with the frame (colour, shape, place), or
    training settles on the frame-independent background. Diffusers' default init leaves it ~10x flatter."""
    from diffusers import AutoencoderKLWan

    from atlasvid_dist.world.clips import evaluation_set
    from atlasvid_dist.world.model import SHAPES_VAE_CONFIG, build_vae
    from atlasvid_dist.world.train import to_pixels

    frames = torch.stack([to_pixels(c.render(64, 64, 1)) for c in evaluation_set()[:8]])  # (8, 3, 1, 64, 64)

    def spread(vae) -> float:
        with torch.no_grad():
            return float(vae.encode(frames).latent_dist.mode().std(0).mean())  # std across frames, per cell

    torch.manual_seed(0)
    default = AutoencoderKLWan(**SHAPES_VAE_CONFIG)
    ours = build_vae(0)
    assert spread(ours) > 0.1 and spread(ours) > 5 * spread(default)


def test_fresh_vae_acts_frame_by_frame():
    """inflate_time's point: before any window step the VAE is a per-frame model, so a still clip's 17 frames come
    back identical (4x temporal compression with repeat / pair-mean resamplers); random earlier-frame taps or
    resamplers make the later chunks differ from the first frame."""
    from atlasvid_dist.world.clips import evaluation_set
    from atlasvid_dist.world.model import build_vae
    from atlasvid_dist.world.train import to_pixels

    still = to_pixels(evaluation_set()[0].render(64, 64, 1)).expand(3, 17, 64, 64)[None]  # (1, 3, 17, 64, 64)
    with torch.no_grad():
        out = build_vae(0).decode(build_vae(0).encode(still).latent_dist.mode()).sample  # (1, 3, 17, 64, 64)
    assert out.shape == still.shape
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out), atol=1e-5, rtol=1e-5)
    assert float(out[:, :, 0].std()) > 1e-3  # not trivially constant


def test_vae_trains_on_single_frames_first_then_on_windows():
    from atlasvid_dist.world.train import BUDGETS, vae_batch

    plan = BUDGETS["short"]
    first = vae_batch(plan, 0, plan.vae_image_steps - 1)
    then = vae_batch(plan, 0, plan.vae_image_steps)
    assert first.shape == (plan.vae_image_batch, 3, 1, plan.height, plan.width)  # whole frames
    assert then.shape == (plan.vae_batch, 3, plan.vae_frames, plan.vae_crop, plan.vae_crop)
    assert not torch.equal(vae_batch(plan, 0, 0), vae_batch(plan, 0, 1))  # a fresh draw every step


def test_single_frame_pool_is_each_clips_frames_encoded_alone():
    """The transformer's single-frame phase trains on frames 0, 4, ... of every pool clip, each encoded alone: frame
    0's latent is the clip's first latent frame (the causal VAE codes a clip's first frame alone), the others are
    whole frames of their own (not the clip's later latent frames, which code four frames each); captions follow."""
    from atlasvid_dist.world.model import build_vae
    from atlasvid_dist.world.train import BUDGETS, dit_loss, encode_pool

    plan = BUDGETS["tiny"]
    assert plan.dit_frame_steps > 0
    pool = encode_pool(build_vae(0).eval(), plan)
    clips, frames = len(pool["latents"]), len(range(0, plan.frames, 4))
    lat, cap = pool["frame_latents"], pool["frame_caption"]
    assert lat.shape == (clips * frames, *pool["latents"].shape[1:2], 1, *pool["latents"].shape[3:])
    assert clips <= 8  # one encode batch: all clips' frame 0, then all clips' frame 4
    torch.testing.assert_close(lat[:clips], pool["latents"][:, :, :1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lat[clips : 2 * clips], pool["latents"][:, :, 1:2], atol=1e-3)
    assert torch.equal(cap[:clips], pool["caption"]) and torch.equal(cap[clips:], pool["caption"])
    from atlasvid_dist.world.model import SHAPES_TEXT_DIM, SHAPES_TEXT_LEN, build_transformer

    texts = torch.zeros(33, SHAPES_TEXT_LEN, SHAPES_TEXT_DIM)
    loss = dit_loss(build_transformer(1), pool, texts, plan, 0, frames=True)(0)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_decoder_stage_trains_the_decoder_alone(tmp_path):
    """The decoder-only stages leave the encoder (and so every latent the transformer trained on) bit-identical and
    move the decoder."""
    from atlasvid_dist.world.model import build_vae
    from atlasvid_dist.world.train import BUDGETS, decoder_stage

    plan = BUDGETS["tiny"]
    vae = build_vae(0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seconds = decoder_stage(tmp_path, vae, plan, 0, log=lambda line: None)
    assert set(seconds) == {"vae_decoder", "vae_decoder_base"} and min(seconds.values()) > 0
    after = vae.state_dict()
    coder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert coder and all(torch.equal(before[k], after[k]) for k in coder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert not any(p.requires_grad for p in vae.parameters())


def test_decoder_crops_show_large_interiors_and_edges():
    """The decoder stage's windows come from clips up to 4x the base size, where the object is wider than the crop:
    some windows are all object, others show its edge; every window has the budget's shape."""
    import numpy as np

    from atlasvid_dist.world.train import _BACKGROUND, BUDGETS, decoder_crop

    plan = BUDGETS["tiny"]
    rng = np.random.default_rng(0)
    crops = [decoder_crop(plan, rng) for _ in range(24)]
    assert all(c.shape == (3, plan.vae_frames, plan.vae_crop, plan.vae_crop) for c in crops)
    object_share = [float(((c[:, :1] - _BACKGROUND[0]).abs().amax(0) > 0.05).float().mean()) for c in crops]
    assert max(object_share) == 1.0 and any(0.05 < s < 0.95 for s in object_share), object_share
    base = [decoder_crop(plan, rng, scales=(1,)) for _ in range(24)]  # the base-size stage: the whole object fits
    base_share = [float(((c[:, :1] - _BACKGROUND[0]).abs().amax(0) > 0.05).float().mean()) for c in base]
    assert max(base_share) < 0.5 and any(s > 0.05 for s in base_share), base_share


def _unwind_decoder(trained: Path, copy: Path, keep: str, drop: tuple[str, ...]) -> None:
    """Make ``copy`` the folder `world train` would have made without the decoder stages ``drop``: its VAE as the
    stage ``keep`` left it, those stages' checkpoints gone and their steps recorded as 0."""
    from diffusers import AutoencoderKLWan

    from atlasvid_dist.world.checkpoint import read_stage, restore, stage_dir

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(trained, copy)
    for stage in drop:
        shutil.rmtree(stage_dir(copy, stage))
    vae = AutoencoderKLWan.from_pretrained(copy / "vae")
    restore(vae, None, read_stage(stage_dir(copy, keep))[1], "model")
    vae.save_pretrained(copy / "vae", safe_serialization=True)
    defaults = json.loads((copy / DEFAULTS_FILE).read_text())
    defaults["trained_on"].update({f"{stage}_steps": 0 for stage in drop})
    (copy / DEFAULTS_FILE).write_text(json.dumps(defaults))


@pytest.mark.slow  # needs the module's `world train --budget tiny` run
def test_world_decoder_on_a_folder_made_without_it_equals_the_recipe(trained, tmp_path):
    """`world decoder` on a folder whose VAE lacks both decoder stages, or only the base-size one, gives the VAE
    `world train` made with them, bit for bit (same code, seed and draws); a folder that had them, another budget,
    or a base-size stage without the first is refused (exit 2)."""
    copy = tmp_path / "copy"
    r = cli("world", "decoder", "--model", trained, "--budget", "tiny")
    assert r.exit_code == 2 and "already" in r.output
    made = load_file(str(trained / "vae" / "diffusion_pytorch_model.safetensors"))
    for keep, drop in (("vae", ("vae_decoder", "vae_decoder_base")), ("vae_decoder", ("vae_decoder_base",))):
        _unwind_decoder(trained, copy, keep, drop)
        r = cli("world", "decoder", "--model", copy, "--budget", "full")
        assert r.exit_code == 2 and "another budget" in r.output
        r = cli("world", "decoder", "--model", copy, "--budget", "tiny")
        assert r.exit_code == 0, r.output
        redone = load_file(str(copy / "vae" / "diffusion_pytorch_model.safetensors"))
        assert made.keys() == redone.keys() and all(torch.equal(made[k], redone[k]) for k in made), drop
        recorded = json.loads((copy / DEFAULTS_FILE).read_text())["trained_on"]
        assert recorded["vae_decoder_steps"] == recorded["vae_decoder_base_steps"] == 1
    assert "_name_or_path" not in json.loads((copy / "vae" / "config.json").read_text())  # no local path shipped
    defaults = json.loads((copy / DEFAULTS_FILE).read_text())
    defaults["trained_on"]["vae_decoder_steps"] = 0  # a base-size stage recorded without the first
    (copy / DEFAULTS_FILE).write_text(json.dumps(defaults))
    r = cli("world", "decoder", "--model", copy, "--budget", "tiny")
    assert r.exit_code == 2 and "not a start" in r.output


@pytest.mark.slow  # needs the module's `world train --budget tiny` run
def test_tiny_budget_makes_a_model_that_loads_and_generates(trained, tmp_path):
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.pipeline.adapter_geometry import read_geometry

    parts = load_components(str(trained))
    assert parts.vae.config.z_dim == 16 and len(parts.vae.config.latents_mean) == 16
    assert parts.tokenizer.model_max_length == 16
    defaults = json.loads((trained / DEFAULTS_FILE).read_text())
    assert (
        defaults["base_width"] == 64
        and defaults["seed"] == 3
        and set(defaults["seconds"])
        == {"vae", "vae_decoder", "vae_decoder_base", "latents", "dit_frames", "dit", "export", "lora1", "lora2"}
    )
    # stage C: both adapters trained by `atlasvid-dist train` and made the model's own defaults
    assert {defaults["generate"][f"lora_stage{k}"] for k in (1, 2)} == {f"lora_stage{k}.safetensors" for k in (1, 2)}
    geometry = read_geometry(trained / "lora_stage2.safetensors")
    assert geometry["stage"] == 2 and geometry["window"] == defaults["window"]
    # stage 2 trains on the budget's detail_frames (5) cut from each 17-frame render at 2x the base size
    assert geometry["frames"] == 5 and geometry["width"] == 128
    out = tmp_path / "v.mp4"
    r = cli(
        "generate",
        "--model",
        trained,
        "--prompt",
        "a red square moving right",
        "--res",
        "128x128",
        "--frames",
        "5",
        "--steps",
        "1",
        "--proxy-steps",
        "1",
        "--guidance",
        "1",
        "--spatial-scale",
        "2",
        "--temporal-scale",
        "1",
        "--window",
        "2,4,4",
        "--quiet",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0


@pytest.mark.slow  # needs the module's `world train --budget tiny` run
def test_used_folder_is_refused_without_resume(trained):
    r = cli("world", "train", "--output", trained, "--budget", "tiny", "--seed", 3)
    assert r.exit_code == 2 and "--resume" in r.output
    r = cli("world", "train", "--output", trained, "--budget", "full", "--seed", 3, "--resume")
    assert r.exit_code == 2 and "budget" in r.output


@pytest.mark.slow  # needs the module's `world train --budget tiny` run
def test_resume_from_the_vae_checkpoint_gives_the_same_transformer(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoints" / "dit")
    r = cli("world", "train", "--output", copy, "--budget", "tiny", "--seed", 3, "--resume")
    assert r.exit_code == 0, r.output
    assert "vae: resumed" in r.output and "dit_frames: resumed" in r.output and "dit: resumed" not in r.output
    before, after = transformer_weights(trained), transformer_weights(copy)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # needs the module's `world train --budget tiny` run
def test_plan_reads_the_small_parts_sizes_from_the_folder(trained):
    from atlasvid_dist.models.loading import load_components, read_model_spec
    from atlasvid_dist.world.model import param_count

    spec, parts = read_model_spec(trained), load_components(str(trained))
    assert spec.text_encoder_params == param_count(parts.text_encoder)
    assert spec.vae_params == param_count(parts.vae)


def test_model_folder_defaults_fill_what_the_user_left_unset(trained, monkeypatch):
    """atlasvid_model.json's options sit between generate's defaults and the user's: a bare `--model FOLDER
    --prompt` runs at 4x the base size per side with the model's shift, guidance and text length; its base size
    and window aim `--window auto` and the automatic spatial scale; a flag still wins; a bad key is refused."""
    from atlasvid_dist.cli.generate import build_config
    from atlasvid_dist.errors import ConfigError
    from atlasvid_dist.world.train import GENERATE_GUIDANCE

    cfg = build_config({"model": str(trained), "prompt": "a red disc moving up"})
    assert (cfg.video.width, cfg.video.height, cfg.video.frames) == (256, 256, 17)
    assert (
        cfg.flow_shift == 3.0 and cfg.guidance == GENERATE_GUIDANCE and cfg.negative_prompt == "" and cfg.text_len == 16
    )
    # base 64x64 = 4x4 tokens per frame: a 256x256 detail (16x16 tokens) gets a 4x4-token proxy, scale 4
    assert cfg.method.spatial_scale == 4 and cfg.method.window[1:] == (4, 4)
    cfg = build_config({"model": str(trained), "prompt": "x", "res": "128x128", "guidance": 2.0})
    assert (cfg.video.width, cfg.guidance, cfg.method.spatial_scale) == (128, 2.0, 2)
    # the command line too: only what the user typed goes over the folder's defaults
    seen = []
    monkeypatch.setattr("atlasvid_dist.cli.generate.run", lambda cfg, **kw: seen.append(cfg))
    r = cli("generate", "--model", trained, "--prompt", "a red disc moving up", "--proxy-steps", "3", "--quiet")
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert (cfg.video.width, cfg.steps, cfg.proxy_steps, cfg.guidance) == (256, 20, 3, GENERATE_GUIDANCE)
    assert cfg.lora_stage2 == str(trained / "lora_stage2.safetensors")
    defaults = json.loads((trained / DEFAULTS_FILE).read_text())
    bad = trained.parent / "bad"
    shutil.copytree(trained, bad)
    (bad / DEFAULTS_FILE).write_text(json.dumps({**defaults, "generate": {"stepz": 3}}))
    with pytest.raises(ConfigError, match="stepz"):
        build_config({"model": str(bad), "prompt": "x"})


def test_full_budget_is_the_recipe_that_made_the_shipped_model():
    """`world train --budget full` must make what `--model shapes` ships: the folder records the budget it was
    trained on, and an experiment that changes the full budget without shipping its model fails here."""
    from atlasvid_dist.models.loading import read_model_defaults
    from atlasvid_dist.world.model import build_transformer
    from atlasvid_dist.world.train import BUDGETS, GENERATE_GUIDANCE, GENERATE_STEPS, WorldBudget

    shipped = read_model_defaults("shapes")
    # the folder's sampler defaults are the ones `world train` writes
    own = shipped["generate"]
    assert (own["guidance"], own["steps"], own["proxy_steps"]) == (GENERATE_GUIDANCE, GENERATE_STEPS, GENERATE_STEPS)
    full = asdict(BUDGETS["full"])
    assert {k: full[k] for k in shipped["trained_on"]} == shipped["trained_on"]
    assert not any(full[k] != v for k, v in asdict(WorldBudget(**shipped["trained_on"])).items())
    wide = BUDGETS["wide"]  # the width is the budget's: the built transformer has it
    built = build_transformer(0, wide.dit_heads, wide.dit_ffn).config
    assert (built.num_attention_heads, built.ffn_dim) == (wide.dit_heads, wide.dit_ffn)


def test_stage2_trains_at_the_budgets_detail_size_and_stage1_keeps_its_clips():
    """The full budget's stage 2 reads 17-frame cuts of 4x renders (the default job's size); stage 1 keeps the
    2x, 65-frame clips its shipped adapter was trained on, and the two stages' clips live in separate folders."""
    from atlasvid_dist.world.adapters import clips_folder, stage_settings
    from atlasvid_dist.world.train import BUDGETS

    full = BUDGETS["full"]
    one, two = (stage_settings(full, k, 0, [5, 8, 8]) for k in (1, 2))
    assert (one["width"], one["frames"], one["spatial_scale"]) == (256, 65, 2)
    assert (two["width"], two["frames"], two["spatial_scale"]) == (512, 17, 4)
    assert clips_folder(full, 1) == "adapter_clips_128" and clips_folder(full, 2) == "adapter_clips_4x"


@pytest.mark.parametrize("field,value", [("detail_frames", 6), ("detail_frames", 69), ("detail_scale", -1)])
def test_bad_detail_fields_are_refused(field, value):
    from atlasvid_dist.errors import ConfigError
    from atlasvid_dist.world.train import BUDGETS, WorldBudget

    with pytest.raises(ConfigError, match=field):
        WorldBudget(**{**asdict(BUDGETS["full"]), field: value})
