"""Where a model comes from and what is refused there: weights that do not match their config (by name), folders
declaring custom code, and Hugging Face ids resolved in the local cache only."""

import io
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from atlasvid_dist.cli.main import main
from atlasvid_dist.errors import ModelLoadError
from atlasvid_dist.models.loading import load_components, model_folder, read_model_spec, validate_model_dir
from atlasvid_dist.models.tiny import save_tiny_pipeline
from tests.test_generate import SMALL_ARGS

HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "model")


def cli_generate(model, out, *extra):
    with pytest.raises(SystemExit) as e:
        main(["generate", *SMALL_ARGS, "--model", str(model), "--out", str(out), *extra])
    return e.value.code


def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# --- weights by name ------------------------------------------------------------------------------------------


def test_config_with_fewer_layers_than_weights_exits_2_naming_a_key(model_copy, tmp_path, capsys):
    _edit_json(model_copy / "transformer" / "config.json", num_layers=1)
    with pytest.raises(ModelLoadError, match=r"unexpected weight.*blocks\.1\."):
        validate_model_dir(model_copy)
    out = tmp_path / "o.mp4"
    assert cli_generate(model_copy, out) == 2
    err = capsys.readouterr().err
    assert "blocks.1." in err and "diffusion_pytorch_model.safetensors" in err and not out.exists()


def test_missing_weight_is_named(model_copy):
    f = next((model_copy / "transformer").glob("*.safetensors"))
    state = load_file(str(f))
    del state["proj_out.bias"]
    save_file(state, str(f))
    for call in (validate_model_dir, load_components):
        with pytest.raises(ModelLoadError, match=r"missing.*proj_out\.bias"):
            call(str(model_copy))


def test_tied_text_encoder_embedding_is_not_reported_missing(tiny_dir):
    validate_model_dir(tiny_dir)  # the file holds shared.weight only; encoder.embed_tokens.weight is tied to it


# --- custom code ----------------------------------------------------------------------------------------------


def _custom_tokenizer(root):
    """A tokenizer folder whose config points at a class in a .py file that would leave a marker when imported."""
    tok = root / "tokenizer"
    marker = root / "CUSTOM_CODE_RAN"
    (tok / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    _edit_json(
        tok / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]},
    )
    return marker


def test_tokenizer_with_custom_code_is_refused_without_prompt(model_copy, tmp_path, capsys, monkeypatch):
    marker = _custom_tokenizer(model_copy)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)  # a prompt would fail on it; none may be shown
    for call in (validate_model_dir, load_components):
        with pytest.raises(ModelLoadError, match=r"tokenizer_config.json: field auto_map"):
            call(str(model_copy))
    out = tmp_path / "o.mp4"
    assert cli_generate(model_copy, out) == 2
    captured = capsys.readouterr()
    assert "auto_map" in captured.err and "[y/N]" not in captured.out + captured.err
    assert not marker.exists() and not out.exists()


def test_component_config_with_auto_map_is_refused(model_copy):
    _edit_json(model_copy / "text_encoder" / "config.json", auto_map={"AutoModel": "evil.Model"})
    with pytest.raises(ModelLoadError, match=r"text_encoder.config.json: field auto_map"):
        validate_model_dir(model_copy)


# --- Hugging Face ids through the local cache -----------------------------------------------------------------


def _fake_cache(tiny_dir, cache):
    """The tiny model laid out as huggingface_hub caches a repo: models--org--name/{refs/main, snapshots/<hash>}."""
    repo = cache / "models--atlas-test--tiny-wan"
    shutil.copytree(tiny_dir, repo / "snapshots" / HASH)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HASH)
    return repo / "snapshots" / HASH


def test_hub_id_resolves_in_local_cache(tiny_dir, tmp_path, monkeypatch):
    snapshot = _fake_cache(tiny_dir, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_folder("atlas-test/tiny-wan") == snapshot
    assert read_model_spec("atlas-test/tiny-wan").num_layers == 2
    parts = load_components("atlas-test/tiny-wan")
    ref = load_components(str(tiny_dir))
    assert parts.source == str(snapshot)
    for a, b in zip(parts.transformer.state_dict().values(), ref.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_uncached_hub_id_exits_2_naming_id_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError, match="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        load_components("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    out = tmp_path / "o.mp4"
    assert cli_generate("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", out) == 2
    err = capsys.readouterr().err
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err and str(tmp_path / "empty-hub") in err and not out.exists()


def test_existing_local_folder_wins_over_hub_id(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    (tiny_dir.parent / "org").mkdir(exist_ok=True)
    local = tiny_dir.parent / "org" / "tiny"
    if not local.exists():
        shutil.copytree(tiny_dir, local)
    assert model_folder("org/tiny") == local.relative_to(tiny_dir.parent)
    validate_model_dir("org/tiny")
