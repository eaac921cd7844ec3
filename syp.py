"""SyP: Synergistic Prompting for Robust Visual Recognition with Missing Modalities (Zhang et al., ICCV 2025,
arXiv 2507.07802).

Official code: none: implemented from the paper. Its sizes (36 prompt tokens, 6 layers) and its baseline are those
of DCP, hulianyuyy/Deep_Correlated_Prompting @ 3519534 (clip/modules/clip_missing_aware_prompt_module.py,
clip/modules/vision_transformer_prompts.py), whose conventions fill the gaps marked (DCP) below.

Map from the paper (method section; notation the paper's, labels (E1)-(E8) ours, in the paper's order):
    (E1) X_C = [X_I, X_T], X_I in R^{d_I}, X_T in R^{d_T}, a missing modality a zero tensor -> `input_features`
    (E2) S_d = sigmoid(W_2 ReLU(W_1 X_C + b_1) + b_2), the Dynamic Adapter, reduction r  -> `SynergisticPrompts.adapter`
    (E3) P_{I,D} = P_{I,B} (.) S_d,  P_{T,D} = P_{T,B} (.) S_d: ONE S_d for both towers  -> `SynergisticPrompts.first`
    (E4) P_{I,S} = G_I(P_S),  P_{T,S} = G_T(P_S): linear projections of one static P_S  -> `SynergisticPrompts.first`
    (E5) P_m^I = P_{I,D} + P_{I,S},  P_m^T = P_{T,D} + P_{T,S}, prepended to each tower  -> `first`, `forward_clip`
    (E6) P_m^{I,R_i} = F_i(P_m^{I,R_{i-1}}) = LN(FC(GELU(FC(P_m^{I,R_{i-1}})))), also T -> `propagation`, the loops
    (E7) P_final = FC(P_m^{I,R} || P_m^{T,R}), the prompt features of each tower          -> `head_features`, `head`
    (E8) L_total = sum_i L_i(P_final^(i)), the task loss                                  -> `loss_fn` in `main`
    Missing cases m in {c, m1, m2} = (complete, image missing, text missing) in the paper; this repository's codes
    are the reverse for m1/m2: 0 = complete, 1 = TEXT missing, 2 = IMAGE missing (data.py).
Ablations (the sources print two ablation tables without numbers; "Table 3" = the first (dynamic / static prompt),
"Table 4" = the second (base prompt, adapter), our names; `paper_variant` names the row a run reproduces):
--no-dynamic (static prompt only), --no-static (dynamic prompt only = base prompt + adapter), --no-static
--no-adapter (base prompt only), --no-adapter (synergistic prompts without the adapter), --no-dynamic --no-static
--head cls (classifier fine-tuning only).

Readings of the paper (the literal one is the default, the other a flag):
    - (E6) --propagate inserted (default): F_i's argument is the prompt INSERTED at layer i-1 (F_{i-1}'s output,
      P^{R_0} for i = 1), a chain of inserted prompts, as the equation's only argument and DCP's chain of prompts;
      --propagate output: F_i of the prompt tokens that LEFT layer i-1 (the prose's "integrates ... the current
      layer's input features"). Either replaces the prompt part of layer i's input, 1 <= i < M; after layer M-1
      the prompts are carried through the remaining layers.
    - CLIP head input, --missing-feature keep (default, the paper: P_final = FC(P^{I,R} || P^{T,R}), nothing
      zeroed): the FC sees the missing tower's prompt feature (computed on the dummy input), so P_{I,B}[image
      missing] and P_{T,B}[text missing] train, the prompts S_d is said to re-weight when a modality is absent;
      --missing-feature zero (DCP's code): that half is zeroed, the logits ignore the missing tower and those two
      prompts get zero gradient (46,080 of the 1.61 M trainable parameters on ViT-B/16, Food-101, never
      train). CLIP only.
    - (E7) the sources' words: "the prompt features of the last prompted layer". Read as each tower's L_p prompt
      tokens at the ENCODER OUTPUT (the prompts of the last prompted layer, carried to the end), token mean, then
      the tower's frozen final norm and projection (CLIP: ln_post, proj; ln_final, text_projection), so 2E = DCP's
      head width; not the prompts as they leave layer M-1.

Assumptions (the paper is silent; each also marked ASSUMPTION where it is coded):
    - (E1) X_I, X_T: the mean of each modality's tokens at the layer-0 input (embedding output; CLIP text over
      SOT..EOT, ViLT over its unpadded tokens), the missing one zeroed: no extra encoder pass, the same reading on
      both backbones, d_I = D_v and d_T = D_t as the paper's two widths allow.
    - (E3) S_d in [0, 1]^{L_p}, one scale per prompt token that scales the whole token row in both towers: the one
      shared S_d the equation asks for, with no new projection although D_v != D_t on CLIP.
    - (E2) W_1: d_I + d_T -> (d_I + d_T) / r, W_2: -> L_p; r = 16 (not reported; DCP's r).
    - P_{k,B} (3 x L_p x D_k) and P_S (3 x L_p x D_t) are indexed by the missing case m (P_m's subscript; DCP's
      per-case prompts), N(0, 0.02) (DCP); P_S has the text width D_t (DCP's common prompts); G_k = Linear(D_t, D_k).
    - (E6) F_i's hidden width D_k / r (DCP's projections); one F_i per tower and layer.
    - CLIP text tower: prompts before SOT, text rows causal (open_clip's mask); a prompt row sees every prompt and
      the text up to its EOT, never the padding after it (else P^{T,R} could not see the text it is to carry under
      the causal mask; the padding is no input). So no prompt or text row sees the padding, and cutting the ids to
      the batch's last EOT + 1 changes nothing (exact).
    - Missing inputs: common.py's dummy inputs ('' and an all-ones image).
    - FC = Linear(2E, C), N(0, 0.02), bias 0 (DCP). (E8): the batch mean instead of the sum (a constant factor).
    - Schedule (not stated): 10% linear warm-up, then linear decay (DCP, MAP).
    - --head cls: DCP's head (CLIP's pooled [CLS] and EOT after the prompts; the prompt rows as above), kept because
      the classifier-only row of "Table 3" has no prompts to pool, and to compare the heads.
    - ViLT (not in the paper): one joint stream of width D, one P_B, G and F_i, prompts before [CLS]; head = FC on
      the prompt feature after ViLT's final norm (--head cls: a trained copy of ViLT's pooler on [CLS], as MAP);
      the missing modality's dummy tokens stay in the joint stream (MAP), only X_C zeroes it.
    - Tiny backbones have 4 layers: M = min(--prompt-depth, layers). L_p, M >= 1 and widths / r >= 1, else refused.
    - CLIP: the forward also returns each tower's per-layer inserted prompt mean, for --nm2i (AOEPT's diagnostic).
    - Recipe (README): DCP's no-decay names, val once per epoch, MM-IMDb per plot; on ViLT LN eps 1e-6, no dropout.

Use from your own code (README, "Use a method in your own code"): `SyP(bb, num_outputs, length, depth, r)` on a
frozen `common.load_clip()` / `load_vilt()` backbone; `model(batch)["logits"]`; loss `common.task_loss`; no
pre-pass. Copy this file with common.py and data.py.

Sections, in reading order: command line; prompt module (dynamic adapter, synergistic prompts, propagation);
forward; loss (E8) and run; the numbers to compare with.

Usage: python syp.py --dataset food101 --missing text --rate 0.7            (CLIP ViT-B/16, the paper's backbone)
       python syp.py --dataset food101 --missing both --rate 0.7            (the paper's main table: 82.45)
       python syp.py --dataset food101 --missing both --rate 0.5 --no-static   ("Table 3", dynamic prompt only)
       python syp.py --dataset toy --backbone tiny-clip                       (offline, CPU, a few minutes)
"""
import torch
import torch.nn as nn

