"""AOEPT against a port of the official forward (Jian-Lang/AOEPT @ b312905, core/model/AOEPT/AOEPT_CLIP_model.py,
AOEPT_ViLT_model.py, module.py, base_model.py), written here from reading that code, on the tiny backbones with
identical weights (the port reads aoept.py's parameters): logits, the training loss and every gradient agree within
1e-5 in training mode and the logits in eval mode, under --recipe official (attention MCP, the shared prompts
[shared; modality] of use_shared_prompt with L_shared = M, CLIP's trained projections and final norms) and with the
shared prompts and trained projections off (use_shared_prompt False; the backbone's own projections).

Where aoept.py keeps a difference listed in its header, the port takes aoept.py's side and says so in a comment:
CLIP text positions (frozen table, prompts without positions), text means over SOT..EOT, EOT pooling by argmax,
ViLT image means over the unpadded patches (a batch of mixed image sizes is one of the cases)."""
import pytest
import torch
import torch.nn.functional as F

import aoept
import common
from common import finalize_args, load_backbone
from data import IMAGE_MISSING, TEXT_MISSING, Collate, load_split


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_mcp(Q, C, heads, norm):
    """_param_free_dot_attn per layer: heads by reshaping only, keys = values = the prototypes; LN(out + q)."""
    N, M, D = Q.shape
    d = D // heads
    q = Q.reshape(N, M, heads, d).permute(0, 2, 1, 3)
    k = C.reshape(N, C.shape[1], heads, d).permute(0, 2, 1, 3)
    out = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / d ** 0.5, -1), k)
    return norm(out.permute(0, 2, 1, 3).reshape(N, M, D) + Q)


def gated(mlp, source, available):
    """AdaptivePromptGate + the caller's rule: sigmoid(gate logits), 1 where the gating modality is missing."""
    a = available.float().view(-1, 1)
    return torch.sigmoid(mlp(source)) * a + (1.0 - a)


def official_aux(prompts, feats, missing_of_m, logit_scale):
    """The consistency loss: per layer and modality, cosine logits * exp(s) of the batch, CE on the rows and
    columns of the samples that have m, terms with more than one such sample, averaged over the terms."""
    aux, terms = 0.0, 0
    for P, f, missing in zip(prompts, feats, missing_of_m):
        valid = ~missing
        if valid.sum() > 1:
            logits = F.normalize(P.mean(1), dim=-1) @ F.normalize(f.detach(), dim=-1).t() * logit_scale.exp()
            idx = torch.where(valid)[0]
            aux = aux + F.cross_entropy(logits[idx][:, idx], torch.arange(len(idx)))
            terms += 1
    return aux / terms if terms else aux


def official_shared_clip(model):
    """_get_proxy_prompts' shared branch (CLIP): per layer the shared query (width D_t / r) lifted by
    shared_text_proj / shared_vision_proj, attending over the same tower's memory, + q, LayerNorm."""
    sh, ST, SV = model.shared, [], []
    for i in range(model.depth):
        lift = lambda f, q: F.linear(F.gelu(F.linear(q, f[0].weight, f[0].bias)), f[2].weight, f[2].bias)  # noqa
        q_text, q_vision = lift(sh.lift_t[i], sh.Q[i]), lift(sh.lift_v[i], sh.Q[i])     # Linear, GELU, Linear
        ST.append(official_mcp(q_text[None], model.tcp.C[i][None], 8, sh.norm_t)[0])
        SV.append(official_mcp(q_vision[None], model.icp.C[i][None], 8, sh.norm_v)[0])
    return ST, SV


