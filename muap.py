"""MuAP: Multi-step Adaptive Prompt Learning for Vision-Language Model with Missing Modality
(Dai, Tan, Mo, He, Qin, Liang; arXiv 2409.04693, 2024).

Official code: none: implemented from the paper (its summary, ../shared/papers/muap.md, and METHODS.md Sec. 3).

Map from the paper to this file:
    Sec. 3.4 complete-type prompts P_t^c, P_v^c                             -> `ModalityPrompt.complete`
    Sec. 3.4 crosswise missing-type prompts P_t^miss = f_missing(P_v^c),
             P_v^miss = f_missing(P_t^c); per-sample choice by missing case   -> `PromptGenerator.forward`
    Sec. 3.5 head-fusion / cross-fusion prompting                           -> `MuAP.forward_vilt / forward_clip`
    Sec. 3.6 multi-step tuning: text-step, image-step, alignment stage      -> `main` (`set_stage`, `snapshot`)
    Sec. 3.6 alignment loss L = L_task + lambda_t KL(y_t||y) + lambda_v KL(y_v||y) -> `alignment_loss`, `kl`

Deviations and assumptions (the paper leaves these open; each is marked ASSUMPTION where it happens):
    - f_missing: one bottleneck MLP per target modality and prompted layer, token-wise,
      Linear(D_other, D/16) -> GELU -> Linear(D/16, D).
    - Single stages (text-step, image-step) use the task loss only; the paper's "contrastive learning" there
      could not be read.
    - Alignment: KL(teacher || student) with teachers = the detached predictions of the model snapshots after the
      text-step and the image-step; multi-label tasks use the Bernoulli KL per class. lambda_t = lambda_v = 1.
    - Stage lengths 5 / 5 / 10 epochs (MAP's 20 split 1:1:2); each stage restarts AdamW and the warm-up/decay
      schedule and keeps its best validation state.
    - MAP's recipe otherwise: AdamW lr 1e-2, weight decay 2e-2, batch 256, prompts in the first 6 layers, input-level
      (prepended at each prompted layer, earlier prompts kept), ViLT pooler + MAP's MLP head, both trained in every
      stage. Prompts are initialised N(0, 0.02).
    - Head-fusion concatenates the two prompts ([P_t, P_v]); one review reads "adds".
    - On ViLT, head- and cross-fusion compute the same function: self-attention is permutation-equivariant and the
      prompts carry no position embedding, so only the token layout differs (tested). The paper reports different
      numbers for them; whatever made them differ is not in the text we could read.
    - CLIP (not in the paper): cross-fusion = the text prompt before the text tower's tokens, the image prompt before
      the image tower's; head-fusion = [P_t, P_v] before the tokens of *each* tower, the other tower's prompt
      mapped to the width by one linear map per direction, shared over layers. The two pooled features are
      concatenated (DCP) and fed to MAP's MLP head.
    - Validation once per epoch (MAP: every 0.2 epoch). The single-stage snapshots are also written to
      OUT/teacher-{text,image}-step.safetensors, which --resume reads back.

Use from your own code (README, "Use a method in your own code"): `MuAP(bb, num_outputs, fusion, length, depth)` on a
frozen `common.load_vilt()` / `load_clip()` backbone; stages by `set_stage(model, text, image)`, teachers by
`snapshot(model)` into `model.teachers`; losses `common.task_loss` (single stages) and `alignment_loss` (alignment,
`main` shows the order); no pre-pass. Copy this file with common.py and data.py.

Usage: python muap.py --dataset food101 --missing both --rate 0.7 --fusion head     (ViLT, the paper's setting)
       python muap.py --dataset toy --backbone tiny-vilt --epochs 4 --batch-size 16   (offline, on CPU)
"""
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (build_parser, checkpoint_meta, cli, finish, fit, method_state, read_checkpoint, save_tensors, setup,
                    task_loss)
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING


