"""SyP: Synergistic Prompting for Robust Visual Recognition with Missing Modalities (Zhang et al., ICCV 2025,
arXiv 2507.07802).

Official code: none: implemented from the paper (../shared/papers/syp.md). Its sizes (36 prompt tokens, 6 layers)
and its baseline are those of DCP, hulianyuyy/Deep_Correlated_Prompting @ 35195347e5b74c473ce9fbca6d7dbd7d9b672e3f,
whose conventions fill the gaps below.

Map from the paper to this file. The equation labels (E1)-(E8) are ours, in the order of the paper's method section:
the summary we could read elides the equations and their numbers.
    (E1) X = [X_I; X_T], features of the current input, the missing one zero   -> `SyP.forward_clip / forward_vilt`
    (E2) S_d = sigmoid(W_2 delta(W_1 X)), the Dynamic Adapter, ratio r          -> `SynergisticPrompts.adapter`
    (E3) P_d = S_d * P_b, the dynamic prompt of missing case m                  -> `SynergisticPrompts.first`
    (E4) P_s^I = F_I(P_s), P_s^T = F_T(P_s), the shared static prompt           -> `SynergisticPrompts.first`
    (E5) P = P_d + P_s, the synergistic prompt, prepended in each tower         -> `SynergisticPrompts.first`
    (E6) P^i = F^i(P^{i-1}, features of layer i), the first M layers           -> `Propagation`, the layer loops
    (E7) logits = FC([f_I; f_T])                                                -> `SyP.forward`
    (E8) L_total = sum_i L_i, the task loss                                     -> `loss_fn` in `main`
    Ablations: --no-dynamic (P = P_s, Table 3), --no-static (P = P_d, Table 3), --no-adapter (P_d = P_b, Table 4);
    --no-static --no-adapter is Table 4's base prompt only; --no-dynamic with --no-static is refused (no prompt).

Deviations and assumptions (each also marked ASSUMPTION where it is coded):
    - X_I, X_T: the frozen backbone's prompt-free pooled features (one extra no-grad pass), missing one zeroed.
    - Adapter: delta = ReLU, r = 16, W_1: 2E -> 2E/r, W_2: 2E/r -> D; S_d is channel-wise, shared by the P tokens.
    - One adapter, one base prompt P_b (3 cases x P x D) and one projection F per tower; P_b, P_s ~ N(0, 0.02).
    - P_s: one per missing case, like DCP's common prompts, of width E, projected by F_I, F_T = Linear(E, D).
    - One block of P = 36 tokens per tower (DCP splits its 36 into three groups of 12).
    - (E6), DCP-style replacement: at layers 1..M-1 the prompt tokens are replaced by F^i(P^{i-1}, h^i), where
      P^{i-1} is the prompt that entered layer i-1 in both towers and h^i the layer input's pooled token (image
      [CLS], text EOT); after layer M-1 the prompt outputs are carried to the end.
    - F^i = LayerNorm(prompts) + LayerNorm(h^i) -> Linear(d -> d/16) -> GELU -> Linear(-> D), d = D_v + D_t:
      DCP's projection with the summary added; two norms so neither part swamps the other.
    - Missing inputs: common.py's dummy inputs ('' and an all-ones image), not zero tensors; the missing
      modality's pooled feature is zeroed before the FC (DCP). FC = Linear(2E, C), N(0, 0.02), bias 0 (DCP).
    - (E8) the batch mean instead of the sum (a constant factor; AdamW is insensitive to it).
    - Schedule (not stated): 10% linear warm-up, then linear decay (DCP, MAP).
    - ViLT (not in the paper): one joint stream of width D, prompts before [CLS]; X = [mean patch embedding;
      mean text-token embedding] of the layer-0 input, the missing one zeroed; one projection F; h^i = [CLS];
      head = a trained copy of ViLT's pooler + Linear(D, C).
    - Tiny backbones have 4 layers: M = min(--prompt-depth, layers).
    - CLIP: the forward also returns each tower's per-layer pooled prompt, for --nm2i (AOEPT's diagnostic).

Use from your own code (README, "Use a method in your own code"): `SyP(bb, num_outputs, length, depth, r)` on a
frozen `common.load_clip()` / `load_vilt()` backbone; `model(batch)["logits"]`; loss `common.task_loss`; no
pre-pass. Copy this file with common.py and data.py.

Usage: python syp.py --dataset food101 --missing text --rate 0.7            (CLIP ViT-B/16, the paper's setting)
       python syp.py --dataset food101 --missing text --rate 0.7 --no-static   (Table 3, dynamic prompt only)
       python syp.py --dataset toy --backbone tiny-clip                       (offline, CPU, a few minutes)
"""
import torch
import torch.nn as nn

