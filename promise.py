"""PROMISE: Prompt-Attentive Hierarchical Contrastive Learning for Robust Cross-Modal Representation with Missing
Modalities (Chen et al., AAAI 2026, arXiv 2511.10997).

Official code: none: implemented from the paper (its summary in shared/papers/promise.md, METHODS.md Sec. 7).

Map from the paper to this file:
    frozen features of the present modalities (CLIP ViT-L/14)                   -> `unimodal_features`
    prompt pools (4 prompts x length 16 per modality), Prompt Attention, two
    linear layers giving x^_m2 and x^_m2_a                                       -> `PromptAttention.forward`
    x^_m2 used only where m2 is missing, crossmodal transformer, head          -> `PROMISE.forward`
    FNCL: symmetric NT-Xent of (x_m1, x^_m2), (x_m1, x^_m2_a), (x_m1_a, x^_m2), (x_m1_a, x^_m2_a)  -> `fncl`
    CCCL, Eq. (9): supervised contrastive loss within each modality           -> `cccl`, `supcon`
    L = L_cls + lambda [alpha FNCL + (1 - alpha) CCCL]                          -> `promise_loss`

Deviations and assumptions:
    - ASSUMPTION: augmented views: image random resized crop (area 0.5-1, ratio 3/4-4/3) + horizontal flip; text word
      dropout 10%. Each sample has --aug-views fixed views (seeded by seed, id, view); each epoch draws one, so
      training with and without --cache-features is the same computation (the cache only memoises the encoder).
    - ASSUMPTION: each modality's feature is projected by its own linear layer (width d = E); Prompt Attention =
      one multi-head self-attention over [pool of m2 (N*P tokens); projected x_m1], mean over its outputs.
    - ASSUMPTION: fusion = 6-layer pre-LN transformer (8 heads; 2 for tiny widths; FFN 4d; dropout 0) over
      [CLS, image token, text token] + learned position embeddings; linear head on the final-normed CLS.
    - ASSUMPTION: NT-Xent is SimCLR's over the 2N vectors of a pair (symmetric by construction); FNCL averages it over
      the four pairs and both directions m1 -> m2, each over the rows where m1 is present (complete rows give both).
    - ASSUMPTION: CCCL per modality over [z_m; z_m_a] (real where present, generated where missing); positives = the
      other view and same-label samples; multi-label (MM-IMDb): sharing >= 1 label; anchors without positives excluded.
    - ASSUMPTION: alpha = 0.5 and lambda (--contrast-weight) = 1: the paper gives no value; equal weights, L = L_cls +
      L_contrast as written. Contrastive terms use the micro-batch (default = the paper's batch of 64).
    - ASSUMPTION: Adam, weight decay 0, cosine schedule without warm-up, 20 epochs (not stated in the paper).
    - NON-PAPER ADAPTATION (ViLT is single-stream): unimodal features from single-modality passes over ViLT's own
      tokens: text-only pass -> mean of the text tokens; image-only pass -> mean of the image tokens.

Use from your own code (README, "Use a method in your own code"): `PROMISE(bb, num_outputs, args)` on a frozen
`common.load_clip()` / `load_vilt()` backbone; loss `promise_loss(out, batch, task, args)`; training batches carry
an augmented view as `aug_*` keys (`PromiseCollate(common.Collate(...), args)` on items with a "view"); the feature
cache as a plain call: `unimodal_features(bb, batch)`, passed as `feat_image` / `feat_text` (+ `_a` in training).
Copy this file with common.py and data.py.

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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import (autocast, build_parser, cli, finish, fit, gather_rows, rank_batches, read_checkpoint, save_tensors,
                    setup, task_loss, to_device)
from data import IMAGE_MISSING, TEXT_MISSING

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
    p.add_argument("--aug-views", type=int, default=2, help="fixed augmented views x_a per training sample")
    p.add_argument("--text-dropout", type=float, default=0.1, help="word dropout of the augmented text view")
    p.add_argument("--crop-scale", type=float, default=0.5, help="smallest area fraction of the augmented image crop")
    p.add_argument("--cache-features", action="store_true", help="encode every split once with the frozen encoder")
    p.add_argument("--cache-dir", default=os.path.join("runs", "cache"), help="where --cache-features keeps its files")
    p.set_defaults(lr=1e-4, weight_decay=0.0, batch_size=64, micro_batch=64, epochs=20, optimizer="adam",
                   schedule="cosine", warmup=0.0, clip_model="ViT-L-14")
    return p


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
        h = self.attn(seq, seq, seq, need_weights=False)[0].mean(1)          # (B, d); ASSUMPTION: mean over tokens
        return self.out(h), self.out_a(h)


# ---------------------------------------------------------------------------------------------------------
# PROMISE: forward
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def unimodal_features(bb, batch):
    """Frozen features of the present modalities only, (B, E) each with zeros where missing: the encoder never
    sees a dummy input."""
    has = {m: batch["missing"] != ABSENT[m] for m in MODALITIES}
    width = bb.embed_dim if bb.kind == "clip" else bb.width
    f = {m: torch.zeros(len(batch["missing"]), width, device=batch["missing"].device) for m in MODALITIES}
    if bb.kind == "clip":
        if has["image"].any():
            x = bb.image_embed(batch["image"][has["image"]])              # (B_i, L_v, D_v)
            for i in range(bb.num_layers):
                x = bb.image_block(i, x)
            f["image"][has["image"]] = bb.image_pool(x).to(f["image"].dtype)
        if has["text"].any():
            ids = batch["text"][has["text"]]
            t = bb.text_embed(ids)                                         # (B_t, 77, D_t)
            for i in range(bb.num_layers):
                t = bb.text_block(i, t)
            f["text"][has["text"]] = bb.text_pool(t, ids).to(f["text"].dtype)
        return f["image"], f["text"]
    # NON-PAPER ADAPTATION: ViLT's embedding layer embeds both parts at once (a dummy part is dropped before any
    # block); each modality then runs alone through the blocks and is mean-pooled over its valid tokens.
    x, mask = bb.embed(batch)                                              # (B, L_t + L_v, D), (B, L_t + L_v)
    L_t = batch["input_ids"].shape[1]
    for m, part in (("text", slice(0, L_t)), ("image", slice(L_t, None))):
        if has[m].any():
            h, valid = x[has[m], part], mask[has[m], part]
            bias = bb.attention_bias(valid, h.dtype)
            for i in range(bb.num_layers):
                h = bb.block(i, h, bias)
            valid = valid[..., None].to(h.dtype)
            f[m][has[m]] = ((bb.final_norm(h) * valid).sum(1) / valid.sum(1)).to(f[m].dtype)
    return f["image"], f["text"]


class PROMISE(nn.Module):
    def __init__(self, bb, num_outputs, args):
        super().__init__()
        self.bb, self.views = bb, None
        d = bb.embed_dim if bb.kind == "clip" else bb.width
        heads = 8 if d >= 256 else 2
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

    def train(self, mode=True):
        """fit() calls train() at the start of every epoch: the training set draws each sample's view anew."""
        if mode and self.views is not None:
            self.views.epoch += 1
        return super().train(mode)

    def features(self, batch):
        """{m: (B, E)} and, for training batches, {m_a: (B, E)}: from the cache or from the frozen encoder."""
        if "feat_image" in batch:
            return {k[5:]: v for k, v in batch.items() if k.startswith("feat_")}
        f = dict(zip(MODALITIES, unimodal_features(self.bb, batch)))
        if self.training and "aug_missing" in batch:
            aug = unimodal_features(self.bb, {k[4:]: v for k, v in batch.items() if k.startswith("aug_")})
            f.update({f"{m}_a": v for m, v in zip(MODALITIES, aug)})
        return f

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
# PROMISE: loss (FNCL, CCCL Eq. (9), total)
# ---------------------------------------------------------------------------------------------------------
def nt_xent(u, v, tau):
    """SimCLR's NT-Xent over the 2N vectors [u; v]: positive = the pair partner, negatives = the other 2N - 2.
    ASSUMPTION: this is the paper's "symmetric NT-Xent" (every vector of both sides is an anchor)."""
    z = F.normalize(torch.cat([u, v]).float(), dim=-1)                    # (2N, d)
    n = len(u)
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def fncl(x, x_a, g, g_a, tau):
    """FNCL: mean symmetric NT-Xent of (x_m1, x^_m2), (x_m1, x^_m2_a), (x_m1_a, x^_m2), (x_m1_a, x^_m2_a)."""
    return torch.stack([nt_xent(a, b, tau) for a in (x, x_a) for b in (g, g_a)]).mean()


