"""AOEPT: Breaking the Implicit Modality-Reduction Bottleneck in Modality-Missing Prompt Tuning.
Lang et al., ICML 2026, arXiv 2605.24816 (https://arxiv.org/abs/2605.24816).
Official code: github.com/Jian-Lang/AOEPT @ b3129050b5ddb874fbc047985512e3df2c65acf6 (read, not copied).

Equation numbers were not readable here, so equations are named after the method's parts:
    (MCP) C_m^l = K-means of pooled m-tokens at layer l, train samples with m  -> `mcp_bank`, `kmeans`
    (MCP) P_m^l = LN(Attn(Q_m^l, C_m^l) + Q_m^l), or the mlp / init variants  -> `ModalContextPrompt.forward`
    (IA)  P_{m,i}^l = P_m^l * sigmoid(MLP(h_i^{l-1})), h: the other modality   -> `InstanceGate.forward`
    (INS) fresh prompts replace the old in layers < N, later layers carry them -> `AOEPT.forward_clip / _vilt`
    (CR)  L_CR = InfoNCE(mean_M P_{m,i}^l, z_{m,i}^l), samples that have m     -> `consistency_loss`
    (L)   L = L_task + alpha * L_CR                                            -> `make_loss`
    NM2I  this repository's estimator (METHODS.md 8.5; the official code has none) -> `common.nm2i`

Deviations and assumptions (one line each):
- Paper sizes M = 16, N = 6, K = 256 (official CLIP configs: depth 4, M 5-14, K 128 on some datasets).
- No shared prompts: an official-code extension that the paper does not describe.
- CLIP: prompts are prepended after the positional embedding (official: before it, with an interpolated table).
- CLIP: projections and final norms stay frozen (official: trained); text pooled at the true EOT (not eos id 2).
- ASSUMPTION: gates read the other stream's input of layer l (official CLIP: image gate reads the text output).
- ASSUMPTION: text means count real tokens only (official gates also average PAD positions).
- ViLT: one pass collects both slices of the joint sequence (official: single-modality copies of complete samples).
- ViLT: prototypes [layer l, all K] (not the official cluster-axis bug); one gate per layer (official: one for all).
- ViLT: prompts prepended (= after [CLS], bidirectional): TCP if text missing, ICP if image missing, mean if complete.
- K-means in torch: k-means++, one init, <= 300 Lloyd steps, empty clusters kept (official: sklearn, n_init 10).
- K is clamped to the number of samples that have the modality on tiny data (logged).
- ASSUMPTION: mlp = token-wise MLP D -> D/r -> D on the prototypes, pooled K -> M; init = pooled prototypes.
- ASSUMPTION: NM2I's ground truth is the prompt-free input of layer l (the bank's); L_CR's z is the prompted output.
- Heads use PyTorch's default initialisation (official: N(0, 0.02)).

Use from your own code (README, "Use a method in your own code"): `AOEPT(bb, bank, num_outputs, args, depth)` on a
frozen `common.load_clip()` / `load_vilt()` backbone; loss `make_loss(alpha, task)` (L_task + alpha L_CR, from the
training-mode outputs); pre-pass: the bank {"text", "image"}: (N, K, D_m) prototypes, `mcp_bank(run, depth, K)` in a
run, or `common.kmeans` per layer of `common.modality_tokens(bb, batch, depth)` over the training samples that have
the modality (`presence`). Copy this file with common.py and data.py.

Usage: python aoept.py --dataset food101 --missing text --rate 0.7 [--backbone vilt] [--mcp mlp] [--nm2i]
"""
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (autocast, build_parser, cli, clip_text_mask, finish, fit, gather_rows, kmeans, make_loader,
                    masked_mean, modality_tokens, rank_batches, read_checkpoint, save_tensors, setup, task_loss,
                    to_device)
from data import IMAGE_MISSING, TEXT_MISSING, DataError


