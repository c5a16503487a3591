"""Every plan that `atlasvid-dist plan` suggests is one the distributed runtime accepts: the suggestion is built
as a ParallelPlan and put through the runtime's own checks (ParallelPlan.check_runnable, which the driver's
pre-flight calls, and DistributedGenerator.preflight), without Ray."""

import json
import re

import pytest
from typer.testing import CliRunner

from atlasvid_dist.cli.common import build_parallel, resolve_model
from atlasvid_dist.cli.main import app
from atlasvid_dist.config.parallel import ParallelPlan
from atlasvid_dist.errors import ConfigError

runner = CliRunner()

SCENARIOS = [("wan2.1-1.3b", "4k", 8), ("wan2.1-14b", "4k", 8), ("wan2.1-1.3b", "4k", 6), ("wan2.1-14b", "720p", 3)]


def plan(*args):
    """plan on the 1.3B shapes (these tests' figures; plan's own default is generate's, the tiny model); a
    --model in ``args`` comes later and wins."""
    return runner.invoke(app, ["plan", "--model", "wan2.1-1.3b", *args])


def suggested(text: str, gpus: int) -> list[dict]:
    """The build_parallel options of every plan the text proposes."""
    out = []
    for modes in re.findall(r"--proxy-parallel ((?:\w+)(?: or \w+)*) spreads it", text):
        out += [dict(workers=gpus, proxy_parallel=m) for m in modes.split(" or ")]
    out += [dict(workers=gpus, proxy_parallel=m) for m in re.findall(r"fastest: (\w+)", text)]
    out += [dict(workers=int(n)) for n in re.findall(r"--gpus (\d+) fits", text)]
    if "or --proxy-parallel ring" in text or "use --proxy-parallel ring" in text:
        out.append(dict(workers=gpus, proxy_parallel="ring"))
    return out


def runtime_accepts(model: str, res: str, options: dict) -> None:
    """The runtime's pre-flight of this plan (PlanError / ConfigError when it would refuse it)."""
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.runtime.driver import DistributedGenerator

    par = build_parallel(device="cuda", gpus=options["workers"], **options)
    d = json.loads(
        plan(
            "--model", model, "--res", res, "--gpus", str(par.workers), "--proxy-parallel", par.proxy_parallel, "--json"
        ).stdout
    )
    par.check_runnable(resolve_model(model), d["num_windows"] or None, d["proxy_tokens"] or None)
    cfg = build_config({**DEFAULTS, "prompt": "x", "res": res, "device": "cuda", "out": "/tmp/never.mp4"})
    DistributedGenerator(cfg, par.workers, ray_address="auto", plan=par).preflight()  # a cluster: no local GPUs


@pytest.mark.parametrize("model,res,gpus", SCENARIOS)
def test_every_suggested_plan_is_accepted_by_the_runtime(model, res, gpus):
    r = plan("--model", model, "--res", res, "--gpus", str(gpus))
    assert r.exit_code in (0, 2) and "Traceback" not in r.output, r.output  # a plan that does not fit still suggests
    found = suggested(r.stdout, gpus)
    assert found, r.stdout
    for options in found:
        runtime_accepts(model, res, options)


def test_refusals_suggest_only_runnable_plans():
    """A refused plan's message names alternatives the runtime runs, never `--window-parallel ring`."""
    cases = [
        ("--gpus", "8", "--proxy-parallel", "ulysses"),
        ("--gpus", "8", "--window-group", "8"),
        ("--gpus", "8", "--attention", "full", "--res", "720p"),
        ("--gpus", "1", "--model", "wan2.1-14b", "--dtype", "fp32"),
    ]
    for args in cases:
        r = plan("--res", "4k", *args) if "--res" not in args else plan(*args)
        assert r.exit_code == 2, r.output
        assert "--window-parallel ring" not in r.output and "window_parallel 'ring'" not in r.output, r.output
        model = args[args.index("--model") + 1] if "--model" in args else "wan2.1-1.3b"
        res = args[args.index("--res") + 1] if "--res" in args else "4k"
        for options in suggested(r.output, int(args[1])):
            runtime_accepts(model, res, options)


def test_ring_inside_a_window_is_costed_but_not_runnable():
    """The cost model estimates window_parallel 'ring'; the runtime's check refuses it, naming the option."""
    par = ParallelPlan(workers=8, device="cuda", gpus=8, window_group=2, window_parallel="ring")
    with pytest.raises(ConfigError, match="window_parallel"):
        par.check_window_split()
    ParallelPlan(workers=8, device="cuda", gpus=8, window_group=2).check_window_split()


def test_a_memory_lever_plan_suggests_makes_the_run_fit():
    """14B at 8K x 161 frames on 16 H100s does not fit as it is; plan names the generate flags that make it fit
    on the same GPUs, and with those flags the plan fits at the figure it quoted."""
    base = ["--model", "wan2.1-14b", "--res", "8k", "--frames", "161", "--gpus", "16"]
    r = plan(*base)
    assert r.exit_code == 2
    m = re.search(r"((?:--offload-encoders ?)?(?:--ffn-chunk \d+)?) fits on these ranks \(([\d.]+) GiB", r.output)
    assert m, r.output
    again = plan(*base, *m.group(1).split(), "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["fits"] and f"{report['memory_per_rank_bytes'] / 2**30:.1f}" == m.group(2)


@pytest.mark.parametrize("extra", [[], ["--decode-tile", "16", "--decode-batch", "2"]])
def test_plan_prices_the_decode_generate_runs(extra):
    """`plan` resolves the decode's tile, overlap and tiles per call by generate's rule (8 tiles a call on CPU by
    default), so its decode phase is the pre-flight's to the byte; it priced one tile a call before."""
    from atlasvid_dist.cli.generate import build_config
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    args = ["--model", "tiny", "--res", "512x512", "--frames", "33", "--window", "3,4,4", "--device", "cpu"]
    r = runner.invoke(app, ["plan", *args, "--workers", "2", "--json", *extra])
    assert r.exit_code == 0, r.output
    options = dict(zip([a[2:].replace("-", "_") for a in (args + extra)[::2]], (args + extra)[1::2]))
    options = {k: int(v) if v.isdigit() else v for k, v in options.items()}
    gen = TwoStageGenerator(build_config({**options, "prompt": "a test"}), progress=False)
    assert json.loads(r.output)["memory"]["decode"] == gen.preflight(workers=2).memory["decode"]