def supcon(z, positive, tau):
    """Supervised contrastive loss (Khosla et al., L_out) over z (n, d) with a boolean (n, n) positive mask; the
    denominator runs over all k != a; anchors without a positive are excluded."""
    z = F.normalize(z.float(), dim=-1)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = (z @ z.T / tau).masked_fill(self_mask, float("-inf")).log_softmax(-1)
    positive = positive & ~self_mask
    count = positive.sum(1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / count.clamp(min=1)
    keep = count > 0
    return per_anchor[keep].mean() if keep.any() else z.sum() * 0.0


def cccl(z, z_a, label, task, tau):
    """Eq. (9), CCCL within one modality over [z; z_a]: positives = the other view and same-label samples
    (multi-label: sharing >= 1 label)."""
    y = torch.cat([label, label])
    same = (y.float() @ y.float().T > 0) if task == "multilabel" else y[:, None] == y[None, :]   # ASSUMPTION: >= 1
    other_view = torch.eye(2 * len(z), dtype=torch.bool, device=z.device).roll(len(z), 1)   # k <-> k + N
    return supcon(torch.cat([z, z_a]), same | other_view, tau)


def promise_loss(out, batch, task, args):
    """L = L_cls + lambda [alpha FNCL + (1 - alpha) CCCL]."""
    L_cls = task_loss(out["logits"], batch["label"], task)
    L_fncl = []
    for m1 in MODALITIES:                                                   # m2 = OTHER[m1], generated from m1
        rows = batch["missing"] != ABSENT[m1]
        if rows.any():
            g, g_a = out["gen"][OTHER[m1]]
            L_fncl.append(fncl(out["x"][m1][rows], out["x_a"][m1][rows], g[rows], g_a[rows], args.tau))  # FNCL
    L_cccl = [cccl(out["z"][m], out["z_a"][m], batch["label"], task, args.tau) for m in MODALITIES]   # Eq. (9)
    L_contrast = args.alpha * torch.stack(L_fncl).mean() + (1 - args.alpha) * torch.stack(L_cccl).mean()
    return L_cls + args.contrast_weight * L_contrast                       # L = L_cls + lambda L_contrast


# ---------------------------------------------------------------------------------------------------------
# Augmented views (ASSUMPTION, METHODS.md 7.2), the view of each epoch, the feature cache
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
    """The training split; each item carries the index of its augmented view for this epoch, a seeded draw among
    --aug-views. PROMISE.train() advances `epoch` (fit calls it at the start of every epoch)."""

    def __init__(self, ds, seed, views):
        self.ds, self.seed, self.views, self.epoch = ds, seed, views, -1
        for name in SPLIT_ATTRS:
            setattr(self, name, getattr(ds, name))

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "view": random.Random(f"{self.seed}/{self.epoch}/{i}").randrange(self.views)}

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
    """Raw items -> the backbone's batch, plus `aug_*` keys (the item's augmented view) for training items.
    Cached items -> feat_image / feat_text, plus feat_image_a / feat_text_a of the drawn view for training items."""

    def __init__(self, base, args):
        self.base, self.seed, self.text_dropout, self.crop_scale = base, args.seed, args.text_dropout, args.crop_scale

    def augment(self, items, view):
        return self.base([augment(it, self.seed, view(it), self.text_dropout, self.crop_scale) for it in items])

    def all_views(self, views, items):                          # cache building: the original and every view
        return [self.base(items)] + [self.augment(items, lambda it: v) for v in range(views)]

    def __call__(self, items):
        if "feat_image" in items[0]:
            batch = {"ids": [it["id"] for it in items], "missing": torch.tensor([it["missing"] for it in items]),
                     "label": torch.as_tensor(np.stack([np.asarray(it["label"]) for it in items]))}
            for m in MODALITIES:
                batch[f"feat_{m}"] = torch.stack([it[f"feat_{m}"] for it in items])
                if "view" in items[0]:
                    batch[f"feat_{m}_a"] = torch.stack([it[f"feat_{m}_a"][it["view"]] for it in items])
            return batch
        batch = self.base(items)
        if "view" in items[0]:
            aug = self.augment(items, lambda it: it["view"])
            batch.update({f"aug_{k}": v for k, v in aug.items() if torch.is_tensor(v)})
        return batch


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cached_split(run, args, ds, split, views):
    """Encode `ds` once (original + `views` augmented views) to a file keyed like a build artefact; reuse it while
    the key (backbone and weights, data, missing table, augmentation, seed) is unchanged."""
    weights = torch.stack([p.detach().float().sum() for p in run.bb.parameters()]).cpu().numpy()
    key = json.loads(json.dumps({
        "backbone": run.bb.info, "weights": hashlib.sha256(weights.tobytes()).hexdigest()[:16],
        "dataset": args.dataset, "split": split, "data": digest([ds.ids, ds.texts]), "table_hash": ds.table_hash,
        "max_text_len": args.max_text_len, "seed": args.seed, "augment": None if not views else
        {"views": views, "text_dropout": args.text_dropout, "crop_scale": args.crop_scale}}))
    path = os.path.join(args.cache_dir, f"promise-{args.dataset}-{split}-{digest(key)}.safetensors")
    if os.path.isfile(path):
        tensors, meta = read_checkpoint(path)
        if meta.get("key") == key:
            run.log(f"{split} features: reusing {path}")
            return CachedSet(ds, tensors), {"path": path, "hit": True, "build_s": 0.0}
    t0, parts = time.time(), {}
    mine = rank_batches(run, len(ds))                                  # under torchrun each rank encodes its share
    loader = torch.utils.data.DataLoader(ds, batch_sampler=mine, num_workers=args.num_workers,
                                         collate_fn=partial(run.collate.all_views, views))
    for batches in tqdm(loader, desc=f"caching {split} features", disable=not run.main):
        with autocast(run):
            feats = [unimodal_features(run.bb, to_device(b, run.device)) for b in batches]
        for k, m in enumerate(MODALITIES):
            parts.setdefault(f"feat_{m}", []).append(feats[0][k].float().cpu())
            if views:
                parts.setdefault(f"feat_{m}_a", []).append(torch.stack([f[k] for f in feats[1:]], 1).float().cpu())
    tensors = gather_rows(run, mine, {k: torch.cat(v) for k, v in parts.items()})
    if run.main:
        save_tensors(path, tensors, {"key": key})
    run.log(f"{split} features: cached to {path} in {time.time() - t0:.1f}s")
    return CachedSet(ds, tensors), {"path": path, "hit": False, "build_s": time.time() - t0}


def main(args):
    run = setup(args)
    model = PROMISE(run.bb, run.num_outputs, args).to(run.device)
    run.collate = PromiseCollate(run.collate, args)
    extra = {}
    if args.cache_features:
        for split, views in (("train", args.aug_views), ("val", 0), ("test", 0)):
            ds, extra[f"cache_{split}"] = cached_split(run, args, getattr(run, f"{split}_set"), split, views)
            setattr(run, f"{split}_set", ds)
    run.train_set = model.views = Views(run.train_set, args.seed, args.aug_views)
    fit(run, model, lambda out, batch: promise_loss(out, batch, run.task, args))
    return finish(run, model, extra)


if __name__ == "__main__":
    cli(parser(), main)
