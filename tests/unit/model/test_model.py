"""SARLModel: shapes for both tower kinds, dense features in CLIP space, freezing, heads and options."""

import pytest
import torch
import torch.nn.functional as F

from sarl.model import create_model, list_models

NAMES = ["circle", "square", "red car"]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("tiny", NAMES).eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("tiny-rn", NAMES).eval()


def test_registered_architectures():
    assert {"tiny", "tiny-rn", "rn50", "rn101", "vitb16"} <= set(list_models())


@pytest.mark.parametrize("fixture,grid", [("vit", 64), ("resnet", 4)])
def test_dense_and_global_shapes(request, fixture, grid):
    model = request.getfixturevalue(fixture)
    dense, glob = model.encode_image(torch.randn(2, 3, 64, 64))
    assert dense.shape == (2, grid, 64) and glob.shape == (2, 64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, len(NAMES))


def test_vit_dense_tokens_projected_like_the_global_token(vit):
    """Each patch token goes through ln_post and proj exactly as the class token does in CLIP's forward."""
    v = vit.visual.visual
    images = torch.randn(2, 3, 64, 64)
    dense, glob = vit.encode_image(images)
    torch.testing.assert_close(glob, v(images), atol=1e-5, rtol=1e-5)  # open_clip's own global embedding
    x = v.transformer(v._embeds(images))
    expected = v.ln_post(x[:, 1:]) @ v.proj
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_resnet_global_matches_attention_pool_and_dense_uses_value_projection(resnet):
    v = resnet.visual.visual
    images = torch.randn(2, 3, 64, 64)
    dense, glob = resnet.encode_image(images)
    torch.testing.assert_close(glob, v(images), atol=1e-5, rtol=1e-5)
    fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
    tokens = fmap.flatten(2).transpose(1, 2) + v.attnpool.positional_embedding[1:]
    torch.testing.assert_close(dense, v.attnpool.c_proj(v.attnpool.v_proj(tokens)), atol=1e-5, rtol=1e-5)


def test_positional_embeddings_interpolate_to_other_resolutions(vit, resnet):
    for model, grid in ((vit, 144), (resnet, 9)):
        dense, _ = model.encode_image(torch.randn(1, 3, 96, 96))
        assert dense.shape == (1, grid, 64)


def test_frozen_encoders_train_only_head_prompt_and_decoupling():
    model = create_model("tiny", NAMES, unfreeze="none")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in {"prompts", "head", "decoupling"} for n in trainable)
    assert "prompts.ctx" in trainable
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.split(".")[0] in {"visual", "text"})
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_unfreeze_last_block_adds_only_the_last_visual_block():
    model = create_model("tiny", NAMES, unfreeze="last_block")
    visual = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert visual and all(n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj"))
                          for n in visual)


def test_frozen_resnet_keeps_batchnorm_in_eval_mode():
    model = create_model("tiny-rn", NAMES, unfreeze="none").train()
    assert not model.visual.training and model.prompts.training


@pytest.mark.parametrize("head", ["sarl", "global", "dualcoop"])
@pytest.mark.parametrize("mode", ["class_specific", "shared", "handcrafted"])
def test_heads_and_prompt_modes(head, mode):
    model = create_model("tiny", NAMES, head=head, prompt_mode=mode)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    if mode == "handcrafted":
        assert model.prompts.ctx is None


@pytest.mark.parametrize("fusion", ["bilinear", "additive", "dot"])
def test_attention_maps_are_distributions(vit, fusion):
    model = create_model("tiny", NAMES, fusion=fusion, temperature=0.5, rank=8)
    attn = model.attention_maps(torch.randn(2, 3, 64, 64))
    assert attn.shape == (2, 3, 64)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3))


def test_sarl_score_is_scaled_cosine_of_decoupled_features(vit):
    images = torch.randn(2, 3, 64, 64)
    dense, glob = vit.encode_image(images)
    feats, _ = vit.decoupling(dense, vit.semantics)
    text, _ = vit.text_features()
    expected = vit.head.log_scale.exp() * (F.normalize(feats, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
    torch.testing.assert_close(vit(images), expected + vit.head.bias, atol=1e-5, rtol=1e-5)


def test_negative_prompts_and_global_term_change_the_score():
    torch.manual_seed(0)
    base = create_model("tiny", NAMES)
    state = base.state_dict()
    images = torch.randn(2, 3, 64, 64)
    with_global = create_model("tiny", NAMES, global_weight=0.5)
    with_global.load_state_dict(state)
    base.eval(), with_global.eval()
    _, glob = base.encode_image(images)
    text, _ = base.text_features()
    term = 0.5 * base.head.log_scale.exp() * (F.normalize(glob, dim=-1) @ F.normalize(text, dim=-1).t())
    torch.testing.assert_close(with_global(images), base(images) + term, atol=1e-5, rtol=1e-5)
    neg = create_model("tiny", NAMES, negative_prompts=True)
    assert neg.prompts.neg_ctx is not None and neg.text_features()[1].shape == text.shape


def test_text_features_cached_in_eval_and_recomputed_in_training(vit):
    vit.eval()
    first = vit.text_features()[0]
    assert vit.text_features()[0] is first
    vit.train()
    assert vit.text_features()[0] is not first
    vit.eval()


def test_truncated_text_sequence_equals_full_context():
    """Cutting the causal text transformer after the last EOT token is exact."""
    model = create_model("tiny", NAMES, prompt_mode="handcrafted").eval()
    text = model.text
    tokens = model.prompts.tokens
    emb = text.embed(tokens)
    x = text.ln_final(text.transformer(emb + text.positional_embedding, attn_mask=text.attn_mask))
    full = x[torch.arange(len(tokens)), tokens.argmax(-1)] @ text.text_projection
    torch.testing.assert_close(text(emb, tokens), full, atol=1e-5, rtol=1e-5)


def test_word_vector_semantics_need_a_source():
    with pytest.raises(ValueError, match="word_vectors"):
        create_model("tiny", NAMES, semantic_source="word")


def test_word_vectors_from_keyed_vectors(tmp_path):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=5)
    kv.add_vectors(["circle", "square", "red", "car"], torch.randn(4, 5).numpy())
    path = tmp_path / "vectors.kv"
    kv.save(str(path))
    model = create_model("tiny", NAMES, semantic_source="word", word_vectors=str(path))
    assert model.semantics.shape == (3, 5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_semantic_vectors_are_centred_and_the_mean_kept():
    torch.manual_seed(0)
    raw = create_model("tiny", NAMES, center_semantics=False)
    torch.manual_seed(0)
    centred = create_model("tiny", NAMES)
    mean = raw.semantics.mean(0)
    torch.testing.assert_close(centred.semantic_mean, mean)
    torch.testing.assert_close(centred.semantics, F.normalize(raw.semantics - mean, dim=-1))
    assert torch.count_nonzero(raw.semantic_mean) == 0
