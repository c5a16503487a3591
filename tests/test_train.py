"""LoRA training under DeepSpeed ZeRO on 2 gloo processes: loss falls (both stages), resume is exact, the exported
adapter loads and changes generation, and bad inputs give typed errors naming the file or field."""

import json
import os

import pytest
import torch

from atlasvid_dist.errors import ConfigError
from atlasvid_dist.pipeline.checkpoint import StepCheckpointer
from atlasvid_dist.train.config import TrainConfig
from atlasvid_dist.train.synthetic import write_synthetic_dataset
from tests._dist import run_ranks

SMALL = dict(
    width=64,
    height=64,
    frames=9,
    fps=16.0,
    temporal_scale=2,
    spatial_scale=2,
    window=(3, 2, 2),
    text_len=16,
    lora_rank=4,
    lora_alpha=4.0,
    lr=3e-3,
    seed=0,
)
ZERO2 = "zero2"  # packaged DeepSpeed configs (atlasvid_dist/configs/ds_NAME.json)
ZERO3 = "zero3"


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
    return before, after, str(path) if path else None, frozen_unchanged(trainer, cfg_kw.get("lora_stage1"))


def frozen_unchanged(trainer, stage1_file) -> bool | None:
    """Stage 2: the frozen stage-1 adapter's weights in the trained model still equal its file (None in stage 1)."""
    if not stage1_file or stage1_file == "none":  # stage 1, or stage 2 trained without a stage-1 adapter
        return None
    import deepspeed
    from safetensors.torch import load_file

    params = dict(trainer.transformer.named_parameters())
    saved = load_file(stage1_file)
    names = {k: k.removeprefix("transformer.").replace(".weight", ".stage1.weight") for k in saved}
    with deepspeed.zero.GatheredParameters([params[n] for n in names.values()]):  # ZeRO-3 shards them; else no-op
        return len(saved) > 0 and all(torch.equal(params[names[k]].detach().cpu(), v) for k, v in saved.items())


@pytest.mark.slow  # every case starts two DeepSpeed ranks and trains 30 steps
@pytest.mark.parametrize("stage,ds", [(1, ZERO2), (2, ZERO2), (1, ZERO3), (2, ZERO3)])
def test_loss_falls(stage, ds, data_dir, tmp_path):
    from atlasvid_dist.pipeline.adapter_geometry import read_geometry, training_geometry

    cfg = dict(SMALL, stage=stage, data=data_dir, output=str(tmp_path / "out"), max_steps=30)
    if stage == 2:  # a non-trivial stage-1 adapter: the proxy keys/values come from it, frozen
        cfg["lora_stage1"] = stage1_adapter(tmp_path)
    (before, after, adapter, frozen_ok), _ = run_ranks(_fit, 2, cfg, ds, 30, timeout=240)
    assert after < 0.9 * before, (before, after)
    assert adapter == str(tmp_path / "out" / "adapter.safetensors")
    assert frozen_ok is (True if stage == 2 else None)
    assert read_geometry(adapter) == training_geometry(TrainConfig(**cfg))
    check_adapter(adapter, tmp_path, f"lora_stage{stage}")


def stage1_adapter(tmp_path) -> str:
    """A stage-1 adapter file with non-zero lora_B (a fresh one would leave the base model unchanged)."""
    from atlasvid_dist.models import lora
    from atlasvid_dist.models.tiny import build_tiny_transformer
    from atlasvid_dist.train.train import add_lora

    tr = build_tiny_transformer()
    add_lora(tr, TrainConfig(**SMALL), "stage1")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if ".lora_B.stage1." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return str(lora.save_lora(tr, "stage1", tmp_path / "stage1.safetensors"))


def check_adapter(adapter, tmp_path, option):
    """The exported file loads with models.lora (same tensors) and changes what generate makes."""
    from safetensors.torch import load_file

    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.models import lora
    from atlasvid_dist.models.loading import load_components
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    saved = load_file(adapter)
    assert saved and any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    tr = load_components("tiny").transformer
    lora.load_lora(tr, adapter, "trained")
    loaded = {n: p for n, p in tr.named_parameters() if ".lora_" in n}
    for key, value in saved.items():
        name = key.removeprefix("transformer.").replace(".weight", ".trained.weight")
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    # diffusers' own reader (WanPipeline.lora_state_dict + load_lora_adapter) into a plain Wan transformer
    from diffusers import WanPipeline

    from atlasvid_dist.models.tiny import build_tiny_transformer

    state = WanPipeline.lora_state_dict(adapter)
    plain = build_tiny_transformer()
    plain.load_lora_adapter(
        state[0] if isinstance(state, tuple) else state, prefix="transformer", adapter_name="trained"
    )
    plain_params = dict(plain.named_parameters())
    for name, value in loaded.items():
        torch.testing.assert_close(plain_params[name], value, rtol=0, atol=0)
    small = dict(
        res="128x128",
        frames=9,
        steps=2,
        proxy_steps=2,
        window="3,4,4",
        guidance=1.0,
        spatial_scale=2,
        prompt="a red disc moving right",
    )
    out = []
    for name, extra in (("base", {}), ("tuned", {option: adapter})):
        cfg = build_config(
            {
                **DEFAULTS,
                **small,
                "out": str(tmp_path / f"{name}.mp4"),
                "save_latents": str(tmp_path / f"{name}.safetensors"),
                **extra,
            }
        )
        TwoStageGenerator(cfg, progress=False).run()
        out.append(load_file(cfg.save_latents)["latents"])
    assert not torch.equal(out[0], out[1])


