"""The cost model against hand-computed figures, the geometry, the halo plan and a measured H100 run."""

import json
import math
from pathlib import Path

import pytest
import torch

from atlasvid_dist.config import AtlasConfig, VideoSpec, model_preset
from atlasvid_dist.config.parallel import ParallelPlan
from atlasvid_dist.cost import RunSettings, estimate
from atlasvid_dist.cost.model import linear_flops_per_layer
from atlasvid_dist.cost.ranks import group_share, owner_of_tokens
from atlasvid_dist.errors import ConfigError, PlanError
from atlasvid_dist.geometry import Grid, ProxyGeometry, WindowSpec, proxy_regions
from atlasvid_dist.parallel.halo import halo_plan
from atlasvid_dist.parallel.sharding import shard_windows

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
WAN13, WAN14 = model_preset("wan2.1-1.3b"), model_preset("wan2.1-14b")


def gpu_plan(workers=1, **kw):
    return ParallelPlan(workers=workers, device="cuda", gpus=max(workers, kw.pop("gpus", 1)), **kw)


def est(res, frames, model=WAN13, workers=1, run=None, profile="h100", plan=None, **method):
    method.setdefault("spatial_scale", 3)
    return estimate(
        VideoSpec.from_res(res, frames=frames),
        model,
        AtlasConfig(**method),
        plan or gpu_plan(workers),
        run or RunSettings(),
        profile,
    )


# -- tokens ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "res,frames,kw,tokens",
    [
        ("4k", 81, dict(spatial_scale=3), 680_400),  # 21 x 135 x 240
        ("2k", 321, dict(spatial_scale=2), 1_166_400),  # 81 x 90 x 160
        ("8k", 29, dict(spatial_scale=6, pad_windows=True), 1_036_800),  # 8 x 270 x 480
    ],
)
def test_detail_tokens_hand_computed(res, frames, kw, tokens):
    r = est(res, frames, **kw)
    assert r.detail_tokens == tokens == math.prod(r.detail_grid)


def test_proxy_and_window_counts_4k():
    r = est("4k", 81, workers=8)
    assert r.proxy_grid == (6, 45, 80) and r.proxy_tokens == 21_600  # 720P proxy at 4 fps
    assert (r.num_windows, r.window_tokens) == (7 * 9 * 15, 720)
    assert r.windows_per_rank == math.ceil(945 / 8) and r.tokens_per_rank == 119 * 720


# -- FLOPs ----------------------------------------------------------------------------------------------------
def test_full_attention_flops_formula_small_case():
    # tiny model (2 heads x 12) at 480p x 9 frames: grid 3 x 30 x 52 = 4,680 tokens; 4 * 4680^2 * 24
    r = est("480p", 9, model=model_preset("tiny"), mode="full", plan=ParallelPlan())
    assert r.detail_tokens == 4_680
    assert r.attention_flops_per_layer["full"] == 2_102_630_400


def test_linear_flops_per_layer_hand_computed():
    d, f, lt, n = 1536, 8960, 512, 1000
    lin = linear_flops_per_layer(WAN13, n)
    assert lin["qkvo"] == 2 * n * 4 * d * d
    assert lin["ffn"] == 2 * n * 2 * d * f
    assert lin["cross_attention"] == 2 * n * 2 * d * d + 2 * lt * 2 * d * d + 4 * n * lt * d


def test_atlas_ratio_4k_matches_window_plus_aligned_context():
    grid = Grid(21, 135, 240)
    proxy = ProxyGeometry(grid, 4, 3).grid
    base = WindowSpec(grid, (3, 15, 16))
    _, size = proxy_regions(base, proxy, (4.0, 3.0, 3.0), (1, 1, 1))
    ctx = math.prod(size)
    assert ctx == 4 * 8 * 9
    unshifted = est("4k", 81, shift=False)
    assert unshifted.attention_flops_ratio == pytest.approx(680_400 / (720 + ctx))  # ~675x
    # shifted layers (every other one) cut 8 x 10 x 16 windows at the grid's borders; one process runs each at its
    # real length: per axis t 2,3x6,1; h 8,15x8,7; w 8,16x14,8 tokens, and every real query reads ctx proxy keys
    shifted = est("4k", 81)
    t, h, w = [2] + [3] * 6 + [1], [8] + [15] * 8 + [7], [8] + [16] * 14 + [8]
    assert (sum(t), sum(h), sum(w)) == grid.dims and len(t) * len(h) * len(w) == 1280
    pairs = sum(a * a for a in t) * sum(a * a for a in h) * sum(a * a for a in w)  # sum of (window tokens)^2
    mean_keys = (945 * 720 * (720 + ctx) + pairs + 680_400 * ctx) / 2  # query-key pairs per layer, averaged
    assert shifted.attention_flops_ratio == pytest.approx(680_400**2 / mean_keys, rel=1e-9)
    assert 675 < shifted.attention_flops_ratio < 720  # the cut windows are smaller, not padded to full ones


