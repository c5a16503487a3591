"""`atlasvid-dist plan`: JSON and table output, refusal of a run that does not fit, exit code 2 for bad input."""

import json

import pytest
from typer.testing import CliRunner

from atlasvid_dist.cli.main import app

runner = CliRunner()
KEYS = ("detail_tokens", "proxy_tokens", "attention_flops_ratio", "memory_per_rank_bytes", "fits", "reasons")


def plan(*args):
    """plan on the 1.3B shapes (these tests' figures; plan's own default is generate's, the tiny model); a
    --model in ``args`` comes later and wins."""
    return runner.invoke(app, ["plan", "--model", "wan2.1-1.3b", *args])


def test_json_has_the_keys_and_hand_computed_tokens():
    r = plan("--res", "4k", "--frames", "81", "--gpus", "8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert all(k in d for k in KEYS)
    assert d["detail_tokens"] == 680_400 and d["proxy_tokens"] == 21_600  # auto proxy scale 3: a 720P proxy
    assert d["fits"] is True and d["reasons"] == []
    assert 675 < d["attention_flops_ratio"] < 720  # shifted layers: cut windows at their real length
    assert d["inputs"]["parallel"]["workers"] == 8


def test_table_output():
    r = plan("--res", "2k", "--frames", "81", "--model", "wan2.1-1.3b", "--gpus", "4")
    assert r.exit_code == 0, r.output
    assert "302,400" in r.stdout and "memory / rank" in r.stdout and "fits" in r.stdout


def test_14b_8k_on_one_gpu_is_refused_with_reasons():
    r = plan("--res", "8k", "--frames", "29", "--model", "wan2.1-14b", "--gpus", "1", "--pad-windows", "--json")
    assert r.exit_code == 2
    d = json.loads(r.stdout)
    assert d["fits"] is False and d["detail_tokens"] == 1_036_800
    assert d["memory_per_rank_bytes"] > 80 * 2**30 and any("--gpus" in x for x in d["reasons"])
    assert r.stderr.startswith("error: plan does not fit") and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,field",
    [
        (["--frames", "80"], "frames"),
        (["--res", "9k"], "res"),
        (["--res", "1000x720"], "width"),
        (["--window", "3,15"], "window"),
        (["--attention", "sparse"], "attention"),
        (["--dtype", "fp8"], "dtype"),
        (["--gpus", "2", "--workers", "4"], "workers"),
        (["--spatial-scale", "7"], "spatial_scale"),
        (["--device-profile", "a100"], "device_profile"),
        (["--model", "/nonexistent/wan"], "model"),
        (["--res", "8k", "--frames", "29", "--window", "3,15,16"], "window.t"),  # 8 latent frames: 3 does not tile them
        (["--gpus", "16", "--model", "wan2.1-14b", "--proxy-parallel", "ulysses"], "ulysses_degree"),
    ],
)
def test_bad_input_exits_2_naming_the_field(args, field):
    r = plan(*args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and field in r.stderr and "Traceback" not in r.stderr


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_model_folder_shapes_are_read(tmp_path):
    """--model DIR reads transformer/config.json (no weights); here a 14B-shaped folder of configs."""
    root = tmp_path / "wan"
    _write_json(
        root / "model_index.json",
        {k: ["diffusers", "X"] for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")},
    )
    _write_json(
        root / "transformer" / "config.json",
        {
            "_class_name": "WanTransformer3DModel",
            "num_layers": 40,
            "num_attention_heads": 40,
            "attention_head_dim": 128,
            "ffn_dim": 13824,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 4096,
            "freq_dim": 256,
            "patch_size": [1, 2, 2],
        },
    )
    _write_json(root / "vae" / "config.json", {"_class_name": "AutoencoderKLWan", "z_dim": 16})
    _write_json(root / "text_encoder" / "config.json", {"d_model": 4096})
    _write_json(root / "tokenizer" / "tokenizer_config.json", {})
    _write_json(root / "scheduler" / "scheduler_config.json", {})
    from_dir = json.loads(plan("--model", str(root), "--gpus", "8", "--json").stdout)
    preset = json.loads(plan("--model", "wan2.1-14b", "--gpus", "8", "--json").stdout)
    assert from_dir["attention_flops_per_layer"] == preset["attention_flops_per_layer"]
    assert from_dir["memory"]["detail_stage"]["weights"] == preset["memory"]["detail_stage"]["weights"]
    (root / "transformer" / "config.json").unlink()
    r = plan("--model", str(root))
    assert r.exit_code == 2 and "config.json" in r.stderr


def test_plan_says_which_stage1_parallelism_is_faster():
    """1.3B has 12 heads: Ulysses over 8 ranks is refused (None), ring beats one rank. 14B (40 heads) over 8: all
    three are possible and the table names the fastest."""
    d = json.loads(plan("--res", "4k", "--gpus", "8", "--json").stdout)["stage1_seconds_by_proxy_parallel"]
    assert d["ulysses"] is None and 0 < d["ring"] < d["none"]
    r = plan("--res", "4k", "--gpus", "8", "--model", "wan2.1-14b")  # printed in full even where it does not fit
    assert "stage 1 by --proxy-parallel" in r.stdout and "fastest: ulysses" in r.stdout, r.output
    single = json.loads(plan("--res", "720p", "--gpus", "1", "--json").stdout)
    assert single["stage1_seconds_by_proxy_parallel"] == {}


def test_plan_shows_the_halo_without_shifts_in_time():
    d = json.loads(plan("--res", "4k", "--gpus", "8", "--window-order", "thw", "--json").stdout)
    spatial = d["halo_bytes_per_step_per_rank_spatial_shift"]
    assert 0 < spatial < d["comm_bytes_per_step_per_rank"]["halo"] / 5  # time slabs: time shifts dominate
    hw = json.loads(plan("--res", "4k", "--gpus", "8", "--shift-axes", "hw", "--window-order", "thw", "--json").stdout)
    assert hw["comm_bytes_per_step_per_rank"]["halo"] == spatial
    assert hw["halo_bytes_per_step_per_rank_spatial_shift"] is None
    assert plan("--res", "4k", "--shift-axes", "x").exit_code == 2


def test_auto_sharding_takes_the_ownership_and_exchange_with_the_least_traffic():
    """The defaults (--window-order auto, --shift-exchange auto) at 4K x 81 on 8 ranks: column slabs (a shift in
    time stays on the rank) whose shifted layers move rows: at most 4 GiB per step per rank (the issue's target),
    less than half the halo of column slabs with keys/values, and a fifth of time slabs'; every figure of the
    report prices that sharding."""
    d = json.loads(plan("--res", "4k", "--gpus", "8", "--json").stdout)
    by = d["by_sharding"]
    assert (d["inputs"]["parallel"]["window_order"], d["inputs"]["parallel"]["shift_exchange"]) == ("wht", "rows")
    halo = d["comm_bytes_per_step_per_rank"]["halo"]
    assert halo == by["wht/rows"]["halo"] <= 4 * 2**30
    assert halo < by["wht/kv"]["halo"] / 2 and halo < by["thw/kv"]["halo"] / 4
    marked = [line for line in plan("--res", "4k", "--gpus", "8").stdout.splitlines() if "<- this run" in line]
    assert len(marked) == 1 and "--window-order wht --shift-exchange rows" in marked[0] and "auto" in marked[0]
    kv = json.loads(plan("--res", "4k", "--gpus", "8", "--shift-exchange", "kv", "--json").stdout)
    assert kv["inputs"]["parallel"]["window_order"] == "wht"  # the least halo of keys/values
    one = json.loads(plan("--res", "720p", "--gpus", "1", "--json").stdout)  # nothing to choose: one window group
    assert one["inputs"]["parallel"]["window_order"] == "thw"
    assert plan("--res", "4k", "--gpus", "8", "--window-order", "xyz").exit_code == 2


def test_plan_counts_ultragen_compressed_global_branch():
    """--attention ultragen: the global branch is dense attention among the N' pooled tokens, 4 N'^2 heads head_dim
    (1.3B: 12 x 128) per layer; --ultragen-pool changes N', the branch's memory is shown, bad values exit 2."""

    def run(*extra):
        r = plan("--res", "4k", "--gpus", "1", "--device-profile", "h200", "--attention", "ultragen", "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    coarse, fine = run("--ultragen-pool", "1,8,8"), run()  # default 1,4,4; grid (21, 135, 240), ceil per axis
    n4, n8 = 21 * 34 * 60, 21 * 17 * 30
    diff = fine["attention_flops_per_layer"]["ultragen"] - coarse["attention_flops_per_layer"]["ultragen"]
    assert diff == 4 * 12 * 128 * (n4**2 - n8**2)
    assert fine["attention_flops_ratios"]["ultragen"] > 150  # was ~15 when every full-size query read N' keys
    assert fine["memory"]["detail_stage"]["ultragen_global"] == (4 * n4 + 2 * 680_400) * 1536 * 2
    assert fine["inputs"]["method"]["ultragen_weight"] == 0.5
    assert run("--ultragen-weight", "0.25")["inputs"]["method"]["ultragen_weight"] == 0.25
    for flag, value in (("--ultragen-weight", "1.5"), ("--ultragen-pool", "1,0,4"), ("--ultragen-pool", "4,4")):
        r = plan("--attention", "ultragen", flag, value)
        assert r.exit_code == 2 and "ultragen_" in r.output, r.output
