"""PROMISE: Prompt-Attentive Hierarchical Contrastive Learning for Robust Cross-Modal Representation with Missing
Modalities (Chen et al., AAAI 2026, arXiv 2511.10997).

Official code: none: implemented from the paper (Sec. Prompt Attention, Sec. Hierarchical Contrastive Learning).

Map from the paper to this file:
    frozen features of the present modalities (CLIP ViT-L/14)                   -> `unimodal_features`
    prompt pools (4 prompts x length 16 per modality), Prompt Attention, two
    linear layers giving x^_m2 and x^_m2_a (one generator per generated m2)      -> `PromptAttention.forward`
    x^_m2 used only where m2 is missing, crossmodal transformer, head          -> `PROMISE.forward`
    FNCL: symmetric NT-Xent of (x_m1, x^_m2), (x_m1, x^_m2_a), (x_m1_a, x^_m2), (x_m1_a, x^_m2_a)  -> `fncl`
    CCCL, Eq. (9): supervised contrastive loss within each modality           -> `cccl`, `supcon`
    L = L_cls + lambda [alpha FNCL + (1 - alpha) CCCL]                          -> `promise_loss`

Deviations and assumptions (modelling first):
    - FNCL pairs as the paper writes them: (x_m1, x^_m2), (x_m1, x^_m2_a), (x_m1_a, x^_m2), (x_m1_a, x^_m2_a), the
      available modality on the real side ("cross-modal embeddings from the same instance should be semantically
      consistent", Sec. Hierarchical Contrastive Learning) on every row that has m1. --fncl-partner reconstruction
      (a reading, not the paper's pairs): the real x_m2 / x_m2_a where m2 is present (a same-modality reconstruction
      loss on complete rows; one softmax then mixes both targets).
    - ASSUMPTION (Prompt Attention): one generator per generated modality m2 (its own pool, one MHA, two linear
      layers). The x_m1 token attends over [pool of m2 (N*P tokens); x_m1]; its output plus x_m1 (a residual) goes
      through the two linears. This file's earlier reading (the mean over the outputs) was dropped: initially the mean
      over N*P + 1 = 65 tokens drowns the one x_m1 token (x^ std across samples 0.001 vs 0.29 for x) and stays so
      after training (tests/test_promise.py::test_generated_feature_carries_its_sample).
    - The generators run on every row (both directions): x^_m2 replaces x_m2 only where m2 is missing; FNCL trains
      it on the rows that have m1. Initialisation (not in the paper): pools and position embeddings N(0, 0.02), CLS
      zeros, linear layers and MHA PyTorch's defaults.
    - ASSUMPTION: NT-Xent is SimCLR's over the 2n vectors of a pair (symmetric by construction); FNCL averages it over
      the four pairs, then over the directions m1 -> m2 that have rows (rows where m1 is present).
    - ASSUMPTION: CCCL per modality over [z_m; z_m_a] (real where present, generated where missing); positives = the
      other view and same-label samples; multi-label (MM-IMDb): sharing >= 1 label; anchors without positives excluded.
    - ASSUMPTION: augmented views: image random resized crop (area 0.5-1, ratio 3/4-4/3) + horizontal flip; text word
      dropout 10%; view v of a sample is a pure function of (seed, id, v). Epoch e trains on view e: a fresh view each
      epoch. --cache-features stores --aug-views views (default = --epochs, so no view repeats; epoch e uses view
      e mod V, the same computation as without the cache while e < V). Disk: (V + 1) x N x 2 x E values in the autocast
      dtype (bf16 on CUDA: lossless, the first trainable layer casts to it), ~4 GB for Food-101 train on ViT-L/14 and
      V = 20, ~1 GB MM-IMDb, ~0.5 GB Hateful Memes. --aug-views 0: no augmentation, x_a = x.
    - Cache key (--cache-features): every image file's path, size and mtime (data.image_cache_key), ids and texts,
      data root, backbone and a digest of its weights, feature dtype, missing table, rate, seed, text length, views.
    - --cache-images is refused with augmented views (its images are preprocessed tensors; the views crop the decoded
      image); with --cache-features every image is decoded once anyway.
    - ASSUMPTION: each modality's feature is projected by its own linear layer (width d = E); Prompt Attention =
      multi-head attention with 8 heads (2 below width 256). The pool is one flat set of N*P tokens, so only N*P
      matters (4 x 16 == 16 x 4); N*P = 0 is the no-prompt ablation (attention over x_m1 alone).
    - Readings of the ablation's words: "prompt dimension" 16 / 32 / 48 -> --prompt-length; "3 / 6 layers" ->
      --fusion-layers (the crossmodal transformer); the paper does not define either.
    - ASSUMPTION: fusion = 6-layer pre-LN transformer (8 heads; 2 below width 256; FFN 4d with GELU; dropout 0)
      over [CLS, image token, text token] + learned position embeddings; linear head on the final-normed CLS.
    - ASSUMPTION: alpha = 0.5 and lambda (--contrast-weight) = 1: the paper gives no value; equal weights, L = L_cls +
      L_contrast as written. Contrastive terms use the micro-batch (default = the paper's batch of 64), gathered from
      every process under torchrun (with gradients): the same loss as one process while --micro-batch >= batch / world.
      Contrastive logits in fp32, autocast off.
    - ASSUMPTION: Adam, weight decay 0, cosine schedule without warm-up, 20 epochs (not stated in the paper).
    - NON-PAPER ADAPTATION (ViLT is single-stream): unimodal features from single-modality passes over ViLT's own
      tokens: text-only pass -> mean of the text tokens; image-only pass -> mean of the image tokens. ViLT's embedding
      layer embeds the whole batch, dummy parts included (per-token, so they do not change the present part); its
      blocks never see a dummy.
    - Recipe (README): Adam without weight decay, val once per epoch, MM-IMDb per plot; ViLT: LN eps 1e-6, no dropout.
    - Refused up front: --nm2i (no prompts inside the encoder to measure); --cache-features with --backbone-dropout on
      ViLT (the cache is encoded once without dropout, so a cached run would differ from an uncached one).

Use from your own code (README, "Use a method in your own code"): `PROMISE(bb, num_outputs, args)` on a frozen
`common.load_clip()` / `load_vilt()` backbone; loss `promise_loss(out, batch, task, args)`; training batches carry
an augmented view as `aug_*` keys (`PromiseCollate(data.Collate(...), args)` on items with a "view"); the feature
cache as a plain call: `unimodal_features(bb, batch)`, passed as `feat_image` / `feat_text` (+ `_a` in training).
Copy this file with common.py and data.py.

Sections, in reading order: command line; prompt module (Prompt Attention); forward; loss (FNCL, CCCL); augmented
views, the view of each epoch, the feature cache, and run; the numbers to compare with.

Usage: python promise.py --dataset food101 --missing both --rate 0.7 --cache-features    (CLIP ViT-L/14)
       python promise.py --dataset toy --backbone tiny-clip --cache-features             (offline, CPU, seconds)
"""
import hashlib
import json
import math
import os
import random
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import (CLIP_L14, autocast, build_parser, cached_tensors, cli, finish, fit, gather_rows, paper_table,
                    setup, task_loss)
