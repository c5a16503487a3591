"""AtlasTransformer against diffusers' own Wan forward, and the method's properties (locality, asymmetry, cache)."""

import pytest
import torch

from atlasvid_dist import AtlasConfig, AtlasTransformer, ConfigError, InputError

from .conftest import make_tiny_wan

LAT = (1, 16, 9, 16, 16)  # (B, C, f, h, w) latents -> token grid (9, 8, 8)
PROXY = (1, 16, 3, 8, 8)  # temporal_scale 4 -> ceil(8/4)+1 = 3 frames; spatial_scale 2 -> 4x4 tokens


def inputs(seed=0, lat=LAT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lat, generator=g), torch.tensor([700.0]), torch.randn(lat[0], 7, 32, generator=g)


def proxy_latents(seed=1):
    return torch.randn(*PROXY, generator=torch.Generator().manual_seed(seed))


def atlas(tr, **kw):
    base = dict(mode="atlas", window=(3, 4, 4), shift=True, temporal_scale=4, spatial_scale=2)
    base.update(kw)
    return AtlasTransformer(tr, AtlasConfig(**base))


@torch.no_grad()
def test_full_mode_equals_diffusers(tiny_wan):
    x, t, enc = inputs()
    ref = tiny_wan(x, t, enc).sample
    out = AtlasTransformer(tiny_wan, AtlasConfig(mode="full"))(x, t, enc)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_one_window_covering_the_grid_equals_diffusers(tiny_wan, backend):
    x, t, enc = inputs()
    ref = tiny_wan(x, t, enc).sample
    out = atlas(tiny_wan, window=(9, 8, 8), backend=backend)(x, t, enc)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_weights_are_shared_not_copied(tiny_wan):
    model = atlas(tiny_wan)
    assert {id(p) for p in model.parameters()} == {id(p) for p in tiny_wan.parameters()}


@torch.no_grad()
def test_locality_one_layer_unshifted():
    tr = make_tiny_wan(num_layers=1, seed=3)
    model = atlas(tr, shift=False)
    x, t, enc = inputs()
    base = model(x, t, enc)
    x2 = x.clone()
    x2[:, :, 3:6, 8:16, 0:8] += torch.randn(1, 16, 3, 8, 8)  # latent cells of window (t 1, h 1, w 0)
    diff = (model(x2, t, enc) - base).abs().amax(dim=(0, 1))  # (f, h, w)
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[3:6, 8:16, 0:8] = True
    assert diff[inside].max() > 1e-3
    assert diff[~inside].max() == 0


@torch.no_grad()
def test_shifted_layers_carry_information_across_windows():
    tr = make_tiny_wan(num_layers=2, seed=3)
    model = atlas(tr, shift=True)
    x, t, enc = inputs()
    x2 = x.clone()
    x2[:, :, 3:6, 8:16, 0:8] += 1.0
    diff = (model(x2, t, enc) - model(x, t, enc)).abs().amax(dim=(0, 1))
    outside = torch.ones_like(diff, dtype=torch.bool)
    outside[3:6, 8:16, 0:8] = False
    assert diff[outside].max() > 1e-4


@torch.no_grad()
def test_proxy_keys_do_not_depend_on_detail_and_proxy_changes_detail(tiny_wan):
    model = atlas(tiny_wan)
    x, t, enc = inputs()
    p = proxy_latents()
    cache = model.build_proxy_cache(p, enc)
    out1 = model(x, t, enc, proxy=p)
    x_other, _, _ = inputs(seed=5)
    model(x_other, t, enc, proxy=p)
    again = model.build_proxy_cache(p, enc)
    for a, b in zip(cache.kv.keys + cache.kv.values, again.kv.keys + again.kv.values):
        assert torch.equal(a, b)
    out2 = model(x, t, enc, proxy=proxy_latents(seed=9))
    assert (out1 - out2).abs().max() > 1e-4
    assert (out1 - model(x, t, enc)).abs().max() > 1e-4  # the proxy is read at all