from common import build_parser, cli, finish, fit, masked_mean, setup, task_loss
from data import IMAGE_MISSING, TEXT_MISSING


def parser():
    p = build_parser("syp", __doc__, backbone="clip")
    # Method-specific
    p.add_argument("--prompt-length", type=int, default=36, help="L_p, prompt tokens per tower (paper, setup)")
    p.add_argument("--prompt-depth", type=int, default=6, help="M, prompted layers from the first (paper, setup)")
    p.add_argument("--reduction", type=int, default=16,
                   help="r, reduction ratio of the Dynamic Adapter and of F^i (not reported; DCP's 16)")
    ablation = p.add_mutually_exclusive_group()
    ablation.add_argument("--no-dynamic", action="store_true",
                          help="drop the base prompt P_b and the Dynamic Adapter: P = P_s (Table 3, static only)")
    ablation.add_argument("--no-static", action="store_true",
                          help="drop the static prompt P_s and F_I, F_T: P = P_d (Table 3, dynamic only)")
    p.add_argument("--no-adapter", action="store_true",
                   help="drop the Dynamic Adapter: P_d = P_b, so P = P_b + P_s (Table 4)")
    # AdamW, lr 1e-3, weight decay 2e-2, batch 32, 20 epochs (paper). ASSUMPTION: 10% warm-up, linear decay.
    p.set_defaults(lr=1e-3, weight_decay=2e-2, batch_size=32, micro_batch=32, epochs=20, schedule="linear",
                   warmup=0.1)
    return p