from data import IMAGE_MISSING, TEXT_MISSING, DataError, image_cache_key, rank_batches, to_device

# ---------------------------------------------------------------------------------------------------------
# PROMISE: command line (the paper's and the official code's defaults)
# ---------------------------------------------------------------------------------------------------------
MODALITIES = ("image", "text")
OTHER = {"image": "text", "text": "image"}
ABSENT = {"image": IMAGE_MISSING, "text": TEXT_MISSING}
SPLIT_ATTRS = ("ids", "missing", "class_names", "missing_type", "rate", "table_hash", "task", "num_classes")


def parser():
    p = build_parser("promise", __doc__, backbone="clip")
    # Method-specific
    p.add_argument("--num-prompts", type=int, default=4, help="N, prompts per modality pool (Sec. Prompt Attention)")
    p.add_argument("--prompt-length", type=int, default=16, help="P, tokens per prompt (Sec. Prompt Attention)")
    p.add_argument("--fusion-layers", type=int, default=6, help="crossmodal transformer layers (ablation: 3 or 6)")
    p.add_argument("--tau", type=float, default=0.07, help="tau, temperature of FNCL and CCCL")
    p.add_argument("--alpha", type=float, default=0.5,                     # ASSUMPTION: not given in the paper
                   help="alpha, FNCL weight in L_contrast (CCCL: 1 - alpha)")
    p.add_argument("--contrast-weight", type=float, default=1.0, help="lambda, weight of L_contrast in the total loss")
    p.add_argument("--fncl-partner", default="available", choices=["available", "reconstruction"],
                   help="the real side of FNCL's pairs with x^_m2: the available x_m1 / x_m1_a on every row (the "
                        "paper's four pairs), or the real x_m2 / x_m2_a where m2 is present (a reconstruction target)")
    p.add_argument("--aug-views", type=int, default=None,
                   help="augmented views x_a per sample kept by --cache-features (epoch e uses view e mod V; default: "
                        "--epochs, no repeat); without the cache every epoch draws a fresh view; 0 = no augmentation")
    p.add_argument("--text-dropout", type=float, default=0.1, help="word dropout of the augmented text view")
    p.add_argument("--crop-scale", type=float, default=0.5, help="smallest area fraction of the augmented image crop")
    p.add_argument("--cache-features", action="store_true", help="encode every split once with the frozen encoder")
    p.add_argument("--cache-dir", default=os.path.join("runs", "cache"), help="where --cache-features keeps its files")
    p.set_defaults(lr=1e-4, weight_decay=0.0, batch_size=64, micro_batch=64, epochs=20, optimizer="adam",
                   schedule="cosine", warmup=0.0, clip_model="ViT-L-14")
    return p