@torch.no_grad()
def test_proxy_path_is_the_stage1_model(tiny_wan):
    """The cached keys come from the same layers as proxy_forward (stage 1) - checked through reference attention."""
    model = atlas(tiny_wan, temporal_scale=1, spatial_scale=1, window=(9, 8, 8))
    x, t, enc = inputs()
    torch.testing.assert_close(model.proxy_forward(x, t, enc), tiny_wan(x, t, enc).sample, atol=1e-5, rtol=0)
    scaled = atlas(tiny_wan, temporal_scale=4)
    assert (scaled.proxy_forward(x, t, enc) - tiny_wan(x, t, enc).sample).abs().max() > 1e-5


@torch.no_grad()
@pytest.mark.parametrize("context", ["all", "aligned"])
def test_cached_proxy_equals_recomputed(tiny_wan, context):
    model = atlas(tiny_wan, proxy_context=context)
    x, t, enc = inputs()
    p = proxy_latents()
    cache = model.build_proxy_cache(p, enc)
    explicit = model(x, t, enc, proxy_cache=cache)
    auto_first = model(x, t, enc, proxy=p)
    auto_cached = model(x, torch.tensor([300.0]), enc, proxy=p)
    fresh = atlas(tiny_wan, proxy_context=context)(x, torch.tensor([300.0]), enc, proxy=p)
    assert torch.equal(explicit, auto_first)
    assert torch.equal(auto_cached, fresh)
    with pytest.raises(InputError, match="proxy_cache"):
        model(x, t, enc, proxy=proxy_latents(seed=4), proxy_cache=cache)


@torch.no_grad()
def test_attention_geometry_is_built_once_per_grid(tiny_wan):
    """RoPE tables and window indices are built by the first forward on a grid and kept: later forwards reuse
    them (same tensors) and give what a fresh model gives; another grid or config builds its own."""
    model = atlas(tiny_wan)
    x, t, enc = inputs()
    p = proxy_latents()
    model(x, t, enc, proxy=p)
    kept = model._geometry
    tables = kept.tables.cos
    second = model(x, torch.tensor([300.0]), enc, proxy=p)
    assert model._geometry is kept and model._geometry.tables.cos is tables
    assert torch.equal(second, atlas(tiny_wan)(x, torch.tensor([300.0]), enc, proxy=p))
    wide, _, _ = inputs(lat=(1, 16, 9, 16, 24))
    model(wide, t, enc)  # another grid, no proxy
    assert model._geometry is not kept and model._geometry.grid.dims == (9, 8, 12)
    model.atlas_config = AtlasConfig(mode="atlas", window=(3, 8, 4), shift=False, temporal_scale=4, spatial_scale=2)
    model(wide, t, enc)
    assert model._geometry.config.window == (3, 8, 4)


@torch.no_grad()
def test_cache_invalidates_on_new_prompt(tiny_wan):
    model = atlas(tiny_wan)
    x, t, enc = inputs()
    p = proxy_latents()
    first = model(x, t, enc, proxy=p)
    enc2 = enc + 1.0
    fresh = atlas(tiny_wan)(x, t, enc2, proxy=p)
    assert torch.equal(model(x, t, enc2, proxy=p), fresh) and not torch.equal(fresh, first)


@torch.no_grad()
def test_joint_mode_renoises_proxy(tiny_wan):
    x, t, enc = inputs()
    p = proxy_latents()
    noise = torch.randn(*PROXY, generator=torch.Generator().manual_seed(2))
    joint = atlas(tiny_wan, proxy_mode="joint")
    a = joint(x, t, enc, proxy=p, proxy_noise=noise)
    assert torch.equal(a, joint(x, t, enc, proxy=p, proxy_noise=noise))
    assert (a - atlas(tiny_wan)(x, t, enc, proxy=p)).abs().max() > 1e-5
    # at timestep 0 re-noising is the identity: joint equals clean
    t0 = torch.tensor([0.0])
    torch.testing.assert_close(joint(x, t0, enc, proxy=p, proxy_noise=noise), atlas(tiny_wan)(x, t0, enc, proxy=p))


