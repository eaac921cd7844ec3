"""MemPrompt: Enhancing Multimodal Model Robustness under Missing Modalities via Memory-Driven Prompt Learning
(Zhao, Xi, Fu, Zhao; IJCAI 2025; no arXiv id found: cite the IJCAI proceedings).

Official code: zhao-yh20/MemPrompt @ 342739e08e3943631e43e60cd0e1f6baea464286 (ViLT, a MAP fork), read, not copied.

Map from the paper to this file:
    Eq. (1) frozen blocks h^{i+1} = f^i(h^i)                     -> the layer loops in `MemPrompt.forward_*`
    Eq. (2) h^i = [p_s,t, p_g,t, f_t, p_s,v, p_g,v, f_v]         -> `insert_prompts` (distributed / pre-append)
    Eq. (4) p_g,m = PromptMem(f_m), query = max-pool of f_m      -> `masked_max`, `MemPromptLayer.forward`
    Eq. (5)-(6) cosine to the keys, softmax, top-N weighted sum  -> `PromptMemory.weights / forward`
    Eq. (7) p_s,m = G_m(p_s), shared prompt chosen by missing case -> `MemPromptLayer.shared`
    Eq. (3) task loss only                                       -> `loss_fn` in `main`

Deviations and assumptions:
    - Retrieval order (code, default): the N keys with the largest cosine, then a softmax over those N cosines. The
      paper's Eq. 5-6 (softmax over all K, keep the N largest weights, no renormalisation): --softmax-over all.
    - Query f_m: max-pool over the modality's tokens of the layer input (the code's; the paper only writes f_m), real
      tokens only (the key mask drops text PAD and padded patches). The code pools over PAD too, but pads to a fixed
      length; here padding is per batch, so PAD would make a query depend on the other samples of its batch.
    - Pre-append (Table 4, no order given): each layer puts [p_s,t, p_g,t, p_s,v, p_g,v] at the sequence start.
    - Generative prompts are computed for both modalities of every sample, missing or not (as the code).
    - Initialisation as the code: memory values and keys kaiming_normal(a=sqrt 5); shared prompts N(0, 0.02);
      bottleneck and head Linear weights N(0, 0.02), biases 0. Bottleneck width D // 16 (the code's).
    - ViLT head: a trainable copy of ViLT's pooler on the text [CLS], then MAP's MLP head (as the code).
    - CLIP (not in the paper): one memory per tower per layer, queried by the max-pool over that tower's tokens (text:
      up to EOT); the per-layer shared prompt has the image width and G_t maps it to the text width. Prompts are
      prepended in their own tower, so distributed and pre-append coincide (--placement has no effect). Head:
      Linear(2E, C) on the concatenated pooled image and text features.
    - Tiny backbones: the prompt depth is clamped to the backbone's layers.
    - Validation once per epoch (the code: every 0.2 epoch; 0.11 for Hateful Memes); the best epoch is tested.

Use from your own code (README, "Use a method in your own code"): `MemPrompt(bb, num_outputs, length, memory_size,
top_n, depth, placement, softmax_over)` on a frozen `common.load_vilt()` / `load_clip()` backbone, after
`resolve_defaults(args)`; `model(batch)["logits"]`; loss `common.task_loss`; no pre-pass. Copy this file with
common.py and data.py.

Usage: python memprompt.py --dataset food101 --missing text --rate 0.7 --test-missing image   (Table 1, cross case)
       python memprompt.py --dataset toy --backbone tiny-vilt                                  (offline, CPU)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import build_parser, cli, finish, fit, setup, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING


def parser():
    p = build_parser("memprompt", __doc__, backbone="vilt")
    # Method-specific
    p.add_argument("--prompt-length", type=int, default=None,
                   help="L, tokens of each generative and shared prompt (Sec. 4.2); default 16, 4 for Hateful Memes")
    p.add_argument("--memory-size", type=int, default=16, help="K, entries per prompt memory (Sec. 3.3, Table 3)")
    p.add_argument("--top-n", type=int, default=5, help="N, retrieved entries per query (Eq. 6, Sec. 4.2)")
    p.add_argument("--prompt-depth", type=int, default=6, help="prompted layers from the first (Sec. 4.2)")
    p.add_argument("--placement", default="distributed", choices=["distributed", "pre-append"],
                   help="distributed: before each modality (Eq. 2); pre-append: all at the start (Table 4)")
    p.add_argument("--softmax-over", default="selected", choices=["selected", "all"],
                   help="Eq. 5: softmax over the N selected cosines (official code) or over all K (paper text)")
    p.set_defaults(lr=None, weight_decay=2e-2, batch_size=256, epochs=20, schedule="linear", warmup=0.1)
    return p


def resolve_defaults(args):
    """Per-dataset paper defaults (Sec. 4.2): Hateful Memes uses L = 4 and lr 1e-3, the others L = 16, lr 5e-3."""
    hateful = args.dataset == "hatememes"
    if args.prompt_length is None:
        args.prompt_length = 4 if hateful else 16
    if args.lr is None:
        args.lr = 1e-3 if hateful else 5e-3
    return args


# ---------------------------------------------------------------------------------------------------------
# MemPrompt: prompt module (Sec. 3.3)
# ---------------------------------------------------------------------------------------------------------
class PromptMemory(nn.Module):
    """PromptMem = {(p_k, q_k)}: K prompts p_k (P, D) and their keys q_k (D)."""

    def __init__(self, K, P, D, N, softmax_over="selected"):
        super().__init__()
        self.N, self.softmax_over = min(N, K), softmax_over
        self.p = nn.Parameter(nn.init.kaiming_normal_(torch.empty(K, P, D), a=math.sqrt(5)))   # (K, P, D)
        self.q = nn.Parameter(nn.init.kaiming_normal_(torch.empty(K, D), a=math.sqrt(5)))      # (K, D)

    def weights(self, f):
        """query f (B, D) -> indices (B, N) of the N most similar keys and their weights w_k (B, N)."""
        cos = F.normalize(f, dim=-1) @ F.normalize(self.q, dim=-1).T          # Eq. (5): cos(f_m, q_k)  (B, K)
        top, idx = cos.topk(self.N, dim=1)                                     # the N most similar entries
        if self.softmax_over == "all":
            return idx, cos.softmax(dim=1).gather(1, idx)                      # Eq. (5) as written: over all K
        return idx, top.softmax(dim=1)                                         # default, the official code's order

    def forward(self, f):                                                      # (B, D) -> (B, P, D)
        idx, w = self.weights(f)
        return (w[:, :, None, None] * self.p[idx]).sum(dim=1)                  # Eq. (6): p_g = sum_k w_k p_k


def bottleneck(d_in, d_out):
    """G_m (Eq. 7): Linear(D, D/16) -> GELU -> Linear(D/16, D_m)."""
    g = nn.Sequential(nn.Linear(d_in, d_in // 16), nn.GELU(), nn.Linear(d_in // 16, d_out))
    for m in (g[0], g[2]):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    return g


class MemPromptLayer(nn.Module):
    """One prompted layer: a prompt memory per modality (generative prompts) and the shared prompts."""

    def __init__(self, P, K, N, D_t, D_v, softmax_over="selected"):
        super().__init__()
        self.mem_t = PromptMemory(K, P, D_t, N, softmax_over)
        self.mem_v = PromptMemory(K, P, D_v, N, softmax_over)
        # ASSUMPTION (CLIP): the shared prompt has the image width D_s = D_v; G_t maps it to D_t (ViLT: all D)
        self.shared_missing_t = nn.Parameter(torch.randn(P, D_v) * 0.02)      # (P, D_s)
        self.shared_missing_v = nn.Parameter(torch.randn(P, D_v) * 0.02)
        self.G_t, self.G_v = bottleneck(D_v, D_t), bottleneck(D_v, D_v)

    def shared(self, missing):
        """p_s per sample by missing case (0 complete: sum of both, 1 text missing, 2 image missing), mapped to
        each stream: -> p_s,t (B, P, D_t), p_s,v (B, P, D_v)."""
        p_s = torch.stack([self.shared_missing_t + self.shared_missing_v,
                           self.shared_missing_t, self.shared_missing_v])     # (3, P, D_s), indexed by the codes
        return self.G_t(p_s)[missing], self.G_v(p_s)[missing]                 # Eq. (7): p_s,m = G_m(p_s)

    def forward(self, f_t, f_v, missing):
        """queries f_t (B, D_t), f_v (B, D_v) -> (p_s,t, p_g,t, p_s,v, p_g,v), each (B, P, D_m)."""
        p_s_t, p_s_v = self.shared(missing)
        return p_s_t, self.mem_t(f_t), p_s_v, self.mem_v(f_v)                  # Eq. (4): p_g,m = PromptMem(f_m)


assert (COMPLETE, TEXT_MISSING, IMAGE_MISSING) == (0, 1, 2), "MemPromptLayer.shared stacks its rows in code order"


def masked_max(x, mask):
    """Max-pool over the real tokens: x (B, L, D), mask (B, L) with 1 = token -> (B, D)."""
    return x.masked_fill(mask[:, :, None] == 0, float("-inf")).amax(dim=1)


def insert_prompts(x, mask, t0, L_t, prompts, placement):
    """The input of a prompted ViLT layer. x (B, L, D) is [older text-side prompts, text (L_t tokens from index
    t0), older image-side prompts, image]; prompts = (p_s,t, p_g,t, p_s,v, p_g,v), each (B, P, D).
    Returns the new x, its key mask and t0, the new index of the text [CLS]."""
    p_s_t, p_g_t, p_s_v, p_g_v = (p.to(x.dtype) for p in prompts)
    ones = mask.new_ones(mask.shape[0], p_s_t.shape[1] + p_g_t.shape[1])     # (B, 2P)
    if placement == "distributed":                                             # Eq. (2)
        cut = t0 + L_t                                                         # end of the text part
        x = torch.cat([p_s_t, p_g_t, x[:, :cut], p_s_v, p_g_v, x[:, cut:]], dim=1)
        mask = torch.cat([ones, mask[:, :cut], ones, mask[:, cut:]], dim=1)
        return x, mask, t0 + ones.shape[1]
    # Table 4, pre-append. ASSUMPTION: the order [p_s,t, p_g,t, p_s,v, p_g,v] (the paper gives none)
    x = torch.cat([p_s_t, p_g_t, p_s_v, p_g_v, x], dim=1)
    mask = torch.cat([ones, ones, mask], dim=1)
    return x, mask, t0 + 2 * ones.shape[1]


# Copied from map.py:mlp_head
def mlp_head(width, num_outputs):
    """MAP's classifier: Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, C), weights N(0, 0.02), bias 0."""
    head = nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                         nn.Linear(2 * width, num_outputs))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


