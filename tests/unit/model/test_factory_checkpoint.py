"""Factory (named configs, pretrained weights) and checkpoints (round trip, safe loading)."""

import copy
import dataclasses
import json
import pickle
import subprocess
import sys

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from sarl.model import ConfigError, Vocabulary, add_model_config, create_model, get_model_config, list_models
from sarl.model.backbone import PretrainedUnavailableError, build_clip, resolve_quick_gelu
from sarl.model.checkpoint import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_backbone,
    export_checkpoint,
    load_checkpoint,
    load_trainable_state,
    read_checkpoint_meta,
    save_checkpoint,
)

NAMES = ["circle", "square", "triangle"]
TOWERS = ("visual.", "text.", "prompts.text.")


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
    # every data set kind included (data.label_studio reads Label Studio exports: no httpx, no platform client)
    code = ("import sys, sarl.model, sarl.model.experiment, sarl.model.engine, sarl.model.checkpoint, sarl.model.data,"
            " sarl.model.data.build, sarl.model.data.label_studio;"
            "bad=[m for m in ('ray','boto3','botocore','httpx','sarl.platform') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ helpers
def weights_file(tmp_path, name="tiny-rn", seed=123, filename="clip-weights.pt"):
    """A random CLIP state dict of ``name``'s towers saved as a local weights file (what users pass as pretrained)."""
    torch.manual_seed(seed)
    path = tmp_path / filename
    torch.save(build_clip(get_model_config(name).clip).state_dict(), path)
    return path


def logits(model, size=64, seed=0):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(images)


def stored(directory):
    return torch.load(directory / WEIGHTS_FILE, weights_only=True)


def perturb_trainable(model):
    """Stand-in for training: every trainable tensor changes (prompts, decoupling, head)."""
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)


def uses_quick_gelu(module):
    return any(isinstance(m, QuickGELU) for m in module.modules())


# ------------------------------------------------------------------------------------------------ QuickGELU
def test_quick_gelu_resolution_follows_the_weights_source():
    assert resolve_quick_gelu("RN101", "openai") and resolve_quick_gelu("RN50", "openai")
    assert resolve_quick_gelu("RN101", "/weights/RN101-openai.pt")  # a local file of an openai-tag architecture
    assert resolve_quick_gelu("ViT-B-16", "s3://bucket/vit.pt")
    assert not resolve_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")  # a GELU tag
    assert not resolve_quick_gelu("RN101", None)  # random towers
    assert not resolve_quick_gelu("ViT-B-32-256", "/weights/datacomp.pt")  # no openai tag
    assert not resolve_quick_gelu("RN101", "openai", quick_gelu=False)  # explicit always wins
    assert resolve_quick_gelu(get_model_config("tiny").clip, None, quick_gelu=True)
    assert create_model("tiny", NAMES).config.quick_gelu is False  # built models hold the resolved value
    model = create_model("tiny", NAMES, quick_gelu=True)
    assert model.config.quick_gelu is True and uses_quick_gelu(model.text) and uses_quick_gelu(model.visual)


@pytest.fixture
def openai_tiny(monkeypatch):
    """An open_clip architecture name for the tiny towers whose (pretend) ``openai`` tag uses QuickGELU, as RN50's."""
    name, cfg = "sarl-test-tiny", copy.deepcopy(get_model_config("tiny").clip)
    real_cfg, real_tags, real_pcfg = (open_clip.get_model_config, open_clip.list_pretrained_tags_by_model,
                                      open_clip.get_pretrained_cfg)
    monkeypatch.setattr(open_clip, "get_model_config", lambda n: copy.deepcopy(cfg) if n == name else real_cfg(n))
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model",
                        lambda n: ["openai"] if n == name else real_tags(n))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda n, t: {"quick_gelu": True} if (n, t) == (name, "openai") else real_pcfg(n, t))
    return name


