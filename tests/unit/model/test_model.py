"""SARLModel: shapes for both tower kinds, dense features in CLIP space, freezing, heads and options."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from sarl.model import Category, Vocabulary, create_model, list_models
from sarl.model.backbone import _interpolate_grid, build_clip
from sarl.model.decoupling import SemanticDecoupling
from sarl.model.heads import ScoreHead
from sarl.model.prompts import tokenize

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


def _reference_resize(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CLIP's (n*n, D) grid is row-major (row y, column x): resize it as an image with channels D."""
    n = math.isqrt(pos.shape[0])
    image = pos.reshape(n, n, -1).permute(2, 0, 1)[None]
    out = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(size[0] * size[1], -1)


def test_positional_grid_interpolation_matches_a_reference_resize_and_keeps_its_orientation():
    n = 4
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32),
                            indexing="ij")
    grid = torch.stack([xs, ys, torch.randn(n, n, generator=torch.Generator().manual_seed(0))], dim=-1)
    pos = grid.reshape(n * n, 3)  # channel 0 varies only along x, channel 1 only along y
    out = _interpolate_grid(pos, (3, 6))
    torch.testing.assert_close(out, _reference_resize(pos, (3, 6)))
    out = out.reshape(3, 6, 3)
    x_channel, y_channel = out[..., 0], out[..., 1]
    torch.testing.assert_close(x_channel, x_channel[:1].expand(3, 6))  # the same in every row
    torch.testing.assert_close(y_channel, y_channel[:, :1].expand(3, 6))  # the same in every column
    assert x_channel[0, -1] - x_channel[0, 0] > 2 and y_channel[-1, 0] - y_channel[0, 0] > 2
    assert torch.equal(_interpolate_grid(pos, (n, n)), pos)