def official_clip(model, batch):
    bb, M, N = model.bb, model.M, model.depth
    shared = model.shared is not None                                        # use_shared_prompt
    L = 2 * M if shared else M                                               # total_prompt_len
    ids, B = batch["text"], len(batch["text"])
    t_miss, v_miss = batch["missing"] == TEXT_MISSING, batch["missing"] == IMAGE_MISSING
    T = official_mcp(model.tcp.Q, model.tcp.C, 8, model.tcp.norm)            # attn_num_heads = 8 (CLIP)
    V = official_mcp(model.icp.Q, model.icp.C, 8, model.icp.norm)
    ST, SV = official_shared_clip(model) if shared else (None, None)
    real = (torch.arange(ids.shape[1])[None] <= ids.argmax(-1, keepdim=True)).float()[..., None]
    text_mean = lambda h: (h * real).sum(1) / real.sum(1)                    # noqa: E731  (header: SOT..EOT)
    first_t = torch.cat([ST[0], T[0]]) if shared else T[0]                   # [p0_shared; p0_text]
    first_v = torch.cat([SV[0], V[0]]) if shared else V[0]
    # official: [prompts; token embeddings] + a position table stretched to 77 + L (header: the frozen table instead)
    t = torch.cat([first_t.expand(B, -1, -1), bb.text_embed(ids)], 1)
    v = bb.image_embed(batch["image"])                                       # embeddings + pre-LN
    prev_v = v.mean(1)
    v = torch.cat([first_v.expand(B, -1, -1), v], 1)
    P_t, P_v, z_t, z_v = [], [], [], []
    for i in range(bb.num_layers):                                           # text layer i, then vision layer i
        if i < N:
            p = T[i] * gated(model.gate_t.mlp[i], prev_v, ~v_miss)[:, None]
            P_t.append(p)
            if shared:                                                       # shared_text_gate_mlp, same source
                p = torch.cat([ST[i] * gated(model.gate_st.mlp[i], prev_v, ~v_miss)[:, None], p], 1)
            t = torch.cat([p, t[:, L:]], 1)
        t = bb.model.transformer.resblocks[i](t, attn_mask=torch.full((77 + L,) * 2, float("-inf")).triu(1))
        prev_t = text_mean(t[:, L:])
        if i < N:
            z_t.append(prev_t)
            p = V[i] * gated(model.gate_v.mlp[i], prev_t, ~t_miss)[:, None]   # gated by text layer i's output
            P_v.append(p)
            if shared:
                p = torch.cat([SV[i] * gated(model.gate_sv.mlp[i], prev_t, ~t_miss)[:, None], p], 1)
            v = torch.cat([p, v[:, L:]], 1)
        v = bb.model.visual.transformer.resblocks[i](v)
        prev_v = v[:, L:].mean(1)
        if i < N:
            z_v.append(prev_v)
    t, v = t[:, L:], v[:, L:]
    if model.trained_proj:                                   # init_base_trainable_para: projections + final norms
        ln_final, text_projection, ln_post, proj = model.ln_final, model.proj_t, model.ln_post, model.proj_v
    else:
        ln_final, text_projection = bb.model.ln_final, bb.model.text_projection
        ln_post, proj = bb.model.visual.ln_post, bb.model.visual.proj
    text = ln_final(t)[torch.arange(B), ids.argmax(-1)] @ text_projection       # (header: argmax EOT)
    image = ln_post(v[:, 0]) @ proj
    logits = model.head(torch.cat([image, text], -1))
    aux = official_aux(P_t + P_v, z_t + z_v, [t_miss] * N + [v_miss] * N, model.logit_scale)   # no shared prompts
    return logits, aux