def _zero3_matches_zero2(rank, world, cfg_kw):
    os.environ["LOCAL_RANK"] = str(rank)
    from safetensors.torch import load_file

    from atlasvid_dist.train.train import Trainer

    out = {}
    for name in ("ds_zero2", "ds_zero3", "ds_zero3_offload"):
        trainer = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + f"/../{name}"), name, log=lambda *_: None)
        losses = trainer.run(4)
        path = trainer.export()
        out[name] = (losses, {k: v.tolist() for k, v in load_file(path).items()} if path else None)
    return out  # plain lists: tensors do not survive the trip back from a finished process


@pytest.mark.slow
def test_zero3_and_offload_train_as_zero2(tmp_path):
    data = str(write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13))
    out, _ = run_ranks(
        _zero3_matches_zero2, 2, dict(SMALL, stage=2, data=data, max_steps=4, lora_stage1="none"), timeout=240
    )
    ref_losses, ref_adapter = out["ds_zero2"]
    assert len(set(ref_losses)) > 1
    for name in ("ds_zero3", "ds_zero3_offload"):
        losses, adapter = out[name]
        assert losses == pytest.approx(ref_losses, rel=1e-4), name
        assert adapter.keys() == ref_adapter.keys()
        for key in adapter:
            torch.testing.assert_close(torch.tensor(adapter[key]), torch.tensor(ref_adapter[key]), rtol=1e-3, atol=1e-5)


