"""Method fidelity (issue 10): each test pins one behaviour of the method against an independent definition, so a
one-line fault in that behaviour fails it (every test was checked by planting such a fault; see the commit log).

Independent references used here: diffusers' own Wan forward and rotary tables, RoPE written out below from its
definition, dense masked attention, torch's interpolate, and the flow line x_s = (1 - s) x0 + s eps.
"""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from atlasvid_dist import AtlasConfig, AtlasTransformer
from atlasvid_dist.geometry.grid import Grid, ProxyAnchor, upsample_proxy
from atlasvid_dist.geometry.windows import WindowSpec, proxy_regions
from atlasvid_dist.models.attention.detail import DetailAttention

from .conftest import make_tiny_wan

THETA = 10000.0


# ---------------------------------------------------------------------------------------------- references
def ref_angles(pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(N, 3) positions -> (N, head_dim/2) RoPE angles, from Wan's definition (t/h/w channel split)."""
    hw = 2 * (head_dim // 6)
    out = []
    for ax, dim in enumerate((head_dim - 2 * hw, hw, hw)):
        inv = torch.tensor([THETA ** (-(2.0 * i) / dim) for i in range(dim // 2)], dtype=torch.float64)
        out.append(pos[:, ax : ax + 1].double() * inv[None, :])
    return torch.cat(out, dim=1)


def ref_rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, N, H, D) by the angles of pos (N, 3), in float64."""
    a = ref_angles(pos, x.shape[-1])[None, :, None, :]
    x = x.double()
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * a.cos() - x[..., 1::2] * a.sin()
    out[..., 1::2] = x[..., 0::2] * a.sin() + x[..., 1::2] * a.cos()
    return out


def ref_positions(dims, scale=(1, 1, 1), offset=(0.0, 0.0, 0.0)) -> torch.Tensor:
    t, h, w = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64) * s + o for n, s, o in zip(dims, scale, offset)], indexing="ij"
    )
    return torch.stack([t, h, w], -1).reshape(-1, 3)


def dense_attention(q, k, v, mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def layer0_keys(tr, latents, timestep, text):
    """Un-rotated self-attention keys of block 0, written out from the diffusers modules (B, N, H, D)."""
    x = tr.patch_embedding(latents).flatten(2).transpose(1, 2)
    _, tproj, text_e, _ = tr.condition_embedder(timestep, text, None)
    block = tr.blocks[0]
    shift, scale, *_ = (block.scale_shift_table + tproj.unflatten(1, (6, -1)).float()).chunk(6, dim=1)
    h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    return block.attn1.norm_k(block.attn1.to_k(h)).unflatten(2, (block.attn1.heads, -1))


# ---------------------------------------------------------------------------------------------- 1. stage-1 RoPE
class _EveryNthFrameRope(torch.nn.Module):
    """diffusers' WanRotaryPosEmbed asked for r (f - 1) + 1 frames, keeping every r-th: positions j * r."""

    def __init__(self, rope, r):
        super().__init__()
        self.rope, self.r = rope, r

    def forward(self, hidden_states):
        b, c, f, h, w = hidden_states.shape
        cos, sin = self.rope(hidden_states.new_zeros(b, c, (f - 1) * self.r + 1, h, w))
        pick = lambda x: x.reshape((f - 1) * self.r + 1, -1, x.shape[-1])[:: self.r].reshape(1, -1, 1, x.shape[-1])  # noqa: E731
        return pick(cos), pick(sin)


@torch.no_grad()
def test_proxy_forward_equals_diffusers_with_time_positions_j_times_rt():
    r_t = 4
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    tr = make_tiny_wan()
    out = AtlasTransformer(tr, AtlasConfig(mode="full", temporal_scale=r_t)).proxy_forward(x, t, enc)
    tr.rope = _EveryNthFrameRope(tr.rope, r_t)
    ref = tr(x, t, enc).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    tr.rope = _EveryNthFrameRope(tr.rope.rope, r_t + 1)  # the comparison can tell r_t from r_t + 1
    assert (tr(x, t, enc).sample - out).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- 2. proxy keys
@torch.no_grad()
def test_proxy_keys_rotated_at_detail_positions_of_the_centre_anchor():
    r_t, s = 4, 2
    tr = make_tiny_wan()
    model = AtlasTransformer(tr, AtlasConfig(mode="atlas", window=(3, 4, 4), temporal_scale=r_t, spatial_scale=s))
    proxy = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    enc = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    cache = model.build_proxy_cache(proxy, enc)
    k = layer0_keys(tr, proxy, torch.zeros(1), enc)
    # proxy token (j, i, k) at (j * r_t, i * s + (s - 1) / 2, k * s + (s - 1) / 2)
    want = ref_rotate(k, ref_positions((3, 4, 4), (r_t, s, s), (0.0, (s - 1) / 2, (s - 1) / 2)))
    torch.testing.assert_close(cache.kv.keys[0].double(), want, atol=1e-5, rtol=0)


def test_moving_detail_and_proxy_by_one_proxy_frame_keeps_the_logits():
    r_t, s, head_dim = 4, 2, 12
    rotary_model = AtlasTransformer(
        make_tiny_wan(num_layers=1), AtlasConfig(mode="atlas", window=(3, 4, 4), temporal_scale=r_t, spatial_scale=s)
    )
    detail, proxy = Grid(2 * r_t + 1, 4, 4), Grid(3, 2, 2)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, Grid(r_t + 1, 4, 4).size, 2, head_dim, generator=g)
    k = torch.randn(1, Grid(2, 2, 2).size, 2, head_dim, generator=g)
    from atlasvid_dist.models.rope import apply_rotary

    dt = DetailAttention(rotary_model.atlas_config, detail, rotary_model.rotary, torch.device("cpu")).tables
    pt = rotary_model.proxy_detail_rotary(proxy)
    n_q, n_k = q.shape[1], k.shape[1]
    dq, pk = detail.h * detail.w, proxy.h * proxy.w  # tokens per frame

    def logits(q_frame0, k_frame0):
        qt = dt.index(torch.arange(n_q) + q_frame0 * dq)
        kt = pt.index(torch.arange(n_k) + k_frame0 * pk)
        return torch.einsum("bqhd,bkhd->bhqk", apply_rotary(q.double(), qt), apply_rotary(k.double(), kt))

    torch.testing.assert_close(logits(r_t, 1), logits(0, 0), atol=1e-5, rtol=0)  # float32 tables


# ---------------------------------------------------------------------------------------------- 3. one anchor
def test_one_anchor_for_rope_regions_and_upsampling():
    a = ProxyAnchor(4, 2)
    assert [a.detail_position(i, 1) for i in range(3)] == [0.5, 2.5, 4.5]
    assert [a.detail_position(j, 0) for j in range(3)] == [0, 4, 8]
    # the covered block of proxy cell i is [i * s, (i + 1) * s): unchanged by the centre anchor
    assert [a.covering(x, 1) for x in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [a.covering(x, 0) for x in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    a3 = ProxyAnchor(1, 3)
    assert [a3.detail_position(i, 2) for i in range(2)] == [1.0, 4.0]


# ---------------------------------------------------------------------------------------------- 4. aligned region
def _needed(spec, proxy, r_t, s, margin):
    """Proxy tokens a window must read, from the definition: per axis the proxy cells whose covered block
    [i r, i r + r) meets the window's real tokens [lo, hi), plus ``margin`` cells on each side."""
    out = []
    for start in spec.starts().tolist():
        ranges = []
        for ax in range(3):
            n, w, m, n_p = spec.grid.dims[ax], spec.window[ax], margin[ax], proxy.dims[ax]
            lo, hi = max(start[ax], 0), min(start[ax] + w, n)  # real tokens [lo, hi)
            r = r_t if ax == 0 else s
            first, last = lo // r, (hi - 1) // r
            ranges.append(range(max(0, first - m), min(n_p - 1, last + m) + 1))
        out.append({(t * proxy.h + h) * proxy.w + w for t in ranges[0] for h in ranges[1] for w in ranges[2]})
    return out


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 2, 2)])
@pytest.mark.parametrize("margin", [(0, 0, 0), (1, 1, 1), (0, 2, 1)])
def test_aligned_region_with_margin_contains_the_covered_tokens(shift, margin):
    r_t, s = 4, 2
    grid = Grid(9, 12, 12)
    proxy = Grid(3, 6, 6)
    spec = WindowSpec(grid, (3, 4, 4), shift, pad=True)
    index, size = proxy_regions(spec, proxy, (float(r_t), float(s), float(s)), margin)
    for w, need in enumerate(_needed(spec, proxy, r_t, s, margin)):
        got = set(index[w].tolist())
        assert need <= got, f"window {w} start {spec.starts()[w].tolist()}: missing {sorted(need - got)}"
    want = tuple(
        min(n_p, math.ceil(w / r) + 1 + 2 * m) for n_p, w, r, m in zip(proxy.dims, spec.window, (r_t, s, s), margin)
    )
    assert size == want  # no larger than the region above the window plus the margin


# ---------------------------------------------------------------------------------------------- 5. alternation
def test_layers_alternate_unshifted_and_shifted_grids():
    grid = Grid(9, 8, 8)
    cfg = AtlasConfig(mode="atlas", window=(3, 4, 4), shift=True)
    att = DetailAttention(cfg, grid, AtlasTransformer(make_tiny_wan(1), cfg).rotary, torch.device("cpu"))
    shifts = [att.layer_spec(i).shift for i in range(6)]
    assert shifts == [(0, 0, 0), (1, 2, 2)] * 3
    sched = (((3, 4, 4), (0, 0, 0)), ((3, 4, 4), (1, 0, 0)), ((3, 4, 4), (0, 2, 2)))
    att = DetailAttention(AtlasConfig(mode="atlas", schedule=sched), grid, att.rotary, torch.device("cpu"))
    assert [att.layer_spec(i).shift for i in range(7)] == [e[1] for e in sched] * 2 + [sched[0][1]]


# ---------------------------------------------------------------------------------------------- 6. ultragen
@pytest.mark.parametrize(
    "grid,pool", [(Grid(2, 4, 6), (1, 2, 3)), (Grid(3, 5, 7), (2, 2, 3))], ids=["divisible", "ceil-and-crop"]
)
def test_ultragen_equals_dense_definition(grid, pool):
    """UltraGen: (1 - w) * windows + w * compressed global. Compressed global, from its definition: q, k and v
    averaged over each pooling cell (a cell cut by the grid's end averages its real tokens), rotated at the cell's
    centre; dense attention among the cells; every token takes its own cell's output."""
    window, wgt, heads, d = (1, 2, 3) if grid.h % 2 == 0 else (1, 5, 7), 0.3, 2, 12
    cfg = AtlasConfig(mode="ultragen", window=window, shift=False, ultragen_pool=pool, ultragen_weight=wgt)
    model = AtlasTransformer(make_tiny_wan(1), cfg)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, grid.size, heads, d, generator=g, dtype=torch.float64) for _ in range(3))
    out = DetailAttention(cfg, grid, model.rotary, torch.device("cpu"))(0, q, k, v)

    pos = ref_positions(grid.dims)
    qr, kr = ref_rotate(q, pos), ref_rotate(k, pos)
    win = torch.stack([pos[:, a] // window[a] for a in range(3)], -1)
    local = dense_attention(qr, kr, v, (win[:, None] == win[None, :]).all(-1))
    cell = torch.stack([pos[:, a] // pool[a] for a in range(3)], -1)
    cells = torch.unique(cell, dim=0)  # sorted raster order of cells
    member = (cell[None, :, :] == cells[:, None, :]).all(-1).double()  # (cells, N)
    mean = member / member.sum(1, keepdim=True)
    qp, kp, vp = (torch.einsum("cn,bnhd->bchd", mean, x) for x in (q, k, v))  # cell averages, un-rotated
    centre = mean @ pos
    glob = dense_attention(ref_rotate(qp, centre), ref_rotate(kp, centre), vp)  # (1, cells, H, D)
    glob_up = torch.einsum("cn,bchd->bnhd", member, glob)  # each token: its cell's output
    torch.testing.assert_close(out.double(), (1 - wgt) * local + wgt * glob_up, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- 7. flow matching
def _scheduler(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from atlasvid_dist.models.tiny import TINY_SCHEDULER_CONFIG

    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG)


@pytest.mark.parametrize("kind", ["euler", "unipc"])
def test_one_step_with_the_training_target_lands_on_the_flow_line(kind):
    from atlasvid_dist.pipeline import sampling
    from atlasvid_dist.train.train import FlowMatchingLoss

    g = torch.Generator().manual_seed(6)
    x0, eps = (
        torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64),
    )
    # training: the loss is zero exactly for a model predicting the target the pipeline's sampler expects
    seen = {}

    class Oracle(torch.nn.Module):
        def proxy_forward(self, xt, t, text):
            seen.update(xt=xt, t=t)
            return eps - x0

    sigma = torch.tensor([0.3], dtype=torch.float64)
    oracle = Oracle()
    loss = FlowMatchingLoss(oracle, stage=1, adapter="stage1", atlases={1: oracle})(x0, eps, sigma, None)
    assert loss.item() == 0.0
    torch.testing.assert_close(seen["xt"], 0.7 * x0 + 0.3 * eps)
    torch.testing.assert_close(seen["t"], sigma * 1000)

    def velocity(x, t):  # the training target at (x, t): x must be on the line at sigma = t / 1000
        s = float(t[0]) / 1000.0  # UniPC rounds timesteps to integers: t / 1000 is sigma to ~1e-3
        torch.testing.assert_close(x, (1 - s) * x0 + s * eps, atol=1e-4 if kind == "euler" else 2e-2, rtol=0)
        return eps - x0

    sched = sampling.start_scheduler(_scheduler(kind), sampling.SamplerConfig(steps=5, flow_shift=3.0), "cpu")
    s0, s1 = float(sched.sigmas[0]), float(sched.sigmas[1])
    x = sampling.denoise(velocity, (1 - s0) * x0 + s0 * eps, sched, 5, stop_after=1)
    torch.testing.assert_close(x, (1 - s1) * x0 + s1 * eps, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- 8-11. pipeline
def _generator(tmp_path, **kw):
    from atlasvid_dist.config.generate import GenerateConfig
    from atlasvid_dist.config.video import VideoSpec
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    method = dict(mode="atlas", window=(5, 4, 4), temporal_scale=4, spatial_scale=2)
    method.update(kw.pop("method", {}))
    run = dict(
        prompt="p",
        video=VideoSpec.from_res("128x128", frames=17),
        method=AtlasConfig(**method),
        steps=2,
        proxy_steps=1,
        guidance=3.0,
        out=str(tmp_path / "o.mp4"),
    )
    run.update(kw)
    cfg = GenerateConfig(**run)
    comp = types.SimpleNamespace(transformer=make_tiny_wan(), scheduler=_scheduler("unipc"))
    gen = TwoStageGenerator(cfg, components=comp, progress=False)
    return gen, comp


def _texts(cfg=True):
    from atlasvid_dist.pipeline.text import TextEmbeddings

    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    return TextEmbeddings(cond, uncond if cfg else None)


def _spy(monkeypatch):
    calls = []
    forward = AtlasTransformer.forward

    def spy(self, latents, timestep, text, proxy=None, **kw):
        calls.append(dict(latents=latents.clone(), t=timestep.clone(), text=text, proxy=proxy, **kw))
        return forward(self, latents, timestep, text, proxy, **kw)

    monkeypatch.setattr(AtlasTransformer, "forward", spy)
    return calls


def _proxy(cfg):
    g = cfg.proxy.grid
    return torch.randn(1, 16, g.t, g.h * 2, g.w * 2, generator=torch.Generator().manual_seed(8))


def test_stage2_cfg_unconditional_pass_reads_the_unconditional_proxy_cache(tmp_path, monkeypatch):
    gen, comp = _generator(tmp_path, steps=1)
    text = _texts()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        gen.stage2(comp, text, _proxy(gen.cfg), None, None)
    assert len(calls) == 2
    kinds = set()
    for c in calls:
        assert c["proxy_cache"] is not None and torch.equal(c["proxy_cache"].text, c["text"])
        kinds.add("cond" if torch.equal(c["text"], text.cond) else "uncond")
    assert kinds == {"cond", "uncond"}


def test_detail_init_proxy_steps_sigma_and_frame_placement(tmp_path, monkeypatch):
    from atlasvid_dist.pipeline import sampling

    gen, comp = _generator(tmp_path, steps=4, detail_init="proxy", init_strength=0.5, guidance=1.0)
    cfg = gen.cfg
    proxy = _proxy(cfg)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        gen.stage2(comp, _texts(cfg=False), proxy, None, None)
    assert len(calls) == 2  # round(4 * 0.5) steps, no CFG
    sched = sampling.start_scheduler(comp.scheduler, sampling.SamplerConfig(4, 1.0, cfg.flow_shift), "cpu")
    torch.testing.assert_close(calls[0]["t"], sched.timesteps[2:3])  # starts at step 2 of 4
    sigma = float(sched.sigmas[2])
    assert abs(float(calls[0]["t"][0]) / 1000.0 - sigma) < 1e-3
    # upsampled proxy, reference: time linear with frame j on detail frame j * r_t, space bilinear (centre anchor)
    lat, r = cfg.latent, cfg.method.temporal_scale
    up_t = F.interpolate(
        proxy, size=((proxy.shape[2] - 1) * r + 1, proxy.shape[3], proxy.shape[4]), mode="trilinear", align_corners=True
    )[:, :, : lat.t]
    up = F.interpolate(up_t.flatten(1, 2), size=(lat.h, lat.w), mode="bilinear", align_corners=False).unflatten(
        1, up_t.shape[1:3]
    )
    noise = torch.randn(1, 16, *lat.dims, generator=torch.Generator().manual_seed(cfg.seed + 1))
    torch.testing.assert_close(calls[0]["latents"], (1 - sigma) * up + sigma * noise, atol=1e-5, rtol=0)
    # frame j of the proxy lands on detail frame j * r_t (bilinear in space); frames in between are linear in time
    flat = torch.randn(1, 1, 2, 3, 3, generator=torch.Generator().manual_seed(9))
    got = upsample_proxy(flat, ProxyAnchor(r, 2), (r + 1, 6, 6))
    space = F.interpolate(flat[:, :, 0:2].flatten(1, 2), size=(6, 6), mode="bilinear", align_corners=False)[0]
    for j in range(2):
        torch.testing.assert_close(got[0, 0, j * r], space[j], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0, 0, 1], 0.75 * space[0] + 0.25 * space[1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- 10. cache key
def _detail_inputs():
    g = torch.Generator().manual_seed(10)
    return (
        torch.randn(1, 16, 9, 16, 16, generator=g),
        torch.tensor([700.0]),
        torch.randn(1, 7, 32, generator=g),
        torch.randn(1, 16, 3, 8, 8, generator=g),
    )


def _model(tr):
    return AtlasTransformer(tr, AtlasConfig(mode="atlas", window=(3, 4, 4), temporal_scale=4, spatial_scale=2))


@torch.no_grad()
def test_automatic_proxy_cache_follows_in_place_weight_edits():
    x, t, enc, proxy = _detail_inputs()
    model = _model(make_tiny_wan())
    before = model(x, t, enc, proxy=proxy)  # builds the automatic cache
    model.transformer.blocks[0].attn1.to_k.weight.mul_(1.5)  # in place: same tensor, new values
    after = model(x, t, enc, proxy=proxy)
    fresh = _model(make_tiny_wan())
    fresh.transformer.load_state_dict(model.transformer.state_dict())
    ref = fresh(x, t, enc, proxy=proxy)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, ref, atol=0, rtol=0)


@torch.no_grad()
def test_automatic_proxy_cache_follows_adapter_switches():
    from peft import LoraConfig

    x, t, enc, proxy = _detail_inputs()
    tr = make_tiny_wan()
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False), "a")
    model = _model(tr)
    tr.disable_adapters()
    base = model(x, t, enc, proxy=proxy)  # cache built without the adapter
    tr.enable_adapters()
    with_adapter = model(x, t, enc, proxy=proxy)
    model.clear_proxy_cache()
    torch.testing.assert_close(with_adapter, model(x, t, enc, proxy=proxy), atol=0, rtol=0)
    assert (with_adapter - base).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- 11. joint proxy
def test_joint_proxy_mode_reachable_from_generate_config(tmp_path, monkeypatch):
    from atlasvid_dist.config.generate import GenerateConfig

    gen, comp = _generator(tmp_path, steps=1, method=dict(proxy_mode="joint"))
    assert GenerateConfig.from_dict(gen.cfg.to_dict()).method.proxy_mode == "joint"
    gen.preflight()  # the cost model accepts it
    calls = _spy(monkeypatch)
    proxy = _proxy(gen.cfg)
    with torch.no_grad():
        joint = gen.stage2(comp, _texts(), proxy, None, None)
    assert len(calls) == 2 and all(
        c.get("proxy_cache") is None and c["proxy"] is proxy and c["proxy_noise"] is not None for c in calls
    )
    clean_gen, _ = _generator(tmp_path, steps=1)
    with torch.no_grad():
        clean = clean_gen.stage2(comp, _texts(), proxy, None, None)
    assert torch.isfinite(joint).all() and (joint - clean).abs().max() > 1e-4


def _rank_latents(gen, comp, tokens):
    """One rank's tokens of a world of one (local order) back to the latent (1, C, f, h, w)."""
    from atlasvid_dist.parallel.window_attention import shard_for
    from atlasvid_dist.runtime.detail import from_tokens

    atlas = AtlasTransformer(comp.transformer, gen.cfg.method)
    grid = atlas.token_grid(torch.empty(1, 16, *gen.cfg.latent.dims, device="meta"))
    full = torch.empty(tokens.shape[0], grid.size, *tokens.shape[2:])
    full[:, shard_for(gen.cfg.method, grid, 1).token_index(0)] = tokens
    return from_tokens(full, grid)


@pytest.mark.slow  # stage 2 three times; the generate-config test above stays fast
def test_joint_proxy_mode_on_a_rank_equals_one_process_and_resumes(tmp_path):
    """The distributed stage 2 (``denoise_rank``, here a world of one: no process group) in joint mode draws the
    proxy noise from the one-process stage-2 generator in the same order, so it gives the one-process latents; a
    rank stopped after step 1 resumes from its checkpoint (generator state included) to the same result."""
    from atlasvid_dist.pipeline.checkpoint import StepCheckpointer
    from atlasvid_dist.runtime.detail import denoise_rank

    gen, comp = _generator(tmp_path, method=dict(proxy_mode="joint"))  # 2 steps, guidance 3: cond + uncond
    text, proxy = _texts(), _proxy(gen.cfg)
    with torch.no_grad():
        want = gen.stage2(comp, text, proxy, None, None)
    tokens, per_layer, _ = denoise_rank(gen, comp, text, proxy, 0, 1)
    assert float((_rank_latents(gen, comp, tokens) - want).abs().max()) <= 1e-5
    assert set(per_layer) == set(range(len(comp.transformer.blocks))) and not any(per_layer.values())

    class Stop(Exception):
        pass

    def stop(done):
        if done == 1:
            raise Stop

    ckpt = StepCheckpointer(tmp_path / "rank-0")
    with pytest.raises(Stop):
        denoise_rank(gen, comp, text, proxy, 0, 1, on_step=stop, ckpt=ckpt)
    assert "rng" in ckpt.load(1)[0]
    resumed, _, _ = denoise_rank(gen, comp, text, proxy, 0, 1, ckpt=ckpt, resume_step=1)
    assert float((_rank_latents(gen, comp, resumed) - want).abs().max()) <= 1e-5
