"""The shipped shapes model draws what its caption says at its base size: the project's first test of quality rather
than plumbing. Generation goes through generate's own config builder and the one-process pipeline, and every
video is scored by `atlasvid-dist eval`'s scorer (one object in every frame, colour, shape, direction)."""

from pathlib import Path

import pytest
import yaml

from atlasvid_dist.cli.generate import build_config
from atlasvid_dist.eval import score_video, summarise
from atlasvid_dist.models.loading import BUILTIN_FOLDERS, load_components, read_model_defaults
from atlasvid_dist.pipeline.generate import TwoStageGenerator
from atlasvid_dist.pipeline.video_io import read_mp4
from atlasvid_dist.world import all_scenes, parse_caption
from atlasvid_dist.world.clips import WorldClip

pytestmark = pytest.mark.skipif(
    not (BUILTIN_FOLDERS["shapes"] / "model_index.json").is_file(), reason="the shapes model is not in this checkout"
)

SUBSET = [WorldClip(all_scenes()[4 * k + k % 4], 0) for k in range(8)]
"""8 captions (seed 0): every colour, both shapes, every direction."""


@pytest.fixture(scope="module")
def base_videos(tmp_path_factory):
    """(clip, frames) of the subset, generated at the model's base size with full attention."""
    own = read_model_defaults("shapes")
    comp = load_components("shapes")
    tmp = tmp_path_factory.mktemp("shapes")
    videos = []
    for k, clip in enumerate(SUBSET):
        cfg = build_config(
            {
                "model": "shapes",
                "prompt": clip.scene.caption,
                "seed": clip.seed,
                "res": f"{own['base_width']}x{own['base_height']}",
                "frames": own["base_frames"],
                "attention": "full",
                "lora_stage1": "none",  # the model at home: its adapters are for the atlas geometry at 4x
                "lora_stage2": "none",
                "out": str(tmp / f"{k}.mp4"),
                "crf": 0,
            }
        )
        TwoStageGenerator(cfg, components=comp, progress=False).run()
        videos.append((clip, read_mp4(tmp / f"{k}.mp4")))
    return videos


def base_scores(base_videos):
    return [score_video(frames, clip.scene.caption, name=clip.scene.caption) for clip, frames in base_videos]


@pytest.mark.xfail(
    strict=True,
    reason="issue 11's target is not met yet: the shipped model scores 5 of 8 all-correct here (every disc right, "
    "three of four squares read as discs: generated squares fill 0.88-0.90 of their box, the threshold 0.893). "
    "strict: passing flags this marker.",
)
def test_shipped_model_draws_the_caption_at_its_base_size(base_videos):
    scores = base_scores(base_videos)
    summary = summarise(scores)
    assert summary.all_correct >= 0.9, [(s.caption, s.colour, s.shape, s.direction, s.one_object) for s in scores]


def test_shipped_model_keeps_what_it_has_learned(base_videos):
    """What the shipped model does draw, held as a floor one video below its measured scores (2026-12-05, guidance
    1.5: colour, direction and one object 8 of 8, all-correct 5): a retrained or broken model, or a broken pipeline,
    that loses the captioned colour or motion fails here. Random-noise videos and the random tiny model's own videos
    score about 0% (test_world)."""
    summary = summarise(base_scores(base_videos))
    assert summary.colour >= 7 / 8 and summary.direction >= 7 / 8, summary
    assert summary.one_object >= 7 / 8 and summary.all_correct >= 4 / 8, summary


def test_shipped_model_draws_the_shape_word(base_videos):
    """Squares come out squarer than discs: every generated square fills more of its bounding box than any disc
    (2026-12-05: squares 0.88-0.90, discs 0.77-0.82). A model that ignores the shape word draws both alike (the
    previous one: 0.78 / 0.78) and fails here, whatever the scorer's threshold."""
    fills = {"square": [], "disc": []}
    for (clip, _), score in zip(base_videos, base_scores(base_videos)):
        fills[clip.scene.shape].append(score.fill_ratio)
    assert len(fills["square"]) == len(fills["disc"]) == 4
    assert min(fills["square"]) > max(fills["disc"]) + 0.03, fills


def test_the_same_videos_fail_against_other_captions(base_videos):
    """The check above can fail: scored against a caption of another colour and direction, no video passes."""
    scenes = all_scenes()
    scores = [
        score_video(frames, scenes[(scenes.index(clip.scene) + 9) % len(scenes)].caption)
        for clip, frames in base_videos
    ]
    assert summarise(scores).all_correct == 0.0


@pytest.mark.slow  # two 256x256x33 clips through the VAE untiled: about 15 s on 2 cores
def test_shipped_vae_keeps_a_large_slow_object_whole():
    """At 2x the base size and 2x its length the object is twice as wide in pixels and moves as many pixels per
    frame as at the base size. The shipped VAE reconstructs such ground truth with one object in every frame and
    the caption right; before its decoder stage (`world decoder`) it decoded green and blue objects dimmer inside
    on the first frame of every group of four from frame 8 on and split them in two (3 and 6 frames of 33 here)."""
    import torch

    from atlasvid_dist.world.train import to_pixels

    vae = load_components("shapes").vae
    for clip in (
        WorldClip(parse_caption("a green square moving right"), 0),
        WorldClip(parse_caption("a blue square moving down"), 0),
    ):
        with torch.no_grad():
            pixels = to_pixels(clip.render(256, 256, 33))[None]  # (1, 3, 33, 256, 256)
            video = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0]  # (3, 33, 256, 256)
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()  # (33, 256, 256, 3)
        score = score_video(frames, clip.scene.caption)
        assert score.all_correct, (clip.scene.caption, score.objects_per_frame, score.fill_ratio)