from common import (CLIP_B16, build_parser, cli, clip_text_mask, finish, fit, masked_mean, paper_table,
                    read_checkpoint, setup, task_loss)
from data import IMAGE_MISSING, TEXT_MISSING, DataError


# ---------------------------------------------------------------------------------------------------------
# SyP: command line (the paper's and the official code's defaults)
# ---------------------------------------------------------------------------------------------------------
def parser():
    p = build_parser("syp", __doc__, backbone="clip")
    # Method-specific
    p.add_argument("--prompt-length", type=int, default=36, help="L_p, prompt tokens per tower (paper, setup)")
    p.add_argument("--prompt-depth", type=int, default=6, help="M, prompted layers from the first (paper, setup)")
    p.add_argument("--reduction", type=int, default=16,
                   help="r, reduction ratio of the Dynamic Adapter and of F_i (not reported; DCP's 16)")
    p.add_argument("--head", default="prompts", choices=["prompts", "cls"],
                   help="FC on the towers' prompt features (paper, E7) or on the pooled [CLS]/EOT (DCP)")
    p.add_argument("--no-dynamic", action="store_true",
                   help="drop P_B and the Dynamic Adapter: P = P_S projected (Table 3, static prompt only)")
    p.add_argument("--no-static", action="store_true",
                   help="drop P_S and G_I, G_T: P = P_D (Table 3, dynamic prompt only)")
    p.add_argument("--no-adapter", action="store_true",
                   help="drop the Dynamic Adapter: P_D = P_B (Table 4)")
    p.add_argument("--propagate", default="inserted", choices=["inserted", "output"],
                   help="(E6) F_i of the prompt inserted at layer i-1 (the equation) or of the prompt tokens that "
                        "left layer i-1")
    p.add_argument("--missing-feature", default="keep", choices=["keep", "zero"],
                   help="CLIP: the FC sees the missing tower's prompt feature (E7, the paper) or zeros (DCP's code)")
    # AdamW, lr 1e-3, weight decay 2e-2, batch 32, 20 epochs (paper). ASSUMPTION: 10% warm-up, linear decay.
    p.set_defaults(lr=1e-3, weight_decay=2e-2, batch_size=32, micro_batch=32, epochs=20, schedule="linear",
                   warmup=0.1)
    return p


