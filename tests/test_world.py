"""The shapes world (analytic clips at any size) and the evaluator that scores videos against their captions."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from atlasvid_dist.cli.main import app
from atlasvid_dist.errors import InputError
from atlasvid_dist.eval import fit_path, label_components, score_video, summarise
from atlasvid_dist.world import (
    COLOURS,
    Motion,
    Scene,
    all_scenes,
    centres_px,
    coverage,
    evaluation_set,
    parse_caption,
    radius_px,
    render_clip,
    write_clips,
)
from atlasvid_dist.world.render import frame_coverage

runner = CliRunner()
SIZES = [(64, 64), (256, 256)]


def weighted_centres(cov):
    """(N, 2) coverage-weighted centroid (x, y) of (N, H, W) coverage, pixel centres at +0.5."""
    h, w = cov.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # (H, W) each
    total = cov.sum(axis=(1, 2))
    return np.stack([(cov * xs).sum(axis=(1, 2)) / total, (cov * ys).sum(axis=(1, 2)) / total], axis=1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", ["square", "disc"])
def test_geometry_is_exact_and_inside_the_frame(size, shape):
    w, h = size
    r = radius_px(w, h)
    # the centroid weights each pixel at its centre: a square's edge column covered a fraction f has its area
    # centred (1 - f) / 2 away, so over the two edges of a side 2r the centroid is off by at most 1 / (8r) px
    area, tol = ((2 * r) ** 2, 1 / (8 * r)) if shape == "square" else (np.pi * r * r, 5e-3)
    for clip in evaluation_set(seeds=(0, 1)):
        if clip.scene.shape != shape:
            continue
        motion = clip.motion(w, h)
        cov = coverage(clip.scene, motion, w, h, 9)  # (9, H, W)
        t = np.arange(9)[:, None] / 8  # (9, 1) from the first to the last frame
        want = (np.array(motion.start) + t * motion.travel * np.array(clip.scene.step)) * [w, h]  # (9, 2) px
        np.testing.assert_allclose(cov.sum(axis=(1, 2)), area, rtol=1e-9)  # whole area inside: nothing clipped
        np.testing.assert_allclose(weighted_centres(cov), want, atol=tol)
        for cx, cy in want[[0, -1]]:
            assert r <= cx <= w - r and r <= cy <= h - r


def test_disc_coverage_matches_supersampling():
    cx, cy, r, s = 20.3, 30.7, radius_px(48, 48), 32
    got = frame_coverage("disc", (cx, cy), 48, 48)
    u = (np.arange(48 * s) + 0.5) / s  # sample positions along one axis
    inside = (u[None, :] - cx) ** 2 + (u[:, None] - cy) ** 2 <= r * r  # (48 s, 48 s)
    want = inside.reshape(48, s, 48, s).mean(axis=(1, 3))  # (48, 48)
    assert np.abs(got - want).max() < 0.02 and got.sum() == pytest.approx(np.pi * r * r, rel=1e-12)


def test_same_scene_at_every_size():
    clip = evaluation_set()[7]
    small, big = clip.motion(64, 64), clip.motion(256, 256)
    assert small == big
    a = centres_px(clip.scene, small, 64, 64, 5) * 4
    np.testing.assert_allclose(a, centres_px(clip.scene, big, 256, 256, 5))


def test_captions_round_trip():
    scenes = all_scenes()
    assert len(scenes) == len({s.caption for s in scenes}) == 32
    for s in scenes:
        assert parse_caption(s.caption) == s and s.caption.startswith(f"a {s.colour} {s.shape} moving ")
    assert len(evaluation_set()) == 96
    with pytest.raises(InputError, match="'a red triangle moving right'"):
        parse_caption("a red triangle moving right")


@pytest.mark.parametrize("text", ["a purple square moving right", "a red square moving sideways", "red square"])
def test_cli_names_a_caption_that_does_not_parse(tmp_path, text):
    r = runner.invoke(app, ["eval", "--video", str(tmp_path / "x.mp4"), "--caption", text])
    assert r.exit_code == 2 and text in r.output and "does not parse" in r.output


def test_cli_refuses_missing_inputs(tmp_path):
    r = runner.invoke(app, ["eval"])
    assert r.exit_code == 2 and "--videos" in r.output
    (tmp_path / "captions.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "a red cube moving up"}) + "\n")
    r = runner.invoke(app, ["eval", "--videos", str(tmp_path)])
    assert r.exit_code == 2 and "line 1" in r.output and "a red cube moving up" in r.output


def test_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((23, 31)) < 0.55
        labels, n = label_components(mask)
        seen, count = np.zeros_like(mask), 0
        for y0, x0 in zip(*np.nonzero(mask)):
            if seen[y0, x0]:
                continue
            count += 1
            stack, members = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                members.append(labels[y, x])
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < 23 and 0 <= xx < 31 and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
            assert len(set(members)) == 1  # one component, one label
        assert n == count and set(np.unique(labels[mask])) == set(range(1, n + 1))


def check_ground_truth(scores, min_psnr, min_ssim):
    assert all(s.all_correct for s in scores), [
        (s.caption, s.colour, s.shape, s.direction) for s in scores if not s.all_correct
    ]
    assert all(s.psnr > min_psnr and s.ssim > min_ssim for s in scores), [(s.psnr, s.ssim) for s in scores]
    assert all(s.path_rms_px < 0.1 for s in scores)
    assert summarise(scores).all_correct == 1.0


def test_ground_truth_arrays_score_perfectly_at_two_sizes():
    scores = [score_video(c.render(64, 64, 9), c.scene.caption) for c in evaluation_set(seeds=(0,))]
    check_ground_truth(scores, 40, 0.999)
    big = [score_video(c.render(256, 256, 5), c.scene.caption) for c in evaluation_set(seeds=(1,))[::5]]
    check_ground_truth(big, 40, 0.999)


def test_ground_truth_through_lossless_mp4_and_the_cli(tmp_path):
    for w, h, step in ((64, 64, 4), (256, 256, 11)):
        clips = [(c.scene, c.motion(w, h)) for c in evaluation_set(seeds=(2,))[::step]]
        folder = write_clips(tmp_path / f"{w}", clips, frames=9, width=w, height=h, fps=16.0, crf=0)
        out = tmp_path / f"{w}.json"
        r = runner.invoke(app, ["eval", "--videos", str(folder), "--json", str(out), "--grid", str(tmp_path / "g.png")])
        assert r.exit_code == 0, r.output
        doc = json.loads(out.read_text())
        assert doc["summary"]["all_correct"] == 1.0 and doc["summary"]["videos"] == len(clips)
        assert all(v["psnr"] == "inf" or v["psnr"] > 40 for v in doc["videos"])
        assert all(v["ssim"] > 0.999 for v in doc["videos"])
    assert (tmp_path / "g.png").stat().st_size > 0


def test_training_set_h264_scores_correct(tmp_path):
    from atlasvid_dist.pipeline.video_io import read_mp4
    from atlasvid_dist.train.synthetic import write_synthetic_dataset

    folder = write_synthetic_dataset(tmp_path, num_videos=8, frames=9)
    lines = [json.loads(ln) for ln in (folder / "captions.jsonl").read_text().splitlines()]
    scores = [score_video(read_mp4(folder / e["video"]), e["caption"]) for e in lines]
    check_ground_truth(scores, 28, 0.98)  # yuv420p at crf 10 blurs colour edges


@pytest.mark.parametrize("kind", ["uniform", "grey"])
def test_noise_is_not_a_scene(kind):
    rng = np.random.default_rng(1)
    shape = (16, 9, 64, 64, 3)
    noise = rng.integers(0, 256, shape) if kind == "uniform" else 128 + 40 * rng.standard_normal(shape)
    videos = np.clip(noise, 0, 255).astype(np.uint8)
    captions = [s.caption for s in all_scenes()[::2]]
    scores = [score_video(v, c) for v, c in zip(videos, captions)]
    assert summarise(scores).all_correct <= 1 / 16
    assert all(s.psnr < 20 and s.ssim < 0.3 for s in scores)


def test_a_wrong_caption_is_caught():
    """A rendered clip scored against any caption that differs in colour, shape or direction is not correct (a
    detector that swapped two colours or a direction's sign would fail here or in the ground-truth tests)."""
    scene = Scene("red", "square", "right")
    frames = render_clip(scene, Motion((0.3, 0.4), 0.4), 64, 64, 9)
    others = [Scene(c, s, d) for c in COLOURS for s in ("square", "disc") for d in ("right", "left", "up", "down")]
    for other in others:
        score = score_video(frames, other.caption)
        assert score.all_correct == (other == scene), other.caption
    assert score_video(frames, scene.caption).psnr > 40
    assert score_video(frames, "a red square moving left").psnr < 25  # re-render goes the captioned way


def test_path_rms_measures_jitter():
    scene, w = Scene("blue", "disc", "down"), 128
    centres = centres_px(scene, Motion((0.5, 0.2), 0.5), w, w, 9)  # (9, 2)
    jitter = np.array([[0.0, 0], [1.5, 0], [-1, 0], [0, 0], [2, 0], [0, 0], [-2, 0], [0, 0], [0, 0]])
    frames = np.stack([render_clip(scene, Motion(tuple(c / w), 0.0), w, w, 1)[0] for c in centres + jitter])
    got = score_video(frames, scene.caption)
    want = fit_path(np.arange(9), centres + jitter).rms_px
    assert got.direction == "down" and got.path_rms_px == pytest.approx(want, abs=0.02) and want > 0.8


def test_the_random_tiny_model_scores_near_zero(tmp_path):
    """The evaluator's other anchor: videos the built-in tiny model (random weights) makes for four captions,
    through generate and a lossless mp4, are not scenes (no caption drawn, re-render PSNR low)."""
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.pipeline.generate import TwoStageGenerator
    from atlasvid_dist.pipeline.video_io import read_mp4

    comp = load_components("tiny")
    scores = []
    for k, scene in enumerate(all_scenes()[::8]):
        out = tmp_path / f"tiny-{k}.mp4"
        values = dict(res="128x128", frames=9, steps=2, attention="full", guidance=1.0, crf=0, seed=k)
        cfg = build_config({**DEFAULTS, **values, "prompt": scene.caption, "out": str(out)})
        TwoStageGenerator(cfg, components=comp, progress=False).run()
        scores.append(score_video(read_mp4(out), scene.caption))
    assert len(scores) == 4 and summarise(scores).all_correct == 0
    assert all(s.psnr < 20 for s in scores)
