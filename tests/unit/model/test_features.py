"""Feature cache: cached logits equal the full model's, keys miss on any change, entries appear atomically."""

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sarl.model import create_model, get_model_config
from sarl.model.backbone import build_clip
from sarl.model.config import ConfigError, load_config
from sarl.model.data import MultiLabelDataset, build_dataset, build_transforms, collate_skip_bad
from sarl.model.data.datasets import BadImageError
from sarl.model.experiment import ExperimentConfig, prepare_cached, prepare_data
from sarl.model.features import (
    FeatureCache,
    FeatureDataset,
    Features,
    cache_key,
    key_digest,
    view_seed,
    weights_digest,
)

NAMES = ["circle", "square", "triangle", "cross"]
# float16 rounds each feature by <= 2**-11 relative; a logit s * cos moves by about s * 2**-11 (s = 20): 1e-2.
# Measured on these models: at most 2.4e-3.
FP16_ATOL = 1e-2


def tiny(arch="tiny", head="sarl", seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model(arch, NAMES, unfreeze="none", head=head, **overrides).eval()


def shapes(split="test", n=24, train=False, augment="none", size=64, **options):
    tf = build_transforms(size, train=train, augment=augment)
    return build_dataset("synthetic", None, split, transform=tf, num_images=n, image_size=64, num_classes=4,
                         **options)


def key_for(model, ds, split="test", **kw):
    return cache_key(model, ds, split=split, kind="synthetic", options={"num_images": len(ds)}, **kw)


def cached_batch(features, ds):
    fd = FeatureDataset(features, ds.labels, ds.categories)
    inputs, targets, _ = collate_skip_bad([fd[i] for i in range(len(fd))])
    return inputs, targets


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("float16", FP16_ATOL)])
@pytest.mark.parametrize("arch,head", [("tiny", "sarl"), ("tiny", "global"), ("tiny-rn", "sarl"),
                                       ("tiny-rn", "global")])
def test_logits_from_cached_features_equal_the_full_model(tmp_path, arch, head, dtype, atol):
    model, ds = tiny(arch, head), shapes()
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        full = model(images)
    features, hit = FeatureCache(tmp_path).get_or_compute(model, ds, key_for(model, ds, dtype=dtype), batch_size=10)
    assert not hit and features.dense.dtype == np.dtype(dtype)
    inputs, targets = cached_batch(features, ds)
    assert isinstance(inputs, tuple) and inputs[0].dtype == torch.float32
    assert torch.equal(targets, torch.from_numpy(ds.labels.astype(np.float32)))
    with torch.no_grad():
        cached = model(inputs)
    torch.testing.assert_close(cached, full, atol=atol, rtol=0)


def test_second_call_hits_and_both_are_logged(tmp_path, caplog):
    model, ds = tiny(), shapes()
    key = key_for(model, ds)
    cache = FeatureCache(tmp_path)
    with caplog.at_level(logging.INFO, logger="sarl.features"):
        first, hit1 = cache.get_or_compute(model, ds, key)
        second, hit2 = cache.get_or_compute(model, ds, key)
    assert (hit1, hit2) == (False, True)
    assert np.array_equal(first.dense, second.dense) and isinstance(second.dense, np.memmap)
    digest = key_digest(key)
    messages = [r.getMessage() for r in caplog.records if r.name == "sarl.features"]
    assert messages[0].startswith(f"feature cache miss {digest[:16]}: 24 images x 1 view(s)")
    assert messages[1].startswith(f"feature cache hit (local) {digest[:16]}")
    assert "MB" in messages[1] and messages[1].endswith(" s")
    meta = json.loads((tmp_path / digest / "meta.json").read_text())
    assert meta["key"]["data"]["items"]["count"] == 24 and meta["dtype"] == "float16"
    assert meta["dense_shape"] == [1, 24, 64, 64] and meta["global_shape"] == [1, 24, 64] and meta["created"]