def check_args(args):
    """Bad values fail here, naming the flag (a clear error instead of a crash or a silent no-op)."""
    if args.num_prompts < 0 or args.prompt_length < 0:
        raise DataError("--num-prompts and --prompt-length must be >= 0 (N * P = 0: the no-prompt ablation)")
    if args.fusion_layers < 1:
        raise DataError("--fusion-layers must be >= 1: the crossmodal transformer is the only place the modalities meet")
    if args.tau <= 0 or not 0.0 <= args.alpha <= 1.0:
        raise DataError("--tau must be > 0 and --alpha in [0, 1]")
    if args.aug_views is not None and args.aug_views < 0:
        raise DataError("--aug-views must be >= 0 (0: no augmentation)")
    if args.nm2i:
        raise DataError("--nm2i measures prompts inside the frozen encoder's layers; PROMISE's prompt pools feed "
                        "Prompt Attention after the encoder, so there is nothing to measure: drop --nm2i")
    if args.cache_features and args.backbone_dropout > 0 and args.backbone in ("vilt", "tiny-vilt"):
        raise DataError("--cache-features encodes every split once with the frozen ViLT, without dropout; with "
                        "--backbone-dropout an uncached run draws dropout in every training step, so the two would "
                        "differ: drop --backbone-dropout or --cache-features")
    if args.cache_images and views_of(args) and not args.eval_only:
        raise DataError("--cache-images holds preprocessed tensors and PROMISE's augmented views crop the decoded image: "
                        "drop --cache-images (with --cache-features every image is decoded once anyway) or pass "
                        "--aug-views 0")


def views_of(args):
    return args.epochs if args.aug_views is None else args.aug_views