# ---------------------------------------------------------------------------------------------------------
# SyP: prompt module (Dynamic Adapter, Synergistic Prompting Strategy, inter-layer propagation)
# ---------------------------------------------------------------------------------------------------------
class Propagation(nn.Module):
    """(E6) F^i for every tower, from the previous layer's prompts of all towers and the current layer input."""

    def __init__(self, towers, r):
        super().__init__()
        d = sum(towers.values())                                    # D_v + D_t (CLIP) or D (ViLT)
        # ASSUMPTION: DCP's LayerNorm -> Linear(d, d/r) -> GELU -> Linear(d/r, D), the summary h^i added
        # after its own LayerNorm.
        self.norm_prompt, self.norm_input = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({k: nn.Sequential(nn.Linear(d, d // r), nn.GELU(), nn.Linear(d // r, D))
                                  for k, D in towers.items()})

    def forward(self, P, h):                                        # P {k: (B, P, D_k)}, h {k: (B, D_k)}
        prompts = self.norm_prompt(torch.cat([P[k] for k in self.mlp], dim=-1))           # (B, P, d)
        inputs = self.norm_input(torch.cat([h[k] for k in self.mlp], dim=-1))[:, None]   # (B, 1, d)
        return {k: mlp(prompts + inputs) for k, mlp in self.mlp.items()}  # (E6): P^i = F^i(P^{i-1}, h^i)


class SynergisticPrompts(nn.Module):
    """The synergistic prompt of the first layer (E2)-(E5) and its propagation (E6). `towers` maps each stream
    to its width: {"image": D_v, "text": D_t} for CLIP, {"joint": D} for ViLT. d_x: width of X. Cases are
    indexed by the missing codes 0 = complete, 1 = text missing, 2 = image missing."""

    def __init__(self, towers, d_x, length, depth, r=16, dynamic=True, static=True, adapter=True):
        super().__init__()
        self.towers = towers
        # ASSUMPTION: one block of P tokens per tower; P_b and P_s initialised N(0, 0.02), as DCP's prompts.
        self.base = nn.ParameterDict({k: nn.Parameter(0.02 * torch.randn(3, length, D))    # P_b: (3, P, D)
                                      for k, D in towers.items()}) if dynamic else None
        # ASSUMPTION: delta = ReLU, r = 16, one channel-wise scale per tower: (B, d_x) -> (B, D).
        self.adapter = nn.ModuleDict({k: nn.Sequential(nn.Linear(d_x, d_x // r), nn.ReLU(), nn.Linear(d_x // r, D),
                                                       nn.Sigmoid())
                                      for k, D in towers.items()}) if dynamic and adapter else None
        # ASSUMPTION: one static prompt per missing case (DCP's common prompts), width d_x / 2 (E for CLIP).
        self.static = nn.Parameter(0.02 * torch.randn(3, length, d_x // 2)) if static else None  # P_s: (3, P, E)
        self.project = nn.ModuleDict({k: nn.Linear(d_x // 2, D) for k, D in towers.items()}) if static else None
        self.F = nn.ModuleList([Propagation(towers, r) for _ in range(1, depth)])    # F^1 .. F^{M-1}

    def first(self, m, X):
        """m (B,) missing codes, X (B, d_x) or None -> P^0 {k: (B, P, D_k)}, S_d {k: (B, D_k)} or None."""
        S_d = {k: a(X) for k, a in self.adapter.items()} if self.adapter is not None else None  # (E2)
        P = {}
        for k in self.towers:
            P_d = P_s = 0
            if self.base is not None:
                P_b = self.base[k][m]                                # (B, P, D): the base prompt of each case
                P_d = S_d[k][:, None] * P_b if S_d is not None else P_b   # (E3): P_d = S_d * P_b
            if self.static is not None:
                P_s = self.project[k](self.static[m])                # (E4): P_s^k = F_k(P_s), (B, P, D)
            P[k] = P_d + P_s                                         # (E5): P = P_d + P_s
        return P, S_d


def zero_missing(f_I, f_T, m):
    """[f_I; f_T] with the missing modality's half set to zero: (B, 2E)."""
    return torch.cat([f_I * (m != IMAGE_MISSING)[:, None], f_T * (m != TEXT_MISSING)[:, None]], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# SyP: forward
# ---------------------------------------------------------------------------------------------------------
class SyP(nn.Module):
    def __init__(self, bb, num_outputs, length=36, depth=6, r=16, dynamic=True, static=True, adapter=True):
        super().__init__()
        self.bb, self.length = bb, length
        self.depth = min(depth, bb.num_layers)
        if bb.kind == "clip":
            towers, d_x = {"image": bb.width_image, "text": bb.width_text}, 2 * bb.embed_dim
            self.head = nn.Linear(2 * bb.embed_dim, num_outputs)    # (E7): FC on [f_I; f_T]
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            towers, d_x = {"joint": bb.width}, 2 * bb.width
            self.pooler = bb.pooler_copy()                          # ASSUMPTION: ViLT's pooler trained, as MAP
            self.head = nn.Linear(bb.width, num_outputs)
        self.prompt = SynergisticPrompts(towers, d_x, length, self.depth, r, dynamic, static, adapter)

    def forward(self, batch):
        forward = self.forward_clip if self.bb.kind == "clip" else self.forward_vilt
        feature, S_d, prompt_means = forward(batch)
        S_d = torch.cat(list(S_d.values()), -1) if S_d is not None else None
        out = {"logits": self.head(feature), "S_d": S_d}            # S_d (B, sum D_k): for inspection
        return dict(out, prompt_means=prompt_means) if prompt_means else out   # per-tower (B, M, D_k), --nm2i

    def forward_clip(self, batch):
        bb, m, ids = self.bb, batch["missing"], batch["text"]
        X = None
        if self.prompt.adapter is not None:
            with torch.no_grad():                                   # ASSUMPTION: X from prompt-free features
                X = zero_missing(*bb.encode(batch), m)              # (E1): X = [X_I; X_T], (B, 2E)
        P, S_d = self.prompt.first(m, X)                            # P^0: (B, P, D_v), (B, P, D_t)
        x, t = bb.image_embed(batch["image"]), bb.text_embed(ids)   # (B, L_v, D_v), (B, 77, D_t)
        x = torch.cat([P["image"].to(x.dtype), x], dim=1)           # (E5): prepended, (B, P + L_v, D_v)
        t = torch.cat([P["text"].to(t.dtype), t], dim=1)            # before SOT, under the causal mask
        n, rows = self.length, torch.arange(len(m), device=m.device)
        eot = n + ids.argmax(dim=-1)                                # the EOT position after the prompts
        means = {"image": [P["image"].mean(1)], "text": [P["text"].mean(1)]}
        for i in range(bb.num_layers):
            if 1 <= i < self.depth:                                 # (E6): replace layer i-1's prompt tokens
                # ASSUMPTION: the features of layer i are its input's [CLS] (image) and EOT (text) tokens.
                P = self.prompt.F[i - 1](P, {"image": x[:, n], "text": t[rows, eot]})
                x = torch.cat([P["image"].to(x.dtype), x[:, n:]], dim=1)
                t = torch.cat([P["text"].to(t.dtype), t[:, n:]], dim=1)
                means["image"].append(P["image"].mean(1))
                means["text"].append(P["text"].mean(1))
            x, t = bb.image_block(i, x), bb.text_block(i, t)        # after layer M-1 the prompts are carried
        # ASSUMPTION (DCP): the missing modality's pooled feature is zeroed before the FC.
        feature = zero_missing(bb.image_pool(x, n), bb.text_pool(t, ids, n), m)   # (B, 2E)
        return feature, S_d, {k: torch.stack(v, 1) for k, v in means.items()}

    def forward_vilt(self, batch):
        bb, m = self.bb, batch["missing"]
        x, mask = bb.embed(batch)                                   # (B, L_t + L_v, D), text first
        X = None
        if self.prompt.adapter is not None:
            L_t = batch["input_ids"].shape[1]
            # (E1), ASSUMPTION for ViLT: X = [mean patch embedding; mean text-token embedding], (B, 2D)
            X = zero_missing(masked_mean(x[:, L_t:], mask[:, L_t:]), masked_mean(x[:, :L_t], mask[:, :L_t]), m)
        P, S_d = self.prompt.first(m, X)                            # P^0: {"joint": (B, P, D)}
        n = self.length
        x = torch.cat([P["joint"].to(x.dtype), x], dim=1)           # (E5): before [CLS], (B, P + L, D)
        bias = bb.attention_bias(torch.cat([mask.new_ones(len(m), n), mask], dim=1), x.dtype)   # once per batch
        for i in range(bb.num_layers):
            if 1 <= i < self.depth:                                 # (E6): replace, h^i = the input's [CLS]
                P = self.prompt.F[i - 1](P, {"joint": x[:, n]})
                x = torch.cat([P["joint"].to(x.dtype), x[:, n:]], dim=1)
            x = bb.block(i, x, bias)
        return self.pooler(bb.final_norm(x)[:, n:n + 1]), S_d, None   # (B, D): pooled text [CLS]


# ---------------------------------------------------------------------------------------------------------
# SyP: loss (E8) and run
# ---------------------------------------------------------------------------------------------------------
def main(args):
    run = setup(args)
    model = SyP(run.bb, run.num_outputs, args.prompt_length, args.prompt_depth, args.reduction,
                dynamic=not args.no_dynamic, static=not args.no_static, adapter=not args.no_adapter).to(run.device)
    if model.depth < args.prompt_depth:
        run.log(f"prompt depth M clamped to the backbone's {model.depth} layers")

    def loss_fn(out, batch):               # (E8): task loss only. ASSUMPTION: the batch mean, not the sum
        return task_loss(out["logits"], batch["label"], run.task)

    fit(run, model, loss_fn)
    return finish(run, model)


if __name__ == "__main__":
    cli(parser(), main)