def test_any_change_of_a_key_input_misses(tmp_path):
    model, ds = tiny(), shapes()
    base = key_for(model, ds)
    assert key_digest(key_for(tiny(), shapes())) == key_digest(base)  # same inputs, same key
    changed_weights = tiny()
    with torch.no_grad():
        changed_weights.visual.visual.proj[0, 0] += 1e-3
    variants = {
        "image size": key_for(tiny(image_size=96), shapes(size=96)),
        "weights (seed)": key_for(tiny(seed=1), ds),
        "weights (one tensor)": key_for(changed_weights, ds),
        "backbone": key_for(tiny("tiny-rn"), ds),
        "split": key_for(model, shapes(split="train"), split="train"),
        "split name only": key_for(model, ds, split="val"),
        "items": key_for(model, ds.subset(np.arange(12))),
        "transform": key_for(model, shapes(train=True, augment="standard")),
        "normalisation": key_for(model, ds.with_transform(build_transforms(64, mean=(0.5,) * 3, std=(0.5,) * 3))),
        "categories": key_for(model, build_dataset("synthetic", None, "test", transform=ds.transform,
                                                    num_images=24, categories=NAMES[::-1])),
        "options": cache_key(model, ds, split="test", kind="synthetic", options={"num_images": 24, "seed": 1}),
        "kind": cache_key(model, ds, split="test", kind="manifest", options={"num_images": 24}),
        "root": key_for(model, ds) | {"data": {**base["data"], "root": "/elsewhere"}},
        "views": key_for(model, ds, views=2),
        "view seed": key_for(model, ds, seed=1),
        "dtype": key_for(model, ds, dtype="float32"),
    }
    digests = {name: key_digest(key) for name, key in variants.items()}
    assert key_digest(base) not in digests.values()
    assert len(set(digests.values())) == len(digests), digests
    cache = FeatureCache(tmp_path)
    assert cache.get_or_compute(model, ds, base)[1] is False
    assert cache.get_or_compute(model, ds, base)[1] is True
    assert cache.get_or_compute(tiny(seed=1), ds, variants["weights (seed)"])[1] is False


def test_weights_from_another_pretrained_file_miss(tmp_path):
    """Two weight files for one architecture (saved random CLIP state dicts, as users pass pretrained=path)."""
    digests = []
    for seed in (1, 2, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"clip-{seed}.pt"
        torch.save(build_clip(get_model_config("tiny").clip).state_dict(), path)
        digests.append(weights_digest(tiny(seed=0, pretrained=str(path)).visual))
    assert digests[0] != digests[1] and digests[1] == digests[2]


def test_fixed_augmented_views(tmp_path):
    model, ds = tiny(), shapes(split="train", n=8, train=True, augment="standard")
    key = key_for(model, ds, split="train", views=3, seed=7, dtype="float32")
    features, _ = FeatureCache(tmp_path / "a").get_or_compute(model, ds, key, batch_size=3)
    assert features.views == 3 and features.dense.shape[:2] == (3, 8)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not np.allclose(features.global_[a], features.global_[b])
    # View v of item i is the training transform under the seed (seed, v, i): reproducible anywhere.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(7, 2, 5))
        image = ds[5][0]
    with torch.no_grad():
        _, glob = model.encode_image(image[None])
    torch.testing.assert_close(torch.from_numpy(np.array(features.global_[2, 5])), glob[0], atol=1e-6, rtol=0)
    again, _ = FeatureCache(tmp_path / "b").get_or_compute(model, ds, key, batch_size=5, num_workers=0)
    assert np.array_equal(again.dense, features.dense)
    # Epoch e serves view e % 3: same epoch residue, same features.
    fd = FeatureDataset(features, ds.labels, ds.categories)
    served = {}
    for epoch in range(6):
        fd.set_epoch(epoch)
        served[epoch] = fd[4][0][1]
    assert torch.equal(served[0], served[3]) and torch.equal(served[1], served[4]) and torch.equal(served[2], served[5])
    assert not torch.equal(served[0], served[1])
    fd.set_epoch(4)
    assert torch.equal(fd.subset([4])[0][0][1], served[1])  # a shard keeps the epoch's view


def test_computing_leaves_the_global_rng_and_the_models_mode_alone(tmp_path):
    model, ds = tiny(), shapes(n=8)
    model.train()
    torch.manual_seed(123)
    FeatureCache(tmp_path).get_or_compute(model, ds, key_for(model, ds))
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))
    assert model.training and model.prompts.training