def official_vilt(model, batch):
    bb, M, N = model.bb, model.M, model.depth
    shared = model.shared is not None
    L = 2 * M if shared else M
    B, L_t = batch["input_ids"].shape
    t_miss, v_miss = batch["missing"] == TEXT_MISSING, batch["missing"] == IMAGE_MISSING
    T = official_mcp(model.tcp.Q, model.tcp.C, 4, model.tcp.norm)            # attn_num_heads = 4 (ViLT)
    V = official_mcp(model.icp.Q, model.icp.C, 4, model.icp.norm)
    if shared:                                                               # one query over the joint memory
        S = official_mcp(model.shared.Q, torch.cat([model.tcp.C, model.icp.C], 1), 4, model.shared.norm)
    out, mask = bb.embed(batch)                                              # [CLS, text, image] tokens
    m_t, m_v = mask[:, :L_t, None].to(out.dtype), mask[:, L_t:, None].to(out.dtype)
    text_mean = lambda h: (h[:, :L_t] * m_t).sum(1) / m_t.sum(1).clamp(min=1e-9)   # noqa: E731
    # header: the unpadded image tokens (official: output[:, text_len:].mean(1), padded patches included)
    image_mean = lambda h: (h[:, L_t:] * m_v).sum(1) / m_v.sum(1)            # noqa: E731
    prev_t, prev_v = text_mean(out), image_mean(out)
    full = torch.cat([mask[:, :1], torch.ones(B, L, dtype=mask.dtype), mask[:, 1:]], 1)   # prompts after [CLS]
    bias = (1.0 - full[:, None, None, :].to(out.dtype)) * torch.finfo(out.dtype).min
    complete = (~t_miss & ~v_miss).float().view(-1, 1, 1)
    w_t, w_v = t_miss.float().view(-1, 1, 1) + 0.5 * complete, v_miss.float().view(-1, 1, 1) + 0.5 * complete
    P_t, P_v, z_t, z_v = [], [], [], []
    for i, layer in enumerate(bb.vilt.encoder.layer):
        if i < N:
            p_t = T[i] * gated(model.gate_t.mlp[0], prev_v, ~v_miss)[:, None]     # one gate for all layers
            p_v = V[i] * gated(model.gate_v.mlp[0], prev_t, ~t_miss)[:, None]
            P_t.append(p_t)
            P_v.append(p_v)
            p = p_t * w_t + p_v * w_v
            if shared:                                                       # fusion source, 1 if both missing
                p_s = S[i] * gated(model.gate_s.mlp[0], (prev_t + prev_v) / 2, ~(t_miss & v_miss))[:, None]
                p = torch.cat([p_s, p], 1)
            x = torch.cat([out[:, :1], p, out[:, 1:]], 1)
        else:
            x = out
        h = layer(x, attention_mask=bias)[0]
        out = torch.cat([h[:, :1], h[:, 1 + L:]], 1) if i + 1 < N else h        # strip if fresh prompts follow
        content = out if i + 1 < N else torch.cat([out[:, :1], out[:, 1 + L:]], 1)
        prev_t, prev_v = text_mean(content), image_mean(content)
        if i < N:
            z_t.append(prev_t)
            z_v.append(prev_v)
    out = torch.cat([out[:, :1], out[:, 1 + L:]], 1)
    logits = model.head(model.pooler(bb.vilt.layernorm(out)))
    aux = official_aux(P_t + P_v, z_t + z_v, [t_miss] * N + [v_miss] * N, model.logit_scale)
    return logits, aux


def build(backbone, depth, argv=(), mixed_sizes=False):
    args = finalize_args(aoept.parser().parse_args(["--backbone", backbone, "--recipe", "official",
                                                    "--prompt-length", "3", "--prompt-depth", str(depth), *argv]))
    torch.manual_seed(0)
    bb = load_backbone(args)
    D_t, D_v = (bb.width_text, bb.width_image) if bb.kind == "clip" else (bb.width, bb.width)
    bank = {"text": torch.randn(depth, 8, D_t), "image": torch.randn(depth, 8, D_v)}
    model = aoept.AOEPT(bb, bank, 4, args, depth)
    with torch.no_grad():                                    # queries at the prototypes' scale: a peaked attention
        for p in (model.tcp.Q, model.icp.Q) + ((model.shared.Q,) if model.shared is not None else ()):
            p.normal_()
        for n, p in model.named_parameters():                # trained norms / projections away from their init
            if n.startswith(("ln_", "proj_", "shared.norm")):
                p.add_(0.1 * torch.randn_like(p))
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    items = [ds[i] for i in range(12)]
    if mixed_sizes:                                          # every other image taller: padded patches in the batch
        for it in items[1::2]:
            w, h = it["image"].size
            it["image"] = it["image"].resize((w, int(h * 1.6)))
    batch = Collate(bb, args.max_text_len)(items)
    if mixed_sizes:
        assert not bool(batch["pixel_mask"].all())
    return model, batch


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


