"""Training data: synthetic set, clip geometry (detail + proxy), latents, and bad data named by file and reason."""

import json
import shutil

import pytest
import torch

from atlasvid_dist.errors import ConfigError, InputError
from atlasvid_dist.train.config import TrainConfig
from atlasvid_dist.train.data import (
    LatentEncoder,
    proxy_pixel_frames,
    resize_crop,
    sample_clip,
    scan_dataset,
    step_generator,
)
from atlasvid_dist.train.synthetic import write_synthetic_dataset

CFG = dict(width=64, height=64, frames=9, fps=16.0, temporal_scale=2, spatial_scale=2, text_len=16, window=(3, 2, 2))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), num_videos=3, frames=13)


def cfg(**kw):
    return TrainConfig(**{**CFG, **kw})


def copy_set(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_scan_and_clip_geometry(dataset_dir):
    data = scan_dataset(dataset_dir, cfg(stage=2))
    assert len(data.records) == 3 and not data.skipped
    clip = sample_clip(data, cfg(stage=2), step_generator(0, 0, 0))
    assert clip.detail.shape == (3, 9, 64, 64)
    assert clip.proxy.shape == (3, proxy_pixel_frames(cfg()), 32, 32) == (3, 5, 32, 32)
    # the proxy is the detail clip every r_t-th frame, reduced in space
    want = resize_crop(((clip.detail[:, ::2].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy(), 32, 32)
    torch.testing.assert_close(clip.proxy, want, atol=2 / 127.5, rtol=0)
    stage1 = sample_clip(data, cfg(stage=1), step_generator(0, 0, 0))
    assert stage1.detail is None and torch.equal(stage1.proxy, clip.proxy)  # same (seed, step, rank): same clip
    other = [sample_clip(data, cfg(stage=1), step_generator(0, s, 1)).proxy for s in range(4)]
    assert any(not torch.equal(o, clip.proxy) for o in other)


def test_latents_are_normalised(dataset_dir):
    from atlasvid_dist.models.loading import load_components

    comp = load_components("tiny")
    enc = LatentEncoder(comp.vae, comp.tokenizer, comp.text_encoder, 16, "cpu", torch.float32)
    clip = sample_clip(scan_dataset(dataset_dir, cfg(stage=2)), cfg(stage=2), step_generator(0, 0, 0))
    z = enc.video(clip.detail)
    assert z.shape == (1, 16, 3, 8, 8)
    raw = comp.vae.encode(clip.detail[None]).latent_dist.mode()
    mean = torch.tensor(comp.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(comp.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    assert enc.text("a red disc").shape == (1, 16, 32)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="captions.jsonl"):
        scan_dataset(tmp_path, cfg())
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(InputError, match="empty dataset"):
        scan_dataset(tmp_path, cfg())


def test_corrupt_video_stop_and_skip(dataset_dir, tmp_path):
    d = copy_set(dataset_dir, tmp_path / "d")
    (d / "video_001.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError, match=r"video_001\.mp4: unreadable video"):
        scan_dataset(d, cfg(bad_data="stop"))
    data = scan_dataset(d, cfg(bad_data="skip"))
    assert len(data.records) == 2 and len(data.skipped) == 1 and "video_001.mp4" in data.skipped[0][0]


def test_missing_caption_and_too_few_frames(dataset_dir, tmp_path):
    d = copy_set(dataset_dir, tmp_path / "d")
    lines = (d / "captions.jsonl").read_text().splitlines()
    entry = json.loads(lines[2])
    lines[2] = json.dumps({"video": entry["video"]})
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="captions.jsonl: missing caption \\(line 3"):
        scan_dataset(d, cfg(bad_data="stop"))
    with pytest.raises(InputError, match=r"video_000\.mp4: too few frames: 13, a clip needs 17"):
        scan_dataset(d, cfg(bad_data="stop", frames=17))
    assert len(scan_dataset(d, cfg()).skipped) == 1


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="frames"):
        cfg(frames=8)
    with pytest.raises(ConfigError, match="lora_rank"):
        cfg(lora_rank="4")
    with pytest.raises(ConfigError, match="bad_data"):
        cfg(bad_data="ignore")


def test_lr_schedule_warmup_then_cosine():
    """diffusers' schedules (warm-up from 0, then cosine to 0 at max_steps; constant stays at the lr)."""
    import torch

    from atlasvid_dist.train.train import lr_scheduler_factory

    def factors(c, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = lr_scheduler_factory(c)(opt)
        out = []
        for _ in range(steps):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    f = factors(cfg(warmup_steps=4, lr_schedule="cosine", max_steps=14), 15)
    assert f[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert f[9] == pytest.approx(0.5) and f[14] == pytest.approx(0.0)
    assert factors(cfg(lr_schedule="constant"), 100)[-1] == 1.0


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])  # stage 2: the detail grid
def test_gradient_checkpointing_same_loss_and_grads(stage):
    from atlasvid_dist.config.method import AtlasConfig
    from atlasvid_dist.models.atlas_transformer import AtlasTransformer
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.train.train import FlowMatchingLoss, add_lora

    c = cfg(stage=stage, window=(3, 2, 2), lora_rank=4, lora_alpha=4.0)
    tr = load_components("tiny").transformer
    add_lora(tr, c, f"stage{stage}")
    with torch.no_grad():  # non-zero lora_B so every LoRA weight gets a gradient
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loss_fn = FlowMatchingLoss(
        AtlasTransformer(tr, AtlasConfig(window=(3, 2, 2), temporal_scale=2)), stage, f"stage{stage}"
    )
    g = torch.Generator().manual_seed(0)
    shape = (1, 16, 2, 4, 4) if stage == 1 else (1, 16, 3, 8, 8)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    inputs = dict(x0=x0, noise=noise, sigma=torch.tensor([0.4]), text=torch.randn(1, 16, 32, generator=g))
    if stage == 2:
        inputs["proxy"] = torch.randn(1, 16, 2, 4, 4, generator=g)
    results = []
    for ckpt in (False, True):
        tr.gradient_checkpointing = ckpt
        tr.zero_grad()
        loss = loss_fn(**inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) == 2 * 2 * 4 * 2
    for n in results[0][1]:
        assert results[0][1][n].abs().sum() > 0, n
        torch.testing.assert_close(results[0][1][n], results[1][1][n])


def test_stage2_window_must_tile_the_detail_tokens():
    with pytest.raises(ConfigError, match="window.h=15"):
        TrainConfig(stage=2, window=(3, 15, 16))  # 1280x704: 44 token rows
    assert TrainConfig(stage=2).window == (3, 11, 16)
