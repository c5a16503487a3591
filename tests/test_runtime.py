"""Distributed generation on Ray (embedded, loopback, gloo): --workers N gives the single-process latents."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atlasvid_dist.cli.main import main

pytestmark = pytest.mark.slow  # one embedded Ray for the module and full generate runs on 2-4 workers

ARGS = [
    "--prompt",
    "a red ball rolling",
    "--res",
    "256x256",
    "--frames",
    "9",
    "--steps",
    "2",
    "--proxy-steps",
    "2",
    "--window",
    "3,4,8",
    "--guidance",
    "3.0",
    "--spatial-scale",
    "2",
    "--quiet",
]
# token grid (3, 16, 16), window (3, 4, 8): 8 windows (3 workers -> 3/3/2), shifted layers halve h and w


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One embedded Ray for the module (the driver joins a running Ray instead of starting its own)."""
    import ray

    from atlasvid_dist.runtime.local import init_with_retry

    # a loaded machine occasionally fails a first start: retried once, as the driver does
    init_with_retry(
        lambda: ray.init(
            address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False
        ),
        cleanup=ray.shutdown,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """(latents, video frames, proxy video frames) of the one-process run."""
    from atlasvid_dist.pipeline.video_io import read_mp4

    d = tmp_path_factory.mktemp("single")
    code = cli(
        "generate",
        *ARGS,
        "--out",
        str(d / "a.mp4"),
        "--save-latents",
        str(d / "a.safetensors"),
        "--save-proxy",
        str(d / "p.mp4"),
    )
    assert code == 0
    return load_file(str(d / "a.safetensors"))["latents"], read_mp4(d / "a.mp4"), read_mp4(d / "p.mp4")


@pytest.fixture(scope="module")
def single(single_run):
    return single_run[0]


@pytest.mark.parametrize("workers,fault", [(2, None), (3, "1:1"), (4, None)])
def test_workers_equal_single_process(tmp_path, capsys, monkeypatch, single, workers, fault):
    """3 workers also lose rank 1 after its step 1 (ATLASVID_FAULT_INJECT): Ray restarts it, every rank resumes
    from the newest common committed step, and the result is still the single-process one."""
    if fault:
        monkeypatch.setenv("ATLASVID_FAULT_INJECT", fault)
    out, lat = tmp_path / "b.mp4", tmp_path / "b.safetensors"
    code = cli("generate", *ARGS, "--workers", str(workers), "--out", str(out), "--save-latents", str(lat))
    text = capsys.readouterr().out
    assert code == 0, text
    got = load_file(str(lat))["latents"]
    assert got.shape == single.shape
    assert float((got - single).abs().max()) <= 1e-5
    assert out.stat().st_size > 0
    sent = [float(m) for m in re.findall(r"rank \d+: ([0-9.]+) MB", text)]
    assert len(sent) == workers and all(s > 0 for s in sent), text  # shifted layers exchange a halo
    per_step = [float(m) for m in re.findall(r"rank \d+: [0-9.]+ MB, ([0-9.]+) MB/step", text)]
    assert len(per_step) == workers and all(0 < p <= s for p, s in zip(per_step, sent)), text
    planned = float(re.search(r"planned ([0-9.]+) MB/step on the heaviest rank", text).group(1))
    assert max(per_step) == planned, text  # the pre-flight's figure, reached by the heaviest rank
    assert ("worker of rank 1 was restarted" in text) == bool(fault), text
    assert f"decode tiles per rank [{', '.join(['1'] + ['0'] * (workers - 1))}]" in text, text  # 256 px: one tile


def test_more_workers_than_windows_is_refused(tmp_path, capsys):
    out = tmp_path / "c.mp4"
    code = cli("generate", *ARGS, "--workers", "9", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "windows" in err
    assert not out.exists()


def test_workers_and_gpus_together_are_refused(tmp_path, capsys):
    code = cli("generate", *ARGS, "--workers", "2", "--gpus", "2", "--out", str(tmp_path / "d.mp4"))
    assert code == 2 and "gpus" in capsys.readouterr().err


def test_bad_fault_injection_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATLASVID_FAULT_INJECT", "5:1")  # rank 5 of 2
    code = cli("generate", *ARGS, "--workers", "2", "--out", str(tmp_path / "g.mp4"))
    assert code == 2 and "ATLASVID_FAULT_INJECT" in capsys.readouterr().err


@torch.no_grad()
def test_strip_layout_runs_embed_and_head_per_token():
    """A rank's patches laid side by side (a 1 x 1 x n strip) go through embed and head as in the full latent."""
    from atlasvid_dist import AtlasConfig, AtlasTransformer
    from atlasvid_dist.geometry.grid import Grid
    from atlasvid_dist.models.tiny import build_tiny_transformer
    from atlasvid_dist.runtime.detail import from_strip, from_tokens, to_strip, to_tokens

    model = AtlasTransformer(build_tiny_transformer(0), AtlasConfig(window=(3, 4, 4)))
    g = torch.Generator().manual_seed(3)
    lat, enc, t = torch.randn(1, 16, 3, 8, 12, generator=g), torch.randn(1, 7, 32, generator=g), torch.tensor([500.0])
    grid = model.token_grid(lat)
    tokens = to_tokens(lat, model.patch)  # (B, N, C, pt, ph, pw)
    assert torch.equal(from_tokens(tokens, grid), lat)
    idx = torch.randperm(grid.size, generator=g)[:17]
    strip = to_strip(tokens[:, idx])
    assert torch.equal(from_strip(strip, model.patch), tokens[:, idx])
    full_x, temb, _, _ = model.embed(lat, t, enc)
    strip_x = model.embed(strip, t, enc)[0]
    torch.testing.assert_close(strip_x, full_x[:, idx], atol=1e-6, rtol=0)
    full_v = to_tokens(model.head(full_x, temb, grid, 1), model.patch)[:, idx]
    strip_v = from_strip(model.head(full_x[:, idx], temb, Grid(1, 1, 17), 1), model.patch)
    torch.testing.assert_close(strip_v, full_v, atol=1e-6, rtol=0)


def test_ulysses_degree_not_dividing_heads_is_refused_before_any_actor(tmp_path, capsys):
    """The tiny model has 2 heads: Ulysses over 4 ranks cannot split them (PlanError, exit 2, nothing written)."""
    out = tmp_path / "u.mp4"
    code = cli("generate", *ARGS, "--workers", "4", "--proxy-parallel", "ulysses", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "ulysses_degree = 4" in err and "heads = 2" in err, err
    assert not out.exists()


def test_distributed_flags_need_workers(tmp_path, capsys):
    code = cli("generate", *ARGS, "--proxy-parallel", "ring", "--out", str(tmp_path / "r.mp4"))
    assert code == 2 and "--workers" in capsys.readouterr().err


def test_unshifted_windows_send_nothing(tmp_path, capsys):
    """--no-shift: every layer uses the base window grid, whose windows each rank owns whole: zero bytes sent,
    and the result is still the single-process one."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("generate", *ARGS, "--no-shift", "--out", str(tmp_path / "a.mp4"), "--save-latents", str(a)) == 0
    capsys.readouterr()
    code = cli(
        "generate", *ARGS, "--no-shift", "--workers", "2", "--out", str(tmp_path / "b.mp4"), "--save-latents", str(b)
    )
    text = capsys.readouterr().out
    assert code == 0, text
    sent = [float(m) for m in re.findall(r"rank \d+: ([0-9.]+) MB", text)]
    assert sent == [0.0, 0.0], text
    diff = (load_file(str(a))["latents"] - load_file(str(b))["latents"]).abs().max()
    assert float(diff) <= 1e-5


def test_more_workers_than_the_cluster_holds_is_refused_at_once(tmp_path, capsys):
    """The module's Ray has 4 CPUs: 5 workers can never be placed; refused (exit 2) instead of waiting."""
    code = cli("generate", *ARGS, "--workers", "5", "--out", str(tmp_path / "e.mp4"))
    err = capsys.readouterr().err
    assert code == 2 and "need 5 CPU" in err, err


def test_proxy_worker_crash_resumes_stage1_from_its_checkpoint(tmp_path, capsys, monkeypatch, single):
    """ATLASVID_FAULT_INJECT=proxy:1: the proxy worker dies after committing stage-1 step 1; Ray restarts it, it
    resumes stage 1 from that step, and the result is still the single-process one."""
    monkeypatch.setenv("ATLASVID_FAULT_INJECT", "proxy:1")
    lat = tmp_path / "p.safetensors"
    code = cli("generate", *ARGS, "--workers", "2", "--out", str(tmp_path / "p.mp4"), "--save-latents", str(lat))
    text = capsys.readouterr().out
    assert code == 0, text
    assert "proxy worker was restarted and resumed stage 1 from step 1" in text, text
    assert float((load_file(str(lat))["latents"] - single).abs().max()) <= 1e-5


def test_worker_log_lines_carry_the_rank(capsys):
    from atlasvid_dist.runtime.actors import rank_logger

    rank_logger("rank 7").info("stage 2 done: %d tokens", 12)
    assert "atlasvid rank 7: stage 2 done: 12 tokens" in capsys.readouterr().err


def test_rank_bars_keep_a_silent_ranks_count():
    from atlasvid_dist.runtime.progress import RankBars

    bars = RankBars(total=5, ranks=3, desc="detail", enabled=False)
    bars.update([2, 3, 1])
    bars.update([3, None, 9])  # rank 1 busy restarting; rank 2's count is clipped to the total
    assert bars.done == [3, 3, 5] and bars.slowest() == (0, 3)
    bars.close()


@pytest.mark.parametrize("order", ["together", "sequential"])
def test_decode_over_ranks_writes_the_one_process_videos(tmp_path, capsys, order):
    """A decode tile of 8 latent cells: 25 tiles over 3 ranks, blended by the driver into exactly the frames the
    one-process decode makes of the same latents with the same tiles (and the proxy video, decoded over the ranks
    too), whether a rank's tiles advance together or one after another (--decode-order). Lossless output (--crf 0), so the decoded tensors are compared byte for byte, not through H.264. Every rank
    runs one CPU thread (its Ray share), so the reference decodes with one thread too: a CPU convolution's last
    bits depend on the thread count."""
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.pipeline.decode import DecodeTiling, decode_stream
    from atlasvid_dist.pipeline.video_io import read_mp4

    d = tmp_path
    # one tile per VAE call: a batch's last bits depend on what it holds, and ranks hold other batches than one
    # process (batched == one at a time within 2e-5: test_decode)
    tiles = write_yaml(d / "tiles.yaml", f"decode_tile: 8\ndecode_overlap: 2\ndecode_batch: 1\ndecode_order: {order}\n")
    tiles = str(tiles)
    code = cli(
        "generate",
        *ARGS,
        "--workers",
        "3",
        "--out",
        str(d / "b.mp4"),
        "--save-proxy",
        str(d / "q.mp4"),
        "--save-latents",
        str(d / "b.safetensors"),
        "--crf",
        "0",
        "--config",
        tiles,
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "decode tiles per rank [9, 8, 8]" in text, text
    saved = load_file(str(d / "b.safetensors"))
    vae = load_components("tiny").vae
    torch.set_num_threads(1)
    for key, video in (("latents", "b.mp4"), ("proxy", "q.mp4")):
        with torch.no_grad():
            want = np.concatenate(list(decode_stream(vae, saved[key], DecodeTiling(tile=8, overlap=2))))
        assert np.array_equal(read_mp4(d / video), want), key


def write_yaml(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("mode,workers", [("ulysses", 2), ("ring", 4)])
def test_proxy_parallel_equals_single_process(tmp_path, capsys, single, mode, workers):
    """Stage 1 over all ranks (the proxy actor only encodes the text): the same latents as one process."""
    lat = tmp_path / "pp.safetensors"
    code = cli(
        "generate",
        *ARGS,
        "--workers",
        str(workers),
        "--proxy-parallel",
        mode,
        "--out",
        str(tmp_path / "pp.mp4"),
        "--save-latents",
        str(lat),
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert float((load_file(str(lat))["latents"] - single).abs().max()) <= 1e-5
    sent = [float(m) for m in re.findall(r"rank \d+: ([0-9.]+) MB(?!/)", text.split("stage 1 on all ranks")[1])]
    assert len(sent) == workers and all(s > 0 for s in sent), text


def test_proxy_that_does_not_split_is_refused_before_any_actor(tmp_path, capsys):
    code = cli("generate", *ARGS, "--workers", "3", "--proxy-parallel", "ring", "--out", str(tmp_path / "x.mp4"))
    err = capsys.readouterr().err
    assert code == 2 and "128 tokens do not split into 3 equal slices" in err, err


def test_windows_shared_by_groups_equal_single_process(tmp_path, capsys, single):
    """--workers 4 --window-group 2: two groups of two ranks, each window split over its group with Ulysses."""
    lat = tmp_path / "wg.safetensors"
    code = cli(
        "generate",
        *ARGS,
        "--workers",
        "4",
        "--window-group",
        "2",
        "--out",
        str(tmp_path / "wg.mp4"),
        "--save-latents",
        str(lat),
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "tokens per rank [192, 192, 192, 192]" in text, text
    assert float((load_file(str(lat))["latents"] - single).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--window-group", "4"], "window_group = 4 does not divide"),
        (["--window-group", "2", "--window-parallel", "ring"], "window_parallel"),
        (["--window-group", "3"], "window_group"),
    ],
)
def test_bad_window_group_plans_are_refused(tmp_path, capsys, flags, match):
    code = cli("generate", *ARGS, "--workers", "4", *flags, "--out", str(tmp_path / "z.mp4"))
    err = capsys.readouterr().err
    assert code == 2 and match in err, err


def test_a_distributed_run_resumes_from_its_run_folder(tmp_path, capsys, monkeypatch, single):
    """--run-dir with --workers: a run that dies (rank 1 crashes, no restarts allowed) leaves every rank's committed
    steps; `--resume DIR --workers 2` finishes it with the single-process result. The folder refuses a resume on
    another worker count, and a single-process resume."""
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.errors import RunFailure
    from atlasvid_dist.runtime.driver import DistributedGenerator

    run = tmp_path / "run"
    values = dict(
        prompt="a red ball rolling",
        res="256x256",
        frames=9,
        steps=2,
        proxy_steps=2,
        window="3,4,8",
        guidance=3.0,
        spatial_scale=2,
        run_dir=str(run),
        out=str(tmp_path / "r.mp4"),
    )
    monkeypatch.setenv("ATLASVID_FAULT_INJECT", "1:1")
    with pytest.raises(RunFailure, match="rank 1"):
        DistributedGenerator(build_config({**DEFAULTS, **values}), 2, progress=False, max_restarts=0).run()
    monkeypatch.delenv("ATLASVID_FAULT_INJECT")
    assert (run / "rank-1" / "step-000001" / "COMMITTED").is_file() and not (tmp_path / "r.mp4").exists()
    capsys.readouterr()
    assert cli("generate", "--resume", str(run), "--workers", "3", "--quiet") == 2
    assert "--workers 2" in capsys.readouterr().err
    assert cli("generate", "--resume", str(run), "--quiet") == 2
    lat = tmp_path / "r.safetensors"
    code = cli("generate", "--resume", str(run), "--workers", "2", "--quiet", "--save-latents", str(lat))
    text = capsys.readouterr().out
    assert code == 0, text
    assert float((load_file(str(lat))["latents"] - single).abs().max()) <= 1e-5


def test_spatial_only_shift_equals_single_process(tmp_path, capsys):
    """--shift-axes hw: the shifted grid moves in space only; 2 workers give the one-process latents. (Here the
    window spans all 3 time tokens, so time is never shifted and the halo is the same as the default's; plan's
    test shows the saving at 4K on 8 ranks.)"""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("generate", *ARGS, "--shift-axes", "hw", "--out", str(tmp_path / "a.mp4"), "--save-latents", str(a)) == 0
    capsys.readouterr()
    code = cli(
        "generate",
        *ARGS,
        "--shift-axes",
        "hw",
        "--workers",
        "2",
        "--out",
        str(tmp_path / "b.mp4"),
        "--save-latents",
        str(b),
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert float((load_file(str(a))["latents"] - load_file(str(b))["latents"]).abs().max()) <= 1e-5
    sent = [float(m) for m in re.findall(r"rank \d+: ([0-9.]+) MB", text)]
    assert len(sent) == 2 and all(s > 0 for s in sent), text


@pytest.mark.parametrize("exchange", ["kv", "rows"])
def test_column_slab_ownership_equals_single_process_and_sends_what_plan_says(tmp_path, capsys, exchange):
    """--window-order wht (column slabs across all time) on 4 workers, windows shifted in time and space, shifted
    layers by a key/value halo or by moving rows: the one-process latents, and every rank's counted bytes per
    step within the pre-flight's figure for the heaviest rank, which one of them reaches exactly (the same
    number `plan` prints for this run)."""
    import json

    args = [*ARGS, "--frames", "45", "--window", "2,8,8"]  # token grid (12, 16, 16): 24 windows, shift (1, 4, 4)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("generate", *args, "--out", str(tmp_path / "a.mp4"), "--save-latents", str(a)) == 0
    capsys.readouterr()
    flags = ["--workers", "4", "--window-order", "wht", "--shift-exchange", exchange]
    code = cli("generate", *args, *flags, "--out", str(tmp_path / "b.mp4"), "--save-latents", str(b), "--json")
    out = capsys.readouterr().out
    assert code == 0, out
    assert float((load_file(str(a))["latents"] - load_file(str(b))["latents"]).abs().max()) <= 1e-5
    summary = json.loads(out.strip().splitlines()[-1])
    per_step, planned = summary["bytes_sent_per_step"], summary["planned_bytes_sent_per_step"]
    assert len(per_step) == 4 and all(0 < x <= planned for x in per_step) and max(per_step) == planned, summary
    phases = summary["planned_memory_by_phase"]  # the pre-flight's memory of the heaviest rank, what plan prints
    assert {"proxy_cache", "detail_stage", "decode"} <= set(phases) and all(v > 0 for v in phases.values())
    plan_args = [x for x in args[2:] if x != "--quiet"]  # plan takes no prompt
    assert cli("plan", *plan_args, *flags, "--device", "cpu", "--json") == 0
    assert json.loads(capsys.readouterr().out)["comm_bytes_per_step_per_rank"]["total"] == planned


def test_workers_json_summary_has_every_ranks_memory_and_bytes(tmp_path, capsys):
    """`generate --workers 2 --json`: the last stdout line is one JSON object with the ranks' numbers."""
    import json

    code = cli(
        "generate",
        *ARGS,
        "--workers",
        "2",
        "--out",
        str(tmp_path / "j.mp4"),
        "--save-proxy",
        str(tmp_path / "jp.mp4"),
        "--json",
    )
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["paths"]["video"] == str(tmp_path / "j.mp4")
    assert summary["paths"]["proxy"] == str(tmp_path / "jp.mp4") and summary["paths"]["latents"] is None
    assert len(summary["bytes_sent"]) == 2 and all(b > 0 for b in summary["bytes_sent"])  # shifted layers' halo
    assert [m["rank"] for m in summary["peak_memory"]] == [0, 1]
    assert all(m["cpu_max_rss_bytes"] > 1e6 and m["cuda_max_allocated_bytes"] is None for m in summary["peak_memory"])
    # the run's peak is read after the decode, the detail stage's before it (a peak cannot fall)
    assert all(m["cpu_max_rss_bytes"] >= m["detail_stage"]["cpu_max_rss_bytes"] > 1e6 for m in summary["peak_memory"])
    assert summary["median_step_seconds"]["detail"] > 0 and summary["median_step_seconds"]["proxy"] > 0
    assert summary["model"]["random_weights"] is True and summary["wall_seconds"] > 0


def test_joint_proxy_mode_workers_equal_single_process(tmp_path, capsys):
    """--proxy-mode joint (the proxy re-noised inside every detail forward): 2 workers, each drawing the proxy noise
    from its own copy of the stage-2 generator, give the one-process joint latents."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    joint = [*ARGS, "--proxy-mode", "joint"]
    assert cli("generate", *joint, "--out", str(tmp_path / "a.mp4"), "--save-latents", str(a)) == 0
    capsys.readouterr()
    code = cli("generate", *joint, "--workers", "2", "--out", str(tmp_path / "b.mp4"), "--save-latents", str(b))
    text = capsys.readouterr().out
    assert code == 0, text
    sent = [float(m) for m in re.findall(r"rank \d+: ([0-9.]+) MB", text)]
    assert len(sent) == 2 and all(s > 0 for s in sent), text  # halo bytes counted over the per-call attentions
    one, two = load_file(str(a)), load_file(str(b))
    assert float((one["latents"] - two["latents"]).abs().max()) <= 1e-5
    assert torch.equal(one["proxy"], two["proxy"])


def test_first_block_cache_workers_equal_single_process(tmp_path, capsys):
    """--detail-reuse with 2 workers: every rank skips the same forwards (the decision's sums are added over the
    ranks), so the latents are the one-process cached run's, and they differ from the uncached run's."""
    fewer = [*ARGS, "--steps", "4", "--detail-cfg-until", "0.5"]
    paths = {k: (tmp_path / f"{k}.mp4", tmp_path / f"{k}.safetensors") for k in ("plain", "one", "two")}
    runs = {"plain": [], "one": ["--detail-reuse", "0.09"], "two": ["--detail-reuse", "0.09", "--workers", "2"]}
    reports = {}
    for name, extra in runs.items():
        out, lat = paths[name]
        code = cli("generate", *fewer, *extra, "--out", str(out), "--save-latents", str(lat), "--json")
        text = capsys.readouterr().out
        assert code == 0, text
        reports[name] = json.loads(text.strip().splitlines()[-1])
    one, two, plain = (load_file(str(paths[k][1]))["latents"] for k in ("one", "two", "plain"))
    assert float((one - two).abs().max()) <= 1e-5
    assert float((one - plain).abs().max()) > 1e-3
    assert reports["one"]["detail_forwards"] == reports["two"]["detail_forwards"] == {"total": 6, "reused": 3}
    assert reports["plain"]["detail_forwards"] == {"total": 6, "reused": 0}


def test_a_ranks_peaks_are_the_whole_runs_with_the_detail_stages_beside():
    """The summary's entry of a rank: the peaks read after its decode at the top (what bench_memory holds against
    the decode phase), the ones its detail-stage result carried under detail_stage; without decode peaks, both
    are the detail stage's."""
    from atlasvid_dist.runtime.results import RankResult, rank_peaks

    part = RankResult(
        1, torch.zeros(1, 0), 0, {}, 0, 0, 1.0, 0.5, {"cpu_max_rss_bytes": 5, "cuda_max_allocated_bytes": 3}
    )
    after = {"cpu_max_rss_bytes": 9, "cuda_max_allocated_bytes": 4}
    assert rank_peaks(part, after) == {
        "rank": 1,
        "cpu_max_rss_bytes": 9,
        "cuda_max_allocated_bytes": 4,
        "detail_stage": {"cpu_max_rss_bytes": 5, "cuda_max_allocated_bytes": 3},
    }
    assert rank_peaks(part, {})["cpu_max_rss_bytes"] == 5