CASES = [("tiny-clip", 2, ()), ("tiny-clip", 4, ()), ("tiny-vilt", 2, ()), ("tiny-vilt", 4, ()),
         ("tiny-clip", 2, ("--shared-prompts", "off", "--clip-projections", "frozen")),
         ("tiny-vilt", 2, ("--shared-prompts", "off")), ("tiny-vilt", 2, ("mixed sizes",))]


@pytest.mark.parametrize("backbone, depth, argv", CASES)
def test_official_forward_logits_loss_and_gradients(backbone, depth, argv):
    mixed = argv == ("mixed sizes",)
    model, batch = build(backbone, depth, () if mixed else argv, mixed_sizes=mixed)
    assert (model.shared is not None) == ("off" not in argv)
    model.train()
    out = model(batch)
    loss = aoept.make_loss(0.05, "multiclass")(out, batch)
    ours = grads(model, loss)
    port = official_clip if backbone == "tiny-clip" else official_vilt
    logits, aux = port(model, batch)
    ref_loss = F.cross_entropy(logits, batch["label"]) + 0.05 * aux
    ref = grads(model, ref_loss)
    assert torch.allclose(out["logits"], logits, atol=1e-5)
    assert float(aux.detach()) > 0 and abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-5
    assert ours.keys() == ref.keys() and len(ours) >= 8
    for n in ours:
        assert torch.allclose(ours[n], ref[n], atol=1e-5, rtol=1e-4), n
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch)["logits"], port(model, batch)[0], atol=1e-5)


def official_trainable(kind, D_t, D_v, E, N, M, K, r, C):
    """The trainable-parameter count of the official model with use_shared_prompt (attention strategy), written out
    from its __init__ / init_trainable_para / init_base_trainable_para (text_init_tokens, vision_init_tokens frozen)."""
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)                 # noqa: E731
    gate = lambda i, o: lin(i, i // r) + lin(i // r, o)                      # noqa: E731  AdaptivePromptGate
    if kind == "clip":
        h = D_t // r
        n = N * M * (D_t + D_v) + 2 * (D_t + D_v)                            # queries, text/vision_layer_norm
        n += N * M * h + N * (lin(h, h) + lin(h, D_t) + lin(h, h) + lin(h, D_v)) + 2 * (D_t + D_v)   # shared
        n += 2 * N * (gate(D_v, D_t) + gate(D_t, D_v))                       # (shared_)text/vision_gate_mlp
        n += 1 + lin(2 * E, C)                                               # logit_scale, classifier
        return n + D_t * E + D_v * E + 2 * (D_t + D_v)                       # projections (no bias), final norms
    n = 2 * N * M * D_t + 2 * 2 * D_t + N * M * D_t + 2 * D_t               # queries + LNs, shared query + LN
    n += 3 * gate(D_t, D_t) + 1                                              # text, vision, shared gates; scale
    return n + lin(D_t, D_t) + lin(D_t, 2 * D_t) + 2 * 2 * D_t + lin(2 * D_t, C)   # pooler, MAP's head


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_trainable_parameters_equal_the_official_structure(backbone):
    model, _ = build(backbone, 2)
    bb = model.bb
    if backbone == "tiny-clip":
        want = official_trainable("clip", bb.width_text, bb.width_image, bb.embed_dim, 2, 3, 8, 16, 4)
    else:
        want = official_trainable("vilt", bb.width, bb.width, None, 2, 3, 8, 16, 4)
    assert common.count_trainable(model) == want


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_training_and_eval_logits_agree_without_dropout(backbone):
    """AOEPT has no dropout: a training-mode forward gives the eval-mode logits (routing, gates and prompts do not
    depend on the mode), on a batch with every missing case."""
    model, batch = build(backbone, 2, mixed_sizes=backbone == "tiny-vilt")
    assert len(set(batch["missing"].tolist())) == 3
    model.train()
    train = model(batch)["logits"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(train.detach(), model(batch)["logits"], atol=1e-5)
