"""MuAP: Multi-step Adaptive Prompt Learning for Vision-Language Model with Missing Modality
(Dai, Tan, Mo, He, Qin, Liang; arXiv 2409.04693, 2024).

Official code: none: implemented from the paper; where it is silent, MAP's recipe
(YiLunLee/missing_aware_prompts @ 9aa5381, vilt/config.py and vilt/modules/vilt_missing_aware_prompt_module.py).

Map from the paper to this file:
    Sec. 3.4 complete-type prompts P_t^c, P_v^c                             -> `ModalityPrompt.complete`
    Sec. 3.4 crosswise missing-type prompts P_t^miss = f_missing(P_v^c),
             P_v^miss = f_missing(P_t^c); per-sample choice by missing case   -> `PromptGenerator.forward`
    Sec. 3.5 head-fusion / cross-fusion prompting                           -> `MuAP.forward_vilt / forward_clip`
    Sec. 3.6 multi-step tuning: text-step, image-step, alignment stage      -> `main` (`set_stage`, `snapshot`, teachers)
    Sec. 3.6 alignment loss L = L_task + lambda_t KL(y_t||y) + lambda_v KL(y_v||y) -> `alignment_loss`, `kl`

Modelling choices (the paper leaves these open; ASSUMPTION marks the place in the code):
    - f_missing: per target modality and prompted layer, token-wise Linear(D_other, D/16) -> GELU -> Linear(., D).
    - Initialisation (not MAP's: MAP starts its prompts at zeros with one row of ones, under which f_missing would
      map the zero rows to one vector): P_m^c ~ N(0, 0.02) (ViLT's init std); f_missing's weights N(0, 1/fan_in),
      biases 0, so P^miss starts as distinct tokens of about half P^c's spread (PyTorch's default init, biases
      included, would start P^miss as one vector repeated P times).
    - Head-fusion adds the prompts, P_t + P_v: P tokens at the sequence start (--head-combine add; a review: "adds");
      with [P_t, P_v] (concat, the summary's word) ViLT head-fusion equals cross-fusion (warned).
    - Single stages (text-step, image-step) use the task loss only: the paper's "contrastive learning" was not readable.
    - Teachers (--teachers snapshot, default): y_t, y_v = frozen deep copies of the text-step / image-step best
      states, so KL(y_v || y) starts at 0 (the image-step state starts the alignment: an anchor); --teachers live,
      the other reading: the model as it is with only its text / only its image prompts, detached (+2 forwards).
      Either kind runs in evaluation mode: a target carries no backbone dropout, whatever the student's forward does.
    - Alignment loss L = L_task + lambda_t KL(y_t || y) + lambda_v KL(y_v || y), lambda_t = lambda_v = 1, KL at
      temperature 1 (softmax of the raw logits), in fp32; multi-label: the per-class Bernoulli KL, averaged.
    - Stages: --epochs (20) split into R equal rounds of E >= 3 epochs, each E // 4, E // 4, the rest (text-step,
      image-step, alignment: 20 -> 5/5/10, MAP's 20 as 1:1:2; 10 -> 2/2/6); --stage-epochs T I A sets one round.
      --rounds R repeats the three stages ("iteratively aligning"), each round with its own teachers.
    - Each stage restarts AdamW and its schedule and keeps its OWN best validation check; the final model is the
      (last) alignment stage's best, even where a single stage validated higher: Sec. 3.6's tuning ends with the
      alignment stage, whose prompts are the model; a single stage's best is its teacher, not a candidate.

Smaller readings:
    - Freezing is parameter-level: the text-step fixes P_v^c, f_v, yet P_v^miss = f_v(P_t^c) moves and feeds P_t^c.
    - Prompts are input-level as in MAP: prepended at each of the first 6 prompted layers, earlier prompts kept.
    - CLIP (not in the paper) cross-fusion: the text prompt before the text tower's tokens, the image prompt likewise;
      head-fusion: P_t + P_v before each tower's tokens, the other tower's prompt mapped by a Linear per direction;
      the two pooled features are concatenated (DCP) and fed to MAP's MLP head.

Plumbing and recipe:
    - MAP's recipe otherwise: AdamW lr 1e-2, weight decay 2e-2, batch 256; ViLT pooler + MAP's MLP head, both trained
      in every stage; LN eps 1e-6, backbone dropout 0.1, val every 0.2 epoch (HM 0.11), also at epoch ends (README).
    - Snapshot teachers never change: their logits of all training samples are computed once per alignment stage
      (`TeacherTable`), in evaluation mode; exact for a deterministic pipeline (HF ViLT draws its patch order at
      random, so float rounding only; with all patches kept, max_image_length -1 as in MAP).
    - The single-stage snapshots are written to OUT/teacher-<stage>.safetensors with the run's configuration;
      --resume reads them back and refuses one written by another configuration.
    - --prompt-depth 0 or --prompt-length 0: no prompts, the backbone with a trained pooler and head (warned).

Use from your own code (README, "Use a method in your own code"), on a frozen `common.load_vilt()` / `load_clip()`
backbone `bb`, a batch of `data.Collate` and its task ("multiclass", "multilabel" or "binary"); copy this file with
common.py and data.py; `main` shows the full order (validation, best states, the teacher table):
    model = MuAP(bb, num_outputs, fusion="head", length=16, depth=6)
    set_stage(model, text=True, image=False)      # text-step: train on task_loss(model(batch)["logits"], ...)
    teacher_t = snapshot(model)
    set_stage(model, text=False, image=True)      # image-step: the same loss
    teacher_v = snapshot(model)
    set_stage(model, text=True, image=True)       # alignment stage: both prompts, KL to the frozen teachers
    model.teachers = snapshot_teachers(teacher_t, teacher_v)
    loss = alignment_loss(model.train()(batch), batch["label"], task, lambda_t=1.0, lambda_v=1.0)

Sections, in reading order: command line; prompt module (Sec. 3.4); forward (Sec. 3.5); multi-step prompt tuning
(Sec. 3.6); loss and run (Sec. 3.6); the numbers to compare with.

Usage: python muap.py --dataset food101 --missing both --rate 0.7 --fusion head     (ViLT, the paper's setting)
       python muap.py --dataset toy --backbone tiny-vilt --epochs 4 --batch-size 16   (offline, on CPU)
"""
import contextlib
import copy
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (autocast, build_parser, checkpoint_meta, cli, config_of, finish, fit, gather_rows, method_state,
                    paper_table, read_checkpoint, save_tensors, setup, task_loss)
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, DataError, make_loader, rank_batches, to_device


