"""AOEPT against a port of the official forward (Jian-Lang/AOEPT @ b312905, core/model/AOEPT/AOEPT_CLIP_model.py,
AOEPT_ViLT_model.py, module.py), written here from reading that code, on the tiny backbones with identical
weights (the port reads aoept.py's parameters): logits, the training loss and every gradient agree within 1e-4
under --recipe official (attention MCP, no shared prompts).

Where aoept.py keeps a difference listed in its header, the port takes aoept.py's side and says so in a comment:
CLIP text positions (frozen table, prompts without positions), text means over SOT..EOT, EOT pooling by argmax.
On toy data every image in a batch has the same size, so ViLT's image means have no padded patches to differ on
(asserted)."""
import pytest
import torch
import torch.nn.functional as F

import aoept
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


def official_clip(model, batch):
    bb, M, N = model.bb, model.M, model.depth
    ids, B = batch["text"], len(batch["text"])
    t_miss, v_miss = batch["missing"] == TEXT_MISSING, batch["missing"] == IMAGE_MISSING
    T = official_mcp(model.tcp.Q, model.tcp.C, 8, model.tcp.norm)            # attn_num_heads = 8 (CLIP)
    V = official_mcp(model.icp.Q, model.icp.C, 8, model.icp.norm)
    real = (torch.arange(ids.shape[1])[None] <= ids.argmax(-1, keepdim=True)).float()[..., None]
    text_mean = lambda h: (h * real).sum(1) / real.sum(1)                    # noqa: E731  (header: SOT..EOT)
    # official: [P_t^0; token embeddings] + a position table stretched to 77 + M (header: the frozen table instead)
    t = torch.cat([T[0].expand(B, -1, -1), bb.text_embed(ids)], 1)
    v = bb.image_embed(batch["image"])                                       # embeddings + pre-LN
    prev_v = v.mean(1)
    v = torch.cat([V[0].expand(B, -1, -1), v], 1)
    P_t, P_v, z_t, z_v = [], [], [], []
    for i in range(bb.num_layers):                                           # text layer i, then vision layer i
        if i < N:
            p = T[i] * gated(model.gate_t.mlp[i], prev_v, ~v_miss)[:, None]
            P_t.append(p)
            t = torch.cat([p, t[:, M:]], 1)
        t = bb.model.transformer.resblocks[i](t, attn_mask=torch.full((77 + M,) * 2, float("-inf")).triu(1))
        prev_t = text_mean(t[:, M:])
        if i < N:
            z_t.append(prev_t)
            p = V[i] * gated(model.gate_v.mlp[i], prev_t, ~t_miss)[:, None]   # gated by text layer i's output
            P_v.append(p)
            v = torch.cat([p, v[:, M:]], 1)
        v = bb.model.visual.transformer.resblocks[i](v)
        prev_v = v[:, M:].mean(1)
        if i < N:
            z_v.append(prev_v)
    t, v = t[:, M:], v[:, M:]
    text = bb.model.ln_final(t)[torch.arange(B), ids.argmax(-1)] @ bb.model.text_projection   # (header: argmax EOT)
    image = bb.model.visual.ln_post(v[:, 0]) @ bb.model.visual.proj
    logits = model.head(torch.cat([image, text], -1))
    aux = official_aux(P_t + P_v, z_t + z_v, [t_miss] * N + [v_miss] * N, model.logit_scale)
    return logits, aux


def official_vilt(model, batch):
    bb, M, N = model.bb, model.M, model.depth
    B, L_t = batch["input_ids"].shape
    t_miss, v_miss = batch["missing"] == TEXT_MISSING, batch["missing"] == IMAGE_MISSING
    T = official_mcp(model.tcp.Q, model.tcp.C, 4, model.tcp.norm)            # attn_num_heads = 4 (ViLT)
    V = official_mcp(model.icp.Q, model.icp.C, 4, model.icp.norm)
    out, mask = bb.embed(batch)                                              # [CLS, text, image] tokens
    assert bool(mask[:, L_t:].all())                                         # no padded patches on toy
    m_t = mask[:, :L_t, None].to(out.dtype)
    text_mean = lambda h: (h[:, :L_t] * m_t).sum(1) / m_t.sum(1).clamp(min=1e-9)   # noqa: E731
    image_mean = lambda h: h[:, L_t:].mean(1)                                # noqa: E731  (all image tokens)
    prev_t, prev_v = text_mean(out), image_mean(out)
    full = torch.cat([mask[:, :1], torch.ones(B, M, dtype=mask.dtype), mask[:, 1:]], 1)   # prompts after [CLS]
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
            x = torch.cat([out[:, :1], p_t * w_t + p_v * w_v, out[:, 1:]], 1)
        else:
            x = out
        h = layer(x, attention_mask=bias)[0]
        out = torch.cat([h[:, :1], h[:, 1 + M:]], 1) if i + 1 < N else h        # strip if fresh prompts follow
        content = out if i + 1 < N else torch.cat([out[:, :1], out[:, 1 + M:]], 1)
        prev_t, prev_v = text_mean(content), image_mean(content)
        if i < N:
            z_t.append(prev_t)
            z_v.append(prev_v)
    out = torch.cat([out[:, :1], out[:, 1 + M:]], 1)
    logits = model.head(model.pooler(bb.vilt.layernorm(out)))
    aux = official_aux(P_t + P_v, z_t + z_v, [t_miss] * N + [v_miss] * N, model.logit_scale)
    return logits, aux


def build(backbone, depth):
    args = finalize_args(aoept.parser().parse_args(["--backbone", backbone, "--recipe", "official",
                                                    "--prompt-length", "3", "--prompt-depth", str(depth)]))
    torch.manual_seed(0)
    bb = load_backbone(args)
    D_t, D_v = (bb.width_text, bb.width_image) if bb.kind == "clip" else (bb.width, bb.width)
    bank = {"text": torch.randn(depth, 8, D_t), "image": torch.randn(depth, 8, D_v)}
    model = aoept.AOEPT(bb, bank, 4, args, depth)
    with torch.no_grad():                                    # queries at the prototypes' scale: a peaked attention
        model.tcp.Q.normal_()
        model.icp.Q.normal_()
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    batch = Collate(bb, args.max_text_len)([ds[i] for i in range(12)])
    return model, batch


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("backbone, depth", [("tiny-clip", 2), ("tiny-clip", 4), ("tiny-vilt", 2), ("tiny-vilt", 4)])
def test_official_forward_logits_loss_and_gradients(backbone, depth):
    model, batch = build(backbone, depth)
    model.train()
    out = model(batch)
    loss = aoept.make_loss(0.05, "multiclass")(out, batch)
    ours = grads(model, loss)
    port = official_clip if backbone == "tiny-clip" else official_vilt
    logits, aux = port(model, batch)
    ref_loss = F.cross_entropy(logits, batch["label"]) + 0.05 * aux
    ref = grads(model, ref_loss)
    assert torch.allclose(out["logits"], logits, atol=1e-4)
    assert float(aux.detach()) > 0 and abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-4
    assert ours.keys() == ref.keys() and len(ours) >= 8
    for n in ours:
        assert torch.allclose(ours[n], ref[n], atol=1e-4, rtol=1e-4), n
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch)["logits"], port(model, batch)[0], atol=1e-4)