# ---------------------------------------------------------------------------------------------------------
# PROMISE: prompt module (Sec. Prompt Attention)
# ---------------------------------------------------------------------------------------------------------
class PromptAttention(nn.Module):
    """Generates the missing modality m2 from the available m1: [pool_m2; proj(x_m1)] -> MHA -> mean -> two linear
    layers giving the original x^_m2 and the augmented x^_m2_a."""

    def __init__(self, width, num_prompts, length, heads):
        super().__init__()
        self.pool = nn.Parameter(torch.randn(num_prompts * length, width) * 0.02)      # (N * P, d)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out, self.out_a = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x_m1):                                                 # (B, d) -> (B, d), (B, d)
        seq = torch.cat([self.pool.expand(len(x_m1), -1, -1), x_m1[:, None]], 1)     # (B, N * P + 1, d)
        # ASSUMPTION: the x_m1 token reads the pool (its row of the self-attention over seq) with a residual
        h = x_m1 + self.attn(seq[:, -1:], seq, seq, need_weights=False)[0][:, 0]     # (B, d)
        return self.out(h), self.out_a(h)


# ---------------------------------------------------------------------------------------------------------
# PROMISE: forward
# ---------------------------------------------------------------------------------------------------------
def present_rows(batch, m):
    """Indices of the rows that have m: from the collate (host-side lengths: no GPU sync), else from the codes."""
    key = f"rows_{m}"
    return batch[key] if key in batch else (batch["missing"] != ABSENT[m]).nonzero()[:, 0]


@torch.no_grad()
def unimodal_features(bb, batch):
    """Frozen features of the present modalities only, (B, E) each with zeros where missing: the encoder never
    sees a dummy input."""
    rows = {m: present_rows(batch, m) for m in MODALITIES}
    width = bb.embed_dim if bb.kind == "clip" else bb.width
    f = {m: torch.zeros(len(batch["missing"]), width, device=batch["missing"].device) for m in MODALITIES}
    if bb.kind == "clip":                                                  # len(rows): a shape, read without a sync
        if len(rows["image"]):
            x = bb.image_embed(batch["image"][rows["image"]])              # (B_i, L_v, D_v)
            for i in range(bb.num_layers):
                x = bb.image_block(i, x)
            f["image"][rows["image"]] = bb.image_pool(x).to(f["image"].dtype)
        if len(rows["text"]):
            ids = batch["text"][rows["text"]]
            t = bb.text_embed(ids)                                         # (B_t, 77, D_t)
            for i in range(bb.num_layers):
                t = bb.text_block(i, t)
            f["text"][rows["text"]] = bb.text_pool(t, ids).to(f["text"].dtype)
        return f["image"], f["text"]
    # NON-PAPER ADAPTATION: ViLT's embedding layer embeds both parts at once (a dummy part is dropped before any
    # block); each modality then runs alone through the blocks and is mean-pooled over its valid tokens.
    x, mask = bb.embed(batch)                                              # (B, L_t + L_v, D), (B, L_t + L_v)
    L_t = batch["input_ids"].shape[1]
    for m, part in (("text", slice(0, L_t)), ("image", slice(L_t, None))):
        if len(rows[m]):
            h, valid = x[rows[m], part], mask[rows[m], part]
            bias = bb.attention_bias(valid, h.dtype)
            for i in range(bb.num_layers):
                h = bb.block(i, h, bias)
            valid = valid[..., None].to(h.dtype)
            f[m][rows[m]] = ((bb.final_norm(h) * valid).sum(1) / valid.sum(1)).to(f[m].dtype)
    return f["image"], f["text"]


