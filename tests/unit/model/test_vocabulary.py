"""Tests for sarl.model.vocabulary: vocabulary files, validation, word vectors, semantic vectors."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from gensim.models import KeyedVectors

from sarl.model.vocabulary import (
    Category,
    MissingWordsError,
    Vocabulary,
    VocabularyError,
    load_word_vectors,
    semantic_vectors,
)

DIM = 6
WORDS = ["person", "human", "traffic", "light", "stoplight", "dog", "puppy", "hot_dog", "potted", "plant", "cat"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kv() -> KeyedVectors:
    """Small word vectors whose values are multiples of 1/4, so every text format stores them exactly."""
    rng = np.random.default_rng(0)
    vectors = (rng.integers(-8, 9, size=(len(WORDS), DIM)) / 4).astype(np.float32)
    out = KeyedVectors(vector_size=DIM)
    out.add_vectors(WORDS, vectors)
    return out


def _write_glove(kv: KeyedVectors, path: Path) -> None:
    # GloVe files are word2vec text without the "N D" header; written by hand as Stanford ships them.
    with open(path, "w", encoding="utf-8") as f:
        for word in kv.index_to_key:
            f.write(word + " " + " ".join(str(float(x)) for x in kv[word]) + "\n")


@pytest.fixture(scope="module")
def vector_files(kv: KeyedVectors, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same vectors in every supported format; text formats share the .txt extension on purpose."""
    root = tmp_path_factory.mktemp("vectors")
    files = {
        "word2vec": root / "w2v.txt",
        "word2vec_binary": root / "w2v.bin",
        "glove": root / "glove.txt",
        "native": root / "vectors.kv",
    }
    kv.save_word2vec_format(str(files["word2vec"]), binary=False)
    kv.save_word2vec_format(str(files["word2vec_binary"]), binary=True)
    _write_glove(kv, files["glove"])
    kv.save(str(files["native"]))
    return files


def _fake_text_encoder(texts: list[str]) -> torch.Tensor:
    """Deterministic stand-in for CLIP's text encoder: 8-d vectors from a hash of each text."""
    rows = [torch.tensor(list(hashlib.sha256(t.encode()).digest()[:8]), dtype=torch.float32) - 127.5 for t in texts]
    return torch.stack(rows)


def _v(kv: KeyedVectors, word: str) -> torch.Tensor:
    return torch.from_numpy(kv[word].copy())


# ------------------------------------------------------------------------- word vectors
@pytest.mark.parametrize("fmt", ["word2vec", "word2vec_binary", "glove", "native"])
@pytest.mark.parametrize("detect", [False, True], ids=["explicit", "auto"])
def test_every_format_loads_the_same_vectors(kv, vector_files, fmt, detect):
    loaded = load_word_vectors(vector_files[fmt], format="auto" if detect else fmt)
    assert isinstance(loaded, KeyedVectors)
    assert loaded.index_to_key == kv.index_to_key
    assert loaded.vector_size == DIM
    np.testing.assert_array_equal(loaded.vectors, kv.vectors)


def test_auto_detection_tells_word2vec_text_from_glove_text(vector_files):
    # Both are .txt: only the header line tells them apart. Read as the wrong format, a GloVe
    # file would lose a row (taken as header) or a word2vec file would gain a bogus "N" word.
    w2v = load_word_vectors(vector_files["word2vec"])
    glove = load_word_vectors(vector_files["glove"])
    assert len(w2v) == len(glove) == len(WORDS)
    assert str(len(WORDS)) not in w2v.key_to_index


def test_gzipped_text_is_detected_through_the_gz_suffix(kv, vector_files, tmp_path):
    import gzip

    gz = tmp_path / "glove.txt.gz"
    gz.write_bytes(gzip.compress(vector_files["glove"].read_bytes()))
    np.testing.assert_array_equal(load_word_vectors(gz).vectors, kv.vectors)


def test_native_word2vec_model_gives_its_keyed_vectors(tmp_path):
    from gensim.models import Word2Vec

    model = Word2Vec(sentences=[["a", "b", "c"]] * 5, vector_size=4, min_count=1, seed=0, workers=1)
    model.save(str(tmp_path / "w2v.model"))
    loaded = load_word_vectors(tmp_path / "w2v.model")
    assert isinstance(loaded, KeyedVectors)
    np.testing.assert_array_equal(loaded["a"], model.wv["a"])


def test_pickled_formats_can_be_refused(vector_files):
    from sarl.model.vocabulary import unpickles

    assert unpickles("s3://b/glove.840B.300d.kv") and unpickles("x.model") and unpickles("x.kv.gz")
    assert unpickles("x.txt", format="native") and not unpickles("x.kv", format="word2vec_binary")
    assert not any(unpickles(p) for p in ("w.bin", "glove.txt", "glove.txt.gz", "vectors"))
    with pytest.raises(ValueError, match="pickle.*save_word2vec_format"):
        load_word_vectors(vector_files["native"], allow_pickle=False)
    for fmt in ("word2vec", "word2vec_binary", "glove"):  # plain numbers: never refused
        assert len(load_word_vectors(vector_files[fmt], allow_pickle=False)) == len(WORDS)


