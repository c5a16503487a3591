"""Mp4Writer / probe_mp4 / read_mp4: round trip of frames, size and fps; temp name + rename; failures leave nothing."""

import os

import numpy as np
import pytest

from atlasvid_dist.errors import InputError
from atlasvid_dist.pipeline.video_io import Mp4Writer, probe_mp4, read_mp4


def smooth_frames(n: int, h: int, w: int) -> np.ndarray:
    """Moving gradients (codec-friendly, so pixel closeness is a fair check): uint8 (n, h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(n):
        r = 128 + 100 * np.sin((x + 3 * t) / w * 2 * np.pi)
        g = 128 + 100 * np.cos((y - 2 * t) / h * 2 * np.pi)
        b = np.full_like(x, 40 + 20 * t)
        frames.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("fps", [16, 4.0])
def test_round_trip_count_size_fps_pixels(tmp_path, fps):
    frames = smooth_frames(9, 40, 72)  # 40 rows: not a multiple of 16, must not be resized
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, fps=fps, width=72, height=40) as w:
        w.write(frames[0])  # (H, W, 3)
        w.write(frames[1:])  # (N, H, W, 3)
        assert w.frames == 9
        assert not path.exists()  # nothing at the destination while writing
    assert leftovers(tmp_path) == ["v.mp4"]  # renamed, no temporary left
    info = probe_mp4(path)
    assert (info.frames, info.width, info.height) == (9, 72, 40)
    assert info.fps == pytest.approx(fps, rel=1e-3)
    back = read_mp4(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    err = np.abs(back.astype(np.int16) - frames.astype(np.int16))
    # Tolerance: yuv420p alone (crf 0) costs ~3.0 levels mean on this content, crf 18 ~3.4; a frame off by one
    # in time costs ~8.
    assert err.mean() < 4.0, err.mean()
    assert np.percentile(err, 99) < 16
    shifted = np.abs(back[1:].astype(np.int16) - frames[:-1].astype(np.int16)).mean()
    assert shifted > 2 * err.mean()  # frames come back in order


def test_crf_0_is_lossless(tmp_path):
    """Lossless RGB H.264: what is read back is exactly what was written (noise, the hardest content)."""
    frames = np.random.default_rng(0).integers(0, 256, (5, 24, 40, 3), dtype=np.uint8)
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, fps=8, width=40, height=24, crf=0) as w:
        w.write(frames)
    assert np.array_equal(read_mp4(path), frames)


def test_exception_mid_write_leaves_nothing(tmp_path):
    path = tmp_path / "v.mp4"
    frames = smooth_frames(3, 16, 16)
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path, fps=8, width=16, height=16) as w:
            w.write(frames)
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_bad_frames_abort_and_leave_nothing(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(InputError, match="uint8"):
        with Mp4Writer(path, fps=8, width=16, height=16) as w:
            w.write(smooth_frames(2, 16, 16))
            w.write(np.zeros((1, 16, 18, 3), np.uint8))  # wrong width
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match="no frames"):
        with Mp4Writer(path, fps=8, width=16, height=16):
            pass
    assert leftovers(tmp_path) == []


def test_existing_file_is_replaced_only_on_success(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old")
    with pytest.raises(KeyError):
        with Mp4Writer(path, fps=8, width=16, height=16) as w:
            w.write(smooth_frames(2, 16, 16))
            raise KeyError("stop")
    assert path.read_bytes() == b"old"
    with Mp4Writer(path, fps=8, width=16, height=16) as w:
        w.write(smooth_frames(2, 16, 16))
    assert probe_mp4(path).frames == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fps=8, width=15, height=16), "width"),
        (dict(fps=8, width=16, height=9), "height"),
        (dict(fps=0, width=16, height=16), "fps"),
        (dict(fps=8, width=16, height=16, crf=99), "crf"),
    ],
)
def test_bad_arguments_refused_before_ffmpeg(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        Mp4Writer(tmp_path / "v.mp4", **kwargs)
    assert leftovers(tmp_path) == []


def test_missing_folder_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Mp4Writer(tmp_path / "nope" / "v.mp4", fps=8, width=16, height=16)
    with pytest.raises(InputError, match="no such file"):
        probe_mp4(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(InputError, match="junk.mp4"):
        read_mp4(junk)
