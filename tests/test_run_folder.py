"""Issue 12 on the tiny model: a reused --run-dir is refused (or cleared with --overwrite-run-dir), --resume checks
the stored configuration and falls back past a corrupt step, outputs never replace each other and are checked
before any work, the video and the proxy video are put in place together, killed runs' leftovers are removed."""

import json
import os
import subprocess
import sys

import pytest
import torch

from atlasvid_dist.errors import InputError
from atlasvid_dist.pipeline.generate import RunInterrupted, TwoStageGenerator
from tests.test_generate import (  # noqa: F401 (fixture)
    SMALL_ARGS,
    cli,
    config,
    generate,
    latents_of,
    tiny_components,
)


def interrupted(cfg, comp, stop):
    gen = TwoStageGenerator(cfg, components=comp, progress=False)
    gen.interrupt_at = stop
    with pytest.raises(RunInterrupted):
        gen.run()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the refusals below must come before any work."""
    import atlasvid_dist.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the run was refused")

    monkeypatch.setattr(loading, "load_components", no_load)


# ------------------------------------------------------------------------------------------------ 5: reused run folder
@pytest.mark.slow  # four generate runs
def test_a_reused_run_dir_is_refused_and_overwrite_clears_it(tmp_path, tiny_components, capsys):
    run = tmp_path / "run"
    interrupted(config(tmp_path, "a", run_dir=str(run)), tiny_components, ("detail", 1))
    b = config(tmp_path, "b", prompt="a blue cube", run_dir=str(run))
    with pytest.raises(InputError, match="already holds a run.*--resume.*--overwrite-run-dir"):
        generate(b, tiny_components)
    code = cli("generate", *SMALL_ARGS, "--run-dir", str(run), "--out", str(tmp_path / "c.mp4"))
    err = capsys.readouterr().err
    assert code == 2 and str(run) in err and "--resume" in err, err
    # cleared, the new run is interrupted in stage 1 and resumed: its own steps, not the old run's stage-2 step
    gen = TwoStageGenerator(b, components=tiny_components, progress=False)
    gen.interrupt_at = ("proxy", 1)
    with pytest.raises(RunInterrupted):
        gen.run(overwrite=True)
    assert generate(b, tiny_components, resume=True).resumed_from == "proxy step 1"
    ref = config(tmp_path, "bref", prompt="a blue cube")
    generate(ref, tiny_components)
    assert torch.equal(latents_of(b), latents_of(ref))


def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(tmp_path, tiny_components):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a run folder"):
        generate(config(tmp_path, "n", run_dir=str(run)), tiny_components, overwrite=True)
    assert (run / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ 6: outputs
def collisions(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "ln").symlink_to(tmp_path / "real")
    (tmp_path / "dir.mp4").mkdir()
    long_name = "v" * 240 + ".mp4"  # fits the folder; its temporary name (.NAME.PID.partial.mp4) does not
    return [
        (["--out", str(tmp_path / "x.mp4"), "--save-proxy", str(tmp_path / "x.mp4")], "name the same file"),
        (["--out", "rel.mp4", "--save-proxy", str(tmp_path / "rel.mp4")], "name the same file"),
        (
            ["--out", str(tmp_path / "real" / "v.mp4"), "--save-proxy", str(tmp_path / "ln" / "v.mp4")],
            "name the same file",
        ),
        (["--out", str(tmp_path / "dir.mp4")], "existing folder"),
        (["--out", str(tmp_path / "r.mp4"), "--run-dir", str(tmp_path / "r.mp4")], "run folder"),
        (["--out", str(tmp_path / long_name)], "cannot write in folder"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_outputs_that_collide_or_cannot_be_written_are_refused_before_work(
    tmp_path, capsys, monkeypatch, no_model_load, case
):
    monkeypatch.chdir(tmp_path)
    args, needle = collisions(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli("generate", *SMALL_ARGS, *args)
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left


# ------------------------------------------------------------------------------------------------ 7: resume checks
def test_resume_refuses_an_edited_or_damaged_config(tmp_path, tiny_components, capsys):
    run = tmp_path / "run"
    interrupted(config(tmp_path, "e", run_dir=str(run)), tiny_components, ("proxy", 1))
    path = run / "config.json"
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "prompt": "an edited prompt"}))
    for text, needle in (
        (None, "changed after the run started"),
        ("{not json", "damaged"),
        ('{"prompt": "x"}', "damaged"),
        ("[1, 2]", "damaged"),
    ):
        if text is not None:
            path.write_text(text)
        assert cli("generate", "--resume", str(run), "--quiet") == 2
        err = capsys.readouterr().err
        assert str(path) in err and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "e.mp4").exists()
    path.write_text(good)
    assert cli("generate", "--resume", str(run), "--quiet") == 0


def test_distributed_resume_refuses_an_edited_config_before_ray(tmp_path, capsys, no_model_load):
    """The --workers run checks the same manifest, before Ray starts (a folder as the driver writes it)."""
    run = tmp_path / "run"
    cfg = config(tmp_path, "d", window="3,4,8", run_dir=str(run))
    TwoStageGenerator(cfg, progress=False).checkpointer(False, workers=2)
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "seed": 7}))
    assert cli("generate", "--resume", str(run), "--workers", "2", "--quiet") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "changed after the run started" in err, err


def test_distributed_resume_refuses_another_cut_of_the_windows_before_ray(tmp_path, capsys, no_model_load):
    """Each rank's checkpoints hold its windows: a resume that would cut them otherwise (another ownership order
    or window group) is refused, naming what the run used, instead of resuming ranks from other windows' steps."""
    run = tmp_path / "run"
    cfg = config(tmp_path, "s", window="3,4,8", run_dir=str(run))
    sharding = {"window_group": 1, "window_order": "wht"}
    TwoStageGenerator(cfg, progress=False).checkpointer(False, workers=2, sharding=sharding)
    assert cli("generate", "--resume", str(run), "--workers", "2", "--window-order", "thw", "--quiet") == 2
    err = capsys.readouterr().err
    assert "--window-group 1 --window-order wht" in err and "resume it with the same" in err, err