class _Failing(MultiLabelDataset):
    """Raises (error policy) or returns None (skip policy) for item 3."""

    def __init__(self, base, on_bad_image):
        super().__init__(base.image_paths, base.labels, base.categories, base.transform, on_bad_image)
        self.base = base

    def load_image(self, index):
        if index == 3:
            raise BadImageError(self.image_paths[index], "truncated")
        return self.base.load_image(index)


def test_a_failed_computation_leaves_no_entry_and_no_temporary_files(tmp_path):
    model = tiny()
    ds = _Failing(shapes(n=8), "error")
    cache = FeatureCache(tmp_path)
    key = key_for(model, ds)
    with pytest.raises(BadImageError):
        cache.get_or_compute(model, ds, key, batch_size=2)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # no entry, no temporary directory
    assert cache.load(key) is None


def test_a_partial_directory_is_not_an_entry(tmp_path):
    model, ds = tiny(), shapes(n=8)
    key = key_for(model, ds)
    partial = tmp_path / key_digest(key)
    partial.mkdir(parents=True)
    (partial / "dense.npy").write_bytes(b"half")  # e.g. an interrupted manual copy: no meta.json
    features, hit = FeatureCache(tmp_path).get_or_compute(model, ds, key)
    assert not hit and len(features) == 8 and (partial / "meta.json").is_file()


def test_concurrent_writers_publish_one_whole_entry(tmp_path):
    model, ds = tiny(), shapes(n=16)
    key = key_for(model, ds)
    results, errors = [], []

    def work():
        try:
            results.append(FeatureCache(tmp_path).get_or_compute(model, ds, key, batch_size=4))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", key_digest(key)]  # no temporary directories
    assert sorted(hit for _, hit in results) == [False, True, True]  # one writer; the others waited and hit
    for features, _ in results:
        assert np.array_equal(np.asarray(features.dense), np.asarray(results[0][0].dense))


def test_unreadable_images_skipped_by_the_dataset_are_skipped_from_the_cache(tmp_path):
    model = tiny()
    ds = _Failing(shapes(n=8), "skip")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        features, _ = FeatureCache(tmp_path).get_or_compute(model, ds, key_for(model, ds), batch_size=4)
    assert features.valid.tolist() == [True] * 3 + [False] + [True] * 4
    fd = FeatureDataset(features, ds.labels, ds.categories)
    assert fd[3] is None
    inputs, targets, skipped = collate_skip_bad([fd[i] for i in range(2, 6)])
    assert skipped == 1 and inputs[0].shape[0] == 3 and targets.shape == (3, 4)


def test_float16_can_be_served_as_is(tmp_path):
    model, ds = tiny(), shapes(n=4)
    features, _ = FeatureCache(tmp_path).get_or_compute(model, ds, key_for(model, ds))
    (dense, glob), _ = FeatureDataset(features, ds.labels, ds.categories, dtype=torch.float16)[0]
    assert dense.dtype == glob.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- configuration
SMALL = ["data.options={num_images: 40, image_size: 64, num_classes: 4}", "data.num_workers=0",
         "train.progress=false", "model.unfreeze=none", "train.eval_batch_size=16"]


def test_cache_shorthand_and_the_frozen_tower_requirement():
    assert load_config(ExperimentConfig, None, [*SMALL, "cache=true"]).cache.enabled
    cfg = load_config(ExperimentConfig, None, [*SMALL, "cache.enabled=true", "cache.views=4"])
    assert cfg.cache.views == 4 and cfg.to_dict()["cache"]["enabled"] is True
    assert not load_config(ExperimentConfig, None, SMALL).cache.enabled
    with pytest.raises(ConfigError, match="model.unfreeze=none"):
        load_config(ExperimentConfig, None, [*SMALL, "model.unfreeze=visual", "cache=true"])
    with pytest.raises(ConfigError, match="cache.dtype"):
        load_config(ExperimentConfig, None, [*SMALL, "cache.dtype=int8"])