def test_dense_features_at_a_non_square_resolution_use_the_reference_resized_grid(vit, resnet):
    images = torch.randn(2, 3, 64, 96)  # a non-square grid: a transposed resize would not even fit
    v = resnet.visual.visual
    fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
    pos = _reference_resize(v.attnpool.positional_embedding[1:], fmap.shape[2:])
    tokens = fmap.flatten(2).transpose(1, 2) + pos
    dense, _ = resnet.encode_image(images)
    torch.testing.assert_close(dense, v.attnpool.c_proj(v.attnpool.v_proj(tokens)), atol=1e-5, rtol=1e-5)

    v = vit.visual.visual
    patches = v.conv1(images)
    pos = _reference_resize(v.positional_embedding[1:], patches.shape[2:])
    x = torch.cat([v.class_embedding.expand(2, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    x = x + torch.cat([v.positional_embedding[:1], pos])
    x = v.transformer(v.ln_pre(x))
    dense, _ = vit.encode_image(images)
    torch.testing.assert_close(dense, v.ln_post(x[:, 1:]) @ v.proj, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("init", ["linear", "unit"])
@pytest.mark.parametrize("fusion", ["bilinear", "additive", "dot"])
def test_decoupling_matches_a_loop_over_images_categories_and_locations(fusion, init):
    """h_ci = tanh((U f_i) * (V w_c)) (bilinear) or tanh(U f_i + V w_c) (additive), score p . h_ci;
    dot: (U f_i) . (V w_c) / sqrt(r); a_ci = softmax_i(score / T); f_c = sum_i a_ci f_i. With init=unit the
    scores see f_i / |f_i| and w_c / |w_c|; the pooled values stay f_i."""
    B, C, HW, D, S, r, T = 2, 3, 4, 5, 7, 6, 0.7
    torch.manual_seed(0)
    module = SemanticDecoupling(D, S, rank=r, fusion=fusion, temperature=T, init=init).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.5)  # large enough that tanh is far from linear
    feats = torch.randn(B, HW, D, dtype=torch.float64)
    sem = torch.randn(C, S, dtype=torch.float64)
    U, V = module.visual_proj.weight.tolist(), module.semantic_proj.weight.tolist()
    p = module.score.weight[0].tolist() if module.score is not None else None
    f, w = feats.tolist(), sem.tolist()
    if init == "unit":
        f = [[[x / math.sqrt(sum(y * y for y in loc)) for x in loc] for loc in img] for img in f]
        w = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in w]
    attn_ref = torch.zeros(B, C, HW, dtype=torch.float64)
    out_ref = torch.zeros(B, C, D, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            v = [sum(V[k][j] * w[c][j] for j in range(S)) for k in range(r)]
            scores = []
            for i in range(HW):
                u = [sum(U[k][j] * f[b][i][j] for j in range(D)) for k in range(r)]
                if fusion == "bilinear":
                    score = sum(p[k] * math.tanh(u[k] * v[k]) for k in range(r))
                elif fusion == "additive":
                    score = sum(p[k] * math.tanh(u[k] + v[k]) for k in range(r))
                else:
                    score = sum(u[k] * v[k] for k in range(r)) / math.sqrt(r)
                scores.append(score / T)
            top = max(scores)
            e = [math.exp(x - top) for x in scores]
            for i in range(HW):
                attn_ref[b, c, i] = e[i] / sum(e)
                out_ref[b, c] += attn_ref[b, c, i] * feats[b, i]
    out, attn = module(feats, sem)
    torch.testing.assert_close(attn, attn_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(module.attention(feats, sem), attn_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-10)
    assert (attn_ref.max(-1).values < 0.9).sum() >= B * C // 2  # mostly not one-hot: T and tanh show


def test_unit_init_scores_are_of_order_one_whatever_the_feature_scale():
    """nn.Linear's init makes the bilinear scores a product of three small factors: with features of norm about
    1 the attention starts as mean pooling (every weight within 2% of 1/HW), and how far it is from it depends on
    the tower's feature scale. ``init="unit"`` starts with scores of order 1, the same for features 100x larger."""
    D, S, r, HW = 64, 50, 32, 64
    torch.manual_seed(0)
    feats = torch.randn(8, HW, D) * 0.125  # norm about 1
    sem = torch.nn.functional.normalize(torch.randn(16, S), dim=-1)  # unit, as the model's semantics
    linear = SemanticDecoupling(D, S, rank=r)
    assert ((linear.attention(feats, sem) * HW - 1).abs() < 0.02).all()
    assert not torch.allclose(linear.attention(feats * 100, sem), linear.attention(feats, sem))
    module = SemanticDecoupling(D, S, rank=r, init="unit")
    attn = module.attention(feats, sem)
    assert attn.max(-1).values.mean() > 2 / HW
    torch.testing.assert_close(module.attention(feats * 100, sem), attn)
    with pytest.raises(ValueError, match="init 'xavier' is not one of linear, unit"):
        SemanticDecoupling(D, S, init="xavier")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().tolist(), b.double().tolist()
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _reference_logits(kind: str, s: float, text_pos, text_neg, glob, category_feat=None, dense=None, bias=None,
                      alpha: float = 0.0) -> torch.Tensor:
    """The heads written out per (image, category): SARL.md step 5 and DualCoOp's ``DualCoop.forward``."""
    B, C = glob.shape[0], text_pos.shape[0]
    out = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            if kind == "global":
                logit = s * _cos(glob[b], text_pos[c])
            elif kind == "sarl":
                logit = s * _cos(category_feat[b, c], text_pos[c])
                if text_neg is not None:
                    logit -= s * _cos(category_feat[b, c], text_neg[c])
                logit += alpha * s * _cos(glob[b], text_pos[c])
            else:  # dualcoop: 20 * cosines per region, the positive side's softmax weights both sides, times 5
                pos = [20 * _cos(dense[b, i], text_pos[c]) for i in range(dense.shape[1])]
                neg = [20 * _cos(dense[b, i], text_neg[c]) for i in range(dense.shape[1])]
                e = [math.exp(x - max(pos)) for x in pos]
                w = [x / sum(e) for x in e]
                logit = 5 * sum(wi * (p - n) for wi, p, n in zip(w, pos, neg))
            out[b, c] = logit + (0.0 if bias is None else float(bias[c].detach()))
    return out


def _head_inputs(seed: int = 0, B: int = 2, C: int = 3, N: int = 5, D: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"text_pos": torch.randn(C, D, generator=g), "text_neg": torch.randn(C, D, generator=g),
            "global_feat": torch.randn(B, D, generator=g), "category_feat": torch.randn(B, C, D, generator=g),
            "dense": torch.randn(B, N, D, generator=g)}


def test_heads_match_their_reference_formulas():
    x = _head_inputs()
    bias = torch.tensor([-1.0, 0.5, 2.0])
    ref = {k: x[k] for k in ("text_pos", "text_neg", "category_feat", "dense")}
    for kind, neg, alpha in (("global", False, 0.0), ("sarl", False, 0.0), ("sarl", True, 0.0), ("sarl", False, 0.3),
                             ("sarl", True, 0.3)):
        head = ScoreHead(kind, 3, logit_scale=7.0, global_weight=alpha)
        with torch.no_grad():
            head.bias.copy_(bias)
        text_neg = x["text_neg"] if neg else None
        logits = head(x["text_pos"], text_neg, x["global_feat"], category_feat=x["category_feat"])
        expected = _reference_logits(kind, 7.0, ref["text_pos"], text_neg, x["global_feat"], ref["category_feat"],
                                     bias=bias, alpha=alpha)
        torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)

    head = ScoreHead("dualcoop", 3)  # DualCoOp: fixed scale 20, factor 5, no bias: nothing to learn
    assert list(head.parameters()) == [] and head.bias is None
    logits = head(x["text_pos"], x["text_neg"], x["global_feat"], dense=x["dense"])
    expected = _reference_logits("dualcoop", 20.0, x["text_pos"], x["text_neg"], x["global_feat"], dense=x["dense"])
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-5)
    # DualCoOp trains a softmax over its (negative, positive) aggregated logits: the probability is our sigmoid.
    cos_pos = F.normalize(x["dense"], dim=-1) @ F.normalize(x["text_pos"], dim=-1).t()
    cos_neg = F.normalize(x["dense"], dim=-1) @ F.normalize(x["text_neg"], dim=-1).t()
    w = torch.softmax(20 * cos_pos, dim=1)
    two_way = torch.stack([5 * (w * 20 * cos_neg).sum(1), 5 * (w * 20 * cos_pos).sum(1)], dim=1)
    torch.testing.assert_close(torch.softmax(two_way, dim=1)[:, 1], logits.sigmoid(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sarl", "global", "dualcoop"])
def test_head_cosines_are_float32_under_bf16_autocast(kind):
    x = _head_inputs(seed=1)
    head = ScoreHead(kind, 3, global_weight=0.5 if kind == "sarl" else 0.0)
    reference = head(**x)
    as_bf16 = {k: v.bfloat16() for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(**x)
        from_bf16 = head(**as_bf16)
    assert logits.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)  # bf16 matmuls would be off by ~1e-1
    torch.testing.assert_close(from_bf16, head(**{k: v.float() for k, v in as_bf16.items()}), atol=1e-5, rtol=1e-5)


def test_model_logits_are_float32_under_bf16_autocast(vit):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert vit(torch.randn(2, 3, 64, 64)).dtype == torch.float32


def _dualcoop_model(arch: str):
    torch.manual_seed(0)
    model = create_model(arch, NAMES, head="dualcoop").eval()
    with torch.no_grad():  # "a photo of a" initialises both prompts alike (cos+ = cos-): make them differ
        model.prompts.neg_ctx.add_(torch.randn_like(model.prompts.neg_ctx))
    return model


@pytest.mark.parametrize("arch", ["tiny", "tiny-rn"])
def test_dualcoop_model_adds_the_mean_token_and_scores_like_dualcoop(arch):
    model = _dualcoop_model(arch)
    images = torch.randn(2, 3, 64, 64)
    dense, glob = model.encode_image(images)
    v = model.visual.visual
    if arch == "tiny-rn":
        fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images))))).flatten(2).transpose(1, 2)  # (B, HW, C)
        pool = v.attnpool
        tokens = torch.cat([fmap.mean(dim=1, keepdim=True), fmap], dim=1) + pool.positional_embedding
        torch.testing.assert_close(dense, pool.c_proj(pool.v_proj(tokens)), atol=1e-5, rtol=1e-5)
        assert dense.shape == (2, 1 + 4, 64)
    else:
        assert dense.shape == (2, 1 + 64, 64)
        torch.testing.assert_close(dense[:, 0], glob)  # ViT: the projected class token
    text_pos, text_neg = model.text_features()
    expected = _reference_logits("dualcoop", 20.0, text_pos, text_neg, glob, dense=dense)
    torch.testing.assert_close(model(images).double(), expected, atol=1e-4, rtol=1e-5)
    assert not any(n.startswith("head.") for n, _ in model.named_parameters())


