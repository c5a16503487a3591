"""Training sees what inference sees (issue 10), tested in-process on the Trainer's pieces (no DeepSpeed):
stage 2's proxy keys/values come from the frozen stage-1 adapter exactly as generate builds them, the stage-1
adapter gets no gradient, exported adapters record their geometry and generate/plan warn on a different one, and
the shipped configs validate."""

from pathlib import Path

import pytest
import torch

from atlasvid_dist.config.method import AtlasConfig
from atlasvid_dist.errors import ConfigError, InputError
from atlasvid_dist.models import lora
from atlasvid_dist.models.atlas_transformer import AtlasTransformer
from atlasvid_dist.models.tiny import build_tiny_transformer
from atlasvid_dist.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(
    stage=2,
    width=64,
    height=64,
    frames=9,
    fps=16.0,
    temporal_scale=2,
    spatial_scale=2,
    window=(3, 2, 2),
    text_len=8,
    lora_rank=4,
    lora_alpha=4.0,
    seed=0,
)


def _randomise(transformer, name: str, seed: int) -> None:
    """Non-zero lora_B (peft starts it at 0, which would make every adapter the base model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _adapter_file(tmp_path, name: str, seed: int, geometry: dict | None = None) -> str:
    from atlasvid_dist.pipeline.adapter_geometry import geometry_metadata
    from atlasvid_dist.train.train import add_lora

    tr = build_tiny_transformer()
    add_lora(tr, TrainConfig(**{**SMALL, "stage": 1, "window": (3, 11, 16)}), name)
    _randomise(tr, name, seed)
    extra = geometry_metadata(geometry) if geometry else None
    return str(lora.save_lora(tr, name, tmp_path / f"{name}.safetensors", extra_metadata=extra))


def _inputs(transformer):
    gen = torch.Generator().manual_seed(7)
    c, d = transformer.config.in_channels, transformer.config.text_dim
    return dict(
        x0=torch.randn(1, c, 3, 8, 8, generator=gen),
        noise=torch.randn(1, c, 3, 8, 8, generator=gen),
        sigma=torch.tensor([0.6]),
        text=torch.randn(1, 8, d, generator=gen),
        proxy=torch.randn(1, c, 2, 4, 4, generator=gen),
    )


def _stage2_loss(tmp_path):
    from atlasvid_dist.train.train import FlowMatchingLoss, build_adapters

    stage1 = _adapter_file(tmp_path, "stage1", seed=1)
    cfg = TrainConfig(**SMALL, lora_stage1=stage1)
    tr = build_tiny_transformer()
    name, frozen = build_adapters(tr, cfg)
    _randomise(tr, name, seed=2)
    atlas = AtlasTransformer(tr, AtlasConfig(window=cfg.window, temporal_scale=2, spatial_scale=2))
    return FlowMatchingLoss(atlas, 2, name, frozen), stage1


def _equal_kv(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values))


def test_stage2_step_reads_the_proxy_kv_generate_builds(tmp_path):
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.pipeline.generate import TwoStageGenerator
    from atlasvid_dist.pipeline.text import TextEmbeddings

    loss, stage1 = _stage2_loss(tmp_path)
    tr, atlas, x = loss.atlas.transformer, loss.atlas, _inputs(loss.atlas.transformer)
    inside = loss.proxy_cache(atlas, x["proxy"], x["text"])  # what forward() passes as proxy_cache
    assert lora.active_adapter(tr) == "stage2" and not any(k.requires_grad for k in inside.kv.keys)
    lora.set_active_adapter(tr, "stage1")
    with torch.no_grad():
        reference = atlas.build_proxy_cache(x["proxy"], x["text"])
    lora.set_active_adapter(tr, "stage2")
    with torch.no_grad():
        by_stage2 = atlas.build_proxy_cache(x["proxy"], x["text"])
    assert _equal_kv(inside, reference) and not _equal_kv(inside, by_stage2)
    # the training step's loss is the loss with exactly those keys/values
    s = x["sigma"].view(-1, 1, 1, 1, 1)
    pred = atlas((1 - s) * x["x0"] + s * x["noise"], x["sigma"] * 1000, x["text"], proxy_cache=reference)
    want = torch.nn.functional.mse_loss(pred, x["noise"] - x["x0"])
    assert torch.equal(loss(**x, spatial_scale=2), want)
    # generate's one-process path (adapters loaded from files, its stage-2 model) builds the same
    cfg = build_config(
        {
            **DEFAULTS,
            "res": "64x64",
            "frames": 9,
            "window": "3,2,2",
            "temporal_scale": 2,
            "spatial_scale": 2,
            "prompt": "p",
            "lora_stage1": stage1,
            "out": str(tmp_path / "o.mp4"),
        }
    )
    gen = TwoStageGenerator(cfg, components=load_components("tiny"), progress=False)
    comp = gen.load()
    caches = gen.proxy_caches(
        AtlasTransformer(comp.transformer, cfg.method), x["proxy"], TextEmbeddings(x["text"], None)
    )
    assert _equal_kv(caches["cond"], inside)


def test_stage1_adapter_gets_no_gradient_and_stays_fixed(tmp_path):
    loss, _ = _stage2_loss(tmp_path)
    tr, x = loss.atlas.transformer, _inputs(loss.atlas.transformer)
    trainable = [p for p in tr.parameters() if p.requires_grad]
    names = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert names and all(".stage2." in n for n in names)
    stage1 = {n: p for n, p in tr.named_parameters() if ".stage1." in n}
    before = {n: p.detach().clone() for n, p in stage1.items()}
    start = {n: p.detach().clone() for n, p in tr.named_parameters() if n in names}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss(**x, spatial_scale=2).backward()
        assert all(p.grad is None and not p.requires_grad for p in stage1.values())
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in stage1.items())
    assert any(not torch.equal(p, start[n]) for n, p in tr.named_parameters() if n in names)


def test_stage2_needs_a_stage1_adapter_or_an_explicit_none(tmp_path):
    from atlasvid_dist.train.train import build_adapters, load_train_config, no_adapter_warning, parse_args

    with pytest.raises(ConfigError, match="lora_stage1"):
        build_adapters(build_tiny_transformer(), TrainConfig(**SMALL))
    none = load_train_config(parse_args(["--stage", "2", "--no-stage1-adapter"]))
    assert none.lora_stage1 == "none" and "WITHOUT a stage-1 adapter" in no_adapter_warning(none)
    assert build_adapters(build_tiny_transformer(), TrainConfig(**SMALL, lora_stage1="none")) == ("stage2", None)
    with pytest.raises(ConfigError, match="lora_stage1"):
        load_train_config(parse_args(["--stage", "2", "--no-stage1-adapter", "--lora-stage1", "x.safetensors"]))


def test_exported_geometry_round_trips(tmp_path):
    from atlasvid_dist.pipeline.adapter_geometry import read_geometry, training_geometry

    cfg = TrainConfig(**{**SMALL, "spatial_scales": (1, 2)}, lora_stage1="none")
    geo = training_geometry(cfg)
    path = _adapter_file(tmp_path, "stage2", seed=3, geometry=geo)
    assert (
        read_geometry(path)
        == geo
        == dict(
            stage=2,
            mode="atlas",
            window=[3, 2, 2],
            spatial_scales=[1, 2],
            temporal_scale=2,
            width=64,
            height=64,
            frames=9,
        )
    )
    lora.load_lora(build_tiny_transformer(), path, "stage2")  # still a plain diffusers LoRA file
    assert training_geometry(TrainConfig(**{**SMALL, "stage": 1}))["frames"] == 5  # the proxy clip it saw


GEN_4K = dict(
    stage=2,
    mode="atlas",
    window=[3, 15, 16],
    spatial_scales=[3, 6],
    temporal_scale=4,
    width=1536,
    height=960,
    frames=81,
)


@pytest.mark.parametrize(
    "trained, warned",
    [
        (GEN_4K, None),
        ({**GEN_4K, "window": [3, 11, 16]}, "window"),
        ({**GEN_4K, "spatial_scales": [2]}, "spatial_scale"),
    ],
)
def test_generate_and_plan_warn_on_another_geometry(trained, warned, tmp_path, capsys):
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.cli.main import main
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    path = _adapter_file(tmp_path, "stage2", seed=4, geometry=trained)
    cfg = build_config(
        {
            **DEFAULTS,
            "res": "4k",
            "frames": 81,
            "window": "3,15,16",
            "spatial_scale": 3,
            "prompt": "p",
            "lora_stage2": path,
            "out": str(tmp_path / "o.mp4"),
        }
    )
    lines = TwoStageGenerator(cfg, progress=False).warn_adapter_geometry()
    with pytest.raises(SystemExit):
        main(
            ["plan", "--res", "4k", "--window", "3,15,16", "--spatial-scale", "3", "--gpus", "8", "--lora-stage2", path]
        )
    err = capsys.readouterr().err
    if warned is None:
        assert lines == [] and "warning" not in err
        return
    assert len(lines) == 1 and f"differs in {warned}" in lines[0]
    assert err.count(f"differs in {warned}") == 2 and "this run uses mode atlas, window (3, 15, 16)" in err
    assert ("(3, 11, 16)" if warned == "window" else "spatial scale 2,") in err


def _shipped(name: str) -> TrainConfig:
    from atlasvid_dist.train.train import load_train_config, parse_args

    return load_train_config(parse_args(["--config", str(REPO / "configs" / "train" / name)]))


def test_shipped_configs_load_and_tile_what_generation_uses():
    from atlasvid_dist.geometry.grid import Grid, ProxyGeometry
    from atlasvid_dist.train.data import needed_source_frames, proxy_pixel_frames

    one, two = _shipped("stage1.yaml"), _shipped("stage2.yaml")
    assert (one.width // one.spatial_scale, one.height // one.spatial_scale, proxy_pixel_frames(one)) == (1280, 720, 81)
    assert one.fps / one.temporal_scale == 4 and needed_source_frames(one, 16.0) == 321  # ~20 s at 16 fps
    assert two.window == (3, 15, 16) and set(two.scales) == {3, 6} and two.lora_stage1
    grid = Grid((two.frames - 1) // 4 + 1, two.height // 16, two.width // 16)
    for s in two.scales:
        assert ProxyGeometry(grid, two.temporal_scale, s).grid.h * s == grid.h
    assert all(n % w == 0 for n, w in zip(grid.dims, two.window))
    with pytest.raises(ConfigError, match="spatial_scales"):
        TrainConfig(**{**two.__dict__, "spatial_scales": (3, 7)})


def test_short_clip_is_refused_naming_the_file(tmp_path):
    import dataclasses

    from atlasvid_dist.train.data import scan_dataset
    from atlasvid_dist.train.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "d", num_videos=1, frames=161, width=32, height=32)
    cfg = dataclasses.replace(_shipped("stage1.yaml"), data=str(data), bad_data="stop")
    with pytest.raises(InputError, match=r"video_000\.mp4: too few frames: 161, a clip needs 321"):
        scan_dataset(data, cfg)


@pytest.mark.parametrize(
    "flag, message", [([], "lora_stage1"), (["--lora-stage1", "missing.safetensors"], "missing.safetensors")]
)
def test_train_stage2_without_its_stage1_adapter_exits_2_before_launching(flag, message, tmp_path, monkeypatch, capsys):
    from atlasvid_dist.cli.main import main
    from atlasvid_dist.train import launch
    from atlasvid_dist.train.synthetic import write_synthetic_dataset

    def no_launch(*_a, **_k):
        raise AssertionError("launched although the stage-1 adapter is missing")

    monkeypatch.setattr(launch, "run_launcher", no_launch)
    data = write_synthetic_dataset(tmp_path / "d", num_videos=1, frames=13)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                "--stage",
                "2",
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
                "--res",
                "64x64",
                "--frames",
                "9",
                *flag,
            ]
        )
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_spatial_scale_is_drawn_per_step_and_each_scale_trains(tmp_path):
    from types import SimpleNamespace

    from atlasvid_dist.train.data import step_generator
    from atlasvid_dist.train.train import FlowMatchingLoss, Trainer, add_lora

    cfg = TrainConfig(**{**SMALL, "spatial_scales": (1, 2)}, lora_stage1="none")
    draw = lambda step: Trainer._spatial_scale(SimpleNamespace(cfg=cfg), step_generator(0, step, 0))  # noqa: E731
    drawn = [draw(step) for step in range(16)]
    assert set(drawn) == {1, 2} and drawn == [draw(step) for step in range(16)]
    tr = build_tiny_transformer()
    add_lora(tr, cfg, "stage2")
    atlases = {
        s: AtlasTransformer(tr, AtlasConfig(window=(3, 2, 2), temporal_scale=2, spatial_scale=s)) for s in cfg.scales
    }
    loss = FlowMatchingLoss(atlases[1], 2, "stage2", None, atlases)
    x = _inputs(tr)
    for s, size in ((1, 8), (2, 4)):
        proxy = torch.randn(1, tr.config.in_channels, 2, size, size)
        assert torch.isfinite(loss(**{**x, "proxy": proxy}, spatial_scale=s))
    with pytest.raises(InputError, match="proxy"):
        loss(**{**x, "proxy": torch.randn(1, tr.config.in_channels, 2, 4, 4)}, spatial_scale=1)


def test_stage2_pads_windows_in_time_as_generate_does(tmp_path):
    """A detail grid whose frames the window does not tile (4 latent frames, window 3) is refused unless
    pad_windows; padded, the step is the padded model generate builds, and its LoRA gets gradients."""
    from atlasvid_dist.train.train import FlowMatchingLoss, build_adapters

    with pytest.raises(ConfigError, match="window"):
        TrainConfig(**{**SMALL, "frames": 13}, lora_stage1="none")
    stage1 = _adapter_file(tmp_path, "stage1", seed=1)
    cfg = TrainConfig(**{**SMALL, "frames": 13, "pad_windows": True}, lora_stage1=stage1)
    assert cfg.method_config() == AtlasConfig(window=(3, 2, 2), temporal_scale=2, spatial_scale=2, pad_windows=True)
    tr = build_tiny_transformer()
    name, frozen = build_adapters(tr, cfg)
    _randomise(tr, name, seed=2)
    loss = FlowMatchingLoss(AtlasTransformer(tr, cfg.method_config()), 2, name, frozen)
    gen = torch.Generator().manual_seed(3)
    x = {**_inputs(tr), "x0": torch.randn(1, 16, 4, 8, 8, generator=gen), "noise": torch.randn(1, 16, 4, 8, 8)}
    value = loss(**{**x, "proxy": torch.randn(1, 16, 3, 4, 4, generator=gen)}, spatial_scale=2)
    value.backward()
    grads = [p.grad for n, p in tr.named_parameters() if f".{name}." in n]
    assert torch.isfinite(value) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)
