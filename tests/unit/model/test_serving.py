"""Serving under another vocabulary: exact with the trained one, renames keep rows, zero-shot built like training."""

import pytest
import torch
import torch.nn.functional as F
from gensim.models import KeyedVectors

from sarl.model import Category, Vocabulary, create_model, get_model_config
from sarl.model.checkpoint import save_checkpoint
from sarl.model.prompts import tokenize
from sarl.model.serving import bind_vocabulary, match_trained, vocabulary_problems

NAMES = ["circle", "square", "red car"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("tiny", Vocabulary([Category("circle"), Category("square", aliases=["box"]),
                                         Category("red car")], version="1"))
    with torch.no_grad():  # non-trivial biases, so that taking the wrong row would show
        m.head.bias.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    kv = KeyedVectors(vector_size=6)
    kv.add_vectors(["circle", "square", "red", "car", "star"], torch.randn(5, 6).numpy())
    torch.manual_seed(0)
    m = create_model("tiny", NAMES, semantic_source="word", word_vectors=kv).eval()
    directory = save_checkpoint(m, tmp_path_factory.mktemp("ckpt"))
    return m, kv, directory


@pytest.mark.parametrize("head", ["sarl", "global", "dualcoop"])
def test_trained_vocabulary_scores_equal_the_model(head, images):
    torch.manual_seed(0)
    m = create_model("tiny", NAMES, head=head, negative_prompts=head == "sarl").eval()
    with torch.no_grad():  # as after training: the contexts differ (at initialisation they may coincide)
        for ctx in (m.prompts.ctx, m.prompts.neg_ctx):
            if ctx is not None:
                ctx.add_(0.05 * torch.randn_like(ctx))
    m.load_state_dict(m.state_dict())  # drops the cached text features
    probs = m(images).sigmoid()
    assert probs.std() > 1e-3  # scores that differ between images and categories, or the check proves nothing
    bound = bind_vocabulary(m, m.vocabulary)
    torch.testing.assert_close(bound.score(m, images), probs, atol=1e-6, rtol=1e-5)
    assert bound.zero_shot == [False, False, False]


def test_renamed_reordered_and_disabled_categories_keep_their_trained_rows(model, images):
    served = Vocabulary([
        Category("automobile", aliases=["red car"], threshold=0.3),  # renamed through an alias
        Category("BOX"),  # matched through the trained alias, case-insensitive
        Category("circle", enabled=False),
    ], version="2")
    bound = bind_vocabulary(model, served)
    assert bound.trained_index == (2, 1, 0) and bound.version == "2"
    torch.testing.assert_close(bound.score(model, images), model(images).sigmoid()[:, [2, 1, 0]])


def test_zero_shot_category_uses_its_prompt_and_centred_clip_semantics(model, images):
    served = Vocabulary([Category("circle"), Category("star", prompt="a drawing of a {name}.")], version="3")
    bound = bind_vocabulary(model, served)
    assert bound.zero_shot == [False, True]
    text = model.text.encode_texts(["a drawing of a star."])[0]
    torch.testing.assert_close(bound.text_pos[1], text)
    torch.testing.assert_close(bound.semantics[1], F.normalize(F.normalize(text, dim=0) - model.semantic_mean, dim=0))
    torch.testing.assert_close(bound.bias[1], model.head.bias.mean())
    scores = bound.score(model, images)
    assert scores.shape == (4, 2) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:, 0], model(images).sigmoid()[:, 0])  # the trained row is unchanged


def test_two_served_categories_on_one_trained_row_are_refused(model):
    served = Vocabulary([Category("square"), Category("box")], version="x")  # "box" is square's trained alias
    with pytest.raises(ValueError, match="both match the trained category 'square'"):
        bind_vocabulary(model, served)
    rows, problems = match_trained(Vocabulary([Category("thing", aliases=["circle", "square"])]), model.vocabulary)
    assert rows == [0] and "matches several trained categories" in problems[0]


def test_word_vector_model_zero_shot(word_model, images):
    m, kv, _ = word_model
    bound = bind_vocabulary(m, Vocabulary([*m.vocabulary.categories, Category("star")], version="2"), kv)
    expected = F.normalize(F.normalize(torch.from_numpy(kv["star"].copy()), dim=0) - m.semantic_mean, dim=0)
    torch.testing.assert_close(bound.semantics[3], expected)
    torch.testing.assert_close(bound.score(m, images)[:, :3], m(images).sigmoid())
    with pytest.raises(ValueError, match="need word vectors"):
        bind_vocabulary(m, Vocabulary([Category("star")]))