class PROMISE(nn.Module):
    def __init__(self, bb, num_outputs, args):
        super().__init__()
        self.bb = bb
        d = bb.embed_dim if bb.kind == "clip" else bb.width
        heads = 8 if d >= 256 else 2                                       # ASSUMPTION: heads not given
        self.proj = nn.ModuleDict({m: nn.Linear(d, d) for m in MODALITIES})
        self.gen = nn.ModuleDict({m: PromptAttention(d, args.num_prompts, args.prompt_length, heads)  # m's pool
                                  for m in MODALITIES})
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(3, d) * 0.02)                 # [CLS, image, text]
        # ASSUMPTION: the crossmodal transformer: pre-LN, FFN 4d, dropout 0, over [CLS, image, text]
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, args.fusion_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, num_outputs)

    def features(self, batch):
        """{m: (B, E)} and, for training batches, {m_a: (B, E)}: from the cache or from the frozen encoder; a training
        batch without an augmented view (--aug-views 0) uses x_a = x."""
        if "feat_image" in batch:
            f = {k[5:]: v for k, v in batch.items() if k.startswith("feat_")}
        else:
            f = dict(zip(MODALITIES, unimodal_features(self.bb, batch)))
            if self.training and "aug_missing" in batch:
                aug = unimodal_features(self.bb, {k[4:]: v for k, v in batch.items() if k.startswith("aug_")})
                f.update({f"{m}_a": v for m, v in zip(MODALITIES, aug)})
        return {**{f"{m}_a": f[m] for m in MODALITIES}, **f}

    def forward(self, batch):
        f = self.features(batch)
        has = {m: (batch["missing"] != ABSENT[m])[:, None] for m in MODALITIES}
        x = {m: self.proj[m](f[m]) for m in MODALITIES}                     # (B, d): projected x_m
        gen = {m: self.gen[m](x[OTHER[m]]) for m in MODALITIES}            # Prompt Attention: (x^_m, x^_m_a) from m1
        z = {m: torch.where(has[m], x[m], gen[m][0]) for m in MODALITIES}  # x^_m only where m is missing
        tokens = torch.stack([self.cls[0].expand(len(z["image"]), -1), z["image"], z["text"]], 1) + self.pos
        fused = self.fusion(tokens)[:, 0]                                  # crossmodal transformer: CLS (B, d)
        out = {"logits": self.head(fused), "fused": fused}
        if self.training:
            x_a = {m: self.proj[m](f[f"{m}_a"]) for m in MODALITIES}       # x_m1_a
            z_a = {m: torch.where(has[m], x_a[m], gen[m][1]) for m in MODALITIES}
            out.update(x=x, x_a=x_a, gen=gen, z=z, z_a=z_a)
        return out


# ---------------------------------------------------------------------------------------------------------
# PROMISE: loss (FNCL, CCCL Eq. (9), total). Row selections are masks (no host-device sync); logits in fp32.
# ---------------------------------------------------------------------------------------------------------
EXCLUDED = -1e9          # a masked logit: exp underflows to exactly 0 in fp32, like -inf, without NaN rows


def nt_xent(u, v, tau, rows=None):
    """SimCLR's NT-Xent over the 2n vectors [u; v] of the rows in `rows` (boolean (n,), default all): positive = the
    pair partner, negatives = the other selected vectors. ASSUMPTION: the paper's "symmetric NT-Xent"."""
    n = len(u)
    keep = torch.ones(2 * n, dtype=torch.bool, device=u.device) if rows is None else torch.cat([rows, rows])
    with torch.autocast(u.device.type, enabled=False):
        z = F.normalize(torch.cat([u, v]).float(), dim=-1)                # (2n, d)
        valid = keep[:, None] & keep[None, :] & ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
        sim = (z @ z.T / tau).masked_fill(~valid, EXCLUDED)
        per_anchor = F.cross_entropy(sim, torch.arange(2 * n, device=z.device).roll(n), reduction="none")
    return (per_anchor * keep).sum() / keep.sum().clamp(min=1)


def fncl(x, x_a, g, g_a, tau, rows=None):
    """FNCL: mean symmetric NT-Xent of (x_m1, x^_m2), (x_m1, x^_m2_a), (x_m1_a, x^_m2), (x_m1_a, x^_m2_a)."""
    return torch.stack([nt_xent(a, b, tau, rows) for a in (x, x_a) for b in (g, g_a)]).mean()