@pytest.mark.parametrize("self_contained", [False, True])
def test_quick_gelu_tower_round_trips_bit_identical(tmp_path, openai_tiny, self_contained):
    """A local OpenAI weights file gets QuickGELU, the checkpoint records it, and the reload runs the same network."""
    torch.manual_seed(5)
    path = tmp_path / "openai.pt"
    torch.save(build_clip(openai_tiny, quick_gelu=True).state_dict(), path)
    model = create_model("tiny", NAMES, clip=openai_tiny, pretrained=str(path))
    assert model.config.quick_gelu is True and uses_quick_gelu(model.text)
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt", self_contained=self_contained)
    assert json.loads((tmp_path / "ckpt" / MODEL_FILE).read_text())["config"]["quick_gelu"] is True
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert uses_quick_gelu(loaded.text) and uses_quick_gelu(loaded.visual)
    assert not any(isinstance(m, torch.nn.GELU) for m in loaded.modules())
    assert torch.equal(logits(loaded), expected)


def test_feature_cache_key_sees_the_activation():
    from sarl.model.features import cache_key

    class Data:
        categories, image_paths, transform = NAMES, ["a.png"], "t"

        def __len__(self):
            return 1

    torch.manual_seed(0)
    gelu = create_model("tiny", NAMES)
    torch.manual_seed(0)
    quick = create_model("tiny", NAMES, quick_gelu=True)
    assert cache_key(gelu, Data(), split="test") != cache_key(quick, Data(), split="test")


# ------------------------------------------------------------------------------------------------ format 2
def test_checkpoint_with_a_weights_source_holds_no_tower_tensor(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    perturb_trainable(model)
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt", extra={"epoch": 2})
    keys = set(stored(tmp_path / "ckpt"))
    assert keys and not any(k.startswith(TOWERS) for k in keys)
    assert {"semantics", "semantic_mean", "prompts.ctx"} <= keys and any(k.startswith("decoupling.") for k in keys)
    backbone = checkpoint_backbone(tmp_path / "ckpt")
    assert backbone["clip"] == model.config.clip and backbone["pretrained"] == str(path)
    assert backbone["quick_gelu"] is False and len(backbone["digest"]) == 64 and not backbone["self_contained"]
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), expected)
    assert loaded.config == model.config and read_checkpoint_meta(tmp_path / "ckpt")[2] == {"epoch": 2}


