"""SyP on the tiny backbones. Mechanisms first (fast), CLI runs last: the defaults and the Table 3/4 rows of the
flags, degenerate sizes refused, the first-layer prompt of every variant against a per-sample loop over the paper's
formulas (one S_d for both towers), X_C = the layer-0 token means of common.modality_tokens with the missing half zero
and no extra encoder pass, the layer-0 injection and F_i = LN(FC(GELU(FC(.)))) of the inserted prompt (default) or of
the tokens that left layer i-1 (recorded on the library's blocks), the prompt rows blind to the text padding (pad ids
and truncation at the last EOT change nothing), the head's input with the missing tower kept (paper) or zeroed (DCP),
logits and gradients against a reference forward for each reading on images of different sizes, in training mode
too (ViLT's backbone dropout with the same masks), the classifier-only row equal to a head on the frozen features, and
the standard outputs of the CLI."""
import inspect
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import syp
from common import check_frozen, cli, load_clip, load_vilt, modality_tokens, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, Collate, load_split
from tests.fixtures import bce_by_a_loop, built_by_main

FAST = ["--batch-size", "32", "--micro-batch", "32", "--prompt-length", "4"]
VARIANTS = {"full": {}, "dynamic-only": {"static": False}, "static-only": {"dynamic": False},
            "base-only": {"static": False, "adapter": False}, "no-adapter": {"adapter": False}}