def fncl_partner(x, x_a, missing, m1, partner):
    """The real side of FNCL's pairs with x^_m2 (generated from m1). available (the paper's pairs): x_m1, x_m1_a on
    every row. reconstruction: the real x_m2, x_m2_a where m2 is present, x_m1, x_m1_a where it is missing."""
    if partner == "available":
        return x[m1], x_a[m1]
    has_m2 = (missing != ABSENT[OTHER[m1]])[:, None]
    return torch.where(has_m2, x[OTHER[m1]], x[m1]), torch.where(has_m2, x_a[OTHER[m1]], x_a[m1])


def supcon(z, positive, tau):
    """Supervised contrastive loss (Khosla et al., L_out) over z (n, d) with a boolean (n, n) positive mask; the
    denominator runs over all k != a; anchors without a positive are excluded."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=-1)
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        log_prob = (z @ z.T / tau).masked_fill(self_mask, float("-inf")).log_softmax(-1)
    positive = positive & ~self_mask
    count = positive.sum(1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / count.clamp(min=1)
    keep = count > 0
    return (per_anchor * keep).sum() / keep.sum().clamp(min=1)


def cccl(z, z_a, label, task, tau):
    """Eq. (9), CCCL within one modality over [z; z_a]: positives = the other view and same-label samples
    (multi-label: sharing >= 1 label)."""
    y = torch.cat([label, label])
    same = (y.float() @ y.float().T > 0) if task == "multilabel" else y[:, None] == y[None, :]   # ASSUMPTION: >= 1
    other_view = torch.eye(2 * len(z), dtype=torch.bool, device=z.device).roll(len(z), 1)   # k <-> k + N
    return supcon(torch.cat([z, z_a]), same | other_view, tau)


def gather(t):
    """Every process's rows of t in rank order (torchrun): with gradients for the method's tensors, so the contrastive
    batch and its gradient are the single-process ones. One process: t itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    if t.requires_grad:
        return torch.cat(dist_nn.all_gather(t))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def promise_loss(out, batch, task, args):
    """L = L_cls + lambda [alpha FNCL + (1 - alpha) CCCL]; the contrastive terms over every process's rows."""
    L_cls = task_loss(out["logits"], batch["label"], task)
    x, x_a, z, z_a = ({m: gather(out[k][m]) for m in MODALITIES} for k in ("x", "x_a", "z", "z_a"))
    gen = {m: tuple(gather(g) for g in out["gen"][m]) for m in MODALITIES}
    missing, label = gather(batch["missing"]), gather(batch["label"])
    L_fncl, directions = [], []
    for m1 in MODALITIES:                                                   # m2 = OTHER[m1], generated from m1
        m2, rows = OTHER[m1], missing != ABSENT[m1]
        t, t_a = fncl_partner(x, x_a, missing, m1, args.fncl_partner)
        L_fncl.append(fncl(t, t_a, gen[m2][0], gen[m2][1], args.tau, rows))                 # FNCL
        directions.append(rows.any())
    directions = torch.stack(directions).float()                          # mean over the directions that have rows
    L_fncl = (torch.stack(L_fncl) * directions).sum() / directions.sum().clamp(min=1)
    L_cccl = torch.stack([cccl(z[m], z_a[m], label, task, args.tau) for m in MODALITIES]).mean()   # Eq. (9)
    L_contrast = args.alpha * L_fncl + (1 - args.alpha) * L_cccl
    return L_cls + args.contrast_weight * L_contrast                       # L = L_cls + lambda L_contrast


# ---------------------------------------------------------------------------------------------------------
# Augmented views (ASSUMPTION: the paper does not give x_a's augmentations), the view of each epoch, the feature cache
# ---------------------------------------------------------------------------------------------------------
def augment(item, seed, view, text_dropout, crop_scale):
    """The augmented input of one sample: a pure function of (seed, id, view).
    ASSUMPTION: random resized crop (area crop_scale-1, ratio 3/4-4/3) + flip; word dropout (keeps >= 1 word)."""
    rng = random.Random(f"{seed}/{item['id']}/{view}")
    image, (w, h) = item["image"], item["image"].size
    area, ratio = rng.uniform(crop_scale, 1.0) * w * h, math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, max(1, round(math.sqrt(area * ratio)))), min(h, max(1, round(math.sqrt(area / ratio))))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    words = item["text"].split()
    kept = [word for word in words if rng.random() >= text_dropout]
    return {**item, "image": image, "text": " ".join(kept or words[:1])}


