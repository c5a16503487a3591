"""`atlasvid-dist plan`: tokens, FLOPs, memory per rank, traffic, seconds and a fit verdict, before any GPU is used.

Thin: options -> configs (cli/common.py) -> ``cost.estimate`` -> a table or one JSON object. A run that does not
fit is still printed in full, then refused (exit code 2) with the reasons.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import typer

from ..config.generate import decode_settings, resolve_device
from ..config.model import MODEL_PRESETS
from ..config.parallel import ParallelPlan
from ..cost.model import CostReport, RunSettings, choose_sharding, estimate
from ..cost.profiles import device_profile
from ..errors import AtlasError, PlanError
from ..pipeline.adapter_geometry import run_geometry, warn_adapter_geometry
from . import common as c
from .options import DISTRIBUTED, OUTPUT, option, with_default

#: Model presets plan prices from their shapes alone (generate runs 'tiny' or a folder).
SHAPE_PRESETS = tuple(name for name in MODEL_PRESETS if name != "tiny")


def plan(
    # video
    res: str = option("res", cli_default=True),
    frames: int = option("frames", cli_default=True),
    fps: int = option("fps", cli_default=True),
    # method
    attention: str = option("attention", cli_default=True),
    window: str = option("window", cli_default=True),
    shift: bool = option("shift", cli_default=True),
    shift_axes: str = option("shift_axes", cli_default=True),
    pad_windows: bool = option("pad_windows", cli_default=True),
    temporal_scale: int = option("temporal_scale", cli_default=True),
    spatial_scale: int = option("spatial_scale", cli_default=True),
    proxy_context: str = option("proxy_context", cli_default=True),
    proxy_mode: str = option("proxy_mode", cli_default=True),
    ultragen_pool: str = option("ultragen_pool", cli_default=True),
    ultragen_weight: float = option("ultragen_weight", cli_default=True),
    # model
    model: str = option("model", cli_default=True, note=f"plan also takes the shapes {'|'.join(SHAPE_PRESETS)}."),
    lora_stage1: Optional[str] = option("lora_stage1", cli_default=True, note="plan warns if trained otherwise."),
    lora_stage2: Optional[str] = option("lora_stage2", cli_default=True, note="plan warns if trained otherwise."),
    dtype: str = option("dtype", cli_default=True),
    # run
    steps: int = option("steps", cli_default=True),
    proxy_steps: int = option("proxy_steps", cli_default=True),
    guidance: float = option("guidance", cli_default=True),
    detail_init: str = option("detail_init", cli_default=True),
    init_strength: float = option("init_strength", cli_default=True),
    detail_cfg_until: float = option("detail_cfg_until", cli_default=True),
    detail_reuse: float = option("detail_reuse", cli_default=True),
    device: str = option("device", cli_default=True, note="With --gpus (and auto): cuda."),
    device_profile_name: str = option("device_profile", "--device-profile", cli_default=True),
    decode_order: str = option("decode_order", cli_default=True),
    decode_tile: int = option("decode_tile", cli_default=True),
    decode_overlap: int = option("decode_overlap", cli_default=True),
    decode_batch: int = option("decode_batch", cli_default=True),
    offload_encoders: bool = option("offload_encoders", cli_default=True),
    ffn_chunk: int = option("ffn_chunk", cli_default=True),
    # distributed
    gpus: Optional[int] = typer.Option(
        None,
        help=with_default("GPUs available (CUDA); workers default to this.", "1 on CUDA"),
        rich_help_panel=DISTRIBUTED,
        show_default=False,
    ),
    workers: Optional[int] = typer.Option(
        None,
        help=with_default("Detail ranks.", "--gpus on CUDA, 1 on CPU"),
        rich_help_panel=DISTRIBUTED,
        show_default=False,
    ),
    proxy_parallel: str = option("proxy_parallel", cli_default=True),
    proxy_degree: int = typer.Option(
        0,
        help=with_default("Ranks sharing the proxy sequence; 0 = all workers.", "0"),
        rich_help_panel=DISTRIBUTED,
        show_default=False,
    ),
    window_group: int = option("window_group", cli_default=True),
    window_parallel: str = option("window_parallel", cli_default=True),
    window_order: str = option("window_order", cli_default=True),
    shift_exchange: str = option("shift_exchange", cli_default=True),
    gpus_per_node: int = option("gpus_per_node", cli_default=True),
    # output
    json_out: bool = typer.Option(
        False,
        "--json",
        help=with_default("Print one JSON object instead of the table.", "off"),
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
    plot: Optional[str] = typer.Option(
        None,
        "--plot",
        help=with_default("Also draw the window-to-rank layout and the cost breakdown to FILE.png.", "none"),
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
) -> None:
    """Cost, memory and fit of a run (tokens, FLOPs, bytes, seconds) from the one cost model; nothing loads."""
    if plot:
        from .plot import check_plot_path

        check_plot_path(plot)  # before minutes of cost model: a bad destination is refused first
    if device == "auto":
        device = "cuda" if gpus is not None else resolve_device(device)  # --gpus N plans N GPUs, here or not
    gpus = 1 if gpus is None else gpus
    video = c.build_video(res, frames, fps)
    spec = c.resolve_model(model)
    method = c.build_method(
        c.detail_grid(video, spec),
        base=c.model_defaults(model).base,
        attention=attention,
        window=window,
        shift=shift,
        shift_axes=shift_axes,
        pad_windows=pad_windows,
        temporal_scale=temporal_scale,
        spatial_scale=spatial_scale,
        proxy_context=proxy_context,
        proxy_mode=proxy_mode,
        ultragen_pool=ultragen_pool,
        ultragen_weight=ultragen_weight,
    )
    warn_adapter_geometry(
        {1: lora_stage1, 2: lora_stage2}, run_geometry(method, video.width, video.height, video.frames)
    )  # stderr; exit 2 if unreadable
    par = c.build_parallel(
        device=device,
        gpus=gpus,
        workers=workers,
        proxy_parallel=proxy_parallel,
        proxy_degree=proxy_degree,
        window_group=window_group,
        window_parallel=window_parallel,
        window_order=window_order,
        shift_exchange=shift_exchange,
    )
    par = dataclasses.replace(par, gpus_per_node=gpus_per_node)
    tile, overlap, batch = decode_settings(decode_tile, decode_overlap, decode_batch, par.device)
    run = RunSettings(
        dtype=dtype,
        steps=steps,
        proxy_steps=proxy_steps,
        guidance=guidance,
        detail_init=detail_init,
        init_strength=init_strength if detail_init == "proxy" else RunSettings.init_strength,
        detail_cfg_until=detail_cfg_until,
        detail_reuse=detail_reuse,
        decode_order=decode_order,
        offload_encoders=offload_encoders,
        ffn_chunk_tokens=ffn_chunk,
        decode_tile=tile,
        decode_overlap=overlap,
        decode_batch=batch,
    )
    auto_profile = device_profile_name in (None, "auto")
    profile = device_profile(("h100" if device == "cuda" else "cpu") if auto_profile else device_profile_name)
    auto = "auto" in (par.window_order, par.shift_exchange)
    if auto:  # resolved once here so every figure below prices the same sharding
        par = choose_sharding(video, spec, method, par, profile)
    report = estimate(video, spec, method, par, run, profile)
    options = stage1_options(video, spec, method, par, run, profile)
    spatial = spatial_shift_halo(video, spec, method, par, run, profile)
    orders = ownership_options(video, spec, method, par, run, profile)
    where = fit_by_gpus(video, spec, method, par, run, profile)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    **report.to_dict(),
                    "stage1_seconds_by_proxy_parallel": options,
                    "halo_bytes_per_step_per_rank_spatial_shift": spatial,
                    "by_sharding": orders,
                    "fit_by_gpus": where,
                },
                indent=2,
            )
        )
    else:
        extra = ""
        if spatial is not None:
            extra = (
                f"\nwithout shifts in time      --shift-axes {method.shift_axes.replace('t', '')}: halo "
                f"{_bytes(spatial)} / step / rank (now {_bytes(report.comm_bytes_per_step_per_rank['halo'])}); "
                f"changes the method: windows never cross time blocks"
            )
        typer.echo(
            format_report(report)
            + _format_options(options)
            + extra
            + _format_orders(orders, (par.window_order, par.shift_exchange), auto)
            + _format_fit(where)
        )
    if plot:
        from ..cost.attention import layer_spec
        from .plot import save_plan_plot

        spec = layer_spec(method, c.detail_grid(video, spec), 0) if method.mode != "full" else None
        save_plan_plot(plot, report, spec, max(1, par.num_window_groups), par.window_order)
    if not report.fits:
        raise PlanError("plan does not fit: " + "; ".join(report.reasons))


def stage1_options(video, spec, method, par, run, profile) -> dict:
    """Stage-1 seconds (cost model) with the proxy on one rank and over all workers with Ulysses or ring; None
    where the cost model or the runtime refuses that plan (e.g. heads or proxy tokens not divisible by the workers),
    so the fastest named is one the runtime runs. Empty when there is no proxy stage or one worker."""
    if par.workers == 1 or method.mode != "atlas":
        return {}
    out = {}
    for mode in ("none", "ulysses", "ring"):
        degree = 1 if mode == "none" else par.workers
        try:
            alt = dataclasses.replace(
                par,
                proxy_parallel=mode,
                ulysses_degree=degree if mode == "ulysses" else 1,
                ring_degree=degree if mode == "ring" else 1,
            )
            report = estimate(video, spec, method, alt, run, profile, suggest=False)
            alt.check_proxy_split(report.proxy_tokens, spec.num_heads)
            out[mode] = report.seconds.get("proxy_stage")
        except AtlasError:
            out[mode] = None
    return out


def spatial_shift_halo(video, spec, method, par, run, profile) -> int | None:
    """Halo bytes per step per rank if the shifted grid did not move in time (None when it does not already, or
    nothing is exchanged)."""
    if (
        par.workers == 1
        or not method.uses_windows
        or not method.shift
        or "t" not in method.shift_axes
        or method.schedule is not None
        or len(method.shift_axes) == 1
    ):
        return None
    alt = dataclasses.replace(method, shift_axes=method.shift_axes.replace("t", ""))
    return estimate(video, spec, alt, par, run, profile, suggest=False).comm_bytes_per_step_per_rank["halo"]


def ownership_options(video, spec, method, par, run, profile) -> dict:
    """ "ORDER/EXCHANGE" ('thw' and 'wht' with 'kv' and 'rows', and the run's) -> {halo bytes / step / rank (rows
    moved, with 'rows'), detail-stage bytes / rank} (cost model); {} without windows or with one window group."""
    if not method.uses_windows or par.num_window_groups == 1:
        return {}
    exchanges = ("kv",) if par.window_group > 1 else ("kv", "rows")
    pairs = [(o, e) for o in ("thw", "wht") for e in exchanges] + [(par.window_order, par.shift_exchange)]
    out = {}
    for order, exchange in dict.fromkeys(pairs):  # the run's own sharding too
        alt = dataclasses.replace(par, window_order=order, shift_exchange=exchange)
        r = estimate(video, spec, method, alt, run, profile, suggest=False)
        out[f"{order}/{exchange}"] = {
            "halo": r.comm_bytes_per_step_per_rank["halo"],
            "across_nodes": r.comm_bytes_per_step_per_rank["across_nodes"],
            "detail_stage": r.memory["detail_stage"]["total"],
            "memory_per_rank": r.memory_per_rank_bytes,
        }
    return out


def fit_by_gpus(video, spec, method, par, run, profile, counts=(4, 8, 16, 32)) -> dict:
    """GPU count -> {memory per rank, fits} of the requested run (CUDA only; None where the plan is refused)."""
    if par.device != "cuda":
        return {}
    out = {}
    for n in sorted({*counts, par.workers}):
        try:
            alt = dataclasses.replace(par, workers=n, gpus=max(n, par.gpus))
            r = estimate(video, spec, method, alt, run, profile, suggest=False)
            out[n] = {"memory_per_rank": r.memory_per_rank_bytes, "fits": r.fits}
        except AtlasError:
            out[n] = None
    return out


def _format_orders(orders: dict, chosen: tuple[str, str], auto: bool) -> str:
    """One line per ownership order and shift exchange; the run's own is marked (``auto``: picked by the cost
    model)."""
    mark = "  <- this run (auto: least traffic)" if auto else "  <- this run"
    lines = []
    for k, v in orders.items():
        order, exchange = k.split("/")
        lines.append(
            f"\nsharding --window-order {order} --shift-exchange {exchange:<4}  halo {_bytes(v['halo'])} / step / "
            f"rank ({_bytes(v['across_nodes'])} across nodes), detail stage {_bytes(v['detail_stage'])}, peak "
            f"{_bytes(v['memory_per_rank'])} / rank" + (mark if (order, exchange) == chosen else "")
        )
    return "".join(lines)


def _format_fit(where: dict) -> str:
    cells = [
        f"{n}: " + ("refused" if v is None else f"{_bytes(v['memory_per_rank'])} {'fits' if v['fits'] else 'NO'}")
        for n, v in where.items()
    ]
    return ("\nfit by --gpus              " + "  |  ".join(cells)) if cells else ""


def _format_options(options: dict) -> str:
    valid = {k: v for k, v in options.items() if v is not None}
    if not valid:
        return ""
    best = min(valid, key=valid.get)
    shown = "  ".join(f"{k} {_secs(v) if v is not None else 'n/a'}" for k, v in options.items())
    return f"\nstage 1 by --proxy-parallel  {shown}  -> fastest: {best}"


# -- the table ------------------------------------------------------------------------------------------------
def _n(x) -> str:
    return f"{x:,}"


def _flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def _bytes(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB" if x >= 2**30 else f"{x / 2**20:,.1f} MiB"


def _secs(x: float) -> str:
    return f"{x:,.1f} s" if x < 120 else f"{x / 60:,.1f} min"


def format_report(r: CostReport) -> str:
    """Human-readable table of a CostReport."""
    i = r.inputs
    v, m, p = i["video"], i["method"], i["parallel"]
    rows = [
        ("video", f"{v['width']}x{v['height']} x {v['frames']} frames @ {v['fps']} fps"),
        ("model / dtype / device", f"{i['model']} / {i['dtype']} / {i['device_profile']['name']}"),
        (
            "method",
            f"{m['mode']}, window {tuple(m['window'])}, proxy scale {m['spatial_scale']} (space) x "
            f"{m['temporal_scale']} (time), context {m['proxy_context']}",
        ),
        ("ranks", ParallelPlan(**p).describe()),
        ("detail tokens", f"{_n(r.detail_tokens)}  grid {r.detail_grid}"),
        ("proxy tokens", f"{_n(r.proxy_tokens)}  grid {r.proxy_grid}" if r.proxy_grid else "none"),
    ]
    if r.num_windows:
        rows += [
            (
                "windows",
                f"{_n(r.num_windows)} x {_n(r.window_tokens)} tokens, + {_n(r.proxy_context_tokens)} proxy keys each",
            ),
            ("per rank", f"{_n(r.windows_per_rank)} windows, {_n(r.tokens_per_rank)} tokens"),
        ]
    else:
        rows.append(("per rank", f"{_n(r.tokens_per_rank)} tokens"))
    att = r.attention_flops_per_layer
    rows.append(("attention / layer", "  ".join(f"{k} {_flops(x)}" for k, x in att.items() if x is not None)))
    rows.append(
        (
            "full / this mode",
            f"{r.attention_flops_ratio:,.1f}x fewer attention FLOPs per layer; "
            f"{r.step_flops_ratio_vs_full:,.1f}x per step "
            f"(limit {r.attention_free_limit:,.1f}x)",
        )
    )
    rows.append(("linear / layer", "  ".join(f"{k} {_flops(x)}" for k, x in r.linear_flops_per_layer.items())))
    rows.append(("FLOPs / video", "  ".join(f"{k} {_flops(x)}" for k, x in r.flops_per_video.items())))
    rows.append(("detail stage", f"{r.detail_steps} steps, {r.detail_forwards} forwards"))
    for phase, parts in r.memory.items():
        detail = ", ".join(f"{k} {_bytes(x)}" for k, x in parts.items() if k != "total")
        rows.append((f"memory: {phase}", f"{_bytes(parts['total'])}  ({detail})"))
    rows.append(("memory / rank", f"{_bytes(r.memory_per_rank_bytes)} of {_bytes(r.memory_usable_bytes)} usable"))
    rows.append(
        (
            "traffic / step / rank",
            ", ".join(f"{k} {_bytes(x)}" for k, x in r.comm_bytes_per_step_per_rank.items() if x) or "none",
        )
    )
    rows.append(("seconds (lower bound)", "  ".join(f"{k} {_secs(x)}" for k, x in r.seconds.items())))
    rows.append(("fits", "yes" if r.fits else "NO"))
    rows += [("reason", x) for x in r.reasons] + [("note", x) for x in r.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)