def test_attention_free_limit_matches_design():
    # the physical limit (README, Measured): even free self-attention leaves ~49x per step on 1.3B shapes and ~24x on 14B at 4K x 81
    assert 48 < est("4k", 81, model=WAN13).attention_free_limit < 50.5
    assert 23 < est("4k", 81, model=WAN14).attention_free_limit < 25


def test_proxy_init_runs_fewer_detail_steps():
    noise = est("4k", 81, run=RunSettings(steps=30))
    proxy = est("4k", 81, run=RunSettings(steps=30, detail_init="proxy", init_strength=0.5))
    assert proxy.detail_steps == 15
    assert proxy.flops_per_video["detail_stage"] * 2 == noise.flops_per_video["detail_stage"]
    with pytest.raises(ConfigError, match="detail_init"):
        est("4k", 81, mode="full", run=RunSettings(detail_init="proxy"))


def test_guidance_doubles_step_flops():
    one = est("4k", 81, run=RunSettings(guidance=1.0))
    two = est("4k", 81, run=RunSettings(guidance=5.0))
    assert two.flops_per_step["detail"] == 2 * one.flops_per_step["detail"]


# -- memory ---------------------------------------------------------------------------------------------------
#: the calibration runs loaded the transformer alone: no text encoder or VAE on the GPU (as offload_encoders models)
TRANSFORMER_ONLY = RunSettings(guidance=1.0, dtype="bf16", offload_encoders=True)


def test_memory_matches_measured_h100_step():
    """benchmarks/results: 1.3B, 4K x 81 atlas (spatial scale 3), bf16, one forward, one H100."""
    measured = json.loads((RESULTS / "step-wan2.1-1.3b-cuda-bf16.json").read_text())["rows"]
    r = est("4k", 81, run=TRANSFORMER_ONLY)
    detail = r.memory["detail_stage"]
    assert detail["proxy_kv_cache"] == measured["4k_atlas_proxy_cache_bytes"]  # 30 x 2 x 21,600 x 1536 x 2 B
    assert detail["total"] == pytest.approx(measured["4k_atlas_peak_memory_bytes"], rel=0.1)


@pytest.mark.parametrize(
    "model,res,mode,scale,measured",
    [
        # measured on one H100, bf16, one forward, random weights: python -m atlasvid_dist.cost.calibrate
        (WAN13, "2k", "atlas", 2, 24_359_049_216),
        (WAN14, "720p", "full", 1, 38_043_741_184),
    ],
)
def test_memory_matches_calibration_points(model, res, mode, scale, measured):
    r = est(res, 81, model=model, mode=mode, spatial_scale=scale, run=TRANSFORMER_ONLY)
    assert r.memory["detail_stage"]["total"] == pytest.approx(measured, rel=0.1)


def test_proxy_cache_per_rank_holds_only_what_its_windows_read():
    full = est("4k", 81, workers=1).memory["detail_stage"]["proxy_kv_cache"]
    per_rank = est("4k", 81, workers=8).memory["detail_stage"]["proxy_kv_cache"]
    assert full / 8 < per_rank < full
    everything = est("4k", 81, workers=8, proxy_context="all").memory["detail_stage"]["proxy_kv_cache"]
    assert everything == full
    joint = est("4k", 81, workers=8, proxy_mode="joint").memory["detail_stage"]
    assert "proxy_kv_cache" not in joint
    # joint: every forward records, layer by layer, only its windows' rows (one guidance pass at a time)
    assert joint["proxy_kv_joint"] == per_rank // 2  # 4k default: guidance on, two passes


def test_more_ranks_less_memory_and_fp32_more():
    one, eight = est("4k", 81, workers=1), est("4k", 81, workers=8)
    assert eight.memory_per_rank_bytes < one.memory_per_rank_bytes
    fp32 = est("4k", 81, run=RunSettings(dtype="fp32"))
    assert fp32.memory["detail_stage"]["weights"] == 2 * one.memory["detail_stage"]["weights"]


def test_14b_8k_on_one_gpu_refused_with_reasons():
    r = est("8k", 29, model=WAN14, spatial_scale=6, pad_windows=True)
    assert not r.fits
    assert r.memory_per_rank_bytes > r.memory_usable_bytes
    assert any("detail_stage needs" in x and "GiB" in x for x in r.reasons)
    assert any("--gpus" in x for x in r.reasons)
    with pytest.raises(PlanError, match="does not fit"):
        r.raise_if_unfit()
    assert est("8k", 29, model=WAN14, workers=8, spatial_scale=6, pad_windows=True).fits