def test_dualcoop_serving_uses_zero_bias_and_the_feature_cache_key_sees_the_mean_token():
    from sarl.model.data import build_dataset, build_transforms
    from sarl.model.features import cache_key
    from sarl.model.serving import bind_vocabulary

    model = _dualcoop_model("tiny")
    images = torch.randn(2, 3, 64, 64)
    bound = bind_vocabulary(model, model.vocabulary)
    torch.testing.assert_close(bound.score(model, images), model(images).sigmoid(), atol=1e-6, rtol=1e-5)
    zero_shot = bind_vocabulary(model, Vocabulary([Category("circle"), Category("star")], version="2"))
    assert torch.equal(zero_shot.bias, torch.zeros(2))
    torch.testing.assert_close(zero_shot.score(model, images)[:, 0], model(images).sigmoid()[:, 0])

    torch.manual_seed(0)
    other = create_model("tiny", NAMES, head="global")  # the same visual tower, without the mean token
    ds = build_dataset("synthetic", None, "test", transform=build_transforms(64), num_images=4, image_size=64,
                       num_classes=3)
    with_token, without = (cache_key(m, ds, split="test", kind="synthetic") for m in (model, other))
    assert with_token["weights"] == without["weights"] and with_token != without
    assert with_token["mean_token"] is True and "mean_token" not in without


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


