"""Two-stage generation end to end on the tiny model: mp4 output, determinism, resume, loading, LoRA, bad inputs."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atlasvid_dist.cli.generate import DEFAULTS, build_config
from atlasvid_dist.cli.main import main
from atlasvid_dist.pipeline.generate import RunInterrupted, TwoStageGenerator

SMALL = dict(res="256x256", frames=9, steps=2, proxy_steps=2, window="3,8,8", guidance=3.0, spatial_scale=2)


def config(tmp_path, name="out", **kw):
    values = {
        **DEFAULTS,
        **SMALL,
        "prompt": "a red ball rolling",
        "out": str(tmp_path / f"{name}.mp4"),
        "save_latents": str(tmp_path / f"{name}.safetensors"),
        **kw,
    }
    return build_config(values)


@pytest.fixture(scope="module")
def tiny_components():
    from atlasvid_dist.models.loading import load_components

    return load_components("tiny")


def generate(cfg, components=None, **kw):
    return TwoStageGenerator(cfg, components=components, progress=False).run(**kw)


def latents_of(cfg):
    return load_file(cfg.save_latents)["latents"]


def test_end_to_end_mp4_and_determinism(tmp_path, tiny_components):
    from atlasvid_dist.pipeline.video_io import probe_mp4, read_mp4

    a = config(tmp_path, "a", save_proxy=str(tmp_path / "proxy.mp4"))
    result = generate(a, tiny_components)
    info = probe_mp4(a.out)
    assert (info.frames, info.width, info.height) == (9, 256, 256) and abs(info.fps - 16) < 1e-6
    proxy = probe_mp4(tmp_path / "proxy.mp4")
    assert (proxy.width, proxy.height, proxy.frames) == (128, 128, 5)
    assert result.out_bytes > 0 and "256x256" in result.summary()
    frames = read_mp4(a.out)
    assert frames.shape == (9, 256, 256, 3) and frames.std() > 1.0  # frames vary
    b = config(tmp_path, "b")
    generate(b, tiny_components)
    assert torch.equal(latents_of(a), latents_of(b))
    assert (read_mp4(b.out) == frames).all()
    c = config(tmp_path, "c", seed=1)
    generate(c, tiny_components)
    assert not torch.equal(latents_of(a), latents_of(c))


@pytest.mark.parametrize(
    "stop",
    [
        ("proxy", 1),
        pytest.param(("proxy", 2), marks=pytest.mark.slow),
        pytest.param(("detail", 1), marks=pytest.mark.slow),
    ],
)
def test_resume_from_each_step_equals_uninterrupted(tmp_path, tiny_components, stop):
    ref = config(tmp_path, "ref")
    generate(ref, tiny_components)
    cfg = config(tmp_path, "resumed", run_dir=str(tmp_path / "run"))
    gen = TwoStageGenerator(cfg, components=tiny_components, progress=False)
    gen.interrupt_at = stop
    with pytest.raises(RunInterrupted):
        gen.run()
    assert not (tmp_path / "resumed.mp4").exists()  # no output file after a failure
    result = generate(cfg, tiny_components, resume=True)
    assert result.resumed_from == f"{stop[0]} step {stop[1]}"
    assert torch.equal(latents_of(cfg), latents_of(ref))


@pytest.mark.slow  # two 4-step generate runs
def test_detail_init_from_proxy_runs_fewer_steps(tmp_path, tiny_components):
    cfg = config(tmp_path, "init", detail_init="proxy", init_strength=0.5, steps=4)
    generate(cfg, tiny_components)
    assert torch.isfinite(latents_of(cfg)).all()
    assert not torch.equal(latents_of(cfg), latents_of(generate_ref(tmp_path, tiny_components, steps=4)))


def test_ffn_chunk_reaches_both_stages_and_keeps_the_latents(tmp_path, tiny_components):
    ref = config(tmp_path, "whole")
    generate(ref, tiny_components)
    rows = []
    ffn = tiny_components.transformer.blocks[0].ffn
    hook = ffn.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[1]))
    try:
        generate(config(tmp_path, "chunked", ffn_chunk=64), tiny_components)
    finally:
        hook.remove()
    assert max(rows) == 64  # stage 1 (128 proxy tokens) and stage 2 (768) in chunks of 64
    torch.testing.assert_close(latents_of(config(tmp_path, "chunked")), latents_of(ref), atol=1e-5, rtol=0)


def generate_ref(tmp_path, comp, **kw):
    cfg = config(tmp_path, "noiseinit", **kw)
    generate(cfg, comp)
    return cfg


@pytest.mark.slow  # saves the tiny model and generates twice
def test_model_folder_equals_built_in(tmp_path, tiny_components):
    from atlasvid_dist.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "tiny-folder")
    a, b = config(tmp_path, "mem"), config(tmp_path, "dir", model=str(folder))
    generate(a, tiny_components)
    generate(b)
    assert torch.equal(latents_of(a), latents_of(b))


@pytest.mark.slow  # two generate runs; test_lora keeps adapter loading fast
def test_lora_changes_output(tmp_path):
    from peft import LoraConfig

    from atlasvid_dist.models import lora
    from atlasvid_dist.models.loading import load_components

    comp = load_components("tiny")
    comp.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
        adapter_name="trained",
    )
    path = lora.save_lora(comp.transformer, "trained", tmp_path / "adapter.safetensors")
    base, tuned = config(tmp_path, "base"), config(tmp_path, "tuned", lora_stage2=str(path))
    generate(base)
    generate(tuned)
    assert not torch.equal(latents_of(base), latents_of(tuned))


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


BAD = [
    (["--frames", "8"], "frames"),
    (["--res", "1000x720"], "width"),
    (["--res", "9k"], "res"),
    (["--window", "3,7,8"], "window"),
    (["--steps", "-2"], "steps"),
    (["--model", "/nonexistent/wan"], "nonexistent"),
    (["--lora-stage2", "README.md"], "README.md"),
    (["--attention", "sparse"], "attention"),  # named as the option the user typed
    (["--attention", "ultragen", "--ultragen-weight", "2"], "ultragen_weight"),
    (["--attention", "ultragen", "--ultragen-pool", "1,4"], "ultragen_pool"),
    (["--detail-cfg-until", "1.5"], "detail_cfg_until"),
    (["--detail-reuse", "1"], "detail_reuse"),
    (["--detail-reuse", "-0.1"], "detail_reuse"),
    (["--ffn-chunk", "-1"], "ffn_chunk"),
]


def test_ultragen_options_reach_the_method(tmp_path):
    """--ultragen-pool / --ultragen-weight (or the same keys in --config, a list for the pool) set the method."""
    cfg = config(tmp_path, attention="ultragen", ultragen_pool="1,2,2", ultragen_weight=0.25)
    assert (cfg.method.mode, cfg.method.ultragen_pool, cfg.method.ultragen_weight) == ("ultragen", (1, 2, 2), 0.25)
    assert config(tmp_path, ultragen_pool=[2, 4, 4]).method.ultragen_pool == (2, 4, 4)
    assert config(tmp_path).method.ultragen_pool == (1, 4, 4) and config(tmp_path).method.ultragen_weight == 0.5


SMALL_ARGS = [
    "--prompt",
    "x",
    "--res",
    "256x256",
    "--frames",
    "9",
    "--steps",
    "1",
    "--proxy-steps",
    "1",
    "--window",
    "3,8,8",
    "--quiet",
]
"""The smallest generate run the CLI tests share (256x256 x 9 frames, one step per stage)."""


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_inputs_exit_2_and_no_output(tmp_path, capsys, args, needle):
    out = tmp_path / "bad.mp4"
    code = cli("generate", *SMALL_ARGS, "--out", str(out), *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and needle in err
    assert not out.exists()


def test_truncated_weights_exit_2(tmp_path, capsys):
    from atlasvid_dist.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "broken")
    weights = next((folder / "transformer").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "t.mp4"
    code = cli(
        "generate",
        "--prompt",
        "x",
        "--model",
        str(folder),
        "--res",
        "256x256",
        "--frames",
        "9",
        "--window",
        "3,8,8",
        "--quiet",
        "--out",
        str(out),
    )
    assert code == 2 and weights.name in capsys.readouterr().err and not out.exists()


def test_cli_generate_with_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("prompt: a kite\nres: 256x256\nframes: 9\nsteps: 1\nproxy_steps: 1\nwindow: [3, 8, 8]\n")
    out = tmp_path / "kite.mp4"
    assert cli("generate", "--config", str(cfg), "--out", str(out), "--quiet") == 0
    assert out.exists() and "256x256" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("promt: typo\n")
    assert cli("generate", "--config", str(tmp_path / "bad.yaml"), "--quiet") == 2


def test_preflight_refuses_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import atlasvid_dist.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the pre-flight refused the run")

    monkeypatch.setattr(loading, "load_components", no_load)
    small = tmp_path / "small.yaml"
    small.write_text(
        "name: small\npeak_flops: 1.0e+12\npeak_flops_fp32: 1.0e+12\nefficiency: 0.5\n"
        "window_efficiency: 0.1\nmemory_bytes: 1000000\nshared_memory: true\n"
    )
    out = tmp_path / "never.mp4"
    code = cli(
        "generate",
        "--prompt",
        "x",
        "--res",
        "256x256",
        "--frames",
        "9",
        "--window",
        "3,8,8",
        "--quiet",
        "--device-profile",
        str(small),
        "--out",
        str(out),
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not fit" in err and not out.exists()


def test_preflight_passes_a_run_that_fits(tmp_path):
    report = TwoStageGenerator(config(tmp_path, "fits"), progress=False).preflight()
    assert report.fits


def test_decode_order_sequential_writes_the_same_video(tmp_path, tiny_components):
    """--decode-order sequential (one tile group after another) writes the bytes all tiles together write."""
    from atlasvid_dist.pipeline.video_io import read_mp4

    videos = {}
    for order in ("together", "sequential"):
        cfg = config(tmp_path, order, decode_order=order, decode_tile=8, decode_overlap=2, crf=0)
        gen = TwoStageGenerator(cfg, components=tiny_components, progress=False)
        gen.run()
        assert gen.decode_tiling().sequential == (order == "sequential")
        videos[order] = read_mp4(cfg.out)
    assert np.array_equal(videos["together"], videos["sequential"])


def test_decode_order_auto_goes_tile_by_tile_when_together_does_not_fit(tmp_path, tiny_components):
    """'auto' takes the pre-flight's order: on a device whose memory holds every phase but the decode with all
    tiles' caches live at once, the run decodes tile by tile (and with room for both, together)."""
    import dataclasses

    import yaml

    from atlasvid_dist.config.parallel import ParallelPlan
    from atlasvid_dist.cost.model import RunSettings, estimate
    from atlasvid_dist.cost.profiles import device_profile

    cfg = config(tmp_path, "auto", decode_tile=8, decode_overlap=2)
    gen = TwoStageGenerator(cfg, components=tiny_components, progress=False)
    cpu, plan = device_profile("cpu"), ParallelPlan(workers=1, device="cpu")

    def peaks(order):
        run = RunSettings(dtype="fp32", steps=2, proxy_steps=2, guidance=3.0, decode_tile=8, decode_overlap=2)
        run = dataclasses.replace(run, decode_batch=8, decode_order=order)
        r = estimate(cfg.video, gen.model_spec(), cfg.method, plan, run, cpu, suggest=False)
        return r.memory["decode"]["total"], max(v["total"] for k, v in r.memory.items() if k != "decode")

    together, others = peaks("together")
    sequential, _ = peaks("sequential")
    assert sequential < together and others < together
    for memory, want in (
        (max(others, sequential) + (together - max(others, sequential)) // 2, True),
        (2 * together, False),
    ):
        profile = tmp_path / f"device-{memory}.yaml"
        fields = {k: v for k, v in dataclasses.asdict(cpu).items() if k != "name"}
        profile.write_text(yaml.safe_dump({**fields, "memory_bytes": memory, "usable_fraction": 1.0}))
        cfg = config(tmp_path, "auto", decode_tile=8, decode_overlap=2, device_profile=str(profile))
        gen = TwoStageGenerator(cfg, components=tiny_components, progress=False)
        gen.preflight()
        assert gen.decode_tiling().sequential == want, memory