@pytest.mark.slow  # three generate runs; test_checkpoint keeps the fallback fast
def test_resume_falls_back_past_a_corrupt_latest_step(tmp_path, tiny_components, capsys):
    ref = config(tmp_path, "ref")
    generate(ref, tiny_components)
    cfg = config(tmp_path, "c", run_dir=str(run := tmp_path / "run"))
    interrupted(cfg, tiny_components, ("detail", 1))
    latest = max(run.glob("step-*"))
    tensors = latest / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    capsys.readouterr()
    result = generate(cfg, tiny_components, resume=True)
    err = capsys.readouterr().err
    assert f"skipping {latest}" in err and "corrupt" in err, err
    assert result.resumed_from == "proxy step 2"
    assert torch.equal(latents_of(cfg), latents_of(ref))


def test_detail_ranks_skip_a_corrupt_step_and_steps_of_another_run(tmp_path):
    """A distributed resume starts from the newest step every rank has intact (DetailWorker.committed_steps)."""
    from atlasvid_dist.pipeline.checkpoint import StepCheckpointer
    from atlasvid_dist.runtime.actors import DetailWorker

    run = tmp_path / "run"
    cfg = config(tmp_path, "w", window="3,4,8", run_dir=str(run))
    TwoStageGenerator(cfg, progress=False).checkpointer(False, workers=2)
    StepCheckpointer(run / "rank-0", run_id="an-older-run").commit(5, {"x": torch.ones(2)}, {})
    worker = DetailWorker(cfg, 0, 2, str(run))
    for step in (1, 2):
        worker.ckpt.commit(step, {"latents": torch.full((4,), float(step))}, {"step": step})
    tensors = run / "rank-0" / "step-000002" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    assert worker.committed_steps() == [1]


# ------------------------------------------------------------------------------------------------ 9: leftovers
class ProxyWriteFails(TwoStageGenerator):
    """The proxy video's write fails (after the main video was written)."""

    def decode(self, comp, latents, path, fps, out_hw, label="decode", pending=None):
        if label == "decode proxy":
            raise OSError(f"{path}: disk full (injected)")
        return super().decode(comp, latents, path, fps, out_hw, label, pending)


def test_a_failed_proxy_write_leaves_no_video_and_stale_partials_go(tmp_path, tiny_components):
    dead = tmp_path / f".old.mp4.{dead_pid()}.partial.mp4"
    alive = tmp_path / f".other.mp4.{os.getpid()}.partial.mp4"  # a live process's: kept
    dead.write_bytes(b"left by a killed run")
    alive.write_bytes(b"still being written")
    cfg = config(tmp_path, "v", save_proxy=str(tmp_path / "p.mp4"), save_latents=None)
    with pytest.raises(OSError, match="injected"):
        ProxyWriteFails(cfg, components=tiny_components, progress=False).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]


def test_ranks_scratch_is_removed_and_stale_ones_of_dead_drivers_go(tmp_path):
    from atlasvid_dist.runtime.driver import SCRATCH_PREFIX, rank_scratch

    stale = tmp_path / f"{SCRATCH_PREFIX}{dead_pid()}-abc"
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    stale.mkdir()
    live.mkdir()
    with pytest.raises(RuntimeError, match="rank died"):
        with rank_scratch(None, base=str(tmp_path)) as scratch:
            assert os.path.isdir(scratch) and os.path.basename(scratch).startswith(f"{SCRATCH_PREFIX}{os.getpid()}-")
            raise RuntimeError("rank died")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
    with rank_scratch(str(tmp_path / "run")) as scratch:
        assert scratch == str(tmp_path / "run")  # with a run folder, the ranks' files go there