@torch.no_grad()
def test_joint_proxy_kv_is_what_forward_reads(tiny_wan):
    """joint_proxy_kv (what the distributed ranks build per call) is the joint forward's proxy keys/values: fed as
    a cache it gives the joint forward's output exactly; its layer-0 values are block 0's value projection of the
    proxy re-noised on the flow line, (1 - t/1000) proxy + t/1000 noise, written out from the diffusers modules."""
    from atlasvid_dist.models.atlas_transformer import ProxyCache

    x, t, enc = inputs()
    p = proxy_latents()
    noise = torch.randn(*PROXY, generator=torch.Generator().manual_seed(2))
    joint = atlas(tiny_wan, proxy_mode="joint")
    kv = joint.joint_proxy_kv(p, noise, t, enc)
    assert len(kv.keys) == len(kv.values) == len(tiny_wan.blocks) and kv.grid == joint.token_grid(p)
    want = joint(x, t, enc, proxy=p, proxy_noise=noise)
    assert torch.equal(joint(x, t, enc, proxy_cache=ProxyCache(kv, p, enc)), want)
    noisy = 0.3 * p + 0.7 * noise  # t = 700
    h = tiny_wan.patch_embedding(noisy).flatten(2).transpose(1, 2)
    _, tproj, _, _ = tiny_wan.condition_embedder(t, enc, None)
    block = tiny_wan.blocks[0]
    shift, scale, *_ = (block.scale_shift_table + tproj.unflatten(1, (6, -1)).float()).chunk(6, dim=1)
    v0 = block.attn1.to_v(block.norm1(h.float()) * (1 + scale) + shift).unflatten(2, (block.attn1.heads, -1))
    torch.testing.assert_close(kv.values[0], v0, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="proxy_noise"):
        joint.joint_proxy_kv(p, noise[:, :, :2], t, enc)


@torch.no_grad()
def test_ultragen_mode(tiny_wan):
    x, t, enc = inputs()
    kw = dict(mode="ultragen", ultragen_pool=(1, 2, 2))
    local_only = atlas(tiny_wan, **kw, ultragen_weight=0.0)(x, t, enc)
    torch.testing.assert_close(local_only, atlas(tiny_wan)(x, t, enc), atol=1e-6, rtol=0)
    mixed = atlas(tiny_wan, **kw)(x, t, enc)
    assert mixed.shape == x.shape and (mixed - local_only).abs().max() > 1e-4
    ref = atlas(tiny_wan, **kw, backend="reference")(x, t, enc)
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=0)


@pytest.mark.slow  # backward through the tiny model; test_train_modes keeps a LoRA-gradient check fast
def test_gradients_flow_through_windows_and_proxy(tiny_wan):
    model = atlas(tiny_wan)
    x, t, enc = inputs()
    out = model(x, t, enc, proxy=proxy_latents())
    out.square().mean().backward()
    q = tiny_wan.blocks[0].attn1.to_q.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    tiny_wan.zero_grad(set_to_none=True)


@pytest.mark.slow  # two backward passes; test_train_data's stage-1 case keeps it fast
def test_gradient_checkpointing_gives_same_grads():
    tr = make_tiny_wan(seed=1)
    model = atlas(tr)
    x, t, enc = inputs()
    model(x, t, enc).sum().backward()
    ref = [p.grad.clone() for p in tr.parameters() if p.grad is not None]
    tr.zero_grad(set_to_none=True)
    tr.enable_gradient_checkpointing()
    model(x, t, enc).sum().backward()
    got = [p.grad for p in tr.parameters() if p.grad is not None]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


