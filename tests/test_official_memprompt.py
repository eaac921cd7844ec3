"""Oracle for memprompt.py: MemPrompt's official forward, ported here from reading zhao-yh20/MemPrompt @ 342739e
(src/modules/memory_prompt_module.py: PromptMemory.forward, MemPromptTransformer.__init__ and .infer;
src/modules/vision_transformer_prompts.py: Block.forward / Attention.forward without prompts), in this file's own
words: the official per-layer bookkeeping of prompt lengths and slices, the max-pooled queries over the whole
fixed-length slices, the per-sample shared-prompt choice, the three insertion cases, a plain loop over the tiny-vilt
layers' weights in timm form, pooling of the text [CLS]; run with the project's weights and compared with
memprompt.MemPrompt on logits, loss and every gradient (fp32, eval mode, dropout off).

Intended differences, not compared here (each is in memprompt.py's header or owned by common.py):
    - The embeddings are HF ViltEmbeddings' (bb.embed), shared by both sides: the port starts at the encoder.
    - --query-pad exclude (the default) pools the real tokens only; the port's `pad_in_query=False` is that rule,
      with the text padded to the batch's longest instead of the fixed length. `include` is compared with the
      official rule itself.
    - --placement pre-append has no official code; it is compared with the official (distributed) forward, which it
      equals: no position embedding is added after the embedding layer, so the token order inside a block is free.
    - LayerNorm eps: the port uses the official 1e-6; the backbone's own eps is common.py's.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import memprompt as M
from common import load_vilt, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, Collate, load_split
from tests.test_official_map import TOL, close, layer_norm, mixed_sizes, official_block, padded_patches

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# The port
# ---------------------------------------------------------------------------------------------------------
def official_memory(mem, query):
    """PromptMemory.forward (key_dim = emb_dim): cosine to every key, top-k (unsorted), the cosines of the chosen
    keys recomputed from the gathered keys, softmax over those k, the weighted sum of the chosen prompts."""
    x = F.normalize(query, dim=-1)
    scores = x @ F.normalize(mem.q, dim=-1).T
    _, idx = torch.topk(scores, k=min(mem.N, mem.q.shape[0]), dim=1, largest=True, sorted=False)
    chosen_p, chosen_q = mem.p[idx], mem.q[idx]                              # (B, k, P, D), (B, k, D)
    refined = (x[:, None] * F.normalize(chosen_q, dim=2)).sum(2)
    w = refined.softmax(dim=1)[:, :, None, None]
    return (chosen_p * w).sum(1)


def official_shared(layer, missing):
    """The per-sample loop of infer: complete -> t + v, missing text -> t, missing image -> v; both bottlenecks."""
    text, image = [], []
    for case in missing.tolist():
        s = {COMPLETE: layer.shared_missing_t + layer.shared_missing_v, TEXT_MISSING: layer.shared_missing_t,
             IMAGE_MISSING: layer.shared_missing_v}[case]
        text.append(layer.G_t(s))
        image.append(layer.G_v(s))
    return torch.stack(text), torch.stack(image)


def official_infer(model, batch, gen_layers, shared_layers, pad_in_query=True, drop=0.0):
    """MemPromptTransformer.infer -> cls_feats (B, D). pad_in_query=False: the queries pool the real tokens only.
    drop: the frozen ViLT's drop_rate in training (the embeddings' dropout is bb.embed's, shared)."""
    bb = model.bb
    x, masks = bb.embed(batch)
    B = x.shape[0]
    text_len = batch["input_ids"].shape[1]
    image_len = x.shape[1] - text_len
    d_t = d_v = s_t = s_v = 0                                                # generative / shared lengths so far

    def pool(h, m):
        return h.max(dim=1)[0] if pad_in_query else h.masked_fill(m[..., None] == 0, float("-inf")).max(dim=1)[0]
    for i, block in enumerate(bb.vilt.encoder.layer):
        text_start = d_t + s_t
        text_end = text_start + text_len
        image_start = text_end + d_v + s_v
        image_end = image_start + image_len
        t_p = v_p = sh_t = sh_v = None
        if i in gen_layers:
            t_feat = pool(x[:, text_start:text_end], masks[:, text_start:text_end])
            v_feat = pool(x[:, image_start:image_end], masks[:, image_start:image_end])
            t_p, v_p = official_memory(model.layers[i].mem_t, t_feat), official_memory(model.layers[i].mem_v, v_feat)
        if i in shared_layers:
            sh_t, sh_v = official_shared(model.layers[i], batch["missing"])

        def ones(p):
            return masks.new_ones(B, 0 if p is None else p.shape[1])
        if t_p is not None and sh_t is not None:
            cut = d_t + s_t + text_len
            masks = torch.cat([ones(sh_t), ones(t_p), masks[:, :cut], ones(sh_v), ones(v_p), masks[:, cut:]], 1)
            x = torch.cat([sh_t, t_p, x[:, :cut], sh_v, v_p, x[:, cut:]], 1)
        elif t_p is not None:                                                # generative only in this layer
            a, b = s_t, d_t + s_t + text_len + s_v
            masks = torch.cat([masks[:, :a], ones(t_p), masks[:, a:b], ones(v_p), masks[:, b:]], 1)
            x = torch.cat([x[:, :a], t_p, x[:, a:b], v_p, x[:, b:]], 1)
        elif sh_t is not None:                                               # shared only in this layer
            cut = d_t + s_t + text_len
            masks = torch.cat([ones(sh_t), masks[:, :cut], ones(sh_v), masks[:, cut:]], 1)
            x = torch.cat([sh_t, x[:, :cut], sh_v, x[:, cut:]], 1)
        d_t += 0 if t_p is None else t_p.shape[1]
        d_v += 0 if v_p is None else v_p.shape[1]
        s_t += 0 if sh_t is None else sh_t.shape[1]
        s_v += 0 if sh_v is None else sh_v.shape[1]
        x = official_block(block, x, masks, drop=drop)
    x = layer_norm(bb.vilt.layernorm, x)
    return model.pooler(x[:, d_t + s_t:d_t + s_t + 1])


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    bb = load_vilt("tiny-vilt")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():                                                    # random-init norms are the identity
        for m in bb.vilt.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    items = mixed_sizes([ds[i] for i in range(10)])
    batch = Collate(bb, 40)(items)
    assert {COMPLETE, TEXT_MISSING, IMAGE_MISSING} <= set(batch["missing"].tolist())
    assert (batch["text_mask"] == 0).any() and batch["input_ids"].shape[1] < 40 and padded_patches(bb, batch)
    return bb, batch