def parser():
    p = build_parser("aoept", __doc__, "clip")
    # Method-specific
    p.add_argument("--prompt-length", type=int, default=16, help="M, prompt tokens per modality (implementation)")
    p.add_argument("--prompt-depth", type=int, default=6, help="N, layers given fresh prompts (adaptive insertion)")
    p.add_argument("--clusters", type=int, default=256, help="K, prototypes per layer and modality (MCP capacity)")
    p.add_argument("--mcp", default="attention", choices=["attention", "mlp", "init"], help="MCP construction variant")
    p.add_argument("--cr-weight", type=float, default=0.05, help="alpha, weight of the consistency loss L_CR")
    p.add_argument("--gate-reduction", type=int, default=16, help="r, gate MLP bottleneck D/r (official code)")
    p.add_argument("--cache-dir", default=os.path.join("runs", "cache"), help="where the MCP bank is cached")
    p.set_defaults(lr=1e-2, weight_decay=2e-2, batch_size=128, epochs=20, schedule="cosine", clip_grad=5.0)
    return p


# ---------------------------------------------------------------------------------------------------------
# AOEPT: Modal-Contextualized Prompt bank (MCP): one frozen pass over train, K-means per layer
# ---------------------------------------------------------------------------------------------------------
def bottleneck(d_in, d_out, r, act):                                # D_in -> D_in / r -> D_out
    return nn.Sequential(nn.Linear(d_in, max(1, d_in // r)), act, nn.Linear(max(1, d_in // r), d_out))


def presence(missing):                                              # (B,) codes -> which samples have m
    return {"text": missing != TEXT_MISSING, "image": missing != IMAGE_MISSING}


def collect_tokens(run, depth):
    """One frozen pass over train -> per modality the (n_m, N, D_m) pooled vectors of the samples that have m."""
    ds = run.train_set
    batches = rank_batches(run, len(ds))                              # under torchrun each rank encodes its share
    rows = {"text": [], "image": [], "missing": []}
    for batch in tqdm(make_loader(run, ds, batches), total=len(batches), desc="MCP bank: tokens",
                      disable=not run.main or not sys.stderr.isatty()):
        batch = to_device(batch, run.device)
        with autocast(run):
            pooled = modality_tokens(run.bb, batch, depth)
        for m in ("text", "image"):
            rows[m].append(pooled[m].float().cpu())
        rows["missing"].append(batch["missing"].cpu())
    rows = gather_rows(run, batches, {k: torch.cat(v) for k, v in rows.items()})
    return {m: rows[m][has] for m, has in presence(rows["missing"]).items()}


def mcp_bank(run, depth, K):
    """Prototypes (N, K, D_m) per modality, cached under (backbone, dataset, split, missing table, N, K, seed)."""
    args, ds = run.args, run.train_set
    key = {"backbone": run.bb.info, "dataset": args.dataset, "root": os.path.abspath(args.data_root), "split": "train",
           "size": len(ds), "table_hash": ds.table_hash, "depth": depth, "clusters": K, "seed": args.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"aoept-mcp-{digest}.safetensors")
    if os.path.isfile(path):
        tensors, meta = read_checkpoint(path)
        if meta.get("key") == key:
            run.log(f"MCP bank: reusing {path}")
            return {m: v.to(run.device) for m, v in tensors.items()}
    bank = {}
    for m, X in collect_tokens(run, depth).items():
        if len(X) == 0:
            raise DataError(f"MCP bank: no training sample has its {m}; lower --rate or change --missing")
        k = min(K, len(X))
        if k < K:
            run.log(f"MCP bank: only {len(X)} training samples have their {m}: K clamped from {K} to {k}")
        X = X.to(run.device)
        bank[m] = torch.stack([kmeans(X[:, l], k, args.seed)[0] for l in range(depth)])  # (MCP) (N, K, D)
    if run.main:
        save_tensors(path, bank, {"key": key})
    return bank


# ---------------------------------------------------------------------------------------------------------
# AOEPT: prompt module (MCP construction, instance-aware instantiation)
# ---------------------------------------------------------------------------------------------------------
class ModalContextPrompt(nn.Module):
    """The N layers' global prompts of one modality, (N, M, D), built from its frozen prototypes C (N, K, D)."""

    def __init__(self, C, M, variant, r):
        super().__init__()
        N, _, D = C.shape
        self.variant, self.M = variant, M
        self.heads = next(h for h in (8, 4, 2, 1) if D % h == 0)   # parameter-free heads: 8, fewer if D needs
        self.register_buffer("C", C.detach().clone())              # (N, K, D), never trained
        if variant == "attention":
            self.Q = nn.Parameter(torch.randn(N, M, D) * 0.02)      # learnable queries Q_m^l
            self.norm = nn.LayerNorm(D)
        elif variant == "mlp":
            self.mlp = nn.ModuleList(bottleneck(D, D, r, nn.GELU()) for _ in range(N))   # ASSUMPTION: as official
        else:
            self.P = nn.Parameter(self.pool(C))                     # prototypes pooled K -> M, then trained

    def pool(self, x):                                              # (N, K, D) -> (N, M, D)
        return F.adaptive_avg_pool1d(x.transpose(1, 2), self.M).transpose(1, 2)

    def forward(self):                                              # -> (N, M, D)
        if self.variant == "init":
            return self.P
        if self.variant == "mlp":
            return self.pool(torch.stack([mlp(c) for mlp, c in zip(self.mlp, self.C)]))
        N, M, D = self.Q.shape
        h, d = self.heads, D // self.heads
        q = self.Q.view(N, M, h, d).transpose(1, 2)                 # (N, h, M, d)
        kv = self.C.view(N, -1, h, d).transpose(1, 2)               # (N, h, K, d)
        attn = (q @ kv.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        return self.norm((attn @ kv).transpose(1, 2).reshape(N, M, D) + self.Q)  # (MCP): LN(Attn(Q, C) + Q)


class InstanceGate(nn.Module):
    """(IA) per layer: sigmoid(MLP(pooled other modality)); 1 (the global prompt) where that modality is missing."""

    def __init__(self, N, d_in, d_out, r):
        super().__init__()
        self.mlp = nn.ModuleList(bottleneck(d_in, d_out, r, nn.ReLU()) for _ in range(N))

    def forward(self, l, h, present):                               # (B, D_in), (B,) bool -> (B, D_out)
        g = torch.sigmoid(self.mlp[l](h))
        return torch.where(present[:, None], g, torch.ones_like(g))


# ---------------------------------------------------------------------------------------------------------
# AOEPT: forward (explicit loops over the frozen layers; prompts enter at layers < N)
# ---------------------------------------------------------------------------------------------------------
class AOEPT(nn.Module):
    def __init__(self, bb, bank, num_outputs, args, depth):
        super().__init__()
        self.bb, self.M, self.depth = bb, args.prompt_length, depth
        D_t, D_v = (bb.width_text, bb.width_image) if bb.kind == "clip" else (bb.width, bb.width)
        r = args.gate_reduction                                             # gate / mlp bottleneck D / r
        self.tcp = ModalContextPrompt(bank["text"], self.M, args.mcp, r)    # text-contextualised prompts
        self.icp = ModalContextPrompt(bank["image"], self.M, args.mcp, r)   # image-contextualised prompts
        self.gate_t = InstanceGate(depth, D_v, D_t, r)                      # text prompts, gated by the image
        self.gate_v = InstanceGate(depth, D_t, D_v, r)                      # image prompts, gated by the text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))       # (CR) temperature, init ln 100
        if bb.kind == "clip":
            self.head = nn.Linear(2 * bb.embed_dim, num_outputs)            # [image; text] -> C
        else:
            self.pooler, D = bb.pooler_copy(), bb.width
            self.head = nn.Sequential(nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(),   # MAP's head
                                      nn.Linear(2 * D, num_outputs))
            mix = [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]                       # (TCP, ICP) weight by missing code
            self.register_buffer("mix", torch.tensor(mix), persistent=False)

    def forward(self, batch):
        return self.forward_clip(batch) if self.bb.kind == "clip" else self.forward_vilt(batch)

    def forward_clip(self, batch):
        bb, M, ids, P_t, P_v = self.bb, self.M, batch["text"], self.tcp(), self.icp()  # (N, M, D_t), (N, M, D_v)
        present, u, z = presence(batch["missing"]), {"text": [], "image": []}, {"text": [], "image": []}
        x, t = bb.image_embed(batch["image"]), bb.text_embed(ids)           # (B, L_v, D_v), (B, 77, D_t)
        tmask = clip_text_mask(ids)
        for l in range(bb.num_layers):
            if l < self.depth:                  # (INS) replace; ASSUMPTION: both gates read the inputs of layer l
                x, t = x[:, M if l else 0:], t[:, M if l else 0:]
                p_t = P_t[l] * self.gate_t(l, x.mean(1), present["image"])[:, None]              # (IA) (B, M, D_t)
                p_v = P_v[l] * self.gate_v(l, masked_mean(t, tmask), present["text"])[:, None]  # (IA) (B, M, D_v)
                x, t = torch.cat([p_v.to(x.dtype), x], 1), torch.cat([p_t.to(t.dtype), t], 1)  # prepend
                u["text"].append(p_t.mean(1))                               # (B, D_t), for (CR) and NM2I
                u["image"].append(p_v.mean(1))
            x, t = bb.image_block(l, x), bb.text_block(l, t)                # layers >= N carry the prompts on
            if self.training and l < self.depth:
                z["image"].append(x[:, M:].mean(1).detach())
                z["text"].append(masked_mean(t[:, M:], tmask).detach())
        logits = self.head(torch.cat([bb.image_pool(x, M), bb.text_pool(t, ids, M)], -1))
        return self.outputs(logits, u, z, present)

    def forward_vilt(self, batch):
        bb, M, P_t, P_v = self.bb, self.M, self.tcp(), self.icp()          # (N, M, D) each
        present, u, z = presence(batch["missing"]), {"text": [], "image": []}, {"text": [], "image": []}
        x, mask = bb.embed(batch)                                           # (B, L_t + L_v, D), (B, L_t + L_v)
        L_t = batch["input_ids"].shape[1]
        mask_t, mask_v = mask[:, :L_t], mask[:, L_t:]
        bias = bb.attention_bias(torch.cat([mask.new_ones(len(x), M), mask], 1), x.dtype)  # once per batch
        w = self.mix[batch["missing"]]                                      # (B, 2)
        for l in range(bb.num_layers):
            if l < self.depth:                                              # (INS) replace the previous prompts
                x = x[:, M if l else 0:]
                p_t = P_t[l] * self.gate_t(l, masked_mean(x[:, L_t:], mask_v), present["image"])[:, None]  # (IA)
                p_v = P_v[l] * self.gate_v(l, masked_mean(x[:, :L_t], mask_t), present["text"])[:, None]   # (IA)
                p = w[:, 0, None, None] * p_t + w[:, 1, None, None] * p_v    # (B, M, D)
                x = torch.cat([p.to(x.dtype), x], 1)
                u["text"].append(p_t.mean(1))
                u["image"].append(p_v.mean(1))
            x = bb.block(l, x, bias)                                        # layers >= N carry the prompts on
            if self.training and l < self.depth:
                z["text"].append(masked_mean(x[:, M:M + L_t], mask_t).detach())
                z["image"].append(masked_mean(x[:, M + L_t:], mask_v).detach())
        logits = self.head(self.pooler(bb.final_norm(x)[:, M:]))           # [CLS] after the prompts
        return self.outputs(logits, u, z, present)

    def outputs(self, logits, u, z, present):
        out = {"logits": logits, "prompt_means": {m: torch.stack(v, 1) for m, v in u.items()}}  # (B, N, D_m)
        if self.training:
            s = self.logit_scale.clone()                  # made inside forward, so DDP sees it used once per step
            out.update(cr=[(u[m][l], z[m][l], present[m]) for m in u for l in range(self.depth)], s=s)
        return out


# ---------------------------------------------------------------------------------------------------------
# AOEPT: loss (CR and L)
# ---------------------------------------------------------------------------------------------------------
def consistency_loss(u, z, present, logit_scale):
    """(CR) over the samples that have the modality only (the others' rows are dropped); None if fewer than 2."""
    if int(present.sum()) < 2:
        return None
    u, z = F.normalize(u[present].float(), dim=-1), F.normalize(z[present].float(), dim=-1)
    logits = u @ z.T * logit_scale.exp()                            # (n, n) cosine * exp(s)
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))


def make_loss(alpha, task):
    def loss_fn(out, batch):
        loss = task_loss(out["logits"], batch["label"], task)
        terms = [c for c in (consistency_loss(*cr, out["s"]) for cr in out["cr"]) if c is not None]
        return loss + alpha * torch.stack(terms).mean() if terms else loss  # (L): L_task + alpha * L_CR
    return loss_fn


def main(args):
    run = setup(args)
    depth = min(args.prompt_depth, run.bb.num_layers)
    if depth < args.prompt_depth:
        run.log(f"prompt depth clamped from {args.prompt_depth} to {depth}: the backbone has {depth} layers")
    model = AOEPT(run.bb, mcp_bank(run, depth, args.clusters), run.num_outputs, args, depth).to(run.device)
    fit(run, model, make_loss(args.cr_weight, run.task))
    return finish(run, model)                                              # --nm2i: common.nm2i


if __name__ == "__main__":
    cli(parser(), main)