BAD = [
    (lambda m, x, t, e: m(x[:, :8], t, e), "channels"),
    (lambda m, x, t, e: m(x[0], t, e), "expected \\(B, C, f, h, w\\)"),
    (lambda m, x, t, e: m(x[..., :15], t, e), "patch"),
    (lambda m, x, t, e: m(x, t, e[..., :16]), "encoder_hidden_states"),
    (lambda m, x, t, e: m(x, torch.ones(3), e), "timestep"),
    (lambda m, x, t, e: m(x, t, e, proxy=torch.randn(1, 16, 3, 6, 8)), "proxy: expected"),
]


@torch.no_grad()
@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_typed_errors(tiny_wan, call, message):
    x, t, enc = inputs()
    with pytest.raises(InputError, match=message):
        call(atlas(tiny_wan), x, t, enc)


@torch.no_grad()
def test_proxy_in_full_mode_and_bad_windows_refused(tiny_wan):
    x, t, enc = inputs()
    with pytest.raises(InputError, match="mode='full'"):
        AtlasTransformer(tiny_wan, AtlasConfig(mode="full"))(x, t, enc, proxy=proxy_latents())
    with pytest.raises(ConfigError, match="window.h"):
        atlas(tiny_wan, window=(3, 3, 4))(x, t, enc)
    with pytest.raises(ConfigError, match="transformer"):
        AtlasTransformer(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_no_proxy_needs_no_proxy_geometry(tiny_wan):
    """A grid the spatial_scale does not divide (720P has 45 token rows) must work when no proxy is given."""
    x, t, enc = inputs(lat=(1, 16, 3, 6, 16))  # token grid (3, 3, 8): 3 rows, spatial_scale 2
    ref = tiny_wan(x, t, enc).sample
    torch.testing.assert_close(AtlasTransformer(tiny_wan, AtlasConfig(mode="full"))(x, t, enc), ref, atol=1e-5, rtol=0)
    assert atlas(tiny_wan, window=(3, 3, 4))(x, t, enc).shape == x.shape


@torch.no_grad()
def test_ffn_chunks_give_the_same_velocity_and_bound_the_ffn_rows(tiny_wan):
    """ffn_chunk runs each block's feed-forward over token chunks: the velocity is the unchunked one and no FFN
    call sees more rows than the chunk (token grid 9 x 8 x 8 = 576 tokens; 100 leaves a ragged last chunk)."""
    x, t, enc = inputs()
    p = proxy_latents()
    cfg = AtlasConfig(mode="atlas", window=(3, 4, 4), shift=True, temporal_scale=4, spatial_scale=2)
    ref = AtlasTransformer(tiny_wan, cfg)(x, t, enc, proxy=p)
    rows = []
    hook = tiny_wan.blocks[0].ffn.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[1]))
    try:
        out = AtlasTransformer(tiny_wan, cfg, ffn_chunk=100)(x, t, enc, proxy=p)
    finally:
        hook.remove()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert max(rows) <= 100 and sum(rows) >= 576  # detail tokens (and the proxy's) in chunks


@pytest.mark.slow
@torch.no_grad()
def test_compiled_blocks_equal_eager(tiny_wan):
    """--compile-blocks: the blocks' non-attention code through torch.compile gives the eager velocity (to
    rounding), with shifted windows, a cached proxy and a chunked feed-forward (a second token count)."""
    x, t, enc = inputs()
    eager = atlas(tiny_wan)
    compiled = AtlasTransformer(tiny_wan, eager.atlas_config, ffn_chunk=100, compile_blocks=True)
    assert compiled.ops.feed_forward is not eager.ops.feed_forward  # the compiled wrappers, not the functions
    cache = eager.build_proxy_cache(proxy_latents(), enc)
    want = eager(x, t, enc, proxy_cache=cache)
    got = compiled(x, t, enc, proxy_cache=compiled.build_proxy_cache(proxy_latents(), enc))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
