"""MAP: Multimodal Prompting with Missing Modalities for Visual Recognition (Lee et al., CVPR 2023, arXiv 2303.03369).

Official code: YiLunLee/missing_aware_prompts @ 9aa538159f4623de1936d25daee880ec47c062be (ViLT). The CLIP variant
follows how DCP (hulianyuyy/Deep_Correlated_Prompting) carries MAP to a dual-stream model: prompts in both towers.

Map from the paper to this file:
    Sec. 3.2 missing-aware prompts, one set per missing case (2^M - 1 = 3)   -> `MissingAwarePrompts`
    Sec. 3.3 input-level prompting (prepend at each layer, accumulate)      -> `MAP.forward_vilt / forward_clip`
    Sec. 3.3 attention-level prompting (prompts as extra keys/values)       -> `attend_with_prefix`
    task loss only (CE; BCE for MM-IMDb)                                    -> `loss_fn`

Deviations and assumptions:
    - Attention-level: the prompt tokens join the keys/values *before* the block's LayerNorm and K/V projections and
      their outputs are dropped (the official code appends 8 raw key + 8 raw value tokens after the projections):
      a reparameterisation of the same prefix, which keeps the library's block untouched.
    - CLIP (not in the paper): one prompt set per tower per case; the image and text features are concatenated
      (DCP) and fed to MAP's MLP head. Text prompts sit before the text tokens, under CLIP's causal mask.
    - Validation once per epoch (official: every 0.2 epoch); the best validation epoch is tested.
    - Prompts are initialised as in the official code (zeros with a one-hot marker row per case).
    - CLIP, eval mode: the forward also returns each tower's per-layer pooled prompt, for --nm2i (AOEPT's diagnostic).

Use from your own code (README, "Use a method in your own code"): `MAP(bb, num_outputs, prompt_type, length,
depth)` on a frozen `common.load_vilt()` / `load_clip()` backbone; `model(batch)["logits"]`; loss
`common.task_loss(logits, labels, task)`; no pre-pass. Copy this file with common.py and data.py.

Usage: python map.py --dataset food101 --missing both --rate 0.7          (ViLT, the paper's setting)
       python map.py --dataset toy --backbone tiny-vilt                   (offline, CPU, about a minute)
"""
import torch
import torch.nn as nn

from common import build_parser, cli, finish, fit, setup, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING


def parser():
    p = build_parser("map", __doc__, backbone="vilt")
    # Method-specific
    p.add_argument("--prompt-type", default="input", choices=["input", "attention"],
                   help="input-level (prepend and accumulate) or attention-level (prefix keys/values), Sec. 3.3")
    p.add_argument("--prompt-length", type=int, default=16, help="L_p, prompt tokens per layer (Sec. 4.1)")
    p.add_argument("--prompt-depth", type=int, default=6, help="N, prompted layers from the first (Sec. 4.1)")
    p.set_defaults(lr=1e-2, weight_decay=2e-2, batch_size=256, epochs=20, schedule="linear", warmup=0.1)
    return p


# ---------------------------------------------------------------------------------------------------------
# MAP: prompt module (Sec. 3.2)
# ---------------------------------------------------------------------------------------------------------
class MissingAwarePrompts(nn.Module):
    """One prompt per missing case and prompted layer: (3, N, P, D), indexed by MAP's codes
    0 = complete, 1 = text missing, 2 = image missing."""

    def __init__(self, depth, length, width):
        super().__init__()
        prompts = torch.zeros(3, depth, length, width)
        for case, marker in ((COMPLETE, 0), (IMAGE_MISSING, 1), (TEXT_MISSING, 2)):   # official initialisation
            prompts[case, :, marker % length] = 1.0
        self.prompts = nn.Parameter(prompts)

    def forward(self, missing, layer):                          # (B,) codes -> (B, P, D)
        return self.prompts[missing, layer]                     # each sample gets the prompt of its own case


def mlp_head(width, num_outputs):
    """MAP's classifier: Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, C), weights N(0, 0.02), bias 0."""
    head = nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                         nn.Linear(2 * width, num_outputs))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def attend_with_prefix(block, prompt, x):
    """Attention-level prompting: the prompt tokens are extra keys/values of the block; only the real tokens
    are queried and kept. block(seq) runs the untouched library block on [prompt, x]."""
    return block(torch.cat([prompt, x], dim=1))[:, prompt.shape[1]:]