def test_negative_prompts_score_is_the_scaled_cosine_difference():
    """s * (cos(f_c, t_c+) - cos(f_c, t_c-)) + alpha * s * cos(g, t_c+) + b_c, checked per (image, category)."""
    torch.manual_seed(0)
    model = create_model("tiny", NAMES, negative_prompts=True, global_weight=0.5).eval()
    with torch.no_grad():
        model.prompts.neg_ctx.add_(torch.randn_like(model.prompts.neg_ctx))
        model.head.log_scale.fill_(math.log(7.0))
        model.head.bias.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    images = torch.randn(2, 3, 64, 64)
    dense, glob = model.encode_image(images)
    feats, _ = model.decoupling(dense, model.semantics)
    text_pos, text_neg = model.text_features()
    assert not torch.allclose(text_pos, text_neg)
    expected = _reference_logits("sarl", 7.0, text_pos, text_neg, glob, feats, bias=model.head.bias, alpha=0.5)
    torch.testing.assert_close(model(images).double(), expected, atol=1e-5, rtol=1e-5)


def _clip_sharing_the_text_tower(model):
    """An open_clip ``CLIP`` whose text tower is the model's own modules."""
    clip = build_clip(model.config.clip)
    for name in ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection"):
        setattr(clip, name, getattr(model.text, name))
    return clip.eval()


@pytest.mark.parametrize("mode", ["class_specific", "shared"])
def test_context_initialised_from_its_words_equals_clip_encode_text(mode):
    """With M = the number of words of ctx_init, t_c is CLIP's text feature of "a photo of a {name}."."""
    torch.manual_seed(0)
    model = create_model("tiny", NAMES, prompt_mode=mode, n_ctx=4, ctx_init="a photo of a").eval()
    clip = _clip_sharing_the_text_tower(model)
    with torch.no_grad():
        expected = clip.encode_text(open_clip.tokenize([f"a photo of a {n}." for n in NAMES]))
        features = model.prompts()[0]
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["class_specific", "shared"])
def test_context_vectors_are_spliced_at_positions_1_to_m(mode):
    torch.manual_seed(0)
    M = 6
    model = create_model("tiny", NAMES, prompt_mode=mode, n_ctx=M, ctx_init=None)
    seen = {}
    hook = model.text.register_forward_pre_hook(lambda module, args: seen.update(emb=args[0], tokens=args[1]))
    with torch.no_grad():
        model.prompts()
    hook.remove()
    emb, tokens = seen["emb"], seen["tokens"]
    ctx = model.prompts.ctx if mode == "class_specific" else model.prompts.ctx.expand(len(NAMES), -1, -1)
    assert torch.equal(emb[:, 1:1 + M], ctx)
    plain = model.text.token_embedding(tokens)
    assert torch.equal(emb[:, :1], plain[:, :1]) and torch.equal(emb[:, 1 + M:], plain[:, 1 + M:])
    sot = tokenize([""])[0, 0]
    for c, name in enumerate(NAMES):
        words = tokenize([f"{name}."])[0]  # [SOT] name . [EOT] 0 ...
        end = int(words.argmax()) + 1
        assert tokens[c, 0] == sot and torch.equal(tokens[c, 1 + M:M + end], words[1:end])


def test_default_context_init_and_the_negative_context_initialised_alike():
    """M = 16 with "a photo of a": 12 N(0, 0.02) vectors, then the phrase; the negative context the same way."""
    torch.manual_seed(0)
    model = create_model("tiny", NAMES, n_ctx=16, negative_prompts=True)
    phrase = model.text.embed(tokenize(["a photo of a"]))[0, 1:5]
    ctx, neg = model.prompts.ctx, model.prompts.neg_ctx
    for context in (ctx, neg):
        assert torch.equal(context[:, 12:], phrase.expand(len(NAMES), 4, -1))
        assert 0.015 < float(context[:, :12].detach().std()) < 0.025
    assert not torch.equal(ctx[:, :12], neg[:, :12])  # their own random draws


def test_handcrafted_prompts_train_the_text_tower_when_it_is_unfrozen():
    images = torch.randn(2, 3, 64, 64)
    model = create_model("tiny", NAMES, prompt_mode="handcrafted", unfreeze="all").train()
    first = model.text_features()[0]
    assert first.requires_grad and model.text_features()[0] is not first  # not cached while it trains
    model(images).sum().backward()
    assert all(p.grad is not None for p in model.text.parameters())

    frozen = create_model("tiny", NAMES, prompt_mode="handcrafted", unfreeze="visual").train()
    feats = frozen.text_features()[0]
    assert not feats.requires_grad and feats.grad_fn is None
    assert frozen.text_features()[0] is frozen.text_features()[0]  # cached: nothing in it trains
    assert frozen.prompts()[0].grad_fn is None
    frozen(images).sum().backward()
    assert all(p.grad is None for p in frozen.text.parameters())


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