def scores_by_adapter(tmp, clips, stage: int, adapters=("shipped", "none"), **values) -> dict:
    """{adapter: scores} of ``clips`` made by generate with ``values`` (the model's defaults otherwise), with the
    model's stage-``stage`` adapter ('shipped') and/or without it ('none'): the whole job, or with ``stage`` 1 its
    proxy alone."""
    comp = load_components("shapes")
    scores = {}
    for adapter in adapters:
        scores[adapter] = []
        for k, clip in enumerate(clips):
            path = tmp / f"{adapter}-{k}.mp4"
            own = {"model": "shapes", "prompt": clip.scene.caption, "seed": clip.seed, "out": str(path)}
            cfg = build_config({**own, **values, **({f"lora_stage{stage}": "none"} if adapter == "none" else {})})
            generator = TwoStageGenerator(cfg, components=comp, progress=False)
            if stage == 1:
                generator.proxy_only(str(path))
            else:
                generator.run()
            scores[adapter].append(score_video(read_mp4(path), clip.scene.caption, name=clip.scene.caption))
    return scores


@pytest.fixture(scope="module")
def proxy_scores(tmp_path_factory):
    """{adapter: scores} of the subset's proxies for the model's default job (4x the base size per side, 65
    frames: the proxy is the base size x 17 frames with its RoPE stretched 4x in time), stage 1 alone, with the
    shipped stage-1 adapter and without it."""
    return scores_by_adapter(tmp_path_factory.mktemp("proxies"), SUBSET, 1)


def test_shipped_stage1_adapter_keeps_the_proxy_whole(proxy_scores):
    """The proxy is the layout every detail window reads. Under the time-stretched RoPE the base model splits or
    loses the object (2026-12-05 on this subset, guidance 1.5: one object in 4 of 8 proxies; 3 at guidance 4); the
    shipped stage-1 adapter keeps it whole in 7 of 8 (6 at guidance 4; all 32 captions: 94% against 44%,
    benchmarks/results/shapes-base-proxy-32-g15.json). Held at 5 of 8, and above the base model: an adapter that is not
    loaded, not trained or not applied to the proxy's forward fails here."""
    adapted, plain = (summarise(proxy_scores[k]) for k in ("shipped", "none"))
    assert adapted.one_object >= 5 / 8 and adapted.one_object > plain.one_object, (adapted, plain)
    assert adapted.direction >= 7 / 8 and adapted.colour >= 7 / 8, adapted


STAGE2_CLIPS = (
    WorldClip(parse_caption("a red square moving right"), 0),
    WorldClip(parse_caption("a blue disc moving up"), 0),
)
"""Two captions (seed 0) for the detail stage: a square and a disc, moving across and along the frame."""


README_JOB = Path(__file__).resolve().parents[1] / "configs" / "generate" / "shapes-512.yaml"
"""The README's main job: the model's defaults (4x the base size per side, 65 frames, both adapters) with the detail
stage started from the proxy."""


@pytest.fixture(scope="module")
def stage2_scores(tmp_path_factory):
    """Scores of STAGE2_CLIPS made by the README's job (its config file's detail start over the model's defaults):
    the size the stage-2 adapter was trained at, where an object is wider than a window."""
    job = yaml.safe_load(README_JOB.read_text())
    start = {k: job[k] for k in ("detail_init", "init_strength")}
    tmp = tmp_path_factory.mktemp("detail")
    return scores_by_adapter(tmp, STAGE2_CLIPS, 2, adapters=("shipped",), crf=0, **start)["shipped"]


def mean_objects(score) -> float:
    return sum(score.objects_per_frame) / len(score.objects_per_frame)


@pytest.mark.slow
def test_shipped_stage2_adapter_keeps_the_detail_whole(stage2_scores):
    """The stage-2 adapter teaches the detail windows to follow the proxy instead of drawing objects of their own,
    and (trained at 4x) to fill the inside of an object wider than a window. Measured 2026-12-05 (guidance 1.5):
    with it 1.11 and 1.35 objects a frame on average, one object in 62 and 42 of the 65 frames, both directions
    right; without it (the same job, `lora_stage2: none`) 3.95 and 10.2 objects a frame, one object in 2 and 0
    frames, the disc read as moving left. Held at 1.5 objects a frame and one object in half the frames: an adapter
    that is not loaded, not trained or not applied to the detail forwards fails here. (From pure noise instead of
    the proxy, the model's default, the disc is the weak one: 2.6 objects a frame at guidance 1.5, 1.6 at 4.)"""
    for clip, score in zip(STAGE2_CLIPS, stage2_scores):
        ones = sum(n == 1 for n in score.objects_per_frame)
        assert mean_objects(score) <= 1.5 and ones >= score.frames / 2, (clip.scene.caption, score.objects_per_frame)
        assert score.direction == clip.scene.direction and score.colour == clip.scene.colour, score