class _Planted:
    """Unpickling this creates the file ``path`` (what a crafted checkpoint could do with os.system)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


DEEPSPEED_NAMES = (
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
)


def plant_pickles(checkpoints, step: int, marker) -> None:
    """Crafted pickles under every name DeepSpeed reads, in a DeepSpeed-style step folder named by ``latest``
    and in every committed step folder."""
    from pathlib import Path

    checkpoints = Path(checkpoints)
    tag = f"step_{step:08d}"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "latest").write_text(tag)
    for folder in [checkpoints / tag, *checkpoints.glob("step-*")]:
        folder.mkdir(parents=True, exist_ok=True)
        for name in DEEPSPEED_NAMES:
            torch.save(_Planted(str(marker)), folder / name)


def _resume(rank, world, cfg_kw, ds_config, marker):
    os.environ["LOCAL_RANK"] = str(rank)
    from atlasvid_dist.train.train import Trainer

    quiet = dict(log=lambda *_: None)
    full = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../full"), ds_config, **quiet)
    straight = full.run(6)
    first = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../stopped"), ds_config, **quiet)
    first.run(3)  # saves a checkpoint at step 3 and "stops"
    if rank == 0:  # before the next engine starts (its initialisation synchronises the ranks)
        plant_pickles(cfg_kw["data"] + "/../stopped/checkpoints", 3, marker)
    second = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../stopped"), ds_config, **quiet)
    assert second.resume() and second.step == 3
    resumed = second.run(6)
    return straight, resumed


@pytest.mark.slow  # two DeepSpeed ranks, three engines each
@pytest.mark.parametrize("ds", [ZERO2, ZERO3])
def test_resume_gives_the_same_next_losses(ds, tmp_path):
    """Exact resume from the safetensors state; DeepSpeed .pt pickles planted in the checkpoints never load."""
    data = str(write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13))
    cfg = dict(SMALL, stage=2, data=data, max_steps=6, lora_stage1="none")
    marker = tmp_path / "planted-code-ran"
    (straight, resumed), _ = run_ranks(_resume, 2, cfg, ds, str(marker), timeout=240)
    assert len(straight) == 6 and len(resumed) == 3
    assert straight[3:] == resumed, (straight, resumed)
    assert len(set(straight)) > 1  # the losses do change step to step
    assert not marker.exists()
    torch.load(tmp_path / "stopped" / "checkpoints" / "step_00000003" / DEEPSPEED_NAMES[0], weights_only=False)
    assert marker.exists()  # the planted file does run code when unpickled


def test_resume_refuses_a_folder_of_deepspeed_pickles(data_dir, tmp_path, monkeypatch, capsys):
    """An output folder with only DeepSpeed .pt checkpoints: exit 2 naming it, before launching; nothing loaded."""
    from atlasvid_dist.cli.main import main
    from atlasvid_dist.train import launch

    monkeypatch.setattr(launch, "run_launcher", _no_launch)
    out, marker = tmp_path / "o", tmp_path / "planted-code-ran"
    plant_pickles(out / "checkpoints", 2, marker)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                "--stage",
                "1",
                "--data",
                data_dir,
                "--output",
                str(out),
                "--config",
                _cli_yaml(tmp_path),
                "--deepspeed-config",
                ZERO2,
                "--resume",
            ]
        )
    assert e.value.code == 2
    assert str(out / "checkpoints") in capsys.readouterr().err and not marker.exists()


def _no_launch(*_args, **_kw):
    raise AssertionError("launched although the inputs are bad")


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


def _cli_yaml(tmp_path):
    import yaml

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}))
    return str(path)


@pytest.mark.slow
def test_cli_trains_with_two_processes_and_resumes(data_dir, tmp_path):
    from atlasvid_dist.cli.main import main

    out = tmp_path / "run"
    args = [
        "train",
        "--stage",
        "2",
        "--data",
        data_dir,
        "--output",
        str(out),
        "--num-processes",
        "2",
        "--config",
        _cli_yaml(tmp_path),
        "--deepspeed-config",
        ZERO2,
        "--no-stage1-adapter",
    ]
    with pytest.raises(SystemExit) as e:
        main(args + ["--max-steps", "2"])
    assert e.value.code in (0, None)
    checkpoints = StepCheckpointer(out / "checkpoints")
    assert (out / "adapter.safetensors").is_file() and checkpoints.latest() == 2
    with pytest.raises(SystemExit) as e:
        main(args + ["--max-steps", "3", "--resume"])
    assert e.value.code in (0, None)
    assert checkpoints.latest() == 3
    steps = [line for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(steps) == 3  # steps 1, 2, then 3 after the resume
    records = [json.loads(line) for line in steps]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and r["lr"] == SMALL["lr"] for r in records)


@pytest.mark.parametrize(
    "problem, match",
    [
        ("empty", "captions.jsonl"),
        ("key", "learning_rate"),
        ("type", "lora_rank"),
        ("corrupt", "video_000.mp4: unreadable"),
    ],
)
def test_cli_bad_inputs_exit_2_naming_the_problem(problem, match, data_dir, tmp_path, capsys):
    import shutil

    from atlasvid_dist.cli.main import main

    data, config = data_dir, _cli_yaml(tmp_path)
    if problem == "empty":
        data = str(tmp_path / "empty")
        os.mkdir(data)
    elif problem in ("key", "type"):
        extra = "learning_rate: 0.1\n" if problem == "key" else "lora_rank: four\n"
        with open(config, "a") as f:
            f.write(extra)
    else:
        data = str(shutil.copytree(data_dir, tmp_path / "d"))
        (tmp_path / "d" / "video_000.mp4").write_bytes(b"\x00" * 100)
        with open(config, "a") as f:
            f.write("bad_data: stop\n")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                "--stage",
                "1",
                "--data",
                data,
                "--output",
                str(tmp_path / "o"),
                "--config",
                config,
                "--deepspeed-config",
                ZERO2,
            ]
        )
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_tensorboard_is_optional(tmp_path):
    """tensorboard: true writes event files when the package is there, and is refused up front when it is not."""
    from atlasvid_dist.train.train import tensorboard_writer

    cfg = TrainConfig(**SMALL, tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorboard"):
            tensorboard_writer(cfg, tmp_path)
        return
    w = tensorboard_writer(cfg, tmp_path)
    w.add_scalar("train/loss", 1.0, 1)
    w.close()
    assert any((tmp_path / "tensorboard").iterdir())
    assert tensorboard_writer(TrainConfig(**SMALL), tmp_path) is None


USER_DS = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 3}},
}


def _user_json(tmp_path, **changes) -> str:
    path = tmp_path / "user_ds.json"
    path.write_text(json.dumps({**USER_DS, **changes}))
    return str(path)


def test_deepspeed_json_keys_win_over_defaults(tmp_path):
    """The user's batch, accumulation, optimizer and scheduler are used; the config follows them."""
    from atlasvid_dist.train.train import deepspeed_config

    ds, cfg = deepspeed_config(_user_json(tmp_path), TrainConfig(), world=2, device=torch.device("cpu"), explicit=set())
    assert (cfg.batch, cfg.grad_accum, cfg.lr) == (2, 2, 3e-3)
    assert ds["train_batch_size"] == 8 and ds["optimizer"]["params"]["lr"] == 3e-3
    assert ds["scheduler"] == USER_DS["scheduler"] and ds["optimizer"]["params"]["torch_adam"] is True
    plain, cfg = deepspeed_config("zero2", TrainConfig(lr=5e-4, batch=3), world=1, device=torch.device("cpu"))
    assert "optimizer" not in plain and plain["train_micro_batch_size_per_gpu"] == 3 and cfg.lr == 5e-4