class Views(torch.utils.data.Dataset):
    """The training split; each item carries the index of the augmented view of the epoch being trained (fit calls
    set_epoch): view e, or e mod `cycle` for a cache of `cycle` views; None when there are no views (x_a = x)."""

    def __init__(self, ds, views, cycle=None):
        self.ds, self.views, self.cycle, self.epoch = ds, views, cycle, 0
        for name in SPLIT_ATTRS:
            setattr(self, name, getattr(ds, name))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        view = None if not self.views else self.epoch if self.cycle is None else self.epoch % self.cycle
        return {**self.ds[i], "view": view}

    def labels(self):
        return self.ds.labels()


class CachedSet(torch.utils.data.Dataset):
    """A split as cached frozen features: feat_image / feat_text (N, E), feat_image_a / feat_text_a (N, V, E)."""

    def __init__(self, ds, tensors):
        for name in SPLIT_ATTRS:
            setattr(self, name, getattr(ds, name))
        self.tensors, self.y = tensors, ds.labels()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"id": self.ids[i], "label": self.y[i], "missing": int(self.missing[i]),
                **{k: v[i] for k, v in self.tensors.items()}}

    def labels(self):
        return self.y


class PromiseCollate:
    """Raw items -> the backbone's batch plus `rows_<m>` (indices of the rows that have m), and `aug_*` keys (the
    epoch's augmented view) for training items. Cached items -> feat_image / feat_text, plus feat_image_a /
    feat_text_a of the epoch's view for training items."""

    def __init__(self, base, args):
        self.base, self.seed, self.text_dropout, self.crop_scale = base, args.seed, args.text_dropout, args.crop_scale

    def encoder_batch(self, items):
        batch = self.base(items)
        for m in MODALITIES:
            batch[f"rows_{m}"] = torch.tensor([k for k, it in enumerate(items) if it["missing"] != ABSENT[m]],
                                              dtype=torch.long)
        return batch

    def augment(self, items, view):
        return self.encoder_batch([augment(it, self.seed, view(it), self.text_dropout, self.crop_scale) for it in items])

    def all_views(self, views, items):                          # cache building: the original and every view
        return [self.encoder_batch(items)] + [self.augment(items, lambda it: v) for v in range(views)]

    def __call__(self, items):
        train = items[0].get("view") is not None
        if "feat_image" in items[0]:
            batch = {"ids": [it["id"] for it in items], "missing": torch.tensor([it["missing"] for it in items]),
                     "label": torch.as_tensor(np.stack([np.asarray(it["label"]) for it in items]))}
            for m in MODALITIES:
                batch[f"feat_{m}"] = torch.stack([it[f"feat_{m}"] for it in items])
                if train:
                    batch[f"feat_{m}_a"] = torch.stack([it[f"feat_{m}_a"][it["view"]] for it in items])
            return batch
        batch = self.encoder_batch(items)
        if train:
            aug = self.augment(items, lambda it: it["view"])
            batch.update({f"aug_{k}": v for k, v in aug.items() if torch.is_tensor(v)})
        return batch


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def feature_dtype(run):
    """The autocast dtype: what the first trainable layer (proj) casts the features to, so storing it loses nothing."""
    return torch.bfloat16 if run.device.type == "cuda" and run.args.precision == "bf16" else torch.float32