def parser():
    p = build_parser("muap", __doc__, backbone="vilt")
    # Method-specific
    p.add_argument("--fusion", default="head", choices=["head", "cross"],
                   help="head-fusion ([P_t, P_v] at the sequence start) or cross-fusion (each prompt before its "
                        "modality's tokens), Sec. 3.5")
    p.add_argument("--prompt-length", type=int, default=16,
                   help="L_p, prompt tokens per modality and layer (the best of the paper's 8/16/24/32)")
    p.add_argument("--prompt-depth", type=int, default=6, help="N, prompted layers from the first (MAP's; not given)")
    p.add_argument("--stage-epochs", type=int, nargs=3, default=None, metavar=("TEXT", "IMAGE", "ALIGN"),
                   help="epochs of the text-step, image-step and alignment stage (Sec. 3.6); "
                        "default: --epochs split 1:1:2 (5 5 10 for 20); 0 skips a stage")
    p.add_argument("--lambda-t", type=float, default=1.0, help="lambda_t, weight of KL(y_t || y) (Sec. 3.6)")
    p.add_argument("--lambda-v", type=float, default=1.0, help="lambda_v, weight of KL(y_v || y) (Sec. 3.6)")
    p.set_defaults(lr=1e-2, weight_decay=2e-2, batch_size=256, epochs=20, schedule="linear", warmup=0.1)
    return p