# ---------------------------------------------------------------------------------------------------------
# MuAP: command line (the paper's and the official code's defaults)
# ---------------------------------------------------------------------------------------------------------
def parser():
    p = build_parser("muap", __doc__, backbone="vilt")
    # Method-specific
    p.add_argument("--fusion", default="head", choices=["head", "cross"],
                   help="head-fusion (prompts at the sequence start) or cross-fusion (each prompt before its "
                        "modality's tokens), Sec. 3.5")
    p.add_argument("--head-combine", default="add", choices=["add", "concat"],
                   help="head-fusion only: P_t + P_v (P tokens) or [P_t, P_v] (2P tokens; on ViLT = cross-fusion)")
    p.add_argument("--prompt-length", type=int, default=16,
                   help="L_p, prompt tokens per modality and layer (the best of the paper's 8/16/24/32)")
    p.add_argument("--prompt-depth", type=int, default=6, help="N, prompted layers from the first (MAP's; not given)")
    p.add_argument("--stage-epochs", type=int, nargs=3, default=None, metavar=("TEXT", "IMAGE", "ALIGN"),
                   help="epochs of the text-step, image-step and alignment stage per round (Sec. 3.6); default: "
                        "--epochs (20) split into rounds of 1:1:2 (5 5 10); 0 skips a stage")
    p.add_argument("--rounds", type=int, default=1,
                   help="repetitions of text-step -> image-step -> alignment (1: the single pass of Sec. 3.6)")
    p.add_argument("--teachers", default="snapshot", choices=["snapshot", "live"],
                   help="y_t, y_v: the frozen text-step / image-step models, or the live model with only its "
                        "text / only its image prompts (Sec. 3.6)")
    p.add_argument("--lambda-t", type=float, default=1.0, help="lambda_t, weight of KL(y_t || y) (Sec. 3.6)")
    p.add_argument("--lambda-v", type=float, default=1.0, help="lambda_v, weight of KL(y_v || y) (Sec. 3.6)")
    p.set_defaults(lr=1e-2, weight_decay=2e-2, batch_size=256, epochs=None, schedule="linear", warmup=0.1)
    p.set_defaults(backbone_dropout=0.1, val_interval={"food101": 0.2, "mmimdb": 0.2, "hatememes": 0.11})  # config.py
    return p