def test_random_augmentation_without_views_disables_the_cache_with_a_message(tmp_path):
    cfg = load_config(ExperimentConfig, None, [*SMALL, "cache.enabled=true", "data.augment=standard",
                                               f"cache.root={tmp_path}"])
    splits = prepare_data(cfg)
    with pytest.warns(UserWarning, match="data.augment=none .* cache.views=K"):
        same, stats = prepare_cached(cfg, splits, tiny())
    assert same is splits and stats["enabled"] is False and "random crops" in stats["reason"]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_prepare_cached_keys_on_the_split_and_shares_train_with_validation(tmp_path):
    cfg = load_config(ExperimentConfig, None, [*SMALL, "cache.enabled=true", "data.augment=none",
                                               f"cache.root={tmp_path}", "data.val_fraction=0.25"])
    splits, model = prepare_data(cfg), tiny()
    cached, stats = prepare_cached(cfg, splits, model)
    assert stats == {"enabled": True, "hits": 0, "misses": 2, "reason": None}  # train split (train + val), test
    assert len(cached.train) == 30 and len(cached.val) == 10 and len(cached.test) == 40
    assert np.array_equal(cached.train.labels, splits.train.labels)  # the partial-label mask is kept
    assert np.array_equal(cached.val.labels, splits.val.labels)
    assert cached.train.features.path == cached.val.features.path
    images = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    inputs, _, _ = collate_skip_bad([cached.val[i] for i in range(len(cached.val))])
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), model(images), atol=FP16_ATOL, rtol=0)
    other = load_config(ExperimentConfig, None, [*SMALL, "cache.enabled=true", "data.augment=none",
                                                 f"cache.root={tmp_path}", "data.val_fraction=0.5"])
    _, again = prepare_cached(other, prepare_data(other), model, parts=("train", "val"))
    assert (again["hits"], again["misses"]) == (1, 0)  # another carve of the same split hits


def _sharded(rank, world, init, tmp, n, views):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, encoded = tiny(), []
        encode = model.encode_image
        model.encode_image = lambda images: (encoded.append(len(images)), encode(images))[1]
        ds = _Failing(shapes(n=n, train=True, augment="standard"), "skip")  # item 3 unreadable, in rank 1's block
        key = key_for(model, ds, views=views, seed=5)
        cache = FeatureCache(Path(tmp) / f"rank{rank}")  # a machine each: nothing shared on disk
        first = cache.get_or_compute(model, ds, key, batch_size=2)[1]
        second = cache.get_or_compute(model, ds, key, batch_size=2)[1]
        (Path(tmp) / f"{rank}.json").write_text(json.dumps({"hits": [first, second], "digest": key_digest(key),
                                                                 "encoded": sum(encoded)}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("n", [7, 1])  # blocks of 3 and 4 images; one image (rank 0's block is empty)
def test_ranks_compute_an_entry_together_and_each_holds_what_one_process_computes(tmp_path, n):
    import torch.multiprocessing as mp

    views = 2
    mp.start_processes(_sharded, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path), n, views), nprocs=2,
                       join=True, start_method="fork")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["hits"] for r in results] == [[False, True]] * 2  # computed once, by both, then a hit on both
    # Each rank encoded its own block only (x 2 views): 3, and 4 less the unreadable one; or 0 and 1.
    assert [r["encoded"] for r in results] == ([3 * views, 3 * views] if n == 7 else [0, views])
    model = tiny()
    ds = _Failing(shapes(n=n, train=True, augment="standard"), "skip")
    alone, _ = FeatureCache(tmp_path / "alone").get_or_compute(model, ds, key_for(model, ds, views=views, seed=5),
                                                             batch_size=3)
    for rank in range(2):
        shared = Features.open(tmp_path / f"rank{rank}" / results[rank]["digest"])
        assert np.array_equal(np.asarray(shared.valid), np.asarray(alone.valid))
        assert np.array_equal(np.asarray(shared.dense), np.asarray(alone.dense))  # bit for bit
        assert np.array_equal(np.asarray(shared.global_), np.asarray(alone.global_))
    assert not bool(np.asarray(alone.valid)[3]) if n > 3 else bool(np.asarray(alone.valid).all())