MUTATIONS = [
    {"file": "syp.py", "old": "f_I * (m != IMAGE_MISSING)[:, None], f_T * (m != TEXT_MISSING)[:, None]",
     "new": "f_I * (m != TEXT_MISSING)[:, None], f_T * (m != IMAGE_MISSING)[:, None]",
     "why": "zero the present modality's half instead of the missing one (X_C and head)"},
    {"file": "syp.py", "old": 'feature = zero_missing(f_I, f_T, m) if self.missing_feature == "zero"',
     "new": 'feature = torch.cat([f_I, f_T], -1) if self.missing_feature == "zero"',
     "why": "--missing-feature zero ignored: the missing tower's feature still reaches the FC"},
    {"file": "syp.py", "old": 'head="prompts", propagate="inserted", missing_feature="keep"):',
     "new": 'head="prompts", propagate="inserted", missing_feature="zero"):',
     "why": "SyP(): DCP's zeroing of the missing tower's feature as the default instead of the paper's FC on both"},
    {"file": "syp.py", "old": 'p.add_argument("--missing-feature", default="keep"',
     "new": 'p.add_argument("--missing-feature", default="zero"',
     "why": "CLI: DCP's zeroing of the missing feature as the default instead of the paper's head",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": 'head="prompts", propagate="inserted", missing_feature',
     "new": 'head="prompts", propagate="output", missing_feature',
     "why": "SyP(): (E6) the tokens that left layer i-1 as the default instead of the inserted prompt (the equation)"},
    {"file": "syp.py", "old": 'p.add_argument("--propagate", default="inserted"',
     "new": 'p.add_argument("--propagate", default="output"',
     "why": "CLI: (E6) --propagate output as the default instead of the equation's chain of inserted prompts",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": 'left = {"image": x[:, :n], "text": t[:, :n]}        # the prompt tokens that left layer i-1\n'
                              '                P = self.prompt.propagate(i, P if self.propagate == "inserted" else left)',
     "new": 'left = {"image": x[:, :n], "text": t[:, :n]}        # the prompt tokens that left layer i-1\n'
            '                P = self.prompt.propagate(i, left if self.propagate == "inserted" else P)',
     "why": "(E6) CLIP: the two readings of P^{R_{i-1}} swapped (inserted <-> left layer i-1)"},
    {"file": "syp.py", "old": 'left = {"joint": x[:, :n]}                          # the prompt tokens that left layer i-1\n'
                              '                P = self.prompt.propagate(i, P if self.propagate == "inserted" else left)',
     "new": 'left = {"joint": x[:, :n]}                          # the prompt tokens that left layer i-1\n'
            '                P = self.prompt.propagate(i, left if self.propagate == "inserted" else P)',
     "why": "(E6) ViLT: the two readings of P^{R_{i-1}} swapped (inserted <-> left layer i-1)"},
    {"file": "syp.py", "old": 'mask[:, :n, n:] = mask[:, :n, n:].masked_fill(padding[:, None], float("-inf"))',
     "new": 'mask[:, :n, n:] = mask[:, :n, n:]',
     "why": "CLIP text: the prompt rows see the padding after EOT (pad ids and truncation move the logits)"},
    {"file": "syp.py", "old": "padding = ~clip_text_mask(ids)", "new": "padding = ~clip_text_mask(ids[:1]).expand_as(ids)",
     "why": "CLIP text: the first sample's EOT masks the padding of every prompt row in the batch"},
    {"file": "syp.py", "old": "P_D = self.P_B[k][m]", "new": "P_D = self.P_B[k][m * (not self.training)]",
     "why": "training mode only: every sample routed to the complete case's base prompt",
     "tests": ["tests/test_syp.py::test_training_mode_equals_eval_mode_without_dropout"]},
    {"file": "syp.py", "old": 'x = torch.cat([P["joint"].to(x.dtype), x], dim=1)       # (E5)',
     "new": 'x = torch.cat([bb.drop(P["joint"].to(x.dtype)), x], dim=1)       # (E5)',
     "why": "ViLT: the first prompt passed through the backbone dropout while training",
     "tests": ["tests/test_syp.py::test_vilt_training_with_backbone_dropout_equals_the_reference_with_the_same_masks"]},
    {"file": "syp.py", "old": 't = torch.cat([P["text"].to(t.dtype), t], dim=1)',
     "new": 't = torch.cat([torch.nn.functional.dropout(P["text"], 0.1, self.training).to(t.dtype), t], dim=1)',
     "why": "CLIP: the first text prompt through dropout while training only",
     "tests": ["tests/test_syp.py::test_training_mode_equals_eval_mode_without_dropout"]},
    {"file": "syp.py", "old": 'if args.eval_only and "propagate" not in', "new": 'if False and "propagate" not in',
     "why": "--eval-only evaluates a checkpoint of the earlier syp.py (another forward) without a word",
     "tests": ["tests/test_syp.py::test_eval_only_refuses_a_checkpoint_of_the_earlier_syp"]},
    {"file": "syp.py", "old": "if prompts and (length < 1 or depth < 1):", "new": "if prompts and length < 1:",
     "why": "SyP(depth=0) accepted (its prompts still enter layer 0)",
     "tests": ["tests/test_syp.py::test_degenerate_sizes_are_refused_with_the_reason"]},
    {"file": "syp.py", "old": "if not 1 <= r <= min(towers.values()):", "new": "if r < 1:",
     "why": "a reduction r above a width accepted (a bottleneck of width 0)",
     "tests": ["tests/test_syp.py::test_degenerate_sizes_are_refused_with_the_reason"]},
    {"file": "syp.py", "old": "bb.text_pool(t, ids, n)", "new": "bb.text_pool(t, ids, 0)",
     "why": "--head cls: pool the text tower at offset 0 (a token before EOT) instead of after the prompts"},
    {"file": "syp.py", "old": "bb.image_pool(x, n)", "new": "bb.image_pool(x, 0)",
     "why": "--head cls: pool image token 0 (a prompt) instead of [CLS]"},
    {"file": "syp.py", "old": "visual.ln_post(x[:, :n].mean(1))", "new": "visual.ln_post(x[:, n:].mean(1))",
     "why": "(E7) image feature: the mean of the image tokens instead of the prompt tokens"},
    {"file": "syp.py", "old": "clip.ln_final(t[:, :n].mean(1))", "new": "clip.ln_final(t[:, n])",
     "why": "(E7) text feature: the SOT token instead of the prompt tokens' mean"},
    {"file": "syp.py", "old": "P_D = P_D * S_d[:, :, None]",
     "new": "P_D = P_D * S_d[:, :, None] if k != 'text' else P_D",
     "why": "(E3) S_d not shared: the text tower's base prompt is left unscaled"},
    {"file": "syp.py", "old": "nn.Linear(D, D // r), nn.GELU(), nn.Linear(D // r, D), nn.LayerNorm(D))",
     "new": "nn.LayerNorm(D), nn.Linear(D, D // r), nn.GELU(), nn.Linear(D // r, D))",
     "why": "(E6) F_i with the LayerNorm first (DCP's order) instead of last"},
    {"file": "syp.py", "old": "return zero_missing(x.mean(1), masked_mean(t, clip_text_mask(batch[\"text\"])), m)",
     "new": "return torch.cat([x.mean(1), masked_mean(t, clip_text_mask(batch[\"text\"]))], -1)",
     "why": "(E1) X_C without the zero tensor of the missing modality (CLIP)"},
    {"file": "syp.py", "old": "masked_mean(x[:, L_t:], t[:, L_t:]), masked_mean(x[:, :L_t], t[:, :L_t]), m)",
     "new": "masked_mean(x[:, :L_t], t[:, :L_t]), masked_mean(x[:, L_t:], t[:, L_t:]), m)",
     "why": "(E1) ViLT: X_I and X_T swapped (text tokens as the image feature)"},
    {"file": "syp.py", "old": "mask[:, :n] = 0", "new": "mask[:, :0] = 0",
     "why": "CLIP text: prompt rows left causal, so the text prompts never see the text"},
    {"file": "syp.py",
     "old": "1 <= i < self.depth:                                 # (E6): P^{R_i} = F_i(P^{R_{i-1}})\n"
            "                left = {\"image\"",
     "new": "2 <= i < self.depth:                                 # (E6): P^{R_i} = F_i(P^{R_{i-1}})\n"
            "                left = {\"image\"",
     "why": "(E6) CLIP: layer 1's prompts are carried instead of propagated"},
    {"file": "syp.py", "old": 'left = {"joint": x[:, :n]}', "new": 'left = {"joint": x[:, n:2 * n]}',
     "why": "(E6) ViLT --propagate output: F_i of the first L_p non-prompt tokens instead of the prompts"},
    {"file": "syp.py", "old": "mask = torch.cat([mask.new_ones(len(m), n), mask], dim=1)",
     "new": "mask = torch.cat([mask.new_zeros(len(m), n), mask], dim=1)",
     "why": "ViLT: the prompts masked out as keys (no token attends to them)"},
    {"file": "syp.py", "old": "nn.init.zeros_(self.head.bias)", "new": "nn.init.ones_(self.head.bias)",
     "why": "the FC's initialisation: bias 1 instead of DCP's 0"},
    {"file": "syp.py", "old": "P_S = self.G[k](self.P_S[m])", "new": "P_S = self.G[k](self.P_S[0])",
     "why": "(E4) the static prompt of the complete case for every sample"},
    {"file": "syp.py", "old": "return bb.final_norm(x[:, :n].mean(1)), S_d, None",
     "new": "return bb.final_norm(x[:, n]), S_d, None",
     "why": "(E7) ViLT: the head on [CLS] instead of the prompt feature"},
    {"file": "syp.py", "old": "nn.ReLU(), nn.Linear(d_x // r, length)", "new": "nn.GELU(), nn.Linear(d_x // r, length)",
     "why": "(E2) the adapter's delta: GELU instead of ReLU"},
    {"file": "syp.py", "old": '(False, True, False): "dynamic-only", (True, False, False): "static-only"',
     "new": '(False, True, False): "static-only", (True, False, False): "dynamic-only"',
     "why": "paper_variant: Table 3's dynamic-only and static-only rows swapped"},
    # New (the suite had not seen these): the class's and the parser's paper defaults, the inits, the CLI wiring of
    # the Table 3/4 flags, the loss of the task, gradients through F_i, the --nm2i means, the paper's numbers.
    {"file": "syp.py", "old": "length=36, depth=6, r=16, dynamic=True", "new": "length=16, depth=6, r=16, dynamic=True",
     "why": "SyP(): the default L_p 16 instead of the paper's 36",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": "length=36, depth=6, r=16, dynamic=True",
     "new": "length=36, depth=12, r=16, dynamic=True",
     "why": "SyP(): the default M 12 (every layer of ViT-B/16) instead of the paper's 6",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": 'epochs=20, schedule="linear",', "new": 'epochs=20, schedule="cosine",',
     "why": "the schedule after the warm-up: cosine instead of the stated linear decay (DCP, MAP)",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": "nn.Parameter(0.02 * torch.randn(3, length, D))",
     "new": "nn.Parameter(torch.randn(3, length, D))", "why": "P_B initialised N(0, 1) instead of N(0, 0.02) (DCP)",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": "nn.Parameter(0.02 * torch.randn(3, length, d_s))",
     "new": "nn.Parameter(0.2 * torch.randn(3, length, d_s))", "why": "P_S initialised with std 0.2 instead of 0.02",
     "tests": ["tests/test_syp.py::test_defaults_and_the_paper_rows_of_the_flags"]},
    {"file": "syp.py", "old": "dynamic=not args.no_dynamic, static=not args.no_static",
     "new": "dynamic=not args.no_static, static=not args.no_dynamic",
     "why": "main: --no-dynamic drops the static prompt and --no-static the dynamic one (Table 3 rows swapped)",
     "tests": ["tests/test_syp.py::test_cli_flags_build_their_row_and_the_task_loss"]},
    {"file": "syp.py", "old": "adapter=not args.no_adapter,", "new": "adapter=True,",
     "why": "main: --no-adapter ignored (Table 4's row without the adapter trains the full model)",
     "tests": ["tests/test_syp.py::test_cli_flags_build_their_row_and_the_task_loss"]},
    {"file": "syp.py", "old": "args.prompt_depth, args.reduction,", "new": "args.prompt_depth, 16,",
     "why": "main: --reduction ignored (r fixed at 16)",
     "tests": ["tests/test_syp.py::test_cli_flags_build_their_row_and_the_task_loss"]},
    {"file": "syp.py", "old": 'batch["label"], run.task)', "new": 'batch["label"], "multiclass")',
     "why": "(E8) the task loss: cross-entropy on every task (MM-IMDb is multi-label: BCE)",
     "tests": ["tests/test_syp.py::test_cli_flags_build_their_row_and_the_task_loss"]},
    {"file": "syp.py", "old": 'left = {"image": x[:, :n], "text": t[:, :n]}',
     "new": 'left = {"image": x[:, :n].detach(), "text": t[:, :n].detach()}',
     "why": "(E6) CLIP --propagate output: F_i's input detached (no gradient to the earlier layers through it)",
     "tests": ["tests/test_syp.py::test_logits_and_gradients_equal_the_reference_forward"]},
    {"file": "syp.py", "old": 'left = {"joint": x[:, :n]}', "new": 'left = {"joint": x[:, :n].detach()}',
     "why": "(E6) ViLT --propagate output: F_i's input detached (no gradient to the earlier layers through it)",
     "tests": ["tests/test_syp.py::test_logits_and_gradients_equal_the_reference_forward"]},
    {"file": "syp.py", "old": "return {k: self.F[k][i - 1](P[k]) for k in P}",
     "new": "return {k: self.F[k][i - 1](P[k].detach()) for k in P}",
     "why": "(E6) the chain of inserted prompts detached (no gradient back through F_i to P^{R_0})",
     "tests": ["tests/test_syp.py::test_logits_and_gradients_equal_the_reference_forward"]},
    {"file": "syp.py", "old": 'means["text"].append(P["text"].mean(1))',
     "new": 'means["text"].append(t[:, n:].mean(1))',
     "why": "--nm2i: the text prompt's per-layer mean taken over the text tokens instead of the prompt tokens",
     "tests": ["tests/test_syp.py::test_propagation_of_the_inserted_or_the_output_prompt"]},
    {"file": "syp.py", "old": "mask[:, :n] = 0", "new": "mask[:, :n + 1] = 0",
     "why": "CLIP text: off by one, SOT's row opened too (SOT sees the whole text)",
     "tests": ["tests/test_syp.py::test_attention_masks_of_the_prompts",
               "tests/test_syp.py::test_logits_and_gradients_equal_the_reference_forward"]},
    {"file": "syp.py", "old": "self.F[k][i - 1](P[k])", "new": "self.F[k][0](P[k])",
     "why": "(E6) one F for every layer instead of F_i per layer",
     "tests": ["tests/test_syp.py::test_propagation_of_the_inserted_or_the_output_prompt"]},
    {"file": "syp.py", "old": "P_D = self.P_B[k][m]", "new": "P_D = self.P_B[k][(3 - m) % 3]",
     "why": "(E3) P_B routed by the paper's m1/m2 order (image-missing and text-missing prompts swapped)",
     "tests": ["tests/test_syp.py::test_each_variant_first_prompt_and_parameters"]},
    {"file": "syp.py", "old": "nn.Linear(d_x // r, length),\n                                     nn.Sigmoid())",
     "new": "nn.Linear(d_x // r, length),\n                                     nn.Softmax(-1))",
     "why": "(E2) S_d normalised over the prompt tokens (softmax) instead of an element-wise sigmoid",
     "tests": ["tests/test_syp.py::test_each_variant_first_prompt_and_parameters"]},
    {"file": "syp.py", "old": "return zero_missing(x.mean(1),", "new": "return zero_missing(x[:, 0],",
     "why": "(E1) CLIP X_I: the [CLS] embedding instead of the mean of the image tokens",
     "tests": ["tests/test_syp.py::test_adapter_input_is_layer0_features_with_the_missing_half_zero"]},
    {"file": "syp.py", "old": "masked_mean(x[:, :L_t], t[:, :L_t]), m)", "new": "x[:, :L_t].mean(1), m)",
     "why": "(E1) ViLT X_T: the mean over the padding too",
     "tests": ["tests/test_syp.py::test_adapter_input_is_layer0_features_with_the_missing_half_zero"]},
    {"file": "syp.py", "old": "f_I * (m != IMAGE_MISSING)[:, None]", "new": "f_I * (m == 0)[:, None]",
     "why": "wrong missing-case branch: the image half zeroed for every incomplete sample",
     "tests": ["tests/test_syp.py::test_adapter_input_is_layer0_features_with_the_missing_half_zero"]},
    {"file": "syp.py", "old": "clip.ln_final(t[:, :n].mean(1))", "new": "clip.ln_final(t[:, :n]).mean(1)",
     "why": "(E7) CLIP text feature: the norm before the token mean", "tests": ["tests/test_syp.py::test_head_input"]},
    {"file": "syp.py", "old": "self.pooler(bb.final_norm(x)[:, n:n + 1])",
     "new": "self.pooler(bb.final_norm(x)[:, :1])",
     "why": "ViLT --head cls: the pooler on the first prompt instead of [CLS]",
     "tests": ["tests/test_syp.py::test_head_input"]},
    {"file": "syp.py",
     "old": "1 <= i < self.depth:                                 # (E6): P^{R_i} = F_i(P^{R_{i-1}})\n"
            "                left = {\"joint\"",
     "new": "1 <= i < self.depth - 1:                             # (E6): P^{R_i} = F_i(P^{R_{i-1}})\n"
            "                left = {\"joint\"",
     "why": "(E6) ViLT: layer M-1's prompts carried instead of propagated",
     "tests": ["tests/test_syp.py::test_propagation_of_the_inserted_or_the_output_prompt"]},
    {"file": "syp.py", "old": 'zip(("hatememes", "food101", "mmimdb"), values)',
     "new": 'zip(("food101", "hatememes", "mmimdb"), values)',
     "why": "PAPER_NUMBERS: the ablation tables' Hateful Memes and Food-101 columns swapped",
     "tests": ["tests/test_syp.py::test_paper_numbers_are_the_papers_tables"]},
    {"file": "syp.py", "old": '("hatememes", (68.16, 68.42, 68.93))', "new": '("hatememes", (68.93, 68.42, 68.16))',
     "why": "PAPER_NUMBERS: Hateful Memes' main-table numbers keyed by the wrong missing rate",
     "tests": ["tests/test_syp.py::test_paper_numbers_are_the_papers_tables"]},
    {"file": "syp.py", "old": "((0.7, (51.88, 68.11, 83.56)), (0.9, (49.58, 67.72, 81.26)))",
     "new": "((0.9, (51.88, 68.11, 83.56)), (0.7, (49.58, 67.72, 81.26)))",
     "why": "PAPER_NUMBERS: AOEPT's re-run of SyP keyed by the wrong missing rate",
     "tests": ["tests/test_syp.py::test_paper_numbers_are_the_papers_tables"]},
]