# ---------------------------------------------------------------------------------------------------------
# MuAP: prompt module (Sec. 3.4, multimodal prompt generator)
# ---------------------------------------------------------------------------------------------------------
def bottleneck(d_in, d_out):
    """ASSUMPTION: f_missing is a token-wise bottleneck MLP, Linear(d_in, d_out/16) -> GELU -> Linear(., d_out),
    weights N(0, 1/fan_in) and biases 0, so distinct input tokens stay distinct (the bias does not dominate)."""
    hidden = max(1, d_out // 16)
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    for m in (mlp[0], mlp[2]):
        nn.init.normal_(m.weight, std=m.in_features ** -0.5)
        nn.init.zeros_(m.bias)
    return mlp


class ModalityPrompt(nn.Module):
    """Everything that produces one modality m's prompts, so a stage can freeze it as a whole (Sec. 3.6):
    its complete-type prompt P_m^c, and f_missing, which generates its missing-type prompt from the *other*
    modality's complete-type prompt. `to_other` (CLIP head-fusion only) carries P_m into the other tower."""

    def __init__(self, depth, length, width, other_width, to_other=False):
        super().__init__()
        self.complete = nn.Parameter(torch.randn(depth, length, width) * 0.02)      # P_m^c (N, P, D); ASSUMPTION:
                                                                                   # N(0, 0.02), not MAP's one-hot rows
        self.f_missing = nn.ModuleList(bottleneck(other_width, width) for _ in range(depth))
        self.to_other = nn.Linear(width, other_width) if to_other else None        # ASSUMPTION (CLIP head)

    def missing_type(self, other_complete):                                        # (N, P, D_other) -> (N, P, D)
        if not len(self.f_missing):                                                # N = 0: no prompted layer
            return self.complete
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


def prepend(p, x, mask=None):
    """[p, x] along the sequence, ones in front of the key mask; p None: nothing inserted."""
    if p is None:                                               # (B, P, D), (B, L, D), (B, L) -> (B, P + L, D), ...
        return x, mask
    x = torch.cat([p.to(x.dtype), x], dim=1)
    return x, None if mask is None else torch.cat([mask.new_ones(p.shape[:2]), mask], dim=1)


# ---------------------------------------------------------------------------------------------------------
# MuAP: forward (Sec. 3.5, prompt fusion)
# ---------------------------------------------------------------------------------------------------------
class MuAP(nn.Module):
    def __init__(self, bb, num_outputs, fusion="head", length=16, depth=6, combine="add"):
        super().__init__()
        self.bb, self.fusion, self.combine, self.length = bb, fusion, combine, length
        self.depth = min(depth, bb.num_layers)
        if bb.kind == "vilt":
            self.generator = PromptGenerator(self.depth, length, bb.width, bb.width)
            self.pooler = bb.pooler_copy()                       # trained, as in MAP
            self.head = mlp_head(bb.width, num_outputs)
        else:
            self.generator = PromptGenerator(self.depth, length, bb.width_text, bb.width_image, fusion == "head")
            self.head = mlp_head(2 * bb.embed_dim, num_outputs)
        self.teachers = None        # alignment stage: (model, batch, P_t, P_v) -> (y_t, y_v); not a module, so
                                    # neither trained nor saved in the checkpoint

    def forward(self, batch):
        P_t, P_v = self.generator(batch["missing"])
        out = {"logits": self.logits(batch, P_t, P_v)}
        if self.training and self.teachers is not None:          # Sec. 3.6: y_t, y_v of the alignment loss
            out["logits_t"], out["logits_v"] = self.teachers(self, batch, P_t, P_v)
        return out

    def logits(self, batch, P_t, P_v):                          # P_t or P_v None: that modality's prompts left out
        encode = self.forward_vilt if self.bb.kind == "vilt" else self.forward_clip
        return self.head(encode(batch, P_t, P_v))

    def head_prompt(self, p_t, p_v):
        """Head-fusion tokens of one layer: P_t + P_v (ASSUMPTION, --head-combine add) or [P_t, P_v] (concat)."""
        present = [p for p in (p_t, p_v) if p is not None]
        if len(present) == 1:
            return present[0]
        return p_t + p_v if self.combine == "add" else torch.cat([p_t, p_v], dim=-2)

    def forward_vilt(self, batch, P_t, P_v):                    # P_t, P_v: (B, N, P, D)
        bb = self.bb
        x, mask = bb.embed(batch)                                # (B, L_t + L_v, D), text first; mask (B, L)
        cls, img = 0, batch["input_ids"].shape[1]                # text [CLS] position, start of the image part
        bias = bb.attention_bias(mask, x.dtype)
        for i in range(bb.num_layers):
            if i < self.depth:                                   # ASSUMPTION: MAP's input level, prompts accumulate
                p_t, p_v = (None if P is None else P[:, i] for P in (P_t, P_v))         # (B, P, D) each
                if self.fusion == "head":                        # head-fusion: [P_t + P_v, <sequence>]
                    p = self.head_prompt(p_t, p_v)                                      # (B, P or 2P, D)
                    x, mask = prepend(p, x, mask)
                    cls, img = cls + p.shape[1], img + p.shape[1]
                else:                                            # cross-fusion: [P_t, <text part>, P_v, <image part>]
                    x_t, m_t = prepend(p_t, x[:, :img], mask[:, :img])
                    x_v, m_v = prepend(p_v, x[:, img:], mask[:, img:])
                    cls += x_t.shape[1] - img
                    x, mask, img = torch.cat([x_t, x_v], dim=1), torch.cat([m_t, m_v], dim=1), x_t.shape[1]
                bias = bb.attention_bias(mask, x.dtype)          # (B, 1, 1, L + prompts so far)
            x = bb.block(i, x, bias)
        return self.pooler(bb.final_norm(x)[:, cls:cls + 1])     # text [CLS] after the prompts in front of it

    def forward_clip(self, batch, P_t, P_v):                    # (B, N, P, D_t), (B, N, P, D_v)
        bb, gen = self.bb, self.generator
        T, V = P_t, P_v                                          # cross-fusion: each prompt into its own tower
        if self.fusion == "head":                                # ASSUMPTION: P_t + P_v before each tower's tokens
            T = self.head_prompt(P_t, None if P_v is None else gen.image.to_other(P_v))      # (B, N, P, D_t)
            V = self.head_prompt(None if P_t is None else gen.text.to_other(P_t), P_v)      # (B, N, P, D_v)
        x, t = bb.image_embed(batch["image"]), bb.text_embed(batch["text"])           # (B, L_v, D_v), (B, 77, D_t)
        for i in range(bb.num_layers):
            if i < self.depth:                                   # prepend, earlier prompts kept
                x, _ = prepend(None if V is None else V[:, i], x)
                t, _ = prepend(None if T is None else T[:, i], t)
            x, t = bb.image_block(i, x), bb.text_block(i, t)
        n_v, n_t = (0 if P is None else self.depth * P.shape[2] for P in (V, T))
        return torch.cat([bb.image_pool(x, n_v), bb.text_pool(t, batch["text"], n_t)], dim=-1)   # (B, 2E)


# ---------------------------------------------------------------------------------------------------------
# MuAP: multi-step prompt tuning (Sec. 3.6)
# ---------------------------------------------------------------------------------------------------------
def set_stage(model, text, image):
    """Which modality's prompts train in a stage. Pooler and head train in every stage (ASSUMPTION)."""
    model.generator.text.requires_grad_(text)
    model.generator.image.requires_grad_(image)


def snapshot(model):
    """A frozen deep copy of the model after a stage (prompts, pooler, head), sharing the frozen backbone."""
    teacher = copy.deepcopy(model, memo={id(model.bb): model.bb})
    teacher.teachers = None
    teacher.requires_grad_(False)
    return teacher.eval()


@contextlib.contextmanager
def backbone_dropout_off(bb):
    """Evaluation-mode backbone for a teacher's forward inside the student's training step (ViLT's dropout; CLIP
    has none), restored after."""
    active = getattr(bb, "dropout_active", False)
    bb.train(False)
    try:
        yield
    finally:
        bb.train(active)


def snapshot_teachers(teacher_t, teacher_v):
    """model.teachers from two `snapshot`s, for your own loop: y_t, y_v of each batch from the frozen teachers, in
    evaluation mode, fp32 (what `main`'s `TeacherTable` looks up, computed per batch instead of once)."""
    def teachers(model, batch, P_t, P_v):
        with torch.no_grad(), backbone_dropout_off(model.bb):
            return teacher_t(batch)["logits"].float(), teacher_v(batch)["logits"].float()
    return teachers


def stage_teacher(run, model, stage):
    """The snapshot after a single stage, also written to OUT/teacher-<stage>.safetensors with the run's config:
    under --resume, `fit` skips a stage that had finished and leaves the model at its pre-stage state, so the
    snapshot is read back, and refused if another configuration wrote it (as `common.resume` does last.safetensors)."""
    path = os.path.join(run.args.out, f"teacher-{stage}.safetensors")
    if run.args.resume and os.path.isfile(path):
        tensors, meta = read_checkpoint(path)
        current = json.loads(json.dumps(config_of(run.args)))
        if meta.get("config") != current:
            stored = meta.get("config") or {}
            diff = sorted(k for k in set(current) | set(stored) if current.get(k) != stored.get(k))
            raise DataError(f"--resume: {path} was written by a different configuration (differs in: "
                            f"{', '.join(diff)}); resume with that run's arguments, or train again in another --out")
        model.load_state_dict(tensors, strict=False)
    elif run.main and not run.args.eval_only:
        save_tensors(path, method_state(model), checkpoint_meta(run))
    return snapshot(model)


class TeacherTable:
    """Snapshot teachers: y_t, y_v of every training sample, (n, C) fp32 each, looked up by sample id."""

    def __init__(self, ids, logits_t, logits_v):
        self.row = {sid: k for k, sid in enumerate(ids)}
        self.logits_t, self.logits_v = logits_t, logits_v

    def __call__(self, model, batch, P_t, P_v):
        rows = torch.tensor([self.row[sid] for sid in batch["ids"]], device=self.logits_t.device)
        return self.logits_t[rows], self.logits_v[rows]


@torch.no_grad()
def teacher_table(run, teacher_t, teacher_v):
    """The frozen teachers' logits of the whole training split, once per alignment stage (each rank its share)."""
    ds = run.train_set
    if len(set(ds.ids)) != len(ds):
        raise DataError(f"{run.args.dataset} train has repeated sample ids; the teacher logits are keyed by id")
    teacher_t.eval()
    teacher_v.eval()
    batches = rank_batches(run, len(ds))
    rows = {"t": [], "v": []}
    for batch in make_loader(run, ds, batches):
        batch = to_device(batch, run.device)
        with autocast(run):
            rows["t"].append(teacher_t(batch)["logits"].float())
            rows["v"].append(teacher_v(batch)["logits"].float())
    rows = gather_rows(run, batches, {k: torch.cat(v) for k, v in rows.items()})
    return TeacherTable(ds.ids, rows["t"].to(run.device), rows["v"].to(run.device))


def live_teachers(model, batch, P_t, P_v):
    """--teachers live: y_t, y_v = the model as it is, with only its text / only its image prompts inserted, in
    evaluation mode (ASSUMPTION: a target without backbone dropout, as the snapshot teachers')."""
    with torch.no_grad(), backbone_dropout_off(model.bb):
        return model.logits(batch, P_t, None), model.logits(batch, None, P_v)


def stage_epochs(args):
    """(text, image, alignment) epochs of one round; sets args.epochs to the total that runs (results.json)."""
    if args.rounds < 1 or args.prompt_depth < 0 or args.prompt_length < 0:
        raise DataError("--rounds must be >= 1 and --prompt-depth / --prompt-length >= 0")
    if args.stage_epochs:
        total = args.rounds * sum(args.stage_epochs)
        if min(args.stage_epochs) < 0 or total == 0:
            raise DataError("--stage-epochs takes three counts >= 0, not all 0")
        if args.epochs not in (None, total):
            raise DataError(f"--epochs {args.epochs} contradicts --stage-epochs x --rounds = {total}: drop --epochs")
        args.epochs = total
        return list(args.stage_epochs)
    args.epochs = 20 if args.epochs is None else args.epochs
    per_round, rest = divmod(args.epochs, args.rounds)
    if rest or per_round < 3:
        raise DataError(f"--epochs {args.epochs} cannot give each stage (text-step, image-step, alignment; Sec. 3.6) "
                        f">= 1 epoch in {args.rounds} equal round(s): pass --epochs >= {3 * args.rounds} (a multiple "
                        f"of --rounds) or --stage-epochs TEXT IMAGE ALIGN")
    quarter = max(1, per_round // 4)                 # ASSUMPTION: MAP's 20 epochs as 5 / 5 / 10 (1:1:2); 10 -> 2/2/6
    return [quarter, quarter, per_round - 2 * quarter]


def equivalences(args, bb, epochs):
    """Configurations that provably compute what another one computes (printed, and saved in results.json)."""
    notes = []
    if args.prompt_length == 0 or args.prompt_depth == 0:
        notes.append("no prompt tokens (--prompt-length or --prompt-depth 0): every fusion is the prompt-free "
                     "backbone with the trained pooler and head")
    elif bb.kind == "vilt" and args.fusion == "head" and args.head_combine == "concat":
        notes.append("--fusion head --head-combine concat on ViLT is --fusion cross: the same tokens in another order, "
                     "and ViLT's attention is permutation-equivariant with no position embedding on the prompts")
    if args.lambda_t == args.lambda_v == 0:
        notes.append("--lambda-t 0 --lambda-v 0: the alignment stage trains on the task loss only (no teachers)")
    elif args.teachers == "snapshot" and epochs[1] == 0:
        notes.append(f"a 0-epoch image-step: its teacher is the text-step's state, so the loss is that of --lambda-t "
                     f"{args.lambda_t + args.lambda_v} --lambda-v 0")
    return notes


# ---------------------------------------------------------------------------------------------------------
# MuAP: loss (Sec. 3.6)
# ---------------------------------------------------------------------------------------------------------
def kl(teacher_logits, logits, task):
    """KL(p || q), p = teacher, q = student, at temperature 1, averaged over the batch, in fp32. Softmax tasks:
    sum_c p_c log(p_c / q_c);
    multi-label (ASSUMPTION): Bernoulli KL of each class, averaged over classes."""
    with torch.autocast(logits.device.type, enabled=False):
        teacher_logits, logits = teacher_logits.float(), logits.float()
        if task == "multilabel":
            log_p = F.logsigmoid(torch.stack([teacher_logits, -teacher_logits]))       # (2, B, C): log p, log(1-p)
            log_q = F.logsigmoid(torch.stack([logits, -logits]))
            return (log_p.exp() * (log_p - log_q)).sum(0).mean()
        log_p, log_q = teacher_logits.log_softmax(-1), logits.log_softmax(-1)           # (B, C)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def alignment_loss(out, labels, task, lambda_t, lambda_v):
    """Alignment stage: L = L_task(y) + lambda_t KL(y_t || y) + lambda_v KL(y_v || y) (ASSUMPTION: the KL form)."""
    y = out["logits"]
    loss = task_loss(y, labels, task)
    if lambda_t or lambda_v:
        loss = loss + lambda_t * kl(out["logits_t"], y, task) + lambda_v * kl(out["logits_v"], y, task)
    return loss


def main(args):
    e_text, e_image, e_align = epochs = stage_epochs(args)     # checked before anything loads
    run = setup(args)
    model = MuAP(run.bb, run.num_outputs, args.fusion, args.prompt_length, args.prompt_depth,
                 args.head_combine).to(run.device)
    if model.depth < args.prompt_depth:
        run.log(f"prompt depth clamped to the backbone's {model.depth} layers")
    warnings = equivalences(args, run.bb, epochs)
    for note in warnings:
        run.log(f"warning: {note}")

    def single_stage_loss(out, batch):                           # ASSUMPTION: task loss only
        return task_loss(out["logits"], batch["label"], run.task)

    def align_loss(out, batch):
        return alignment_loss(out, batch["label"], run.task, args.lambda_t, args.lambda_v)

    for r in range(args.rounds):
        tag = "" if args.rounds == 1 else f"-{r + 1}"
        set_stage(model, text=True, image=False)                 # single stage, text-step: image prompts frozen
        fit(run, model, single_stage_loss, epochs=e_text, stage=f"text-step{tag}")
        teacher_t = stage_teacher(run, model, f"text-step{tag}")
        set_stage(model, text=False, image=True)                 # single stage, image-step: text prompts frozen
        fit(run, model, single_stage_loss, epochs=e_image, stage=f"image-step{tag}")
        teacher_v = stage_teacher(run, model, f"image-step{tag}")
        set_stage(model, text=True, image=True)                  # alignment stage: both prompts, KL to the teachers
        if e_align and (args.lambda_t or args.lambda_v) and not args.eval_only:
            model.teachers = live_teachers if args.teachers == "live" else teacher_table(run, teacher_t, teacher_v)
        fit(run, model, align_loss, epochs=e_align, stage=f"alignment{tag}")
        model.teachers = None
    return finish(run, model, extra={"stage_epochs": {"text-step": e_text, "image-step": e_image,
                                                      "alignment": e_align}, "rounds": args.rounds,
                                     "warnings": warnings})


# ---------------------------------------------------------------------------------------------------------
# The numbers to compare with (percent), each with its provenance (`common.paper_table`; read by the summary)
# ---------------------------------------------------------------------------------------------------------
PAPER_NUMBERS = paper_table("muap", [
    ("vilt", None, "MuAP (arXiv 2409.04693) headline result (read in a public summary of the paper)", "review",
     "inferred", "the source gives 'Hateful Memes AUROC' only; 'both' 70% is this repository's reading (the "
     "protocol's headline setting)", [("hatememes", "both", 0.7, "both", 0.7, 65.09)])])


if __name__ == "__main__":
    cli(parser(), main)