def build(bb, gen, shared, query_pad="include", placement="distributed", seed=0):
    torch.manual_seed(seed)
    model = M.MemPrompt(bb, 4, length=3, memory_size=6, top_n=3, depth=4, placement=placement, query_pad=query_pad,
                        gen_layers=gen, shared_layers=shared).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                                                    # bottlenecks and head away from ~0
        for name, p in model.named_parameters():
            if p.requires_grad and (".G_" in name or name.startswith("head")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def compare(model, ours, theirs, labels):
    assert close(ours, theirs)
    params = [p for p in model.parameters() if p.requires_grad]
    l1, l2 = task_loss(ours, labels, "multiclass"), task_loss(theirs, labels, "multiclass")
    assert close(l1.detach(), l2.detach())
    g1 = torch.autograd.grad(l1, params, allow_unused=True)
    g2 = torch.autograd.grad(l2, params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert close(a, b)


@pytest.mark.parametrize("gen,shared", [(4, 4), (2, 2), (0, 3), (3, 0), (1, 3), (3, 1)])
def test_include_equals_official_forward(tiny, gen, shared):
    """--query-pad include: the official forward (text padded to the fixed length, queries over the whole slices),
    for the full model, Table 2's ablations (generative only / shared only) and Fig. 3c's unequal layer counts."""
    bb, batch = tiny
    model = build(bb, gen, shared)
    torch.manual_seed(1)                                                     # the same padding patches both sides
    ours = model(batch)["logits"]
    padded = M.pad_text(batch, 40)                                           # the official loader: max_length
    torch.manual_seed(1)
    theirs = model.head(official_infer(model, padded, list(range(gen)), list(range(shared))))
    compare(model, ours, theirs, batch["label"])


@pytest.mark.parametrize("placement", ["distributed", "pre-append"])
def test_exclude_equals_official_forward_with_real_token_queries(tiny, placement):
    bb, batch = tiny
    model = build(bb, 4, 4, query_pad="exclude", placement=placement)
    ours = model(batch)["logits"]
    theirs = model.head(official_infer(model, batch, range(4), range(4), pad_in_query=False))
    compare(model, ours, theirs, batch["label"])


@pytest.mark.parametrize("query_pad", ["include", "exclude"])
def test_equals_official_forward_in_training_with_backbone_dropout(tiny, query_pad):
    """Training mode with --backbone-dropout 0.1 (the official drop_rate), on the batch with padded patches: the same
    torch seed right before each side gives the same padding patches and dropout masks in the same order (bb.embed's,
    then per layer proj_drop and the Mlp's two drops), so logits, loss and gradients equal the official forward's
    with timm's dropout; the dropout is really on (the training logits differ from the evaluation ones). Equal
    layer counts: with unequal ones the official code inserts a layer's generative prompts behind the older shared
    ones (the same function, a different token order), so the position-wise masks would fall on other tokens."""
    bb, batch = tiny
    model = build(bb, 3, 3, query_pad=query_pad)
    bb.set_dropout(0.1)
    try:
        model.train()
        torch.manual_seed(11)
        ours = model(batch)["logits"]
        torch.manual_seed(11)
        official_batch = M.pad_text(batch, 40) if query_pad == "include" else batch
        theirs = model.head(official_infer(model, official_batch, range(3), range(3),
                                           pad_in_query=query_pad == "include", drop=0.1))
        with torch.no_grad():
            torch.manual_seed(11)
            evaluated = model.eval()(batch)["logits"]
    finally:
        bb.set_dropout(0.0)
    assert (ours - evaluated).abs().max() > 1e-3
    compare(model, ours, theirs, batch["label"])


def test_exclude_image_query_ignores_the_padded_patches(tiny, monkeypatch):
    """--query-pad exclude, image side, on the batch whose narrower images have padded patches: each image query is
    the max over that image's real patches only (pixel mask 1), so the logits do not depend on which padding patches
    ViLT drew (two draws, the same logits); include pools the padding too, which changes the queries there."""
    bb, batch = tiny
    model = build(bb, 2, 2, query_pad="exclude")
    seen, real_query = [], M.query

    def spy(x, mask, query_pad):
        seen.append((x, mask, real_query(x, mask, query_pad)))
        return seen[-1][2]
    monkeypatch.setattr(M, "query", spy)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(batch)["logits"]
        torch.manual_seed(2)
        b = model(batch)["logits"]
        x, mask, f = seen[1]                                                 # layer 0's image query
        padded = [k for k in range(len(x)) if not mask[k].all()]
        assert padded and (a - b).abs().max() <= TOL
        for k in range(len(x)):
            assert torch.equal(f[k], x[k][mask[k].bool()].max(0)[0])
        assert any(not torch.equal(x[k].max(0)[0], f[k]) for k in padded)  # the padding would change the query


def test_query_pad_changes_the_queries(tiny):
    """include and exclude differ on a batch with PAD (the rule matters), and exclude does not depend on how far
    the batch is padded (the reason it is the default)."""
    bb, batch = tiny
    with torch.no_grad():
        a = build(bb, 4, 4, query_pad="include")(batch)["logits"]
        b = build(bb, 4, 4, query_pad="exclude")(batch)["logits"]
        c = build(bb, 4, 4, query_pad="exclude")(M.pad_text(batch, 40))["logits"]
    assert (a - b).abs().max() > 1e-3
    assert (b - c).abs().max() <= TOL


def test_depth_zero_is_the_frozen_backbone(tiny):
    bb, batch = tiny
    model = build(bb, 0, 0, query_pad="exclude")
    assert len(model.layers) == 0
    with torch.no_grad():
        ref = bb.vilt(input_ids=batch["input_ids"], attention_mask=batch["text_mask"], pixel_values=batch["image"],
                      pixel_mask=batch["pixel_mask"]).pooler_output
        assert (model.forward_vilt(batch) - ref).abs().max() <= TOL


def test_initialisation_is_official():
    """kaiming_normal(a=sqrt 5) memories (fan-in P*D) and keys (fan-in D), shared prompts N(0, 0.02), bottleneck
    Linear N(0, 0.02) with zero bias, width D // 16; checked on the statistics of large draws."""
    torch.manual_seed(0)
    K, P, D = 64, 16, 768
    layer = M.MemPromptLayer(P, K, 5, D, D)
    gain = math.sqrt(2.0 / (1 + 5))
    assert layer.mem_t.p.std().item() == pytest.approx(gain / math.sqrt(P * D), rel=0.02)
    assert layer.mem_t.q.std().item() == pytest.approx(gain / math.sqrt(D), rel=0.05)
    for p_s in (layer.shared_missing_t, layer.shared_missing_v):
        assert p_s.std().item() == pytest.approx(0.02, rel=0.05) and abs(p_s.mean().item()) < 2e-3
    for g in (layer.G_t, layer.G_v):
        assert g[0].out_features == D // 16 and isinstance(g[1], torch.nn.GELU)
        assert g[0].weight.std().item() == pytest.approx(0.02, rel=0.05) and not g[0].bias.any()
        assert g[2].weight.std().item() == pytest.approx(0.02, rel=0.05) and not g[2].bias.any()


def test_defaults_are_the_official_config():
    """task_finetune_*: lr 5e-3 (Hateful Memes 1e-3), wd 2e-2, batch 256, 20 epochs, warm-up 0.1, linear decay;
    mem_size 16, top_k 5, layers 0-5 for both prompt kinds, prompt length 16 (Sec. 4.2: 4 on Hateful Memes),
    text lengths 512 / 1024 / 128, seed 42 (MAP's config: 0); the query rule is this file's documented default."""
    from common import finalize_args
    for dataset, lr, L, text_len in (("food101", 5e-3, 16, 512), ("mmimdb", 5e-3, 16, 1024),
                                     ("hatememes", 1e-3, 4, 128)):
        args = M.resolve_defaults(finalize_args(M.parser().parse_args(["--dataset", dataset])))
        recipe = (args.lr, args.weight_decay, args.batch_size, args.epochs, args.warmup, args.schedule, args.optimizer)
        assert recipe == (lr, 2e-2, 256, 20, 0.1, "linear", "adamw")
        prompts = (args.prompt_length, args.memory_size, args.top_n, args.gen_layers, args.shared_layers)
        assert prompts == (L, 16, 5, 6, 6) and args.max_text_len == text_len
        assert (args.softmax_over, args.placement, args.query_pad) == ("selected", "distributed", "exclude")
        assert (args.backbone_dropout, args.decay_exempt) == (0.1, "bias-norm")
        assert args.val_interval == (0.11 if dataset == "hatememes" else 0.2)            # val_check_interval
        assert args.seed == 42                                                  # src/config.py: seed = 42


def test_optimiser_groups_are_official(tiny):
    """set_schedule's name rule: only the biases are exempt from weight decay (no MemPrompt name holds "norm")."""
    from common import finalize_args, make_optimizer
    args = M.resolve_defaults(finalize_args(M.parser().parse_args([])))
    model = build(tiny[0], 2, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in make_optimizer(model, args).param_groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups[0.0] == {n for n in trainable if n.endswith(".bias")} and "head.1.weight" in groups[2e-2]
    assert groups[2e-2] | groups[0.0] == trainable
