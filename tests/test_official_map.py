"""Oracle for map.py: MAP's official forward, ported here from reading YiLunLee/missing_aware_prompts @ 9aa5381
(vilt/modules/vilt_missing_aware_prompt_module.py: the prompt initialisation in ViLTransformerSS.__init__ and
ViLTransformerSS.infer; vilt/modules/vision_transformer_prompts.py: Block.forward and Attention.forward), written in
this file's own words: a plain loop over the tiny-vilt layers' weights in the official (timm) form — one stacked qkv
projection, prompts concatenated as the official block does, the official key mask, the official pooling — run with
the project's weights, compared with map.MAP on logits, loss and every gradient (fp32, eval mode, dropout off).

Intended differences, not compared here (each is in map.py's header or owned by common.py):
    - The embeddings are HF ViltEmbeddings' (bb.embed), shared by both sides: the port starts at the encoder.
    - The official attention-level reshape hard-codes 12 heads (ViLT-B); the port uses the layer's own head count
      (tiny-vilt: 2), which is what the official code computes on ViLT-B.
    - LayerNorm eps: the port uses the official 1e-6 (timm's ViT norm_layer); the backbone's own eps is common.py's.
    - The official per-sample Python loop that picks each sample's prompt is kept in the port; map.py indexes.
"""
import pytest
import torch
import torch.nn.functional as F

import map as map_method
from common import load_clip, load_vilt, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, Collate, load_split

TOL = 1e-5                              # on max |a - b| / max(1, max |b|): fp32 rounding of logits ~10 is ~1e-6


def close(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1)) <= TOL
OFFICIAL_EPS = 1e-6                     # timm VisionTransformer: norm_layer = partial(nn.LayerNorm, eps=1e-6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# The port
# ---------------------------------------------------------------------------------------------------------
def layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, eps=OFFICIAL_EPS)