def test_weights_source_override_resolve_and_map_location(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt")
    moved = tmp_path / "elsewhere.pt"
    path.rename(moved)
    with pytest.raises(CheckpointError, match=r"weights source .*clip-weights\.pt.*sarl export"):
        load_checkpoint(tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", pretrained=str(moved))
    assert torch.equal(logits(loaded), expected)
    assert loaded.config.pretrained == str(path)  # the source as recorded, not the copy it was read from
    seen = []
    loaded = load_checkpoint(tmp_path / "ckpt", resolve=lambda source: seen.append(source) or moved)
    assert seen == [str(path)] and torch.equal(logits(loaded), expected)
    on_meta = load_checkpoint(tmp_path / "ckpt", map_location="meta", pretrained=str(moved))
    assert {t.device.type for t in on_meta.state_dict().values()} == {"meta"}  # the model moves, not the state


def test_a_changed_weights_file_is_refused_with_both_digests(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    save_checkpoint(model, tmp_path / "ckpt")
    expected = checkpoint_backbone(tmp_path / "ckpt")["digest"]
    state = torch.load(path, weights_only=True)
    state["visual.layer1.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt")
    message = str(info.value)
    assert expected in message and str(path) in message and "digest" in message
    found = message.split("has digest ")[1].split(",")[0]
    assert len(found) == 64 and found != expected


def test_self_contained_round_trip_needs_no_source(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    perturb_trainable(model)
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt", self_contained=True)
    path.unlink()
    assert checkpoint_backbone(tmp_path / "ckpt")["self_contained"]
    assert torch.equal(logits(load_checkpoint(tmp_path / "ckpt")), expected)


def test_random_towers_are_self_contained_and_the_text_tower_is_stored_once(tmp_path):
    model = create_model("tiny", NAMES)  # no weights source
    save_checkpoint(model, tmp_path / "ckpt")
    keys = set(stored(tmp_path / "ckpt"))
    assert checkpoint_backbone(tmp_path / "ckpt")["self_contained"]
    assert not any(k.startswith("prompts.text.") for k in keys)  # prompts.text is the text tower: no second copy
    assert any(k.startswith("text.") for k in keys)
    unique = {id(t) for t in model.state_dict(keep_vars=True).values()}
    assert len(keys) == len(unique) < len(model.state_dict())
    assert torch.equal(logits(load_checkpoint(tmp_path / "ckpt")), logits(model))


def test_loading_draws_no_random_weights_and_leaves_other_threads_theirs(tmp_path, monkeypatch):
    """A self-contained load builds the model without torch.nn.init's random fills (every tensor is loaded after);
    the fills are torch's own again afterwards, and a module built in another thread meanwhile is random."""
    import threading

    from sarl.model import checkpoint

    save_checkpoint(create_model("tiny", NAMES), tmp_path / "ckpt")
    originals = {name: getattr(torch.nn.init, name) for name in checkpoint._RANDOM_INITS}
    built_elsewhere, during = [], threading.Event()
    real_init = checkpoint.SARLModel.__init__

    def init_while_another_thread_builds(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        assert torch.nn.init.normal_ is not originals["normal_"]  # patched now, for this thread only
        worker = threading.Thread(target=lambda: built_elsewhere.append(torch.nn.Linear(64, 64).weight.detach()))
        worker.start()
        worker.join()
        during.set()

    monkeypatch.setattr(checkpoint.SARLModel, "__init__", init_while_another_thread_builds)
    model = load_checkpoint(tmp_path / "ckpt")
    assert during.is_set()
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals
    # the other thread's Linear got torch's kaiming-uniform fill: U(-1/sqrt(64), 1/sqrt(64)), sd 0.125/sqrt(3)
    weight = built_elsewhere[0]
    assert weight.abs().max() <= 0.125 and abs(float(weight.std()) - 0.125 / 3 ** 0.5) < 0.01
    assert torch.equal(logits(model), logits(load_checkpoint(tmp_path / "ckpt")))


def test_no_random_init_nests_and_ends_with_the_outermost():
    from sarl.model.checkpoint import _no_random_init

    def filled() -> bool:  # normal_ left the tensor as it was
        t = torch.full((1000,), 7.0)
        torch.nn.init.normal_(t)
        return bool((t == 7).all())

    with _no_random_init():
        with _no_random_init():
            assert filled()
        assert filled()  # the inner one's end does not end the outer one's
    assert not filled()


def test_export_writes_a_self_contained_copy(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    perturb_trainable(model)
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt", train_state={"epoch": 1}, extra={"epoch": 1})
    (tmp_path / "ckpt" / "job.yaml").write_text("name: x\n")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    path.unlink()
    out = tmp_path / "export"
    assert checkpoint_backbone(out)["self_contained"] and (out / "job.yaml").is_file()
    assert not (out / TRAIN_STATE_FILE).exists() and read_checkpoint_meta(out)[2] == {"epoch": 1}
    assert any(k.startswith("visual.") for k in stored(out))
    assert checkpoint_backbone(out)["digest"] == checkpoint_backbone(tmp_path / "ckpt")["digest"]
    assert torch.equal(logits(load_checkpoint(out)), expected)
    with pytest.raises(CheckpointError, match="weights source"):
        load_checkpoint(tmp_path / "ckpt")  # the source is gone: only the export still loads


def test_sarl_export_command(tmp_path, capsys):
    from sarl.cli import main

    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    save_checkpoint(model, tmp_path / "ckpt")
    moved = tmp_path / "moved.pt"
    path.rename(moved)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")]) == 2
    assert "sarl export" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"),
                 "--pretrained", str(moved)]) == 0
    moved.unlink()
    assert torch.equal(logits(load_checkpoint(tmp_path / "out")), logits(model))


def test_unfreeze_last_block_keeps_the_trained_block_and_its_batchnorm_statistics(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="last_block")
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model.train()
    for step in range(2):  # real steps: the last block's BatchNorm statistics move, the frozen blocks' must not
        loss = model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(step))).sigmoid().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt")
    keys = set(stored(tmp_path / "ckpt"))
    block = "visual.visual.layer4.0."
    assert {block + "bn1.weight", block + "bn1.running_mean", block + "bn1.running_var"} <= keys
    assert any(k.startswith("visual.visual.attnpool.") for k in keys)
    assert not any(k.startswith(("visual.visual.layer1.", "text.", "prompts.text.")) for k in keys)
    source_bn = torch.load(path, weights_only=True)["visual.layer4.0.bn1.running_mean"]
    assert not torch.equal(stored(tmp_path / "ckpt")[block + "bn1.running_mean"], source_bn)  # trained stats kept
    assert torch.equal(logits(load_checkpoint(tmp_path / "ckpt")), expected)


def test_load_trainable_state_into_the_same_towers_reads_no_source(tmp_path):
    path = weights_file(tmp_path)
    model = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    perturb_trainable(model)
    expected = logits(model)
    save_checkpoint(model, tmp_path / "ckpt")
    fresh = create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none")
    path.unlink()  # resuming must not read the source again
    assert not torch.equal(logits(fresh), expected)
    load_trainable_state(fresh, tmp_path / "ckpt")
    assert torch.equal(logits(fresh), expected)
    other = create_model("tiny-rn", NAMES, pretrained=str(weights_file(tmp_path, seed=9, filename="o.pt")),
                         unfreeze="none")
    with pytest.raises(CheckpointError, match="does not match"):
        load_trainable_state(other, tmp_path / "ckpt")


def test_stored_tensors_must_fit_the_model(tmp_path):
    path = weights_file(tmp_path)
    save_checkpoint(create_model("tiny-rn", NAMES, pretrained=str(path), unfreeze="none"), tmp_path / "ckpt")
    state = stored(tmp_path / "ckpt")
    torch.save({**state, "decoupling.extra": torch.zeros(1)}, tmp_path / "ckpt" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="decoupling.extra"):
        load_checkpoint(tmp_path / "ckpt")
    torch.save({k: v for k, v in state.items() if k != "prompts.ctx"}, tmp_path / "ckpt" / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: prompts\.ctx"):
        load_checkpoint(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------------ older formats
def test_format_1_checkpoints_are_read_and_unknown_formats_refused(tmp_path):
    model = create_model("tiny", NAMES)
    perturb_trainable(model)
    expected = logits(model)
    old = tmp_path / "v1"
    old.mkdir()
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "quick_gelu"}  # v1 had no such field
    (old / MODEL_FILE).write_text(json.dumps({"format_version": 1, "config": config, "extra": {"epoch": 4}}))
    (old / "vocabulary.json").write_text(json.dumps(model.vocabulary.to_dict()))
    # Format 1 as saved from a GPU: every state-dict entry its own copy, the text tower twice.
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, old / WEIGHTS_FILE)
    loaded = load_checkpoint(old)
    assert loaded.config.quick_gelu is False and torch.equal(logits(loaded), expected)
    assert read_checkpoint_meta(old)[2] == {"epoch": 4}
    (old / MODEL_FILE).write_text(json.dumps({"format_version": 99, "config": config}))
    with pytest.raises(CheckpointError, match="format 99 is not one this sarl reads"):
        load_checkpoint(old)