def test_missing_file_and_unknown_format(tmp_path, vector_files):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_word_vectors(missing)
    with pytest.raises(ValueError, match="fasttext"):
        load_word_vectors(vector_files["glove"], format="fasttext")


# --------------------------------------------------------------------- semantic vectors
def test_multi_word_names_and_aliases_are_averaged_then_normalised(kv):
    vocab = Vocabulary([Category("traffic light", aliases=["stoplight", "Traffic-Light"]), Category("Person")])
    got = semantic_vectors(vocab, kv)

    phrase = (_v(kv, "traffic") + _v(kv, "light")) / 2  # "traffic light" and "Traffic-Light" alike
    expected_0 = F.normalize((phrase + _v(kv, "stoplight") + phrase) / 3, dim=0)
    expected_1 = F.normalize(_v(kv, "person"), dim=0)  # case-insensitive fallback
    assert got.dtype == torch.float32 and got.shape == (2, DIM)
    torch.testing.assert_close(got[0], expected_0)
    torch.testing.assert_close(got[1], expected_1)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_whole_phrase_token_is_preferred_to_averaging_its_words(kv):
    got = semantic_vectors(Vocabulary([Category("hot dog")]), kv)
    torch.testing.assert_close(got[0], F.normalize(_v(kv, "hot_dog"), dim=0))


def test_words_override_and_explicit_vector(kv):
    vocab = Vocabulary(
        [
            Category("pottedplant", aliases=["houseplant"], words="potted plant"),  # alias not looked up
            Category("thing", vector=[3.0, 0, 0, 4.0, 0, 0]),
        ]
    )
    got = semantic_vectors(vocab, kv)
    torch.testing.assert_close(got[0], F.normalize((_v(kv, "potted") + _v(kv, "plant")) / 2, dim=0))
    torch.testing.assert_close(got[1], torch.tensor([0.6, 0, 0, 0.8, 0, 0]))


def test_missing_words_error_lists_every_word_and_its_category(kv):
    vocab = Vocabulary(
        [
            Category("person", aliases=["human"]),
            Category("zebra crossing", aliases=["crosswalk"]),
            Category("dog", aliases=["doggo"]),
            Category("snowmobile", enabled=False),  # disabled categories still have a row
        ]
    )
    with pytest.raises(MissingWordsError) as info:
        semantic_vectors(vocab, kv)
    assert info.value.missing == {
        "zebra crossing": ["zebra", "crossing", "crosswalk"],
        "dog": ["doggo"],
        "snowmobile": ["snowmobile"],
    }
    message = str(info.value)
    for word in ("zebra", "crossing", "crosswalk", "doggo", "snowmobile", "'dog'"):
        assert word in message
    assert "person" not in message


def test_clip_fallback_uses_the_text_encoder_for_all_categories_and_warns(kv):
    vocab = Vocabulary([Category("person"), Category("zebra", prompt="a blurry photo of a {name}.")])
    with pytest.warns(UserWarning, match="zebra"):
        got = semantic_vectors(vocab, kv, text_encoder=_fake_text_encoder, fallback="clip")
    expected = F.normalize(_fake_text_encoder(["a photo of a person.", "a blurry photo of a zebra."]), dim=1)
    torch.testing.assert_close(got, expected)


def test_clip_fallback_is_silent_when_no_word_is_missing(kv):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = semantic_vectors(Vocabulary([Category("dog")]), kv, text_encoder=_fake_text_encoder, fallback="clip")
    torch.testing.assert_close(got[0], F.normalize(_v(kv, "dog"), dim=0))


def test_clip_fallback_without_text_encoder_still_raises(kv):
    with pytest.raises(MissingWordsError, match="no text_encoder"):
        semantic_vectors(Vocabulary([Category("zebra")]), kv, fallback="clip")


def test_clip_source_needs_no_word_vectors():
    vocab = Vocabulary.from_names(["cat", "traffic light"])
    got = semantic_vectors(vocab, None, text_encoder=_fake_text_encoder, source="clip")
    expected = F.normalize(_fake_text_encoder(["a photo of a cat.", "a photo of a traffic light."]), dim=1)
    torch.testing.assert_close(got, expected)


def test_bad_arguments_and_dimension_mismatch(kv):
    vocab = Vocabulary([Category("dog"), Category("thing", vector=[1.0, 2.0])])
    with pytest.raises(ValueError, match="different dimensions"):
        semantic_vectors(vocab, kv)
    with pytest.raises(ValueError, match="source"):
        semantic_vectors(vocab, kv, source="glove")
    with pytest.raises(ValueError, match="fallback"):
        semantic_vectors(vocab, kv, fallback="zero")
    with pytest.raises(ValueError, match="word_vectors"):
        semantic_vectors(vocab, None)
    with pytest.raises(ValueError, match="text_encoder"):
        semantic_vectors(vocab, None, source="clip")