def official_attention(layer, x, mask, prompts=None, prompt_type="input"):
    """Attention.forward: a stacked qkv Linear; attention-level (learnt_p): the first P/2 prompt rows are extra keys,
    the other P/2 extra values, concatenated to the projected keys/values before the split into heads; the key mask
    (already holding P/2 ones in front) is applied with -inf; input-level: the mask is cut to the last N columns."""
    a = layer.attention.attention
    H = a.num_attention_heads
    W = torch.cat([a.query.weight, a.key.weight, a.value.weight])            # (3C, C), timm's qkv layout
    b = torch.cat([a.query.bias, a.key.bias, a.value.bias])
    B, N, C = x.shape
    qkv = F.linear(x, W, b).reshape(B, N, 3, C)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if prompts is not None and prompt_type == "attention":
        half = prompts.shape[1] // 2
        k = torch.cat([prompts[:, :half], k], dim=1)
        v = torch.cat([prompts[:, half:], v], dim=1)
    else:
        mask = mask[:, mask.shape[1] - N:]
    q, k, v = (t.reshape(B, t.shape[1], H, C // H).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return layer.attention.output.dense(out)                                 # proj


def dropped(x, p):
    """timm's nn.Dropout(drop_rate) in training mode (p = 0: the identity, no random draw)."""
    return F.dropout(x, p, training=True) if p else x


def official_block(layer, x, mask, prompts=None, prompt_type="input", drop=0.0):
    """Block.forward: input-level prepends the prompts; then x + attn(norm1(x)) (Attention's proj_drop after proj),
    x + mlp(norm2(x)) (Mlp: fc1, GELU, drop, fc2, drop); drop = drop_rate in training (--backbone-dropout)."""
    if prompts is not None and prompt_type == "input":
        x = torch.cat([prompts, x], dim=1)
    x = x + dropped(official_attention(layer, layer_norm(layer.layernorm_before, x), mask, prompts, prompt_type), drop)
    h = dropped(F.gelu(layer.intermediate.dense(layer_norm(layer.layernorm_after, x))), drop)
    return x + dropped(layer.output.dense(h), drop)


def official_infer(model, batch, prompt_layers, drop=0.0):
    """ViLTransformerSS.infer with multi_layer_prompt and learnt_p (the official config) -> cls_feats (B, D); drop:
    the frozen ViLT's drop_rate in training (the embeddings' dropout is bb.embed's, shared)."""
    bb = model.bb
    complete, missing_text, missing_img = (model.prompts.prompts[c] for c in (COMPLETE, TEXT_MISSING, IMAGE_MISSING))
    prompts = []
    for case in batch["missing"].tolist():                                   # instance-wise missing-aware prompts
        prompts.append({COMPLETE: complete, TEXT_MISSING: missing_text, IMAGE_MISSING: missing_img}[case])
    prompts = torch.stack(prompts)                                           # (B, n_layers, P, D)
    B, P = prompts.shape[0], prompts.shape[2]
    n_prompt = P // 2 if model.prompt_type == "attention" else P * len(prompt_layers)
    x, co_masks = bb.embed(batch)                                            # [text, image]
    co_masks = torch.cat([co_masks.new_ones(B, n_prompt), co_masks], dim=1)
    for i, layer in enumerate(bb.vilt.encoder.layer):
        if i in prompt_layers:
            x = official_block(layer, x, co_masks, prompts[:, prompt_layers.index(i)], model.prompt_type, drop)
        else:
            x = official_block(layer, x, co_masks, drop=drop)
    x = layer_norm(bb.vilt.layernorm, x)
    if model.prompt_type == "input":
        total = len(prompt_layers) * P
        return model.pooler(x[:, total:total + 1])
    return model.pooler(x)                                                   # Pooler takes x[:, 0]


def official_init(n_layers, P, D, prompt_type):
    """The __init__ rows: complete row 0, missing-text row 2, missing-image row 1 (attention: also P/2 + the same)."""
    out = {}
    for name, r in (("complete", 0), ("missing_text", 2), ("missing_img", 1)):
        t = torch.zeros(n_layers, P, D)
        t[:, r:r + 1, :].fill_(1)
        if prompt_type == "attention":
            t[:, P // 2 + r:P // 2 + r + 1, :].fill_(1)
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------------
# Fixtures: tiny-vilt with non-trivial LayerNorms, a mixed batch with text padding and images of different sizes
# ---------------------------------------------------------------------------------------------------------
def mixed_sizes(items):
    """Every third image twice as wide: on ViLT the other images of the batch get padded patches (pixel_mask 0),
    which ViLT fills with padding patches drawn at random and masks as keys."""
    return [{**it, "image": it["image"].resize((2 * it["image"].width, it["image"].height))} if k % 3 == 1 else it
            for k, it in enumerate(items)]


def padded_patches(bb, batch):
    """Whether some image of the batch has padded patches among its embedded tokens."""
    return bool((bb.embed(batch)[1][:, batch["input_ids"].shape[1]:] == 0).any())


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
    batch = Collate(bb, 40)(mixed_sizes([ds[i] for i in range(10)]))
    assert {COMPLETE, TEXT_MISSING, IMAGE_MISSING} <= set(batch["missing"].tolist())
    assert (batch["text_mask"] == 0).any() and padded_patches(bb, batch)    # PAD keys and padded patches masked
    return bb, batch


def trained_like(model, seed=3):
    """Random prompts and head (the official init is one-hot rows, which would hide a swapped key/value half)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def loss_and_grads(model, logits, labels):
    loss = task_loss(logits, labels, "multiclass")
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("prompt_type", ["input", "attention"])
@pytest.mark.parametrize("depth", [4, 2])
def test_map_equals_official_forward(tiny, prompt_type, depth):
    """Logits, loss and the gradient of every trainable tensor equal the official forward's, within 1e-5."""
    bb, batch = tiny
    torch.manual_seed(0)
    model = trained_like(map_method.MAP(bb, 4, prompt_type, length=6, depth=depth)).eval()
    labels = batch["label"]
    ours = model(batch)["logits"]
    theirs = model.head(official_infer(model, batch, list(range(depth))))
    assert close(ours, theirs)
    (l1, g1), (l2, g2) = loss_and_grads(model, ours, labels), loss_and_grads(model, theirs, labels)
    assert close(l1.detach(), l2.detach())
    for a, b in zip(g1, g2):
        assert close(a, b)
    assert g1[0].abs().sum() > 0                                             # the prompts do get a gradient


@pytest.mark.parametrize("prompt_type", ["input", "attention"])
def test_map_equals_official_forward_in_training_with_backbone_dropout(tiny, prompt_type):
    """Training mode with --backbone-dropout 0.1 (the official drop_rate), on the batch with padded patches: with the
    same torch seed right before each side, both draw the same masks in the same order (bb.embed's, then per layer
    proj_drop, the Mlp's two drops), so logits, loss and every gradient equal the official forward's with timm's
    dropout; the dropout is really on (the training logits differ from the evaluation ones)."""
    bb, batch = tiny
    torch.manual_seed(0)
    model = trained_like(map_method.MAP(bb, 4, prompt_type, length=6, depth=2))
    bb.set_dropout(0.1)
    try:
        model.train()
        torch.manual_seed(11)
        ours = model(batch)["logits"]
        torch.manual_seed(11)
        theirs = model.head(official_infer(model, batch, [0, 1], drop=0.1))
        with torch.no_grad():
            evaluated = model.eval()(batch)["logits"]
    finally:
        bb.set_dropout(0.0)
    assert (ours - evaluated).abs().max() > 1e-3
    assert close(ours, theirs)
    labels = batch["label"]
    (l1, g1), (l2, g2) = loss_and_grads(model, ours, labels), loss_and_grads(model, theirs, labels)
    assert close(l1.detach(), l2.detach())
    for a, b in zip(g1, g2):
        assert close(a, b)


@pytest.mark.parametrize("prompt_type", ["input", "attention"])
@pytest.mark.parametrize("P", [16, 6, 4, 2])
def test_initialisation_is_official(prompt_type, P):
    if prompt_type == "attention" and P % 2:
        return
    prompts = map_method.MissingAwarePrompts(6, P, 8, attention=prompt_type == "attention").prompts
    ref = official_init(6, P, 8, prompt_type)
    assert torch.equal(prompts[COMPLETE], ref["complete"])
    assert torch.equal(prompts[TEXT_MISSING], ref["missing_text"])
    assert torch.equal(prompts[IMAGE_MISSING], ref["missing_img"])


def test_model_uses_the_official_initialisation(tiny):
    bb, _ = tiny
    for prompt_type in ("input", "attention"):
        model = map_method.MAP(bb, 4, prompt_type, length=16, depth=6)
        ref = official_init(4, 16, bb.width, prompt_type)                   # depth clamped to tiny-vilt's 4 layers
        assert torch.equal(model.prompts.prompts[TEXT_MISSING], ref["missing_text"])
        assert torch.equal(model.prompts.prompts[COMPLETE], ref["complete"])


def test_clip_towers_use_the_official_initialisation():
    """The header's CLIP adaptation: one prompt set per tower and case, each initialised as the official ViLT prompts
    (`official_init`, with each tower's own width), for both prompt types; the depth clamped to tiny-clip's 4 layers."""
    bb = load_clip("tiny-clip", "")
    for prompt_type in ("input", "attention"):
        model = map_method.MAP(bb, 4, prompt_type, length=6, depth=6)
        for prompts, width in ((model.image_prompts, bb.width_image), (model.text_prompts, bb.width_text)):
            ref = official_init(4, 6, width, prompt_type)
            for case, name in ((COMPLETE, "complete"), (TEXT_MISSING, "missing_text"), (IMAGE_MISSING, "missing_img")):
                assert torch.equal(prompts.prompts[case], ref[name]), (prompt_type, width, name)


def test_head_is_the_official_classifier():
    """ViLTransformerSS's <dataset>_classifier: Linear(D, 2D) -> LayerNorm(2D) -> GELU -> Linear(2D, C), built here as
    the official nn.Sequential with map.mlp_head's weights (same outputs), and objectives.init_weights: Linear weights
    N(0, 0.02), Linear biases 0, LayerNorm weight 1 and bias 0."""
    torch.manual_seed(0)
    head = map_method.mlp_head(64, 5)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.GELU(),
                              torch.nn.Linear(128, 5))
    ref.load_state_dict(head.state_dict())
    x = 3 * torch.randn(7, 64)
    assert torch.allclose(head(x), ref(x), atol=1e-6)
    big = map_method.mlp_head(768, 101)
    for linear in (big[0], big[3]):
        w = linear.weight.detach()
        assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3
        assert not linear.bias.any()
    assert torch.equal(big[1].weight, torch.ones(1536)) and not big[1].bias.any()


def test_defaults_are_the_official_config(tiny):
    """task_finetune_{food101,mmimdb,hatememes} + the base config: lr 1e-2, wd 2e-2, batch 256, 20 epochs, warm-up
    0.1 then linear decay to 0 (decay_power 1, end_lr 0), AdamW (0.9, 0.98) eps 1e-8, drop_rate 0.1 in the frozen
    ViLT; prompts: input, 16 tokens, layers 0-5; text lengths 512 / 1024 / 128. Optimiser groups as set_schedule:
    no decay for names containing bias / norm patterns, so the head's LayerNorm weight ("head.1.weight") decays."""
    from common import finalize_args, make_optimizer, make_schedule
    for dataset, text_len in (("food101", 512), ("mmimdb", 1024), ("hatememes", 128)):
        args = finalize_args(map_method.parser().parse_args(["--dataset", dataset]))
        recipe = (args.lr, args.weight_decay, args.batch_size, args.epochs, args.warmup, args.schedule,
                  args.optimizer, args.clip_grad, args.backbone_dropout, args.decay_exempt)
        assert recipe == (1e-2, 2e-2, 256, 20, 0.1, "linear", "adamw", 0.0, 0.1, "bias-norm")
        assert (args.prompt_type, args.prompt_length, args.prompt_depth, args.max_text_len) == ("input", 16, 6, text_len)
        assert args.seed == 0                                                   # vilt/config.py: seed = 0
        assert args.val_interval == (0.11 if dataset == "hatememes" else 0.2)            # val_check_interval
    model = map_method.MAP(tiny[0], 4, "input", 16, 6)
    opt = make_optimizer(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert groups == {2e-2: {"prompts.prompts", "pooler.dense.weight", "head.0.weight", "head.1.weight", "head.3.weight"},
                      0.0: {"pooler.dense.bias", "head.0.bias", "head.1.bias", "head.3.bias"}}
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    sched = make_schedule(opt, 100, args)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) in (9, 10)   # peak at the end of 10% warm-up
    assert lrs[-1] == pytest.approx(1e-2 / 90, rel=1e-6)                        # linear to 0 at the last step