def test_a_model_trained_on_built_in_vectors_embeds_new_names_with_them(tmp_path, images):
    """No vectors given: a model whose ``word_vectors`` is built in (the same on every machine) uses its own;
    a model trained on a file still needs them given (test_word_vector_model_zero_shot)."""
    from sarl.model.vocabulary import load_word_vectors

    torch.manual_seed(0)
    config = get_model_config("tiny", semantic_source="word", word_vectors="glove-6b-50d")
    m = create_model(config, ["circle", "square", "triangle"]).eval()
    glove = load_word_vectors("glove-6b-50d")
    bound = bind_vocabulary(m, Vocabulary([*m.vocabulary.categories, Category("heart")], version="2"))
    expected = F.normalize(F.normalize(torch.from_numpy(glove["heart"].copy()), dim=0) - m.semantic_mean, dim=0)
    torch.testing.assert_close(bound.semantics[3], expected)
    save_checkpoint(m, tmp_path / "ckpt")
    assert vocabulary_problems(Vocabulary([Category("heart")]), tmp_path / "ckpt") == []
    problems = vocabulary_problems(Vocabulary([Category("heart"), Category("zqxwv")]), tmp_path / "ckpt")
    assert problems == ["'zqxwv': words not in the word vectors: zqxwv"]


def test_vocabulary_problems_against_a_checkpoint(word_model):
    _, kv, directory = word_model
    ok = Vocabulary([Category("circle"), Category("star"), Category("moon", vector=[0.1] * 6)])
    assert vocabulary_problems(ok, directory, kv) == []
    bad = Vocabulary([Category("circle"), Category("blue star"), Category("moon", vector=[0.1] * 4),
                      Category("ring", aliases=["red car", "square"])])
    problems = "\n".join(vocabulary_problems(bad, directory, kv))
    assert "'blue star': words not in the word vectors: blue" in problems
    assert "'moon': vector has 4 dimensions; the model's semantic vectors have 6" in problems
    assert "'ring' matches several trained categories ('square', 'red car')" in problems
    assert "give the word vector file" in "\n".join(vocabulary_problems(Vocabulary([Category("star")]), directory))


def _clip_like(m, weight: float = 0.5):
    """Make the towers' outputs share one direction, as CLIP's do: every image-text cosine is then about 0.2."""
    gen = torch.Generator().manual_seed(5)
    direction = F.normalize(torch.randn(m.text.text_projection.shape[-1], generator=gen), dim=0)
    text_forward, visual_forward = m.text.forward, m.visual.forward
    m.text.forward = lambda emb, tokens: F.normalize(text_forward(emb, tokens), dim=-1) + weight * direction
    m.visual.forward = lambda images: tuple(F.normalize(f, dim=-1) + weight * direction for f in visual_forward(images))
    m.load_state_dict(m.state_dict())  # drops the cached text features
    return m


@pytest.mark.parametrize("head", ["dualcoop", "sarl"])
def test_zero_shot_category_with_negative_prompts_is_not_scored_present_everywhere(head, images):
    torch.manual_seed(0)
    m = _clip_like(create_model("tiny", NAMES, head=head, negative_prompts=True).eval())
    pos, _ = m.text_features()
    dense, _ = m.encode_image(images)
    cos = F.normalize(dense, dim=-1) @ F.normalize(pos, dim=-1).t()
    assert 0.1 < cos.mean() < 0.35  # the premise: CLIP-like cosines, so s * cos+ alone is about +4 per region
    bound = bind_vocabulary(m, Vocabulary([*m.vocabulary.categories, Category("star")], version="2"))
    assert bound.zero_shot == [False, False, False, True]
    # Its negative side is the learnt negative context (the mean of the class-specific ones) before its name.
    ctx = m.prompts.neg_ctx.mean(dim=0)
    star = bind_vocabulary(m, Vocabulary([Category("star")], version="s")).text_neg[0]
    tokens = tokenize(["X " * m.prompts.n_ctx + "star."], m.text.context_length)
    emb = m.text.embed(tokens)
    emb = torch.cat([emb[:, :1], ctx[None], emb[:, 1 + m.prompts.n_ctx:]], dim=1)
    torch.testing.assert_close(star, m.text.forward(emb, tokens)[0])
    torch.testing.assert_close(bound.text_neg[3], star)
    p = bound.score(m, images)[:, 3]
    assert p.max() < 0.9  # without a negative side: 100 x cos+ (dualcoop) or 20 x cos+ (sarl), p ~ 1 everywhere