@pytest.mark.parametrize(
    "flags, key, field",
    [
        (["--lr", "1e-4"], "optimizer.params.lr", "lr=0.0001"),
        (["--batch", "1"], "train_micro_batch_size_per_gpu", "batch=1"),
        (["--warmup-steps", "5"], "scheduler", "warmup_steps=5"),
    ],
)
def test_deepspeed_json_conflicting_with_the_config_exits_2(flags, key, field, data_dir, tmp_path, monkeypatch, capsys):
    """A JSON key set differently on the command line: refused before launching, naming the key and the field."""
    from atlasvid_dist.cli.main import main
    from atlasvid_dist.train import launch

    monkeypatch.setattr(launch, "run_launcher", _no_launch)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train",
                "--stage",
                "1",
                "--data",
                data_dir,
                "--output",
                str(tmp_path / "o"),
                "--deepspeed-config",
                _user_json(tmp_path),
                *flags,
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert key in err and field in err, err


def test_command_line_sets_training_fields_and_tiny_has_small_defaults(tmp_path):
    from atlasvid_dist.train.train import load_train_config, parse_args

    tiny = load_train_config(parse_args(["--deepspeed", "--stage", "1"]))
    assert (tiny.width, tiny.height, tiny.frames) == (128, 128, 9)
    args = parse_args(
        [
            "--res",
            "64x96",
            "--frames",
            "5",
            "--lr",
            "0.01",
            "--batch",
            "2",
            "--grad-accum",
            "3",
            "--steps",
            "7",
            "--seed",
            "3",
            "--fps",
            "8",
            "--warmup-steps",
            "2",
            "--save-every",
            "4",
        ]
    )
    cfg = load_train_config(args)
    assert args.deepspeed_config == "zero2"
    assert (
        cfg.width,
        cfg.height,
        cfg.frames,
        cfg.lr,
        cfg.batch,
        cfg.grad_accum,
        cfg.max_steps,
        cfg.seed,
        cfg.fps,
        cfg.warmup_steps,
        cfg.save_every,
    ) == (64, 96, 5, 0.01, 2, 3, 7, 3, 8.0, 2, 4)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: some/folder\n")
    wan = load_train_config(parse_args(["--config", str(yaml_file)]))
    assert (wan.width, wan.height, wan.frames) == (1280, 704, 81)
    with pytest.raises(ConfigError, match="res"):
        load_train_config(parse_args(["--res", "64by64"]))


def _user_deepspeed_resume(rank, world, cfg_kw, ds_path):
    os.environ["LOCAL_RANK"] = str(rank)
    from atlasvid_dist.train.train import Trainer

    quiet = dict(log=lambda *_: None, explicit=set())
    full = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../full"), ds_path, **quiet)
    seen = (
        full.engine.train_micro_batch_size_per_gpu(),
        full.engine.gradient_accumulation_steps(),
        type(full.optimizer).__name__,
        type(full.scheduler).__name__,
    )
    straight = full.run(4)
    lrs = [json.loads(line)["lr"] for line in open(cfg_kw["data"] + "/../full/log.jsonl")] if rank == 0 else []
    first = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../stopped"), ds_path, **quiet)
    first.run(2)
    second = Trainer(TrainConfig(**cfg_kw, output=cfg_kw["data"] + "/../stopped"), ds_path, **quiet)
    assert second.resume() and second.step == 2
    return seen, straight, second.run(4), lrs


@pytest.mark.slow
def test_user_deepspeed_json_trains_with_its_optimizer_and_scheduler_and_resumes(tmp_path):
    """Micro batch 2 x accumulation 2, DeepSpeed's own AdamW and WarmupLR: used as given, and exact resume."""
    data = str(write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13))
    cfg = {k: v for k, v in SMALL.items() if k != "lr"}
    (seen, straight, resumed, lrs), _ = run_ranks(
        _user_deepspeed_resume, 2, dict(cfg, stage=1, data=data), _user_json(tmp_path), timeout=400
    )
    assert seen == (2, 2, "AdamW", "WarmupLR")
    assert straight[2:] == resumed and len(set(straight)) > 1, (straight, resumed)
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(3e-3)  # WarmupLR's log warm-up over 3 steps