def cache_key(run, args, ds, split, views):
    """Everything the cached features depend on: the image files (path, size, mtime), ids and texts, data root,
    backbone and weights, feature dtype, missing table, rate, seed, text length and the augmentation."""
    weights = torch.stack([p.detach().float().sum() for p in run.bb.parameters()]).cpu().numpy()
    return json.loads(json.dumps({
        "backbone": run.bb.info, "weights": hashlib.sha256(weights.tobytes()).hexdigest()[:16],
        "dtype": str(feature_dtype(run)), "dataset": args.dataset, "data_root": os.path.abspath(args.data_root),
        "split": split, "images": image_cache_key(ds, run.bb), "data": digest([ds.ids, ds.texts]),
        "missing": ds.missing_type, "rate": ds.rate, "table_hash": ds.table_hash, "seed": args.seed,
        "max_text_len": args.max_text_len, "augment": None if not views else
        {"views": views, "text_dropout": args.text_dropout, "crop_scale": args.crop_scale}}))


def cached_split(run, args, ds, split, views):
    """Encode `ds` once (original + `views` augmented views) to a file keyed like a build artefact (`cache_key`,
    common.cached_tensors); reuse it while the key is unchanged."""
    t0, dtype = time.time(), feature_dtype(run)

    def build():
        parts = {}
        mine = rank_batches(run, len(ds))                              # under torchrun each rank encodes its share
        loader = torch.utils.data.DataLoader(ds, batch_sampler=mine, num_workers=args.num_workers,
                                             collate_fn=partial(run.collate.all_views, views))
        for batches in tqdm(loader, desc=f"caching {split} features", disable=not run.main):
            with autocast(run):
                feats = [unimodal_features(run.bb, to_device(b, run.device)) for b in batches]
            for k, m in enumerate(MODALITIES):
                parts.setdefault(f"feat_{m}", []).append(feats[0][k].to(dtype).cpu())
                if views:
                    parts.setdefault(f"feat_{m}_a", []).append(
                        torch.stack([f[k] for f in feats[1:]], 1).to(dtype).cpu())
        return gather_rows(run, mine, {k: torch.cat(v) for k, v in parts.items()})
    tensors, path, hit = cached_tensors(run, f"promise-{args.dataset}-{split}", cache_key(run, args, ds, split, views),
                                        build)
    build_s = 0.0 if hit else time.time() - t0
    if not hit:
        run.log(f"{split} features: cached to {path} in {build_s:.1f}s")
    return CachedSet(ds, tensors), {"path": path, "hit": hit, "build_s": build_s}


def main(args):
    check_args(args)
    run = setup(args)
    if min(args.batch_size, len(run.train_set)) % run.world:     # only a train split smaller than one batch
        raise DataError(f"the train split ({len(run.train_set)} samples) does not split evenly over {run.world} "
                        f"processes, and PROMISE gathers equal shares for its contrastive terms: change --nproc_per_node")
    model = PROMISE(run.bb, run.num_outputs, args).to(run.device)
    run.collate = PromiseCollate(run.collate, args)
    extra, views = {}, views_of(args)
    if args.cache_features:                                        # --eval-only never encodes the training split
        for split in ("val", "test") if args.eval_only else ("train", "val", "test"):
            ds, extra[f"cache_{split}"] = cached_split(run, args, getattr(run, f"{split}_set"), split,
                                                       views if split == "train" else 0)
            setattr(run, f"{split}_set", ds)
    run.train_set = Views(run.train_set, views, cycle=views if args.cache_features else None)
    fit(run, model, lambda out, batch: promise_loss(out, batch, run.task, args))
    return finish(run, model, extra)


# ---------------------------------------------------------------------------------------------------------
# The numbers to compare with (percent), each with its provenance (`common.paper_table`; read by the summary)
# ---------------------------------------------------------------------------------------------------------
PAPER_NUMBERS = paper_table("promise", [
    (CLIP_L14, None, "PROMISE (AAAI 2026) headline results (read in a public summary of the paper)", "review",
     "inferred", "the source gives '70% missing rate' only; the 'both' type is this repository's reading",
     [("food101", "both", 0.7, "both", 0.7, 88.10), ("hatememes", "both", 0.7, "both", 0.7, 67.17)])])


if __name__ == "__main__":
    cli(parser(), main)