# ---------------------------------------------------------------------------------------------------------
# MuAP: prompt module (Sec. 3.4, multimodal prompt generator)
# ---------------------------------------------------------------------------------------------------------
def bottleneck(d_in, d_out):
    """ASSUMPTION: f_missing is a token-wise bottleneck MLP, Linear(d_in, d_out/16) -> GELU -> Linear(., d_out)."""
    hidden = max(1, d_out // 16)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class ModalityPrompt(nn.Module):
    """Everything that produces one modality m's prompts, so a stage can freeze it as a whole (Sec. 3.6):
    its complete-type prompt P_m^c, and f_missing, which generates its missing-type prompt from the *other*
    modality's complete-type prompt. `to_other` (CLIP head-fusion only) carries P_m into the other tower."""

    def __init__(self, depth, length, width, other_width, to_other=False):
        super().__init__()
        self.complete = nn.Parameter(torch.randn(depth, length, width) * 0.02)      # P_m^c (N, P, D); ASSUMPTION
        self.f_missing = nn.ModuleList(bottleneck(other_width, width) for _ in range(depth))
        self.to_other = nn.Linear(width, other_width) if to_other else None        # ASSUMPTION (CLIP head)

    def missing_type(self, other_complete):                                        # (N, P, D_other) -> (N, P, D)
        return torch.stack([f(p) for f, p in zip(self.f_missing, other_complete)])


class PromptGenerator(nn.Module):
    """Text and image prompts of every sample: complete-type when the modality is present, missing-type
    (generated crosswise) when it is absent. Two prompt tensors per layer instead of MAP's 2^M - 1 = 3."""

    def __init__(self, depth, length, width_text, width_image, to_other=False):
        super().__init__()
        self.text = ModalityPrompt(depth, length, width_text, width_image, to_other)
        self.image = ModalityPrompt(depth, length, width_image, width_text, to_other)

    def forward(self, missing):                                 # (B,) codes -> (B, N, P, D_t), (B, N, P, D_v)
        P_t_c, P_v_c = self.text.complete, self.image.complete
        P_t_miss = self.text.missing_type(P_v_c)                # Sec. 3.4: P_t^miss = f_missing(P_v^c)
        P_v_miss = self.image.missing_type(P_t_c)               # Sec. 3.4: P_v^miss = f_missing(P_t^c)
        # rows in the order of the codes COMPLETE, TEXT_MISSING, IMAGE_MISSING; each sample takes its own row
        P_t = torch.stack([P_t_c, P_t_miss, P_t_c])[missing]     # only text-missing samples get P_t^miss
        P_v = torch.stack([P_v_c, P_v_c, P_v_miss])[missing]     # only image-missing samples get P_v^miss
        return P_t, P_v


assert (COMPLETE, TEXT_MISSING, IMAGE_MISSING) == (0, 1, 2), "PromptGenerator stacks its rows in code order"


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
# MuAP: forward (Sec. 3.5, prompt fusion)
# ---------------------------------------------------------------------------------------------------------
class MuAP(nn.Module):
    def __init__(self, bb, num_outputs, fusion="head", length=16, depth=6):
        super().__init__()
        self.bb, self.fusion, self.length = bb, fusion, length
        self.depth = min(depth, bb.num_layers)
        if bb.kind == "vilt":
            self.generator = PromptGenerator(self.depth, length, bb.width, bb.width)
            self.pooler = bb.pooler_copy()                       # trained, as in MAP
            self.head = mlp_head(bb.width, num_outputs)
        else:
            self.generator = PromptGenerator(self.depth, length, bb.width_text, bb.width_image, fusion == "head")
            self.head = mlp_head(2 * bb.embed_dim, num_outputs)
        self.teachers = []          # alignment stage: frozen text-step and image-step snapshots (a plain list, so
                                    # they are neither trained nor saved in the checkpoint)

    def forward(self, batch):
        P_t, P_v = self.generator(batch["missing"])
        feature = self.forward_vilt(batch, P_t, P_v) if self.bb.kind == "vilt" else self.forward_clip(batch, P_t, P_v)
        out = {"logits": self.head(feature)}
        if self.training and self.teachers:                      # Sec. 3.6: y_t, y_v of the single-stage models
            with torch.no_grad():
                out["logits_t"], out["logits_v"] = (teacher(batch)["logits"] for teacher in self.teachers)
        return out

    def forward_vilt(self, batch, P_t, P_v):                    # P_t, P_v: (B, N, P, D)
        bb, P = self.bb, self.length
        x, mask = bb.embed(batch)                                # (B, L_t + L_v, D), text first; mask (B, L)
        ones = mask.new_ones(mask.shape[0], P)
        cls, img = 0, batch["input_ids"].shape[1]                # text [CLS] position, start of the image part
        bias = bb.attention_bias(mask, x.dtype)
        for i in range(bb.num_layers):
            if i < self.depth:                                   # ASSUMPTION: MAP's input level, prompts accumulate
                p_t, p_v = P_t[:, i].to(x.dtype), P_v[:, i].to(x.dtype)                # (B, P, D) each
                if self.fusion == "head":                        # head-fusion: [P_t, P_v, <sequence>]
                    x = torch.cat([p_t, p_v, x], dim=1)
                    mask = torch.cat([ones, ones, mask], dim=1)
                    cls, img = cls + 2 * P, img + 2 * P
                else:                                            # cross-fusion: [P_t, <text part>, P_v, <image part>]
                    x = torch.cat([p_t, x[:, :img], p_v, x[:, img:]], dim=1)
                    mask = torch.cat([ones, mask[:, :img], ones, mask[:, img:]], dim=1)
                    cls, img = cls + P, img + P
                bias = bb.attention_bias(mask, x.dtype)          # (B, 1, 1, L + 2P(i+1))
            x = bb.block(i, x, bias)
        return self.pooler(bb.final_norm(x)[:, cls:cls + 1])     # text [CLS] after the prompts in front of it

    def forward_clip(self, batch, P_t, P_v):                    # (B, N, P, D_t), (B, N, P, D_v)
        bb, gen = self.bb, self.generator
        if self.fusion == "head":                                # ASSUMPTION: [P_t, P_v] before each tower's tokens
            T = torch.cat([P_t, gen.image.to_other(P_v)], dim=2)                       # (B, N, 2P, D_t)
            V = torch.cat([gen.text.to_other(P_t), P_v], dim=2)                        # (B, N, 2P, D_v)
        else:                                                    # cross-fusion: each prompt into its own tower
            T, V = P_t, P_v
        x, t = bb.image_embed(batch["image"]), bb.text_embed(batch["text"])           # (B, L_v, D_v), (B, 77, D_t)
        for i in range(bb.num_layers):
            if i < self.depth:                                   # prepend, earlier prompts kept
                x = torch.cat([V[:, i].to(x.dtype), x], dim=1)
                t = torch.cat([T[:, i].to(t.dtype), t], dim=1)
            x, t = bb.image_block(i, x), bb.text_block(i, t)
        n_v, n_t = self.depth * V.shape[2], self.depth * T.shape[2]
        return torch.cat([bb.image_pool(x, n_v), bb.text_pool(t, batch["text"], n_t)], dim=-1)   # (B, 2E)


# ---------------------------------------------------------------------------------------------------------
# MuAP: multi-step prompt tuning (Sec. 3.6)
# ---------------------------------------------------------------------------------------------------------
def set_stage(model, text, image):
    """Which modality's prompts train in a stage. Pooler and head train in every stage (ASSUMPTION)."""
    model.generator.text.requires_grad_(text)
    model.generator.image.requires_grad_(image)


def snapshot(model):
    """A frozen copy of the model after a stage, sharing the (already frozen) backbone: a teacher of the
    alignment stage."""
    teacher = copy.deepcopy(model, memo={id(model.bb): model.bb})
    teacher.teachers = []
    teacher.requires_grad_(False)
    return teacher.eval()


def stage_teacher(run, model, stage):
    """The snapshot after a single stage, also written to OUT/teacher-<stage>.safetensors: under --resume, `fit`
    skips a stage that had finished and leaves the model at its pre-stage state, so the snapshot is read back."""
    path = os.path.join(run.args.out, f"teacher-{stage}.safetensors")
    if run.args.resume and os.path.isfile(path):
        model.load_state_dict(read_checkpoint(path)[0], strict=False)
    elif run.main and not run.args.eval_only:
        save_tensors(path, method_state(model), checkpoint_meta(run))
    return snapshot(model)


def stage_epochs(args):
    """ASSUMPTION: the paper gives no split; MAP's 20 epochs as 5 / 5 / 10 (1:1:2), at least 1 per stage."""
    if args.stage_epochs:
        return list(args.stage_epochs)
    quarter = max(1, args.epochs // 4)
    return [quarter, quarter, max(1, args.epochs - 2 * quarter)]


# ---------------------------------------------------------------------------------------------------------
# MuAP: loss (Sec. 3.6)
# ---------------------------------------------------------------------------------------------------------
def kl(teacher_logits, logits, task):
    """KL(p || q), p = teacher, q = student, averaged over the batch. Softmax tasks: sum_c p_c log(p_c / q_c);
    multi-label (ASSUMPTION): Bernoulli KL of each class, averaged over classes."""
    teacher_logits, logits = teacher_logits.float(), logits.float()
    if task == "multilabel":
        log_p = F.logsigmoid(torch.stack([teacher_logits, -teacher_logits]))           # (2, B, C): log p, log(1-p)
        log_q = F.logsigmoid(torch.stack([logits, -logits]))
        return (log_p.exp() * (log_p - log_q)).sum(0).mean()
    log_p, log_q = teacher_logits.log_softmax(-1), logits.log_softmax(-1)               # (B, C)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def alignment_loss(out, labels, task, lambda_t, lambda_v):
    """Alignment stage: L = L_task(y) + lambda_t KL(y_t || y) + lambda_v KL(y_v || y) (ASSUMPTION: the KL form)."""
    y = out["logits"]
    return (task_loss(y, labels, task) + lambda_t * kl(out["logits_t"], y, task)
            + lambda_v * kl(out["logits_v"], y, task))


def main(args):
    run = setup(args)
    model = MuAP(run.bb, run.num_outputs, args.fusion, args.prompt_length, args.prompt_depth).to(run.device)
    if model.depth < args.prompt_depth:
        run.log(f"prompt depth clamped to the backbone's {model.depth} layers")
    e_text, e_image, e_align = stage_epochs(args)
    args.epochs = e_text + e_image + e_align                     # recorded in results.json

    def single_stage_loss(out, batch):                           # ASSUMPTION: task loss only
        return task_loss(out["logits"], batch["label"], run.task)

    def align_loss(out, batch):
        return alignment_loss(out, batch["label"], run.task, args.lambda_t, args.lambda_v)

    set_stage(model, text=True, image=False)                     # single stage, text-step: image prompts frozen
    fit(run, model, single_stage_loss, epochs=e_text, stage="text-step")
    teacher_t = stage_teacher(run, model, "text-step")
    set_stage(model, text=False, image=True)                     # single stage, image-step: text prompts frozen
    fit(run, model, single_stage_loss, epochs=e_image, stage="image-step")
    teacher_v = stage_teacher(run, model, "image-step")
    set_stage(model, text=True, image=True)                      # alignment stage: both prompts, KL to the teachers
    model.teachers = [teacher_t, teacher_v]
    fit(run, model, align_loss, epochs=e_align, stage="alignment")
    model.teachers = []
    return finish(run, model, extra={"stage_epochs": {"text-step": e_text, "image-step": e_image,
                                                      "alignment": e_align}})


if __name__ == "__main__":
    cli(parser(), main)