def check_args(args):
    """Flag combinations that name no model stop here with the fix."""
    if args.reduction < 1:
        return f"--reduction {args.reduction}: r must be >= 1 (the paper's bottlenecks divide widths by r; DCP's 16)"
    if args.missing_feature == "zero" and "vilt" in (args.backbone or ""):
        return "--missing-feature zero is CLIP's (two towers); ViLT has one joint feature: drop it"
    if args.prompt_length < 1 or args.prompt_depth < 1:
        return ("--prompt-length and --prompt-depth must be >= 1; the run without prompts (Table 3, classifier "
                "fine-tuning only) is --no-dynamic --no-static --head cls")
    if args.no_dynamic and args.no_adapter:
        return "--no-adapter with --no-dynamic: there is no adapter left to drop; remove --no-adapter"
    if args.no_dynamic and args.no_static and args.head == "prompts":
        return "--no-dynamic --no-static leaves no prompt for --head prompts to pool; add --head cls (Table 3)"
    return None


def paper_variant(args):
    """The ablation row of Table 3/4 these flags reproduce ("full" = the full SyP; PAPER_NUMBERS below keys its rows by
    these names); a name of no row otherwise."""
    prompts = not (args.no_dynamic and args.no_static)
    row = {(False, False, False): "full", (False, True, False): "dynamic-only", (True, False, False): "static-only",
           (False, True, True): "base-only", (False, False, True): "no-adapter",
           (True, True, False): "classifier-only"}[(args.no_dynamic, args.no_static, args.no_adapter)]
    off = ["head-cls"] if prompts and args.head == "cls" else []
    off += [f"{k}={v}" for k, v, paper in (("propagate", args.propagate, "inserted"),
                                           ("missing-feature", args.missing_feature, "keep")) if v != paper]
    off += [f"{k}={v}" for k, v, paper in (("prompt-length", args.prompt_length, 36),
                                           ("prompt-depth", args.prompt_depth, 6)) if prompts and v != paper]
    return "+".join([row] + off) if off else row