# --------------------------------------------------------------------------- validation
def test_validation_lists_all_problems_at_once():
    data = {
        "version": "3",
        "categories": [
            {"name": "person", "aliases": ["human"]},
            {"name": "Human", "threshold": 1.5},
            {"name": "dog", "colour": "brown"},
            {"name": "  "},
        ],
    }
    with pytest.raises(VocabularyError) as info:
        Vocabulary.from_dict(data)
    problems = info.value.problems
    assert len(problems) == 4, problems
    message = str(info.value)
    assert "'human' is used by more than one category" in message
    assert "alias of categories[0] ('person')" in message and "name of categories[1] ('Human')" in message
    assert "threshold 1.5 is outside [0, 1]" in message
    assert "unknown key 'colour'" in message
    assert "name must be a non-empty string" in message
    assert isinstance(info.value, ValueError)


def test_validation_of_types_vectors_and_empty_vocabulary():
    with pytest.raises(VocabularyError, match="different dimensions"):
        Vocabulary([Category("a", vector=[1.0, 0.0]), Category("b", vector=[1.0, 0.0, 0.0])])
    with pytest.raises(VocabularyError, match="finite"):
        Vocabulary([Category("a", vector=[float("nan")])])
    with pytest.raises(VocabularyError, match="enabled must be true or false"):
        Vocabulary.from_dict({"categories": [{"name": "a", "enabled": "yes"}]})
    with pytest.raises(VocabularyError, match="aliases must be a list"):
        Vocabulary.from_dict({"categories": [{"name": "a", "aliases": "b"}]})
    with pytest.raises(VocabularyError, match="no categories"):
        Vocabulary.from_names([])
    with pytest.raises(VocabularyError, match="unknown key 'labels'"):
        Vocabulary.from_dict({"version": "1", "labels": [], "categories": ["a"]})


def test_constructor_validates_and_own_alias_repeats_are_harmless():
    with pytest.raises(VocabularyError, match="'cat'"):
        Vocabulary([Category("cat"), Category("CAT ")])
    Vocabulary([Category("cat", aliases=["Cat", "kitty"])])  # repeats inside one category are fine


# ------------------------------------------------------------------------ files, lookups
def _sample() -> Vocabulary:
    return Vocabulary(
        [
            Category("person", aliases=["human"], threshold=0.6),
            Category("traffic light", enabled=False),
            Category("zebra", prompt="a photo of a {name}, a striped animal.", words="zebra", vector=[0.5, -1.0]),
        ],
        version="3",
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    vocab = _sample()
    path = tmp_path / f"vocab{suffix}"
    vocab.save(path)
    parsed = json.loads(path.read_text()) if suffix == ".json" else yaml.safe_load(path.read_text())
    assert parsed["version"] == "3" and parsed["categories"][0]["aliases"] == ["human"]
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.fingerprint() == vocab.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_hand_written_yaml_with_shorthand(tmp_path):
    path = tmp_path / "vocab.yaml"
    path.write_text("version: 7\ncategories:\n  - person\n  - name: dog\n    aliases: [puppy]\n    threshold: 1\n")
    vocab = Vocabulary.load(path)
    assert vocab.version == "7"
    assert vocab.names == ["person", "dog"]
    assert vocab.index("Puppy") == 1


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        Vocabulary.load(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        Vocabulary.load(tmp_path / "vocab.txt")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1", "categories": [')
    with pytest.raises(VocabularyError, match="bad.json"):
        Vocabulary.load(bad)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("categories:\n  - name: a\n    threshold: -0.1\n")
    with pytest.raises(VocabularyError, match=r"invalid.yaml.*\n.*threshold -0.1"):
        Vocabulary.load(invalid)


def test_index_properties_and_fingerprint():
    vocab = _sample()
    assert vocab.names == ["person", "traffic light", "zebra"]
    assert vocab.index("HUMAN") == 0 and vocab.index(" Traffic Light ") == 1
    assert vocab.category("human").name == "person"
    with pytest.raises(KeyError, match="did you mean 'person'"):
        vocab.index("persn")
    assert vocab.enabled_mask.tolist() == [True, False, True] and vocab.enabled_mask.dtype == torch.bool
    assert vocab.thresholds.dtype == torch.float32
    torch.testing.assert_close(vocab.thresholds, torch.tensor([0.6, 0.5, 0.5]))
    assert len(vocab) == 3 and [c.name for c in vocab] == vocab.names

    fp = vocab.fingerprint()
    assert len(fp) == 64 and fp == _sample().fingerprint()
    changed = _sample()
    changed.categories[0].threshold = 0.7
    assert changed != vocab and changed.fingerprint() != fp


def test_broken_entries_keep_their_file_positions_in_messages():
    data = {"version": 1.10, "categories": [42, {"aliases": ["x"]}, {"name": "c", "threshold": True}]}
    with pytest.raises(VocabularyError) as info:
        Vocabulary.from_dict(data)
    message = str(info.value)
    assert "categories[0] must be a category (a mapping or a name), got int" in message
    assert "categories[1] (None): name must be a non-empty string" in message
    assert "categories[2] ('c'): threshold must be a number" in message
    assert "version 1.1 is a number; quote it" in message
