"""Factory (named configs, pretrained weights) and checkpoints (round trip, safe loading)."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from sarl.model import ConfigError, Vocabulary, add_model_config, create_model, get_model_config, list_models
from sarl.model.backbone import PretrainedUnavailableError, build_clip
from sarl.model.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint

NAMES = ["circle", "square", "triangle"]


def test_unknown_model_and_field_are_named():
    with pytest.raises(ConfigError, match="unknown model 'nope'.*tiny"):
        create_model("nope", NAMES)
    with pytest.raises(ConfigError, match="fusoin"):
        create_model("tiny", NAMES, fusoin="dot")
    with pytest.raises(ConfigError, match="fusion: 'concat' is not one of"):
        create_model("tiny", NAMES, fusion="concat")


def test_add_model_config_from_file(tmp_path):
    cfg = json.loads(json.dumps(get_model_config("tiny").__dict__, default=list))
    cfg.update(rank=7, description="seven")
    path = tmp_path / "tiny-seven.json"
    path.write_text(json.dumps(cfg))
    assert add_model_config(path) == "tiny-seven"
    assert "tiny-seven" in list_models()
    assert create_model("tiny-seven", NAMES).decoupling.rank == 7


def test_pretrained_weights_from_a_local_file(tmp_path):
    """The same code path users take with pretrained=/path/to/weights: a random CLIP state dict saved to disk."""
    clip_cfg = get_model_config("tiny").clip
    torch.manual_seed(123)
    source = build_clip(clip_cfg)
    path = tmp_path / "clip-weights.pt"
    torch.save(source.state_dict(), path)
    model = create_model("tiny", NAMES, pretrained=str(path))
    for name, tensor in source.visual.state_dict().items():
        torch.testing.assert_close(model.visual.visual.state_dict()[name], tensor)
    torch.testing.assert_close(model.text.token_embedding.weight, source.token_embedding.weight)
    other = create_model("tiny", NAMES)  # random init differs
    assert not torch.equal(other.text.token_embedding.weight, source.token_embedding.weight)


def test_hub_weights_offline_fail_with_alternatives():
    with pytest.raises(PretrainedUnavailableError) as info:
        build_clip("RN50", "openai")
    message = str(info.value)
    assert "local weights file" in message and "pretrained=null" in message and "yfcc15m" in message


def test_unknown_pretrained_tag_lists_tags():
    with pytest.raises(PretrainedUnavailableError, match="tags: .*openai"):
        build_clip("RN50", "not-a-tag")


@pytest.mark.parametrize("head", ["sarl", "global", "dualcoop"])
def test_checkpoint_round_trip_reproduces_logits_exactly(tmp_path, head):
    vocab = Vocabulary.from_names(NAMES, version="7")
    model = create_model("tiny", vocab, head=head, negative_prompts=True).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    save_checkpoint(model, tmp_path / "ckpt", extra={"epoch": 3})
    loaded = load_checkpoint(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)
    config, vocabulary, extra = read_checkpoint_meta(tmp_path / "ckpt")
    assert config == model.config and vocabulary == vocab and extra == {"epoch": 3}


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    model = create_model("tiny", NAMES)
    save_checkpoint(model, tmp_path / "ckpt")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    state = model.state_dict()
    state["payload"] = Exploit()
    with open(tmp_path / "ckpt" / "weights.pt", "wb") as fh:
        torch.save(state, fh, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "ckpt")


def test_model_library_imports_no_platform_modules():
    code = ("import sys, sarl.model, sarl.model.experiment, sarl.model.engine, sarl.model.checkpoint, sarl.model.data;"
            "bad=[m for m in ('ray','boto3','botocore','sarl.platform') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