# ---------------------------------------------------------------------------------------------------------
# SyP: prompt module (Dynamic Adapter, Synergistic Prompting Strategy, inter-layer propagation)
# ---------------------------------------------------------------------------------------------------------
def propagation(D, r):
    """(E6) F_i = LN(FC(GELU(FC(.)))) on one tower's prompt tokens: (B, L_p, D) -> (B, L_p, D)."""
    # ASSUMPTION: hidden width D / r (DCP's projections).
    return nn.Sequential(nn.Linear(D, D // r), nn.GELU(), nn.Linear(D // r, D), nn.LayerNorm(D))


class SynergisticPrompts(nn.Module):
    """The synergistic prompt of the first layer (E2)-(E5) and its propagation (E6). `towers` maps each stream to
    its width: {"image": D_v, "text": D_t} for CLIP, {"joint": D} for ViLT; d_x = d_I + d_T, d_s the width of P_S.
    Cases are indexed by the missing codes 0 = complete, 1 = text missing, 2 = image missing (the paper's m1, m2
    are the reverse)."""

    def __init__(self, towers, d_x, d_s, length, depth, r=16, dynamic=True, static=True, adapter=True):
        super().__init__()
        self.towers = towers
        # ASSUMPTION: P_B and P_S per missing case, N(0, 0.02) (DCP's prompts).
        self.P_B = nn.ParameterDict({k: nn.Parameter(0.02 * torch.randn(3, length, D))    # (3, L_p, D_k)
                                     for k, D in towers.items()}) if dynamic else None
        # (E2), ASSUMPTION: S_d has one entry per prompt token, (B, d_x) -> (B, L_p), shared by the towers.
        self.adapter = nn.Sequential(nn.Linear(d_x, d_x // r), nn.ReLU(), nn.Linear(d_x // r, length),
                                     nn.Sigmoid()) if dynamic and adapter else None
        self.P_S = nn.Parameter(0.02 * torch.randn(3, length, d_s)) if static else None    # (3, L_p, d_s)
        self.G = nn.ModuleDict({k: nn.Linear(d_s, D) for k, D in towers.items()}) if static else None
        self.F = nn.ModuleDict({k: nn.ModuleList([propagation(D, r) for _ in range(1, depth)])   # F_1 .. F_{M-1}
                                for k, D in towers.items()})

    def first(self, m, X_C):
        """m (B,) missing codes, X_C (B, d_x) -> P^{R_0} {k: (B, L_p, D_k)}, S_d (B, L_p) or None."""
        S_d = self.adapter(X_C) if self.adapter is not None else None            # (E2)
        P = {}
        for k in self.towers:
            P_D = P_S = 0
            if self.P_B is not None:
                P_D = self.P_B[k][m]                                             # P_{k,B} of each case, (B, L_p, D)
                if S_d is not None:
                    P_D = P_D * S_d[:, :, None]                                  # (E3): P_{k,D} = P_{k,B} (.) S_d
            if self.P_S is not None:
                P_S = self.G[k](self.P_S[m])                                     # (E4): P_{k,S} = G_k(P_S)
            P[k] = P_D + P_S                                                     # (E5): P_m^k = P_{k,D} + P_{k,S}
        return P, S_d

    def propagate(self, i, P):
        """(E6) P^{R_i} = F_i(P^{R_{i-1}}) per tower, 1 <= i < M."""
        return {k: self.F[k][i - 1](P[k]) for k in P}


def zero_missing(f_I, f_T, m):
    """[f_I; f_T] with the missing modality's half set to zero: (B, d_I + d_T)."""
    return torch.cat([f_I * (m != IMAGE_MISSING)[:, None], f_T * (m != TEXT_MISSING)[:, None]], dim=-1)


def input_features(bb, batch, x, t):
    """(E1) X_C from the layer-0 inputs: CLIP x (B, L_v, D_v), t (B, 77, D_t); ViLT x = joint (B, L, D), t = mask."""
    m = batch["missing"]
    if bb.kind == "clip":                    # ASSUMPTION: the modality's token mean at the layer-0 input
        return zero_missing(x.mean(1), masked_mean(t, clip_text_mask(batch["text"])), m)
    L_t = batch["input_ids"].shape[1]
    return zero_missing(masked_mean(x[:, L_t:], t[:, L_t:]), masked_mean(x[:, :L_t], t[:, :L_t]), m)


def text_attention_mask(bb, ids, n, dtype):
    """CLIP text tower over [L_p prompts; L_t text]: the text rows causal; a prompt row sees the prompts and the text
    up to its EOT, not the padding after it -> (B * heads, L_p + L_t, L_p + L_t); (L_t, L_t) without prompts."""
    L = n + ids.shape[1]
    causal = bb.causal_mask(L, ids.device, dtype)
    if n == 0:
        return causal
    mask = causal.expand(len(ids), L, L).clone()
    mask[:, :n] = 0                          # ASSUMPTION: a text prompt sees the text (else P^{T,R} cannot carry it)
    padding = ~clip_text_mask(ids)           # (B, L_t): the positions after EOT
    mask[:, :n, n:] = mask[:, :n, n:].masked_fill(padding[:, None], float("-inf"))
    return mask.repeat_interleave(bb.model.transformer.resblocks[0].attn.num_heads, 0)


# ---------------------------------------------------------------------------------------------------------
# SyP: forward
# ---------------------------------------------------------------------------------------------------------
class SyP(nn.Module):
    def __init__(self, bb, num_outputs, length=36, depth=6, r=16, dynamic=True, static=True, adapter=True,
                 head="prompts", propagate="inserted", missing_feature="keep"):
        super().__init__()
        self.bb, self.head_type, self.propagate, self.missing_feature = bb, head, propagate, missing_feature
        prompts = dynamic or static
        if bb.kind == "clip":
            towers, d_x, d_s, width = ({"image": bb.width_image, "text": bb.width_text},
                                       bb.width_image + bb.width_text, bb.width_text, 2 * bb.embed_dim)
        else:
            towers, d_x, d_s, width = {"joint": bb.width}, 2 * bb.width, bb.width, bb.width
        if head not in ("prompts", "cls") or propagate not in ("inserted", "output") or \
                missing_feature not in ("keep", "zero"):
            raise ValueError(f"head={head!r}, propagate={propagate!r}, missing_feature={missing_feature!r}: not a choice")
        if not prompts and head == "prompts":
            raise ValueError("no prompt to pool: dynamic=False with static=False needs head='cls' (Table 3)")
        if prompts and (length < 1 or depth < 1):           # layer-0-only prompts, or a mean over no token
            raise ValueError(f"length={length}, depth={depth}: SyP needs L_p >= 1 prompt tokens in M >= 1 layers "
                             f"(no prompts at all: dynamic=False, static=False, head='cls')")
        if not 1 <= r <= min(towers.values()):
            raise ValueError(f"r={r}: the bottlenecks D / r need 1 <= r <= {min(towers.values())}")
        if missing_feature == "zero" and bb.kind != "clip":
            raise ValueError("missing_feature='zero' needs CLIP's two towers; ViLT has one joint feature")
        self.length, self.depth = (length, min(depth, bb.num_layers)) if prompts else (0, 0)
        if bb.kind == "vilt" and head == "cls":
            self.pooler = bb.pooler_copy()                          # ASSUMPTION: ViLT's pooler trained, as MAP
        self.head = nn.Linear(width, num_outputs)                   # (E7): the FC
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.prompt = SynergisticPrompts(towers, d_x, d_s, length, self.depth, r, dynamic, static, adapter) \
            if prompts else None

    def forward(self, batch):
        forward = self.forward_clip if self.bb.kind == "clip" else self.forward_vilt
        feature, S_d, prompt_means = forward(batch)
        out = {"logits": self.head(feature), "S_d": S_d}            # S_d (B, L_p): for inspection
        return dict(out, prompt_means=prompt_means) if prompt_means else out   # per-tower (B, M, D_k), --nm2i

    def forward_clip(self, batch):
        bb, m, ids, n = self.bb, batch["missing"], batch["text"], self.length
        x, t = bb.image_embed(batch["image"]), bb.text_embed(ids)   # layer-0 inputs (B, L_v, D_v), (B, L_t, D_t)
        S_d, means = None, {}
        if self.prompt is not None:
            P, S_d = self.prompt.first(m, input_features(bb, batch, x, t))      # (E1)-(E5): P^{R_0}
            x = torch.cat([P["image"].to(x.dtype), x], dim=1)       # (E5): prepended, (B, L_p + L_v, D_v)
            t = torch.cat([P["text"].to(t.dtype), t], dim=1)        # before SOT, (B, L_p + L_t, D_t)
            means = {"image": [P["image"].mean(1)], "text": [P["text"].mean(1)]}
        mask = text_attention_mask(bb, ids, n, t.dtype)
        for i in range(bb.num_layers):
            if 1 <= i < self.depth:                                 # (E6): P^{R_i} = F_i(P^{R_{i-1}})
                left = {"image": x[:, :n], "text": t[:, :n]}        # the prompt tokens that left layer i-1
                P = self.prompt.propagate(i, P if self.propagate == "inserted" else left)   # inserted: P^{R_{i-1}}
                x = torch.cat([P["image"].to(x.dtype), x[:, n:]], dim=1)
                t = torch.cat([P["text"].to(t.dtype), t[:, n:]], dim=1)
                means["image"].append(P["image"].mean(1))
                means["text"].append(P["text"].mean(1))
            x = bb.image_block(i, x)                                # after layer M-1 the prompts are carried
            t = bb.model.transformer.resblocks[i](t, attn_mask=mask)   # common's text_block, SyP's mask
        f_I, f_T = self.head_features(x, t, ids)                   # (E7): P^{I,R} || P^{T,R}, or DCP's zeroing:
        feature = zero_missing(f_I, f_T, m) if self.missing_feature == "zero" else torch.cat([f_I, f_T], dim=-1)
        return feature, S_d, {k: torch.stack(v, 1) for k, v in means.items()}

    def head_features(self, x, t, ids):
        """(E7) -> f_I (B, E), f_T (B, E): the towers' prompt features, or (--head cls) the pooled [CLS] and EOT."""
        bb, n = self.bb, self.length
        if self.head_type == "cls":
            return bb.image_pool(x, n), bb.text_pool(t, ids, n)
        visual, clip = bb.model.visual, bb.model                    # ASSUMPTION: token mean, frozen norm + proj
        return visual.ln_post(x[:, :n].mean(1)) @ visual.proj, clip.ln_final(t[:, :n].mean(1)) @ clip.text_projection

    def forward_vilt(self, batch):
        bb, m, n = self.bb, batch["missing"], self.length
        x, mask = bb.embed(batch)                                   # (B, L_t + L_v, D), text first
        S_d = None
        if self.prompt is not None:
            P, S_d = self.prompt.first(m, input_features(bb, batch, x, mask))   # (E1)-(E5): {"joint": (B, L_p, D)}
            x = torch.cat([P["joint"].to(x.dtype), x], dim=1)       # (E5): before [CLS], (B, L_p + L, D)
            mask = torch.cat([mask.new_ones(len(m), n), mask], dim=1)
        bias = bb.attention_bias(mask, x.dtype)                     # once per batch
        for i in range(bb.num_layers):
            if 1 <= i < self.depth:                                 # (E6): P^{R_i} = F_i(P^{R_{i-1}})
                left = {"joint": x[:, :n]}                          # the prompt tokens that left layer i-1
                P = self.prompt.propagate(i, P if self.propagate == "inserted" else left)   # inserted: P^{R_{i-1}}
                x = torch.cat([P["joint"].to(x.dtype), x[:, n:]], dim=1)
            x = bb.block(i, x, bias)
        if self.head_type == "cls":
            return self.pooler(bb.final_norm(x)[:, n:n + 1]), S_d, None   # (B, D): pooled text [CLS]
        return bb.final_norm(x[:, :n].mean(1)), S_d, None           # (E7), (B, D): the prompt feature


# ---------------------------------------------------------------------------------------------------------
# SyP: loss (E8) and run
# ---------------------------------------------------------------------------------------------------------
def main(args):
    problem = check_args(args)
    if problem:
        parser().error(problem)
    if args.eval_only and "propagate" not in read_checkpoint(args.checkpoint)[1].get("config", {}):
        raise DataError(f"{args.checkpoint} was written by an earlier syp.py (text prompts that saw the padding, F_i of "
                        f"the prompt tokens that left layer i-1, the missing tower's feature zeroed), which this one "
                        f"does not compute: train it again")
    run = setup(args)
    try:
        model = SyP(run.bb, run.num_outputs, args.prompt_length, args.prompt_depth, args.reduction,
                    dynamic=not args.no_dynamic, static=not args.no_static, adapter=not args.no_adapter,
                    head=args.head, propagate=args.propagate, missing_feature=args.missing_feature).to(run.device)
    except ValueError as e:                 # a size the backbone cannot take (e.g. --reduction above a width)
        raise DataError(f"{e}; change the flag") from e
    if model.prompt is not None and model.depth < args.prompt_depth:
        run.log(f"prompt depth M clamped to the backbone's {model.depth} layers")

    def loss_fn(out, batch):               # (E8): task loss only. ASSUMPTION: the batch mean, not the sum
        return task_loss(out["logits"], batch["label"], run.task)

    fit(run, model, loss_fn)
    return finish(run, model, extra={"paper_variant": paper_variant(args)})


# ---------------------------------------------------------------------------------------------------------
# The numbers to compare with (percent), each with its provenance (`common.paper_table`; read by the summary)
# ---------------------------------------------------------------------------------------------------------
_ABLATIONS = (("classifier-only", (57.35, 71.59, 44.63), "classifier fine-tuning only, no prompts"),
              ("dynamic-only", (66.37, 82.90, 51.21), "dynamic prompt only = base prompt + dynamic adapter (two rows)"),
              ("static-only", (65.62, 83.06, 50.34), "static prompt only"),
              ("base-only", (64.27, 81.68, 48.95), "base prompt only"),
              ("no-adapter", (66.19, 84.85, 51.90), "synergistic prompts without the dynamic adapter"),
              ("full", (68.16, 86.17, 54.72), "synergistic prompts + dynamic adapter (the full model)"))
PAPER_NUMBERS = paper_table("syp", [
    (CLIP_B16, "full", "SyP (ICCV 2025) main results table (read in a public review of the paper)", "review", "stated",
     "balanced 'both' missing type", [
         (dataset, "both", rate, "both", rate, v) for dataset, values in (
             ("mmimdb", (55.02, 52.90, 49.63)), ("food101", (86.17, 82.45, 81.03)),
             ("hatememes", (68.16, 68.42, 68.93))) for rate, v in zip((0.5, 0.7, 0.9), values)])] + [
    (CLIP_B16, variant, "SyP (ICCV 2025) ablation tables (read in a public review of the paper)", "review",
     "inferred", f"{what}; setting not given: read as 'both' 50%, where the full-model row equals the main table on "
     f"Hateful Memes and Food-101", [
         (d, "both", 0.5, "both", 0.5, v) for d, v in zip(("hatememes", "food101", "mmimdb"), values)])
    for variant, values, what in _ABLATIONS] + [
    (CLIP_B16, "full", "AOEPT (ICML 2026) main results table, SyP re-run under AOEPT's protocol (read in a public "
     "review of the paper)", "re-report", "stated", "mean over text / image / both; the sources give no per-type SyP "
     "numbers", [(d, "avg", rate, "avg", rate, v)
                 for rate, values in ((0.7, (51.88, 68.11, 83.56)), (0.9, (49.58, 67.72, 81.26)))
                 for d, v in zip(("mmimdb", "hatememes", "food101"), values)])])


if __name__ == "__main__":
    cli(parser(), main)
