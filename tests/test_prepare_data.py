"""prepare-data: a dataset encoded once into sharded safetensors; training reads the shards (loss falls), the shards
hold exactly what the encoder makes of each clip, and mismatched or damaged shards are refused naming the field or
file. Also Wan's shifted timestep sampling."""

import json

import pytest
import torch
import yaml

from atlasvid_dist.cli.main import main
from atlasvid_dist.errors import ConfigError, InputError
from atlasvid_dist.train.config import TrainConfig
from atlasvid_dist.train.shards import INDEX, PreparedData
from atlasvid_dist.train.synthetic import write_synthetic_dataset
from tests._dist import run_ranks
from tests.test_train import SMALL, ZERO2, _fit


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(raw data folder, prepared folder, config YAML) for stage 2 of the SMALL geometry: 2 videos x 3 clips."""
    root = tmp_path_factory.mktemp("prep")
    data = write_synthetic_dataset(root / "data", num_videos=2, frames=17)
    conf = root / "small.yaml"
    conf.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}))
    out = root / "shards"
    assert (
        cli(
            "prepare-data",
            "--data",
            str(data),
            "--output",
            str(out),
            "--stage",
            "2",
            "--config",
            str(conf),
            "--clips-per-video",
            "3",
            "--shard-size",
            "4",
        )
        == 0
    )
    return str(data), str(out), str(conf)


@pytest.mark.slow  # VAE-encodes a data set (prepare-data)
def test_shards_hold_what_the_encoder_makes_of_each_clip(prepared):
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.train.data import LatentEncoder, cut_clip, scan_dataset

    data, out, _ = prepared
    index = json.loads((__import__("pathlib").Path(out) / INDEX).read_text())
    assert index["records"] == 6 and [s["count"] for s in index["shards"]] == [4, 2]
    cfg = TrainConfig(**SMALL, stage=2, data=data)
    shards = PreparedData(out, cfg)
    comp = load_components("tiny", device="cpu")
    enc = LatentEncoder(comp.vae, comp.tokenizer, comp.text_encoder, cfg.text_len, "cpu", torch.float32)
    records = {str(r.path): r for r in scan_dataset(data, cfg).records}
    for j in (0, 5):  # one clip of each shard
        src = index["sources"][j]
        clip = cut_clip(records[src["video"]], src["start"], cfg)
        got = shards.get(j)
        assert torch.equal(got["proxy"], enc.video(clip.proxy)) and torch.equal(got["detail"], enc.video(clip.detail))
        assert torch.equal(got["text"], enc.text(clip.caption))
    assert len({s["start"] for s in index["sources"]}) == 3  # starts spread over each video


@pytest.mark.slow  # VAE-encodes the data set again, 4 clips per call
def test_batched_encoding_makes_the_same_shards(prepared, tmp_path):
    data, out, conf = prepared
    batched = tmp_path / "batched"
    args = ["--data", data, "--output", str(batched), "--stage", "2", "--config", conf, "--clips-per-video", "3"]
    assert cli("prepare-data", *args, "--shard-size", "4", "--encode-batch", "4") == 0
    one, four = (json.loads((__import__("pathlib").Path(d) / INDEX).read_text()) for d in (out, batched))
    assert four["sources"] == one["sources"] and [s["count"] for s in four["shards"]] == [4, 2]
    cfg = TrainConfig(**SMALL, stage=2, data=data)
    a, b = PreparedData(out, cfg), PreparedData(batched, cfg)
    for j in range(6):  # a batch of 4 and its remainder of 2: every clip where one-at-a-time put it
        x, y = a.get(j), b.get(j)
        assert torch.equal(x["text"], y["text"])
        for k in ("proxy", "detail"):  # batched convolutions may round differently, nothing more
            assert torch.allclose(x[k], y[k], atol=1e-4, rtol=1e-4), (j, k, (x[k] - y[k]).abs().max())


@pytest.mark.slow
def test_training_from_shards_lowers_the_loss(prepared, tmp_path):
    _, out, _ = prepared
    cfg = dict(SMALL, stage=2, data=out, output=str(tmp_path / "run"), max_steps=25, lora_stage1="none")
    (before, after, adapter, _), _ = run_ranks(_fit, 2, cfg, ZERO2, 25, timeout=240)
    assert after < 0.9 * before, (before, after)
    assert adapter is not None


@pytest.mark.slow  # VAE-encodes a data set (prepare-data)
def test_prepare_data_progress_is_bounded_plain_lines_off_a_terminal(tmp_path, capsys):
    """Off a terminal (captured stderr) prepare-data prints at most 10 complete lines (clips done/total, s/clip,
    ETA), never a carriage return, whatever the clip count; --quiet prints none."""
    data = write_synthetic_dataset(tmp_path / "data", num_videos=3, frames=25)
    conf = tmp_path / "small.yaml"
    conf.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}))
    base = ["prepare-data", "--data", str(data), "--stage", "1", "--config", str(conf), "--clips-per-video", "5"]
    assert cli(*base, "--output", str(tmp_path / "a")) == 0
    out = capsys.readouterr()
    n = json.loads((tmp_path / "a" / INDEX).read_text())["records"]
    lines = [line for line in out.err.splitlines() if line.startswith("prepare-data:")]
    assert n > 10 and 1 <= len(lines) <= 10, (n, out.err)
    assert "\r" not in out.err + out.out
    assert all("s/clip, ETA" in line for line in lines) and lines[-1].startswith(f"prepare-data: clip {n}/{n} (100%)")
    assert cli(*base, "--output", str(tmp_path / "b"), "--quiet") == 0
    out = capsys.readouterr()
    assert "prepare-data:" not in out.err and f"prepared {n} clips" in out.out


@pytest.mark.slow  # VAE-encodes a data set (prepare-data)
def test_mismatched_or_damaged_shards_are_refused(prepared, tmp_path, capsys):
    import shutil

    data, out, conf = prepared
    with pytest.raises(ConfigError, match="width"):
        PreparedData(out, TrainConfig(**{**SMALL, "width": 128}, stage=2, data=out))
    with pytest.raises(ConfigError, match="stage"):
        PreparedData(out, TrainConfig(**SMALL, stage=1, data=out))
    code = cli("train", "--stage", "1", "--data", out, "--output", str(tmp_path / "o"), "--config", conf)
    assert code == 2 and "stage" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="shard-00001.safetensors"):
        PreparedData(bad, TrainConfig(**SMALL, stage=2, data=str(bad)))
    (bad / INDEX).write_text("{not json")
    with pytest.raises(InputError, match="index.json"):
        PreparedData(bad, TrainConfig(**SMALL, stage=2, data=str(bad)))


def test_wan_shifted_timesteps_follow_the_closed_form():
    from atlasvid_dist.train.train import sample_sigma, shift_sigma

    s = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(shift_sigma(s, 1.0), s)
    gen = torch.Generator().manual_seed(0)
    cfg = TrainConfig(timestep_shift=5.0)
    x = torch.cat([sample_sigma(cfg, gen) for _ in range(20000)])
    for q in (0.25, 0.5, 0.75):  # P(sigma <= q) = P(s <= q / (shift - (shift - 1) q)) for uniform s
        want = q / (5.0 - 4.0 * q)
        assert abs(float((x <= q).float().mean()) - want) < 0.015, q
    ln = torch.cat([sample_sigma(TrainConfig(timestep_sampling="logit_normal"), gen) for _ in range(20000)])
    assert abs(float(ln.median()) - 0.5) < 0.02 and float((ln < 0.1).float().mean()) < 0.02  # sigmoid(N(0, 1))
    with pytest.raises(ConfigError, match="timestep_sampling"):
        TrainConfig(timestep_sampling="beta")
    with pytest.raises(ConfigError, match="timestep_shift"):
        TrainConfig(timestep_shift=0.0)


def test_timesteps_come_from_diffusers_density_seeded_then_shifted():
    """sample_sigma draws s with diffusers' compute_density_for_timestep_sampling from the step's generator (same
    RNG state, same value), is reproducible from a seed (exact resume), and applies Wan's shift after."""
    from diffusers.training_utils import compute_density_for_timestep_sampling as density

    from atlasvid_dist.train.train import sample_sigma, shift_sigma

    def draws(cfg, seed, n=4000):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([sample_sigma(cfg, gen) for _ in range(n)])

    for scheme in ("uniform", "logit_normal"):
        for shift in (1.0, 3.0):
            cfg = TrainConfig(timestep_sampling=scheme, timestep_shift=shift)
            got = draws(cfg, 7)
            assert torch.equal(got, draws(cfg, 7)) and not torch.equal(got, draws(cfg, 8))
            ref = torch.Generator().manual_seed(7)
            want = torch.cat([density(scheme, 1, 0.0, 1.0, generator=ref) for _ in range(4000)])
            assert torch.equal(got, shift_sigma(want, shift).clamp(1e-3, 1 - 1e-3)), (scheme, shift)
    u, ln = draws(TrainConfig(), 0), draws(TrainConfig(timestep_sampling="logit_normal"), 0)
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.006  # uniform(0, 1)
    assert abs(float(ln.mean()) - 0.5) < 0.02 and abs(float(ln.var()) - 0.0433) < 0.006  # sigmoid(N(0, 1))
    shifted = draws(TrainConfig(timestep_shift=3.0), 0)
    assert abs(float(shifted.mean()) - 0.676) < 0.02  # E[3s / (1 + 2s)] = 3/2 (1 - ln(3) / 2) for uniform s


@pytest.mark.parametrize(
    "extra,match",
    [
        ([], "captions.jsonl"),
        (["--stage", "3"], "stage=3"),
        (["--shard-size", "0"], "shard_size=0"),
        (["--encode-batch", "0"], "encode_batch=0"),
    ],
)
def test_prepare_data_bad_inputs_exit_2(tmp_path, capsys, extra, match):
    (tmp_path / "empty").mkdir()
    code = cli("prepare-data", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "out"), *extra)
    assert code == 2 and match in capsys.readouterr().err
