"""StepCheckpointer: round trip, only committed and intact steps load, keep-K pruning, RNG state helpers, run
identity (run id, config checksum) per step, fallback past a corrupt step."""

import json
import random

import pytest
import torch

from atlasvid_dist.errors import ConfigError, InputError
from atlasvid_dist.pipeline.checkpoint import (
    MARKER,
    META,
    TENSORS,
    StepCheckpointer,
    config_checksum,
    generator_state,
    python_rng_state,
    restore_generator,
    restore_python_rng,
    step_key,
)


def state(step: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(step)
    lat = torch.randn(1, 4, 2, 3, 5, generator=g)
    tensors = {
        "latents": lat,
        "view": lat[0, :2].transpose(-1, -2),  # a non-contiguous view sharing storage
        "rng": g.get_state(),
        "sigmas": torch.linspace(1, 0, 5, dtype=torch.float64),
        "step_index": torch.tensor(step),
    }
    return tensors, {"stage": "detail", "step": step, "sched": {"shift": 5.0, "names": ["a", "b"]}}


def test_round_trip(tmp_path):
    ck = StepCheckpointer(tmp_path)
    assert ck.latest() is None
    tensors, meta = state(5)
    d = ck.commit(5, tensors, meta)
    assert d.name == "step-000005" and sorted(p.name for p in d.iterdir()) == sorted([MARKER, META, TENSORS])
    assert ck.latest() == 5
    back, back_meta = ck.load(5)
    assert back_meta == meta
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_uncommitted_step_is_never_loaded(tmp_path):
    ck = StepCheckpointer(tmp_path)
    ck.commit(1, *state(1))
    ck.commit(2, *state(2))
    (tmp_path / "step-000002" / MARKER).unlink()  # a crash before the marker
    assert ck.latest() == 1
    with pytest.raises(InputError, match="not committed"):
        ck.load(2)
    (tmp_path / "step-000009").mkdir()  # an empty leftover folder
    assert ck.latest() == 1


def test_truncated_or_corrupt_step_is_refused_naming_the_file(tmp_path):
    ck = StepCheckpointer(tmp_path, keep=3)
    for s in (1, 2, 3):
        ck.commit(s, *state(s))
    f3 = tmp_path / "step-000003" / TENSORS
    f3.write_bytes(f3.read_bytes()[:-7])  # truncated after commit
    assert ck.latest() == 2  # skipped: its size disagrees with the marker
    with pytest.raises(InputError, match="step-000003/tensors.safetensors.*truncated"):
        ck.load(3)
    f2 = tmp_path / "step-000002" / TENSORS
    data = bytearray(f2.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte flipped
    f2.write_bytes(bytes(data))
    with pytest.raises(InputError, match="step-000002/tensors.safetensors.*corrupt"):
        ck.load(2)
    (tmp_path / "step-000001" / MARKER).write_text("{not json")
    with pytest.raises(InputError, match="step-000001/COMMITTED"):
        ck.load(1)


def test_keep_k_pruning_only_after_the_new_commit(tmp_path):
    ck = StepCheckpointer(tmp_path, keep=2)
    (tmp_path / "step-000000").mkdir()  # leftover of an interrupted write
    for s in range(1, 5):
        ck.commit(s, *state(s))
        assert ck.committed_steps() == list(range(max(1, s - 1), s + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    # a failed commit (non-serialisable meta) removes nothing
    with pytest.raises(InputError, match="JSON"):
        ck.commit(5, state(5)[0], {"bad": object()})
    assert ck.committed_steps() == [3, 4]
    t, m = ck.load(ck.latest())
    assert m["step"] == 4 and torch.equal(t["latents"], state(4)[0]["latents"])


def test_recommit_same_step_replaces_it(tmp_path):
    ck = StepCheckpointer(tmp_path)
    ck.commit(7, *state(7))
    ck.commit(7, *state(8))
    t, m = ck.load(7)
    assert m["step"] == 8 and torch.equal(t["latents"], state(8)[0]["latents"])
    marker = json.loads((tmp_path / "step-000007" / MARKER).read_text())
    assert marker["step"] == 7 and set(marker["files"]) == {TENSORS, META}


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="keep"):
        StepCheckpointer(tmp_path, keep=0)
    ck = StepCheckpointer(tmp_path)
    with pytest.raises(ConfigError, match="step"):
        ck.commit(-1, {}, {})
    with pytest.raises(InputError, match="torch.Tensor"):
        ck.commit(1, {"x": [1, 2]}, {})
    assert ck.latest() is None


def test_rng_helpers_restore_the_sequence(tmp_path):
    g = torch.Generator().manual_seed(123)
    torch.randn(3, generator=g)
    random.seed(7)
    random.random()
    random.gauss(0, 1)  # leaves a cached gauss value in the state
    rng = random.Random(99)
    ck = StepCheckpointer(tmp_path)
    ck.commit(1, {"gen": generator_state(g), "py": python_rng_state(), "py2": python_rng_state(rng)}, {})
    want = (torch.randn(4, generator=g), random.gauss(0, 1), random.random(), rng.random())
    t, _ = ck.load(1)
    g2, rng2 = torch.Generator(), random.Random()
    restore_generator(g2, t["gen"])
    restore_python_rng(t["py"])
    restore_python_rng(t["py2"], rng2)
    got = (torch.randn(4, generator=g2), random.gauss(0, 1), random.random(), rng2.random())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    with pytest.raises(InputError, match="generator state"):
        restore_generator(g2, torch.zeros(3))
    with pytest.raises(InputError, match="python RNG"):
        restore_python_rng(torch.zeros(5, dtype=torch.int64))


def test_steps_of_another_run_are_neither_resumed_nor_outrank_this_runs(tmp_path):
    """Issue 12: an old run's stage-2 steps (higher numbers) used to be 'latest' for a new run in the same folder,
    and the new run's steps were pruned as soon as written. Steps carry the run id; each run sees its own."""
    old = StepCheckpointer(tmp_path, run_id="old", config_sha256="a")
    old.commit(step_key(1, 1), *state(1))
    old.commit(step_key(1, 2), *state(2))
    new = StepCheckpointer(tmp_path, run_id="new", config_sha256="b")
    assert new.latest() is None
    new.commit(step_key(0, 1), *state(3))
    new.commit(step_key(0, 2), *state(4))
    assert new.committed_steps() == [1, 2]  # not pruned by the old run's higher step numbers
    assert new.load(2)[1]["step"] == 4
    with pytest.raises(InputError, match="run_id='old'.*another run"):
        new.load(step_key(1, 2))
    marker = json.loads((tmp_path / "step-000002" / MARKER).read_text())
    assert (marker["run_id"], marker["config_sha256"]) == ("new", "b")
    same_run_other_config = StepCheckpointer(tmp_path, run_id="new", config_sha256="c")
    assert same_run_other_config.committed_steps() == []


def test_step_key_orders_by_stage_then_step():
    assert step_key(0, 99999) < step_key(1, 0) < step_key(1, 1)
    with pytest.raises(ConfigError, match="steps"):
        step_key(0, 100000)


def test_newest_loadable_falls_back_past_a_corrupt_step(tmp_path):
    ck = StepCheckpointer(tmp_path, keep=3)
    for s in (1, 2, 3):
        ck.commit(s, *state(s))
    f3 = tmp_path / "step-000003" / TENSORS
    data = bytearray(f3.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum sees it
    f3.write_bytes(bytes(data))
    skipped = []
    step, tensors, meta = ck.newest_loadable(on_skip=lambda s, why: skipped.append((s, why)))
    assert step == 2 and meta["step"] == 2 and torch.equal(tensors["latents"], state(2)[0]["latents"])
    assert len(skipped) == 1 and skipped[0][0] == 3 and "corrupt" in skipped[0][1]
    assert ck.intact_steps() == [1, 2]


def test_config_checksum_is_canonical():
    assert config_checksum({"a": 1, "b": [1, 2]}) == config_checksum({"b": [1, 2], "a": 1})
    assert config_checksum({"a": 1, "out": "x"}, ("out",)) == config_checksum({"a": 1, "out": "y"}, ("out",))
    assert config_checksum({"a": 1}) != config_checksum({"a": 2})