# ---------------------------------------------------------------------------------------------------------
# MAP: forward
# ---------------------------------------------------------------------------------------------------------
class MAP(nn.Module):
    def __init__(self, bb, num_outputs, prompt_type="input", length=16, depth=6):
        super().__init__()
        self.bb, self.prompt_type, self.length = bb, prompt_type, length
        self.depth = min(depth, bb.num_layers)
        if bb.kind == "vilt":
            self.prompts = MissingAwarePrompts(self.depth, length, bb.width)
            self.pooler = bb.pooler_copy()                       # trained, as in the official code
            self.head = mlp_head(bb.width, num_outputs)
        else:
            self.image_prompts = MissingAwarePrompts(self.depth, length, bb.width_image)
            self.text_prompts = MissingAwarePrompts(self.depth, length, bb.width_text)
            self.head = mlp_head(2 * bb.embed_dim, num_outputs)

    def forward(self, batch):
        if self.bb.kind == "vilt":
            return {"logits": self.head(self.forward_vilt(batch))}
        out = {"logits": self.head(self.forward_clip(batch))}
        if not self.training:                                    # per-layer pooled prompts of each tower, --nm2i
            m = batch["missing"]
            out["prompt_means"] = {"image": self.image_prompts.prompts[m].mean(2),
                                   "text": self.text_prompts.prompts[m].mean(2)}   # (B, N, D_m)
        return out

    def forward_vilt(self, batch):
        bb, m = self.bb, batch["missing"]
        x, mask = bb.embed(batch)                                # (B, L_t + L_v, D)
        ones = mask.new_ones(mask.shape[0], self.length)
        bias = bb.attention_bias(mask, x.dtype)
        if self.prompt_type == "attention":                      # the prefix length is constant: one mask per batch
            prefix_bias = bb.attention_bias(torch.cat([ones, mask], dim=1), x.dtype)
        for i in range(bb.num_layers):
            if i < self.depth and self.prompt_type == "input":  # Sec. 3.3: prepend, earlier prompts kept
                x = torch.cat([self.prompts(m, i).to(x.dtype), x], dim=1)          # (B, P + L, D)
                mask = torch.cat([ones, mask], dim=1)
                bias = bb.attention_bias(mask, x.dtype)
                x = bb.block(i, x, bias)
            elif i < self.depth:                                 # Sec. 3.3: attention-level
                x = attend_with_prefix(lambda seq: bb.block(i, seq, prefix_bias), self.prompts(m, i).to(x.dtype), x)
            else:
                x = bb.block(i, x, bias)
        cls = self.depth * self.length if self.prompt_type == "input" else 0
        return self.pooler(bb.final_norm(x)[:, cls:cls + 1])     # text [CLS] after all accumulated prompts

    def forward_clip(self, batch):
        bb, m = self.bb, batch["missing"]
        x, t = bb.image_embed(batch["image"]), bb.text_embed(batch["text"])   # (B, L_v, D_v), (B, 77, D_t)
        for i in range(bb.num_layers):
            if i < self.depth and self.prompt_type == "input":   # Sec. 3.3, in each tower
                x = torch.cat([self.image_prompts(m, i).to(x.dtype), x], dim=1)
                t = torch.cat([self.text_prompts(m, i).to(t.dtype), t], dim=1)
                x, t = bb.image_block(i, x), bb.text_block(i, t)
            elif i < self.depth:
                x = attend_with_prefix(lambda seq: bb.image_block(i, seq), self.image_prompts(m, i).to(x.dtype), x)
                t = attend_with_prefix(lambda seq: bb.text_block(i, seq), self.text_prompts(m, i).to(t.dtype), t)
            else:
                x, t = bb.image_block(i, x), bb.text_block(i, t)
        n = self.depth * self.length if self.prompt_type == "input" else 0
        return torch.cat([bb.image_pool(x, n), bb.text_pool(t, batch["text"], n)], dim=-1)   # (B, 2E)


# ---------------------------------------------------------------------------------------------------------
# MAP: loss (task loss only)
# ---------------------------------------------------------------------------------------------------------
def main(args):
    run = setup(args)
    model = MAP(run.bb, run.num_outputs, args.prompt_type, args.prompt_length, args.prompt_depth).to(run.device)
    if model.depth < args.prompt_depth:
        run.log(f"prompt depth clamped to the backbone's {model.depth} layers")

    def loss_fn(out, batch):
        return task_loss(out["logits"], batch["label"], run.task)

    fit(run, model, loss_fn)
    return finish(run, model)


if __name__ == "__main__":
    cli(parser(), main)