def test_cpu_host_memory_is_shared_by_workers():
    plan = ParallelPlan(workers=4, device="cpu")
    r = est("480p", 9, model=model_preset("tiny"), plan=plan, profile="cpu", spatial_scale=2, pad_windows=True)
    from atlasvid_dist.cost.profiles import device_profile, host_memory_bytes

    cpu = device_profile("cpu")
    assert cpu.memory_bytes == host_memory_bytes()  # this machine's memory, not an assumed 32 GiB
    assert r.fits and r.memory_usable_bytes == cpu.usable_bytes // 4
    assert r.inputs["dtype"] == "fp32"  # auto on CPU


# -- communication --------------------------------------------------------------------------------------------
def test_stage1_ulysses_bytes_hand_computed():
    plan = gpu_plan(4, proxy_parallel="ulysses", ulysses_degree=4)
    r = est("4k", 81, plan=plan, run=RunSettings(guidance=5.0))
    # 2 passes x 30 layers x 4 all-to-alls x (21,600 / 4 tokens x 1536 x 2 B) x 3/4
    assert r.comm_bytes_per_proxy_step_per_rank == 2 * 30 * 4 * (21_600 // 4) * 1536 * 2 * 3 // 4


def test_unshifted_windows_need_no_halo_and_shifted_ones_do():
    assert est("4k", 81, workers=8, shift=False).comm_bytes_per_step_per_rank["total"] == 0
    assert est("4k", 81, workers=8).comm_bytes_per_step_per_rank["halo"] > 0
    assert est("4k", 81, workers=1).comm_bytes_per_step_per_rank["total"] == 0


def test_group_share_agrees_with_halo_plan():
    grid = Grid(6, 30, 32)
    base, shifted = WindowSpec(grid, (3, 15, 16)), WindowSpec(grid, (3, 15, 16), (1, 7, 8))
    sharding = shard_windows(base, 3)
    share = group_share(owner_of_tokens(sharding), 3, shifted, None, (1.0, 1.0, 1.0), (0, 0, 0), aligned=False)
    plans = [halo_plan(sharding, shifted, r) for r in range(3)]
    assert share.halo_tokens == max(p.num_halo for p in plans) > 0
    assert share.touched_windows == max(int(p.windows.numel()) for p in plans)
    assert share.tokens == max(sharding.tokens_per_rank)
    assert torch.equal(owner_of_tokens(sharding), sharding.owner)


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_rank_attention_pairs_are_what_the_runtime_computes(ranks):
    """The cost model's query-key pairs of a rank equal those of the groups the sharded attention runs (every
    window at its real lengths); with one rank, the whole grid's real pairs."""
    from atlasvid_dist.models.attention.kernels import group_windows

    grid = Grid(5, 9, 11)  # the shifted grid's edge windows are cut in every axis
    base, shifted = WindowSpec(grid, (2, 4, 4), pad=True), WindowSpec(grid, (2, 4, 4), (1, 2, 2), pad=True)
    sharding = shard_windows(base, ranks)
    share = group_share(owner_of_tokens(sharding), ranks, shifted, None, (1.0, 1.0, 1.0), (0, 0, 0), aligned=False)
    pairs = []
    for r in range(ranks):
        p = halo_plan(sharding, shifted, r)
        groups = group_windows(p.query_index, p.query_valid, p.key_index, p.key_valid)
        pairs.append(sum(g.query.numel() * g.keys.shape[1] for g in groups))
    assert share.key_pairs == max(pairs)
    if ranks == 1:
        assert share.key_pairs == shifted.real_token_pairs() < grid.size * shifted.window_tokens


def test_moved_rows_agree_with_the_move_plans():
    """Shift exchange 'rows', counted vectorised by the cost model: the same assignment as the runtime's, no
    halo, and the rows each rank sends along a forward (base -> shifted -> base) equal its move plans'."""
    from atlasvid_dist.cost.ranks import assigned_owner, moved_rows
    from atlasvid_dist.parallel.migrate import move_plan
    from atlasvid_dist.parallel.sharding import assign_windows

    grid = Grid(6, 30, 32)
    base, shifted = WindowSpec(grid, (3, 15, 16)), WindowSpec(grid, (3, 15, 16), (1, 7, 8), pad=True)
    sharding = shard_windows(base, 3, "wht")
    held = assign_windows(sharding.owner, shifted, 3)
    owner = assigned_owner(owner_of_tokens(sharding), shifted, 3)
    assert torch.equal(owner, held.owner)
    share = group_share(owner, 3, shifted, None, (1.0, 1.0, 1.0), (0, 0, 0), aligned=False)
    assert share.halo_tokens == 0 and share.tokens == max(held.tokens_per_rank)
    moves = moved_rows([sharding.owner, owner, sharding.owner], 3)
    sent = [move_plan(sharding, held, r).num_sent + move_plan(held, sharding, r).num_sent for r in range(3)]
    assert moves.sent == max(sent) > 0


# -- the parallel plan ----------------------------------------------------------------------------------------
def test_parallel_plan_refusals_print_every_factor():
    with pytest.raises(ConfigError, match=r"workers = 9 > gpus = 8"):
        ParallelPlan(workers=9, device="cuda", gpus=8)
    with pytest.raises(ConfigError, match=r"ulysses_degree \(3\) x ring_degree \(1\) = 3 must divide workers = 8"):
        ParallelPlan(workers=8, device="cuda", gpus=8, proxy_parallel="ulysses", ulysses_degree=3)
    with pytest.raises(ConfigError, match="window_group"):
        ParallelPlan(workers=8, window_group=3)
    with pytest.raises(ConfigError, match="proxy_parallel"):
        ParallelPlan(workers=4, ulysses_degree=4)
    with pytest.raises(PlanError, match=r"ulysses_degree = 16 does not divide the model's heads = 40"):
        ParallelPlan(workers=16, device="cuda", gpus=16, proxy_parallel="ulysses", ulysses_degree=16).check_against(
            WAN14, 945
        )
    with pytest.raises(PlanError, match=r"8 window groups .* only 6 windows"):
        ParallelPlan(workers=8).check_against(WAN13, 6)
    ParallelPlan(workers=8, window_group=2).check_against(WAN13, 6)  # 4 groups of 2 ranks: fine


def test_full_attention_over_ranks_needs_dividing_heads_or_ring():
    with pytest.raises(PlanError, match="heads = 12"):
        est("4k", 81, mode="full", workers=8)
    ring = est("4k", 81, mode="full", plan=gpu_plan(8, window_parallel="ring"))
    assert ring.tokens_per_rank == 680_400 // 8
    # ring: keys and values of the 7 other shards pass through every rank, every layer, both passes
    assert ring.comm_bytes_per_step_per_rank["window_split"] == 2 * 30 * 2 * (680_400 // 8) * 1536 * 2 * 7


def test_estimate_checks_the_plan_before_costing():
    with pytest.raises(PlanError, match="window groups"):
        est("480p", 9, model=model_preset("tiny"), plan=ParallelPlan(workers=64), spatial_scale=2, pad_windows=True)


def test_decode_tile_caches_per_rank_hand_computed():
    """4K: 270 x 480 latent cells cut into tiles of 32 every 28 cells: rows 9 x 32 + 18 = 306, columns 17 x 32
    = 544 cells of tiles (overlaps counted in each), 166,464 in all; each cell of a tile holds 605,312 B of causal
    cache (the Wan2.1 VAE, fp32). One rank holds them all (~92 GiB: the decode must spread); on 8 ranks at most an
    eighth plus one tile."""
    together = RunSettings(decode_order="together")
    r1 = est("4k", 81, model=WAN14, workers=1, run=together)
    assert r1.memory["decode"]["tile_caches"] == 306 * 544 * 605_312
    assert not r1.fits and any(x.startswith("decode needs") for x in r1.reasons), r1.reasons
    r8 = est("4k", 81, model=WAN14, workers=8, run=together)
    assert r8.memory["decode"]["tile_caches"] == (306 * 544 // 8 + 32 * 32) * 605_312


def test_decode_tile_by_tile_holds_one_tile_and_auto_picks_it_when_short():
    """Sequential decode: a rank's causal caches are one tile's (32 x 32 cells), whatever the clip; 'auto' keeps
    tiles together where that fits and goes tile by tile where it does not (14B 4K on one H100: ~92 GiB)."""
    seq = est("4k", 81, model=WAN14, workers=1, run=RunSettings(decode_order="sequential"))
    assert seq.memory["decode"]["tile_caches"] == 32 * 32 * 605_312
    auto = est("4k", 81, model=WAN14, workers=1)
    assert auto.decode_order == "sequential" and auto.memory["decode"] == seq.memory["decode"]
    assert est("4k", 81, workers=8).decode_order == "together"


def test_text_encoder_and_vae_are_counted_resident_unless_offloaded():
    on = est("4k", 81, workers=8).memory
    off = est("4k", 81, workers=8, run=RunSettings(offload_encoders=True)).memory
    te, vae = WAN13.text_encoder_params * 2, WAN13.vae_params * 4
    for phase in ("proxy_stage", "proxy_cache", "detail_stage"):
        assert on[phase]["total"] - off[phase]["total"] == te + vae, phase
    assert off["decode"]["vae_weights"] == vae and "text_encoder_weights" not in off["decode"]
    assert off["text_encoder"]["text_encoder_weights"] == te and "vae_weights" not in off["text_encoder"]


def test_the_proxy_cache_phase_holds_the_kept_rows_and_one_proxy_forward():
    r = est("4k", 81, workers=8)  # stage 1 on one rank: the same proxy forward as the cache's
    m = r.memory["proxy_cache"]
    whole = WAN13.num_layers * 2 * 21_600 * WAN13.dim * 2 * 2  # layers x (k, v) x proxy tokens x d x bf16 x passes
    assert "whole_proxy_kv" not in m  # rows are kept as each layer is recorded
    assert m["kept_proxy_kv"] == r.memory["detail_stage"]["proxy_kv_cache"] < whole / 4
    assert m["activations"] == r.memory["proxy_stage"]["activations"] > 0


def test_ffn_chunking_lowers_activations_to_the_attention_phase():
    full = est("4k", 81, workers=8).memory["detail_stage"]["activations"]
    chunked = est("4k", 81, workers=8, run=RunSettings(ffn_chunk_tokens=16384)).memory["detail_stage"]["activations"]
    tokens = est("4k", 81, workers=8).tokens_per_rank
    assert chunked < full
    assert chunked >= tokens * 10 * WAN13.dim * 2  # never below the attention phase's ten d-wide tensors


def test_max_window_batch_bounds_the_sdpa_transient():
    run = RunSettings(ffn_chunk_tokens=1024)  # so that the attention phase is the block's peak
    small = est("4k", 81, workers=8, run=run, max_window_batch=4).memory["detail_stage"]["activations"]
    big = est("4k", 81, workers=8, run=run, max_window_batch=64).memory["detail_stage"]["activations"]
    wt, ctx = 720, est("4k", 81, workers=8).proxy_context_tokens
    assert big - small == 60 * (2 * (wt + ctx) + wt) * WAN13.dim * 2


@pytest.mark.parametrize("order", ["thw", "wht"])
def test_halo_bytes_equal_the_halo_plan_to_the_byte(order):
    """Every rank's halo from parallel/halo.py (the runtime's exchange plan), summed over the layers, times k and v,
    d and bf16 and the guidance passes, is the cost model's halo of the heaviest rank, exactly."""
    video = VideoSpec.from_res("480p", frames=21)
    cfg = AtlasConfig(spatial_scale=2, pad_windows=True)
    plan = gpu_plan(4, window_order=order, shift_exchange="kv")
    r = estimate(video, WAN13, cfg, plan, RunSettings(), "h100")
    grid = Grid(*r.detail_grid)
    base = WindowSpec(grid, cfg.window, (0, 0, 0), pad=True)
    sharding = shard_windows(base, 4, order)
    entries = cfg.layer_entries()
    per_rank = [0] * 4
    for layer in range(WAN13.num_layers):
        window, shift = entries[layer % len(entries)]
        spec = WindowSpec(grid, window, shift, pad=True)
        for rank in range(4):
            per_rank[rank] += halo_plan(sharding, spec, rank).num_halo
    assert r.comm_bytes_per_step_per_rank["halo"] == max(per_rank) * 2 * WAN13.dim * 2 * 2

    # exchange 'rows': the rows the runtime's move plans send along the forward (layer by layer, back at the end)
    from atlasvid_dist.parallel.migrate import move_plan
    from atlasvid_dist.parallel.window_attention import layer_holdings

    r = estimate(video, WAN13, cfg, gpu_plan(4, window_order=order, shift_exchange="rows"), RunSettings(), "h100")
    holdings = [sharding]
    for layer in range(WAN13.num_layers):
        window, shift = entries[layer % len(entries)]
        holdings.append(layer_holdings(sharding, WindowSpec(grid, window, shift, pad=True), "rows"))
    holdings.append(sharding)
    sent = [0] * 4
    for a, b in zip(holdings[:-1], holdings[1:]):
        if a is not b:
            for rank in range(4):
                sent[rank] += move_plan(a, b, rank).num_sent
    assert r.comm_bytes_per_step_per_rank["halo"] == max(sent) * WAN13.dim * 2 * 2 > 0