def toy_batch(bb, n=8, missing="both", rate=0.5, start=12):          # rows 12..19 hold codes 0, 1, 2
    ds = load_split("toy", None, "train", missing_type=missing, rate=rate, seed=0)
    return Collate(bb, 40)([ds[i] for i in range(start, start + n)])


def mixed_batch(bb, n=8, start=12):
    """toy items with PIL images of different sizes (ViLT: padded patches of different counts per sample), texts of
    different lengths and the three missing cases."""
    ds = load_split("toy", None, "train", missing_type="both", rate=0.5, seed=0)
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (56, 32), (32, 48), (40, 40), (64, 24), (24, 40), (48, 48), (32, 40)]
    items = [dict(ds[i], image=Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
             for i, (w, h) in zip(range(start, start + n), sizes)]
    batch = Collate(bb, 40)(items)
    if bb.kind == "vilt":                                                       # padding in the image part
        assert len(set(batch["pixel_mask"].sum((1, 2)).tolist())) > 2
    return batch


def backbone(kind):
    torch.manual_seed(0)
    return load_clip("tiny-clip", "") if kind == "tiny-clip" else load_vilt("tiny-vilt")


def record(bb, fn):
    """Run fn() recording every layer call of the library's blocks -> per tower (inputs, outputs). CLIP: forward
    hooks on open_clip's resblocks; ViLT: a wrapper of common.FrozenViLT.block (its SDPA path calls the layer's
    submodules, never the ViltLayer module, so hooks on encoder.layer would not fire)."""
    if bb.kind != "clip":
        seen, block = ([], []), bb.block

        def wrapped(i, x, bias, kv_prefix=None):
            out = block(i, x, bias, kv_prefix)
            seen[0].append(x)
            seen[1].append(out)
            return out
        bb.block = wrapped
        try:
            with torch.no_grad():
                fn()
        finally:
            del bb.block
        return {"joint": seen}
    seen = [([], []) for _ in range(2)]
    hooks = []
    for s, layers in enumerate([bb.model.visual.transformer.resblocks, bb.model.transformer.resblocks]):
        for block in layers:
            def hook(module, args, out, s=s):
                seen[s][0].append(args[0])
                seen[s][1].append(out[0] if isinstance(out, tuple) else out)
            hooks.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return dict(zip(["image", "text"], seen))


def X_oracle(bb, batch):
    """X_C = [X_I, X_T] from common.modality_tokens' layer-0 means, the missing half zero (a loop over samples)."""
    tokens = modality_tokens(bb, batch, 1)
    X_I, X_T = tokens["image"][:, 0].clone(), tokens["text"][:, 0].clone()
    for b, code in enumerate(batch["missing"].tolist()):
        if code == IMAGE_MISSING:
            X_I[b] = 0
        if code == TEXT_MISSING:
            X_T[b] = 0
    return torch.cat([X_I, X_T], -1)


def first_by_hand(sp, m, X, flags):
    """P^{R_0} per sample: S_d = sigmoid(W_2 relu(W_1 X + b_1) + b_2) in R^{L_p}, the SAME for every tower;
    P^k = S_d[:, None] * P_{k,B}[m] + P_S[m] G_k^T + b_k, each term only where the variant keeps it."""
    dynamic, static, adapter = flags.get("dynamic", True), flags.get("static", True), flags.get("adapter", True)
    P = {k: [] for k in sp.towers}
    for b in range(len(m)):
        s = None
        if dynamic and adapter:
            a = sp.adapter
            s = torch.sigmoid(a[2].weight @ torch.relu(a[0].weight @ X[b] + a[0].bias) + a[2].bias)   # (L_p,)
        for k in sp.towers:
            p = 0
            if dynamic:
                p = sp.P_B[k][m[b]] * (s[:, None] if s is not None else 1)
            if static:
                p = p + sp.P_S[m[b]] @ sp.G[k].weight.T + sp.G[k].bias
            P[k].append(p)
    return {k: torch.stack(v) for k, v in P.items()}


def F_by_hand(f, P):
    """LN(FC(GELU(FC(P)))) from the weights of F_i."""
    h = F.linear(F.gelu(F.linear(P, f[0].weight, f[0].bias)), f[2].weight, f[2].bias)
    return F.layer_norm(h, h.shape[-1:], f[3].weight, f[3].bias, f[3].eps)


def text_mask_by_hand(n, ids_row):
    """CLIP text of one sample over [n prompts; its L_t ids], by loops: a text row r sees the prompts and text <= r;
    a prompt row sees the prompts and the text up to EOT (the largest id), not the padding after it."""
    L_t = len(ids_row)
    eot = int(ids_row.argmax())
    mask = torch.zeros(n + L_t, n + L_t)
    for r in range(n + L_t):
        for c in range(n, n + L_t):
            if (r >= n and c > r) or (r < n and c - n > eot):
                mask[r, c] = float("-inf")
    return mask


def X_by_hand(bb, batch, embedded):
    """(E1) X_C from this pass's own layer-0 inputs, by a loop: the mean of a modality's tokens (CLIP text SOT..EOT,
    ViLT its unmasked tokens), zero for a missing modality."""
    rows = []
    for b, code in enumerate(batch["missing"].tolist()):
        if bb.kind == "clip":
            eot = int(batch["text"][b].argmax())
            X_I, X_T = embedded["image"][b].mean(0), embedded["text"][b, :eot + 1].mean(0)
        else:
            x, mask, L_t = embedded["joint"][b], embedded["mask"][b].bool(), batch["input_ids"].shape[1]
            X_I, X_T = x[L_t:][mask[L_t:]].mean(0), x[:L_t][mask[:L_t]].mean(0)
        rows.append(torch.cat([X_I * (code != IMAGE_MISSING), X_T * (code != TEXT_MISSING)]))
    return torch.stack(rows)


def reference_logits(model, batch, propagate="inserted", missing_feature="keep", vilt_layer="hf"):
    """The full SyP written out from the paper, per sample where it selects by case, on the library's own blocks
    (open_clip's resblocks one sample at a time under `text_mask_by_hand`; HF's ViltLayer, or common's block where
    the backbone dropout must draw the same masks): (E1) `X_by_hand`, (E2)-(E5) `first_by_hand`, prepended; (E6)
    for 1 <= i < M the prompt part of layer i's input is P^{R_i} = F_i(P^{R_{i-1}}), P^{R_{i-1}} read literally as
    the prompt INSERTED at layer i-1 (propagate="inserted") or as the prompt tokens that LEFT layer i-1 ("output");
    (E7) the FC on the towers' mean prompt after the frozen final norm (and projection), the missing tower's half
    kept (the paper) or zeroed (missing_feature="zero"). ViLT samples its patches: the caller seeds each pass."""
    bb, sp, n, M = model.bb, model.prompt, model.length, model.depth
    m = batch["missing"]
    if bb.kind == "clip":
        x = {"image": bb.image_embed(batch["image"]), "text": bb.text_embed(batch["text"])}
        ids = batch["text"]
        P = first_by_hand(sp, m, X_by_hand(bb, batch, x), {})

        def text_layer(i, h):
            return torch.stack([bb.model.transformer.resblocks[i](h[b:b + 1], attn_mask=text_mask_by_hand(n, ids[b]))[0]
                                for b in range(len(h))])
        layers = {"image": lambda i, h: bb.model.visual.transformer.resblocks[i](h), "text": text_layer}
    else:
        joint, mask = bb.embed(batch)
        P = first_by_hand(sp, m, X_by_hand(bb, batch, {"joint": joint, "mask": mask}), {})
        mask = torch.cat([torch.ones(len(m), n, dtype=mask.dtype), mask], 1)
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        layer = (lambda i, h: bb.vilt.encoder.layer[i](h, bias)[0]) if vilt_layer == "hf" else \
            (lambda i, h: bb.block(i, h, bias))
        x, layers = {"joint": joint}, {"joint": layer}
    x = {k: torch.cat([P[k], h], 1) for k, h in x.items()}                    # P^{R_0} in front of layer 0
    for i in range(bb.num_layers):
        if 1 <= i < M:
            for k in x:
                previous = P[k] if propagate == "inserted" else x[k][:, :n]
                P[k] = F_by_hand(sp.F[k][i - 1], previous)                      # P^{R_i}
                x[k] = torch.cat([P[k], x[k][:, n:]], 1)
        for k in x:
            x[k] = layers[k](i, x[k])
    if bb.kind == "vilt":
        feature = bb.vilt.layernorm(x["joint"][:, :n].mean(1))
    else:
        clip = bb.model
        f = {"image": clip.visual.ln_post(x["image"][:, :n].mean(1)) @ clip.visual.proj,
             "text": clip.ln_final(x["text"][:, :n].mean(1)) @ clip.text_projection}
        if missing_feature == "zero":
            keep = {"image": [float(c != IMAGE_MISSING) for c in m.tolist()],
                    "text": [float(c != TEXT_MISSING) for c in m.tolist()]}
            f = {k: f[k] * torch.tensor(keep[k])[:, None] for k in f}
        feature = torch.cat([f["image"], f["text"]], -1)
    return F.linear(feature, model.head.weight, model.head.bias)


def logits_and_grads(model, forward, seed=1):
    """logits of forward() (the torch RNG seeded first: ViLT's patch draw, dropout) and the gradient of a fixed random
    linear function of them with respect to every trainable parameter (None where unused)."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    logits = forward()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    return logits, torch.autograd.grad((weights * logits).sum(), params, allow_unused=True)


def assert_same(a, b, model, atol=1e-5):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert torch.allclose(logits_a, logits_b, atol=atol), (logits_a - logits_b).abs().max()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, g, g_ref in zip(names, grads_a, grads_b):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert (g - g_ref).abs().max() <= 1e-4 * g_ref.abs().max() + 1e-9, name


def expected_params(bb, length, C, r=16, depth=6, dynamic=True, static=True, adapter=True, head="prompts"):
    """Parameter count of SyP from the sizes alone."""
    towers = [bb.width_image, bb.width_text] if bb.kind == "clip" else [bb.width]
    d_x = sum(towers) if bb.kind == "clip" else 2 * bb.width
    d_s, M = towers[-1], min(depth, bb.num_layers)
    count = {"P_B": 3 * length * sum(towers) if dynamic else 0,
             "adapter": d_x * (d_x // r) + d_x // r + (d_x // r) * length + length if dynamic and adapter else 0,
             "P_S": 3 * length * d_s if static else 0,
             "G": sum(d_s * D + D for D in towers) if static else 0,
             "F": (M - 1) * sum(D * (D // r) + D // r + (D // r) * D + D + 2 * D for D in towers)
             if dynamic or static else 0}
    width = 2 * bb.embed_dim if bb.kind == "clip" else bb.width
    count["head"] = width * C + C + (bb.width * bb.width + bb.width if bb.kind == "vilt" and head == "cls" else 0)
    return count


# ---------------------------------------------------------------------------------------------------------
# Mechanisms
# ---------------------------------------------------------------------------------------------------------
def test_defaults_and_the_paper_rows_of_the_flags(capsys):
    """The paper's numbers as defaults of the parser and of SyP() (L_p 36, M 6, AdamW lr 1e-3, weight decay 2e-2,
    batch 32, 20 epochs), the header's DCP choices (r 16, linear decay after a 10% warm-up, FC and prompts
    N(0, 0.02)), the Table 3/4 row each flag set names, and the fix each flag set without a model is told."""
    args = syp.parser().parse_args([])
    assert (args.prompt_length, args.prompt_depth, args.reduction, args.head) == (36, 6, 16, "prompts")
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs, args.warmup) == (1e-3, 2e-2, 32, 20, 0.1)
    assert args.paper_backbone == "clip" and not (args.no_dynamic or args.no_static or args.no_adapter)
    assert syp.paper_variant(args) == "full" and syp.check_args(args) is None
    assert (args.propagate, args.missing_feature) == ("inserted", "keep")      # the literal readings
    assert args.schedule == "linear"                                            # after the warm-up (DCP, MAP)
    defaults = {k: v.default for k, v in inspect.signature(syp.SyP).parameters.items()}
    assert (defaults["length"], defaults["depth"], defaults["r"], defaults["head"]) == (36, 6, 16, "prompts")
    assert (defaults["propagate"], defaults["missing_feature"]) == ("inserted", "keep")
    model = syp.SyP(backbone("tiny-clip"), 101)
    head, sp = model.head, model.prompt
    assert (head.bias == 0).all() and abs(float(head.weight.detach().std()) - 0.02) < 0.002   # FC: N(0, 0.02), bias 0
    for name, p in [*sp.P_B.items(), ("P_S", sp.P_S)]:                         # P_B, P_S: N(0, 0.02) (DCP's prompts)
        assert p.shape[:2] == (3, 36) and abs(float(p.detach().mean())) < 0.002, name
        assert abs(float(p.detach().std()) - 0.02) < 0.002, name
    rows = {(): "full", ("--no-static",): "dynamic-only", ("--no-dynamic",): "static-only",
            ("--no-static", "--no-adapter"): "base-only", ("--no-adapter",): "no-adapter",
            ("--no-dynamic", "--no-static", "--head", "cls"): "classifier-only",
            ("--head", "cls"): "full+head-cls", ("--no-static", "--prompt-length", "4"): "dynamic-only+prompt-length=4",
            ("--propagate", "output"): "full+propagate=output",
            ("--missing-feature", "zero"): "full+missing-feature=zero"}
    for flags, row in rows.items():
        args = syp.parser().parse_args(list(flags))
        assert syp.check_args(args) is None and syp.paper_variant(args) == row, flags
    for flags, fix in ((["--prompt-depth", "0"], "--no-dynamic --no-static --head cls"),
                       (["--prompt-length", "0"], "--no-dynamic --no-static --head cls"),
                       (["--no-dynamic", "--no-adapter"], "remove --no-adapter"),
                       (["--no-dynamic", "--no-static"], "add --head cls"),
                       (["--reduction", "0"], "r must be >= 1"),
                       (["--backbone", "tiny-vilt", "--missing-feature", "zero"], "ViLT has one joint feature")):
        with pytest.raises(SystemExit):
            cli(syp.parser(), syp.main, ["--backbone", "tiny-clip", *flags])
        assert fix in capsys.readouterr().err, flags


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_degenerate_sizes_are_refused_with_the_reason(kind, tmp_path):
    """SyP() from your own code: no prompt tokens (a mean over none: non-finite logits), no prompted layer (the
    prompts would still enter layer 0), a reduction r < 1 or above a width (a bottleneck of width 0), a word that
    is no choice, DCP's zeroing on ViLT's one feature: ValueError with the reason. The CLI refuses an r above the
    backbone's width with the same reason, before training."""
    bb = backbone(kind)
    cases = [(dict(length=0), "L_p >= 1"), (dict(depth=0), "M >= 1"), (dict(r=0), "1 <= r"), (dict(r=10 ** 4), "1 <= r"),
             (dict(propagate="outputs"), "not a choice"), (dict(head="pooled"), "not a choice")]
    if kind == "tiny-vilt":
        cases.append((dict(missing_feature="zero"), "one joint feature"))
    for kw, reason in cases:
        with pytest.raises(ValueError, match=reason):
            syp.SyP(bb, 4, **kw)
    syp.SyP(bb, 4, length=0, depth=0, dynamic=False, static=False, head="cls")      # no prompts: sizes unused
    with pytest.raises(SystemExit, match="1 <= r"):
        cli(syp.parser(), syp.main, ["--backbone", kind, "--reduction", "10000", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "last.safetensors").exists()


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_first_prompt_and_parameters(kind, variant):
    """first(m, X) equals the per-sample formulas; inside the forward, layer 0 receives exactly first(m, X_C) in
    front of the untouched embeddings; the module holds exactly the variant's parameters."""
    bb, flags = backbone(kind), VARIANTS[variant]
    model = syp.SyP(bb, 3, length=5, depth=3, **flags).eval()
    sp = model.prompt
    m = torch.tensor([COMPLETE, TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING])
    X = torch.randn(4, (bb.width_image + bb.width_text) if kind == "tiny-clip" else 2 * bb.width)
    with torch.no_grad():
        P, S_d = sp.first(m, X)
        for k, p in first_by_hand(sp, m, X, flags).items():
            assert torch.allclose(P[k], p, atol=1e-6), k
    assert (S_d is None) == (variant not in ("full", "dynamic-only"))
    batch = toy_batch(bb)
    torch.manual_seed(1)                                                        # ViLT samples its patches
    seen = record(bb, lambda: model(batch))
    with torch.no_grad():
        P0 = first_by_hand(sp, batch["missing"], X_oracle(bb, batch), flags)
        torch.manual_seed(1)
        embedded = {"image": bb.image_embed(batch["image"]), "text": bb.text_embed(batch["text"])} \
            if kind == "tiny-clip" else {"joint": bb.embed(batch)[0]}
    for k, (ins, _) in seen.items():
        assert len(ins) == bb.num_layers                                        # no extra encoder pass
        assert torch.allclose(ins[0][:, :5], P0[k], atol=1e-5), k
        assert torch.equal(ins[0][:, 5:], embedded[k]), k
    count = expected_params(bb, 5, C=3, depth=3, **flags)
    names = {n.split(".")[1] if n.startswith("prompt.") else "head" for n, p in model.named_parameters()
             if not n.startswith("bb.")}
    assert names == {c for c, v in count.items() if v}
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bb.")) == sum(count.values())


def test_one_S_d_scales_both_towers():
    """Dynamic prompt only: P^I / P_{I,B}[m] and P^T / P_{T,B}[m] are the same (B, L_p) tensor, S_d itself."""
    bb = backbone("tiny-clip")
    sp = syp.SyP(bb, 3, length=6, static=False).prompt
    m = torch.tensor([COMPLETE, TEXT_MISSING, IMAGE_MISSING])
    with torch.no_grad():
        P, S_d = sp.first(m, torch.randn(3, bb.width_image + bb.width_text))
        ratio = {k: P[k] / sp.P_B[k][m] for k in ("image", "text")}
    assert S_d.shape == (3, 6) and (S_d > 0).all() and (S_d < 1).all()
    for k in ratio:
        assert torch.allclose(ratio[k], S_d[:, :, None].expand_as(ratio[k]), atol=1e-5), k


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_adapter_input_is_layer0_features_with_the_missing_half_zero(kind):
    """(E1) X_C, caught on its way into the adapter, equals `X_oracle` (common.modality_tokens' layer-0 means, the
    missing half zeroed by a loop), with a present text cut short, so that its padding must stay out of X_T; S_d
    is per sample and in [0, 1]."""
    bb = backbone(kind)
    model = syp.SyP(bb, 4, length=4).eval()
    ds = load_split("toy", None, "train", missing_type="both", rate=0.5, seed=0)
    items = [ds[i] for i in range(12, 20)]
    short = next(k for k, it in enumerate(items) if it["missing"] == COMPLETE)
    items[short] = dict(items[short], text=" ".join(items[short]["text"].split()[:2]))
    batch = Collate(bb, 40)(items)
    m = batch["missing"]
    assert {COMPLETE, TEXT_MISSING, IMAGE_MISSING} <= set(m.tolist())
    if kind == "tiny-vilt":                                                     # a present text with padding
        assert batch["text_mask"][short].sum() < batch["text_mask"][m != TEXT_MISSING].sum(1).max()
    got = []
    model.prompt.adapter.register_forward_pre_hook(lambda module, args: got.append(args[0]))
    with torch.no_grad():
        S_d = model(batch)["S_d"]
    X, d_I = got[0], bb.width_image if kind == "tiny-clip" else bb.width
    assert torch.allclose(X, X_oracle(bb, batch), atol=1e-5)
    X_I, X_T = X[:, :d_I], X[:, d_I:]
    assert (X_T[m == TEXT_MISSING] == 0).all() and (X_I[m == TEXT_MISSING] != 0).any(-1).all()
    assert (X_I[m == IMAGE_MISSING] == 0).all() and (X_T[m == IMAGE_MISSING] != 0).any(-1).all()
    assert (X_I[m == COMPLETE] != 0).any(-1).all() and (X_T[m == COMPLETE] != 0).any(-1).all()
    assert S_d.shape == (8, 4) and (S_d >= 0).all() and (S_d <= 1).all()
    assert (S_d[0] - S_d[1:]).abs().amax(dim=1).min() > 1e-6                   # per sample, not per batch


@pytest.mark.parametrize("head", ["prompts", "cls"])
def test_logits_ignore_the_missing_modality_only_with_zero(head):
    """CLIP, --missing-feature zero: other pixels under a missing image, another text under a missing text: the
    same logits; another present modality: other logits. keep: the missing tower's feature reaches the FC."""
    bb = backbone("tiny-clip")
    model = syp.SyP(bb, 4, length=4, head=head, missing_feature="zero").eval()
    batch = toy_batch(bb)
    m = batch["missing"]
    other = dict(batch, image=batch["image"].clone(), text=batch["text"].clone())
    other["image"][m == IMAGE_MISSING] = torch.randn_like(other["image"][m == IMAGE_MISSING])
    donor = int(torch.nonzero(m == COMPLETE)[0])
    other["text"][m == TEXT_MISSING] = batch["text"][donor]
    changed = dict(batch, image=batch["image"].clone())
    changed["image"][m == COMPLETE] = torch.randn_like(changed["image"][m == COMPLETE])
    with torch.no_grad():
        a, b, c = (model(x)["logits"] for x in (batch, other, changed))
    assert torch.allclose(a, b, atol=1e-5)
    assert (a[m == COMPLETE] - c[m == COMPLETE]).abs().amax(-1).min() > 1e-5
    model.missing_feature = "keep"
    with torch.no_grad():
        a, b = (model(x)["logits"] for x in (batch, other))
    assert (a[m == IMAGE_MISSING] - b[m == IMAGE_MISSING]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
@pytest.mark.parametrize("propagate", ["inserted", "output"])
def test_propagation_of_the_inserted_or_the_output_prompt(kind, propagate):
    """M = 3 of 4 layers: the prompt tokens entering layer i (1 <= i < M) are F_i = LN(FC(GELU(FC(.)))) of the
    prompt INSERTED at layer i-1 (the recorded input of layer i-1; the default) or of the prompt tokens that LEFT
    layer i-1 (its recorded output; --propagate output), per tower; the other tokens pass on; from layer M the
    prompts are carried. CLIP's prompt_means (--nm2i) are the means of the recorded prompts entering layers 0..M-1."""
    bb, n, depth = backbone(kind), 4, 3
    model = syp.SyP(bb, 4, length=n, depth=depth, propagate=propagate).eval()
    assert syp.SyP(bb, 4, length=n).propagate == "inserted"                    # the equation's literal chain
    batch = toy_batch(bb)
    out = []
    seen = record(bb, lambda: out.append(model(batch)))
    for k, (ins, outs) in seen.items():
        if kind == "tiny-clip":                                                 # --nm2i: mean prompt entering l < M
            means = out[0]["prompt_means"][k]
            assert means.shape == (8, depth, ins[0].shape[-1]), k
            for i in range(depth):
                assert torch.allclose(means[:, i], ins[i][:, :n].mean(1), atol=1e-6), (k, i)
        for i in range(1, bb.num_layers):
            assert torch.equal(ins[i][:, n:], outs[i - 1][:, n:]), (k, i)
            if i < depth:
                previous = ins[i - 1][:, :n] if propagate == "inserted" else outs[i - 1][:, :n]
                with torch.no_grad():
                    expected = F_by_hand(model.prompt.F[k][i - 1], previous)
                assert torch.allclose(ins[i][:, :n], expected, atol=1e-5), (k, i)
                other = outs[i - 1][:, :n] if propagate == "inserted" else ins[i - 1][:, :n]
                assert not torch.allclose(ins[i][:, :n], F_by_hand(model.prompt.F[k][i - 1], other), atol=1e-3)
            else:
                assert torch.equal(ins[i][:, :n], outs[i - 1][:, :n]), (k, i)


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_attention_masks_of_the_prompts(kind):
    """Each recorded block output equals the library block on the recorded input under a mask built here: CLIP
    text, by loops per sample (`text_mask_by_hand`: causal text rows, prompt rows open up to EOT); ViLT, prompts
    visible to all. CLIP text:
    the prompts see the words at layer 0 while SOT and the first word do not see later words."""
    bb, n = backbone(kind), 4
    model = syp.SyP(bb, 4, length=n, adapter=False).eval()                   # X_T would move S_d, hence SOT
    batch = toy_batch(bb)
    torch.manual_seed(1)
    seen = record(bb, lambda: model(batch))
    with torch.no_grad():
        if kind == "tiny-vilt":
            torch.manual_seed(1)
            mask = torch.cat([torch.ones(8, n, dtype=torch.long), bb.embed(batch)[1]], 1)
            bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            ins, outs = seen["joint"]
            assert torch.allclose(bb.vilt.encoder.layer[1](ins[1], bias)[0], outs[1], atol=1e-5)
            return
        ins, outs = seen["text"]
        for b in range(8):
            mask = text_mask_by_hand(n, batch["text"][b])
            assert torch.allclose(bb.model.transformer.resblocks[1](ins[1][b:b + 1], attn_mask=mask)[0], outs[1][b],
                                  atol=1e-5), b
    later = dict(batch, text=batch["text"].clone())
    row = int(torch.nonzero(batch["missing"] != TEXT_MISSING)[0])
    eot = int(batch["text"][row].argmax())
    later["text"][row, 2:eot] = torch.flip(batch["text"][row, 2:eot], [0]) + 1    # change every word after the first
    t0, t1 = (record(bb, lambda b=b: model(b))["text"][1][0][row] for b in (batch, later))
    assert (t0[:n] - t1[:n]).abs().max() > 1e-4                                 # prompts see the text at layer 0
    assert torch.allclose(t0[n:n + 2], t1[n:n + 2], atol=1e-6)                  # SOT and word 1 do not see later words


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
@pytest.mark.parametrize("head", ["prompts", "cls"])
def test_head_input(kind, head):
    """(E7) the FC's input, from the last block's recorded output: CLIP prompts: [ln_post(mean prompt) proj;
    ln_final(mean prompt) text_projection]; cls: [ln_post([CLS]) proj; ln_final(EOT) text_projection], the missing
    half kept (the paper; its zeroing is tested with the switch); ViLT: layernorm(mean prompt), or the pooler on [CLS]. P_B and P_S are scaled up and M = 2:
    at N(0, 0.02) the random tiny backbone makes the output prompts near copies, where a norm and a mean commute."""
    bb, n = backbone(kind), 4
    model = syp.SyP(bb, 4, length=n, depth=2, head=head).eval()
    with torch.no_grad():
        for p in [*model.prompt.P_B.values(), model.prompt.P_S]:
            p.mul_(50)
    batch = toy_batch(bb)
    got = []
    model.head.register_forward_pre_hook(lambda module, args: got.append(args[0]))
    seen = record(bb, lambda: model(batch))
    for k, (_, outs) in seen.items():
        assert outs[-1][:, :n].std(1).mean() > 0.1, k                         # the output prompts differ
    with torch.no_grad():
        if kind == "tiny-vilt":
            x, v = seen["joint"][1][-1], bb.vilt
            expected = v.layernorm(x[:, :n].mean(1)) if head == "prompts" else \
                torch.tanh(model.pooler.dense(v.layernorm(x)[:, n]))
        else:
            x, t, clip = seen["image"][1][-1], seen["text"][1][-1], bb.model
            if head == "prompts":
                f_I, f_T = clip.visual.ln_post(x[:, :n].mean(1)), clip.ln_final(t[:, :n].mean(1))
            else:
                eot = n + batch["text"].argmax(-1)
                f_I, f_T = clip.visual.ln_post(x[:, n]), clip.ln_final(t[torch.arange(8), eot])
            f_I, f_T = f_I @ clip.visual.proj, f_T @ clip.text_projection       # nothing zeroed (the default)
            expected = torch.cat([f_I, f_T], -1)
    assert torch.allclose(got[0], expected, atol=1e-5)


@pytest.mark.parametrize("kind,propagate,missing_feature", [
    ("tiny-clip", "inserted", "keep"), ("tiny-clip", "output", "keep"), ("tiny-clip", "inserted", "zero"),
    ("tiny-vilt", "inserted", "keep"), ("tiny-vilt", "output", "keep")])
def test_logits_and_gradients_equal_the_reference_forward(kind, propagate, missing_feature):
    """The full SyP (M = 3 of 4 layers) on a batch of images of different sizes (ViLT: padded patches): logits and
    the gradient of a random linear function of them with respect to every trainable parameter equal those of
    `reference_logits`, the paper's forward written out in the test for the same reading. The gradients see what
    the logits cannot: each path back to P_B, S_d, P_S, G_k and F_i is kept, none detached."""
    bb = backbone(kind)
    model = syp.SyP(bb, 4, length=4, depth=3, propagate=propagate, missing_feature=missing_feature)
    batch = mixed_batch(bb)
    got = logits_and_grads(model, lambda: model(batch)["logits"])
    assert_same(got, logits_and_grads(model, lambda: reference_logits(model, batch, propagate, missing_feature)),
                model)
    assert all(g is not None for g in got[1])


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_training_mode_equals_eval_mode_without_dropout(kind):
    """With no dropout anywhere, the training-mode forward (the one `fit` runs) equals the evaluation forward: no
    routing, prompt or head differs between the modes (logits and gradients, mixed image sizes)."""
    bb = backbone(kind)
    model = syp.SyP(bb, 4, length=4, depth=3)
    batch = mixed_batch(bb)
    model.train()
    train = logits_and_grads(model, lambda: model(batch)["logits"])
    model.eval()
    assert_same(train, logits_and_grads(model, lambda: model(batch)["logits"]), model)


def test_vilt_training_with_backbone_dropout_equals_the_reference_with_the_same_masks():
    """--backbone-dropout 0.3 on tiny-vilt, training mode: SyP's forward equals `reference_logits` on common's block
    (the dropout sites of MAP's ViLT) when both start from the same torch seed, so both draw the same patches and
    dropout masks; another seed gives other logits (the dropout is on), evaluation mode none."""
    bb = backbone("tiny-vilt")
    bb.set_dropout(0.3)
    model = syp.SyP(bb, 4, length=4, depth=3).train()
    batch = mixed_batch(bb)
    got = logits_and_grads(model, lambda: model(batch)["logits"])
    assert_same(got, logits_and_grads(model, lambda: reference_logits(model, batch, vilt_layer="common")), model)
    other = logits_and_grads(model, lambda: model(batch)["logits"], seed=5)[0]
    assert (got[0] - other).abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        evaluated = model(batch)["logits"]
        torch.manual_seed(1)
        assert torch.allclose(evaluated, reference_logits(model, batch), atol=1e-5)


@pytest.mark.parametrize("head", ["prompts", "cls"])
def test_text_padding_after_eot_changes_nothing(head):
    """CLIP: other ids after each text's EOT (the padding), or the ids cut to the batch's last EOT + 1 (the
    truncation of issue 32, the positions cut with them): the same logits and gradients within 1e-5, with either
    head. Without the padding columns masked for the prompt rows both would move the prompts."""
    bb = backbone("tiny-clip")
    model = syp.SyP(bb, 4, length=4, depth=3, head=head)
    batch = mixed_batch(bb)
    ids = batch["text"]
    eot = ids.argmax(-1)
    assert (eot < ids.shape[1] - 1).all() and len(set(eot.tolist())) > 1
    after = torch.arange(ids.shape[1])[None] > eot[:, None]
    noise = torch.randint(1, int(ids.max()), ids.shape, generator=torch.Generator().manual_seed(3))
    repadded = dict(batch, text=torch.where(after, noise, ids))
    full = logits_and_grads(model, lambda: model(batch)["logits"])
    assert_same(full, logits_and_grads(model, lambda: model(repadded)["logits"]), model)
    cut = dict(batch, text=ids[:, :int(eot.max()) + 1])
    bb.text_embed = lambda ids: bb.model.token_embedding(ids) + bb.model.positional_embedding[:ids.shape[1]]
    assert_same(full, logits_and_grads(model, lambda: model(cut)["logits"]), model)


def test_missing_feature_keep_trains_the_missing_cases_prompts_and_zero_does_not():
    """(E7) keep (the default, the paper): the FC sees the missing tower's prompt feature, so P_{I,B}[image missing]
    and P_{T,B}[text missing] get a gradient; zero (DCP's code): exactly zero gradient for those two, the other
    cases' prompts still train."""
    bb = backbone("tiny-clip")
    batch = toy_batch(bb)
    assert syp.SyP(bb, 4, length=4).missing_feature == "keep"
    for missing_feature in ("keep", "zero"):
        model = syp.SyP(bb, 4, length=4, depth=3, missing_feature=missing_feature)
        task_loss(model(batch)["logits"], batch["label"], "multiclass").backward()
        g_I, g_T = model.prompt.P_B["image"].grad, model.prompt.P_B["text"].grad
        blind = (g_I[IMAGE_MISSING].abs().max(), g_T[TEXT_MISSING].abs().max())
        if missing_feature == "keep":
            assert min(blind) > 0
        else:
            assert max(blind) == 0
        assert g_I[COMPLETE].abs().max() > 0 and g_T[COMPLETE].abs().max() > 0


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_classifier_only_is_a_head_on_the_frozen_features(kind):
    bb = backbone(kind)
    model = syp.SyP(bb, 4, length=4, dynamic=False, static=False, head="cls").eval()
    assert model.prompt is None and model.length == model.depth == 0
    with pytest.raises(ValueError, match="head='cls'"):
        syp.SyP(bb, 4, dynamic=False, static=False)
    batch = toy_batch(bb)
    with torch.no_grad():
        if kind == "tiny-clip":
            feature = torch.cat(bb.encode(batch), -1)
        else:
            feature = model.pooler(bb.encode(batch)[0][:, :1])
        assert torch.allclose(model(batch)["logits"], model.head(feature), atol=1e-5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        expected_params(bb, 4, C=4, dynamic=False, static=False, head="cls").values())


def test_only_syp_trains_and_backbone_is_bit_identical():
    bb = backbone("tiny-clip")
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    model = syp.SyP(bb, 4, length=4)
    check_frozen(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        batch = toy_batch(bb, start=8 * step)
        task_loss(model(batch)["logits"], batch["label"], "multiclass").backward()
        for name, p in model.named_parameters():
            if name.startswith("bb."):
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
    assert not bb.training
    for k, v in bb.state_dict().items():
        assert torch.equal(v, frozen[k]), k


# ---------------------------------------------------------------------------------------------------------
# CLI runs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_cli_writes_outputs_and_checkpoint_holds_only_syp(tmp_path, kind):
    out = tmp_path / kind
    results = cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", kind, "--epochs", "1", *FAST,
                                           "--out", str(out)])
    for name in ("results.json", "predictions_test.csv", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    saved_results = json.loads((out / "results.json").read_text())
    assert saved_results["method"] == "syp" and saved_results["paper_variant"] == "full+prompt-length=4"
    assert len((out / "predictions_test.csv").read_text().splitlines()) == 128 + 1
    model = syp.SyP(backbone(kind), 4, length=4)
    names = {n for n, _ in model.named_parameters() if not n.startswith("bb.")}
    saved = load_file(out / "checkpoint.safetensors")
    assert set(saved) == names and not any(k.startswith("bb.") for k in saved)
    assert results["trainable_params"] == sum(expected_params(model.bb, 4, C=4).values())


def test_cli_flags_build_their_row_and_the_task_loss(tmp_path, monkeypatch):
    """main() on toy-multilabel up to fit: each flag set builds exactly the parameters of its Table 3/4 row and
    --reduction r (counted from the sizes by `expected_params`), and the loss main trains with is (E8)'s task loss
    of MM-IMDb-like multi-label data, binary cross-entropy averaged over samples and classes by a loop."""
    rows = {("--no-static", "--reduction", "8"): dict(static=False, r=8), ("--no-dynamic",): dict(dynamic=False),
            ("--no-adapter",): dict(adapter=False)}
    for flags, kw in rows.items():
        run, model, loss_fn = built_by_main(syp, ["--dataset", "toy-multilabel", "--backbone", "tiny-clip",
                                                  "--prompt-length", "4", *flags, "--out", str(tmp_path / "-".join(flags))],
                                            monkeypatch)
        count = expected_params(run.bb, 4, C=4, **kw)
        groups = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                group = name.split(".")[1] if name.startswith("prompt.") else "head"
                groups[group] = groups.get(group, 0) + p.numel()
        assert groups == {c: v for c, v in count.items() if v}, flags
    batch = run.collate([run.train_set[i] for i in range(6)])
    with torch.no_grad():
        out = model(batch)
        assert float(loss_fn(out, batch)) == pytest.approx(bce_by_a_loop(out["logits"], batch["label"]), rel=1e-5)


def test_paper_numbers_are_the_papers_tables():
    """PAPER_NUMBERS holds the SyP paper's main table ('both' at 50/70/90%), its Table 3/4 ablation rows (read at
    'both' 50%) and AOEPT's re-run (mean over the three types at 70/90%), transcribed here from the tables' own
    layout: dataset -> rates, row -> (Hateful Memes, Food-101, MM-IMDb), rate -> (MM-IMDb, Hateful Memes, Food-101)."""
    main = {"mmimdb": (55.02, 52.90, 49.63), "food101": (86.17, 82.45, 81.03), "hatememes": (68.16, 68.42, 68.93)}
    ablations = {"classifier-only": (57.35, 71.59, 44.63), "dynamic-only": (66.37, 82.90, 51.21),
                 "static-only": (65.62, 83.06, 50.34), "base-only": (64.27, 81.68, 48.95),
                 "no-adapter": (66.19, 84.85, 51.90), "full": (68.16, 86.17, 54.72)}
    aoept = {0.7: (51.88, 68.11, 83.56), 0.9: (49.58, 67.72, 81.26)}
    expected = {}
    for dataset, values in main.items():
        for rate, v in zip((0.5, 0.7, 0.9), values):
            expected.setdefault((dataset, "both", rate, "full"), []).append(v)
    for row, (hm, food, imdb) in ablations.items():
        for dataset, v in (("hatememes", hm), ("food101", food), ("mmimdb", imdb)):
            expected.setdefault((dataset, "both", 0.5, row), []).append(v)
    for rate, (imdb, hm, food) in aoept.items():
        for dataset, v in (("mmimdb", imdb), ("hatememes", hm), ("food101", food)):
            expected.setdefault((dataset, "avg", rate, "full"), []).append(v)
    got = {}
    for key, papers in syp.PAPER_NUMBERS.items():
        method, backbone, dataset, missing, rate, test_missing, test_rate, variant = key
        assert (method, backbone, test_missing, test_rate) == ("syp", "clip ViT-B-16", missing, rate), key
        got[dataset, missing, rate, variant] = sorted(p.value for p in papers)
    assert got == {k: sorted(v) for k, v in expected.items()}


def test_headline_command_on_food101_tree(tmp_path, food101_root):
    out = tmp_path / "food"
    results = cli(syp.parser(), syp.main, ["--dataset", "food101", "--missing", "text", "--rate", "0.7",
                                           "--data-root", food101_root, "--backbone", "tiny-clip", "--epochs", "1",
                                           "--out", str(out)])
    assert (out / "checkpoint.safetensors").is_file() and results["protocol"]["splits"]["train"]["counts"]["text"] > 0
    assert results["config"]["prompt_length"] == 36 and results["config"]["lr"] == 1e-3
    assert results["config"]["batch_size"] == 32 and results["config"]["weight_decay"] == 2e-2
    assert results["config"]["head"] == "prompts" and results["paper_variant"] == "full"


def test_eval_only_refuses_a_checkpoint_of_the_earlier_syp(tmp_path):
    """A checkpoint whose config lacks --propagate (written before the padding mask, the inserted chain and the kept
    missing feature) is refused by --eval-only with the reason; this run's own checkpoint evaluates."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = tmp_path / "run"
    cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", "tiny-clip", "--epochs", "1", *FAST,
                                 "--out", str(out)])
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    del config["propagate"], config["missing_feature"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(out / "checkpoint.safetensors"), str(old), metadata=dict(meta, config=json.dumps(config)))
    with pytest.raises(SystemExit, match="earlier syp.py"):
        cli(syp.parser(), syp.main, ["--eval-only", "--checkpoint", str(old), "--out", str(tmp_path / "e1")])
    results = cli(syp.parser(), syp.main, ["--eval-only", "--checkpoint", str(out / "checkpoint.safetensors"),
                                           "--out", str(tmp_path / "e2")])
    assert results["config"]["propagate"] == "inserted"


def test_cli_classifier_only_row(tmp_path):
    """Table 3's "classifier fine-tuning only": only the FC trains and is saved."""
    out = tmp_path / "classifier"
    results = cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", "tiny-clip", "--epochs", "1", *FAST,
                                           "--no-dynamic", "--no-static", "--head", "cls", "--out", str(out)])
    assert results["trainable_params"] == 2 * 32 * 4 + 4 and results["paper_variant"] == "classifier-only"
    assert set(load_file(out / "checkpoint.safetensors")) == {"head.weight", "head.bias"}


def test_toy_training_beats_majority(tmp_path):
    """Measured: accuracy 0.44 against a majority class of 0.28 (seed 0, five epochs, lr 1e-2: the random tiny
    backbone learns slowly at the paper's 1e-3; 0.45 in three epochs before the padding mask and the inserted
    chain, 0.42 after)."""
    results = cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", "tiny-clip", "--missing", "both",
                                           "--rate", "0.3", "--epochs", "5", "--lr", "1e-2", *FAST,
                                           "--out", str(tmp_path / "toy")])
    labels = load_split("toy", None, "test", missing_type="none", rate=0.0, seed=0).labels()
    majority = np.bincount(np.asarray(labels)).max() / len(labels)
    assert results["metrics"]["test"]["accuracy"] >= majority + 0.12, (results["metrics"]["test"], majority)
    assert os.path.isfile(tmp_path / "toy" / "results.json")