# ---------------------------------------------------------------------------------------------------------
# MemPrompt: forward
# ---------------------------------------------------------------------------------------------------------
class MemPrompt(nn.Module):
    def __init__(self, bb, num_outputs, length=16, memory_size=16, top_n=5, depth=6, placement="distributed",
                 softmax_over="selected"):
        super().__init__()
        self.bb, self.placement = bb, placement
        self.depth = min(depth, bb.num_layers)
        D_t, D_v = (bb.width, bb.width) if bb.kind == "vilt" else (bb.width_text, bb.width_image)
        self.layers = nn.ModuleList(MemPromptLayer(length, memory_size, top_n, D_t, D_v, softmax_over)
                                    for _ in range(self.depth))
        if bb.kind == "vilt":
            self.pooler = bb.pooler_copy()                                     # trained, as in the official code
            self.head = mlp_head(bb.width, num_outputs)
        else:
            self.head = nn.Linear(2 * bb.embed_dim, num_outputs)              # ASSUMPTION (CLIP): linear head

    def forward(self, batch):
        feature = self.forward_vilt(batch) if self.bb.kind == "vilt" else self.forward_clip(batch)
        return {"logits": self.head(feature)}

    def forward_vilt(self, batch):
        bb, missing = self.bb, batch["missing"]
        x, mask = bb.embed(batch)                                              # (B, L_t + L_v, D), (B, L)
        L_t = batch["input_ids"].shape[1]
        L_v = x.shape[1] - L_t
        t0 = 0                                                                 # index of the text [CLS]
        bias = bb.attention_bias(mask, x.dtype)
        for i in range(bb.num_layers):
            if i < self.depth:
                # Eq. (4) queries (B, D). ASSUMPTION: real tokens only (the code also pools PAD)
                f_t = masked_max(x[:, t0:t0 + L_t], mask[:, t0:t0 + L_t])
                f_v = masked_max(x[:, -L_v:], mask[:, -L_v:])                  # the image is always last
                prompts = self.layers[i](f_t, f_v, missing)
                x, mask, t0 = insert_prompts(x, mask, t0, L_t, prompts, self.placement)   # Eq. (2)
                bias = bb.attention_bias(mask, x.dtype)
            x = bb.block(i, x, bias)                                           # Eq. (1)
        return self.pooler(bb.final_norm(x)[:, t0:t0 + 1])                     # text [CLS] after its prompts

    def forward_clip(self, batch):
        bb, missing, ids = self.bb, batch["missing"], batch["text"]
        x, t = bb.image_embed(batch["image"]), bb.text_embed(ids)              # (B, L_v, D_v), (B, 77, D_t)
        L_v, L_t = x.shape[1], t.shape[1]
        # ASSUMPTION (CLIP): the text query pools the tokens up to EOT, the image query all tokens
        text_mask = torch.arange(L_t, device=ids.device) <= ids.argmax(dim=-1, keepdim=True)   # (B, 77)
        n = 0                                                                  # prompt tokens in front, per tower
        for i in range(bb.num_layers):
            if i < self.depth:
                f_t, f_v = masked_max(t[:, -L_t:], text_mask), x[:, -L_v:].amax(dim=1)   # Eq. (4) queries
                p_s_t, p_g_t, p_s_v, p_g_v = self.layers[i](f_t, f_v, missing)
                t = torch.cat([p_s_t.to(t.dtype), p_g_t.to(t.dtype), t], dim=1)           # (B, n + 77, D_t)
                x = torch.cat([p_s_v.to(x.dtype), p_g_v.to(x.dtype), x], dim=1)           # (B, n + L_v, D_v)
                n += p_s_t.shape[1] + p_g_t.shape[1]
            x, t = bb.image_block(i, x), bb.text_block(i, t)                  # Eq. (1), each tower
        return torch.cat([bb.image_pool(x, n), bb.text_pool(t, ids, n)], dim=-1)          # (B, 2E)


# ---------------------------------------------------------------------------------------------------------
# MemPrompt: loss (Eq. 3, the task loss only)
# ---------------------------------------------------------------------------------------------------------
def build_model(run, args):
    return MemPrompt(run.bb, run.num_outputs, args.prompt_length, args.memory_size, args.top_n, args.prompt_depth,
                     args.placement, args.softmax_over).to(run.device)


def main(args):
    resolve_defaults(args)
    run = setup(args)
    model = build_model(run, args)
    if model.depth < args.prompt_depth:
        run.log(f"prompt depth clamped to the backbone's {model.depth} layers")

    def loss_fn(out, batch):
        return task_loss(out["logits"], batch["label"], run.task)             # Eq. (3): L = L_task

    fit(run, model, loss_fn)
    extra = {"memprompt": {"prompt_length": args.prompt_length, "memory_size": args.memory_size, "top_n": args.top_n,
                           "prompt_depth": model.depth, "placement": args.placement if run.bb.kind == "vilt"
                           else "per-tower", "softmax_over": args.softmax_over}}
    return finish(run, model, extra)


if __name__ == "__main__":
    cli(parser(), main)
