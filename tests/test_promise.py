"""PROMISE: FNCL / CCCL against brute-force loops, the loss wired over exactly the chosen rows and tensors, the
generator tied to its own row, generated features only where a modality is missing, the encoder never sees a dummy
input, views per epoch across --resume, the cache key, DDP gather, no host-device syncs, CLI outputs, toy learning."""
import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import promise
from common import cli, finalize_args, load_backbone, seed_everything
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, Collate, load_split
from tests.fixtures import make_food101, train_and_eval_logits
from tests.test_official_map import mixed_sizes

MUTATIONS = [
    {"file": "promise.py", "old": 'L_fncl.append(fncl(t, t_a, gen[m2][0], gen[m2][1], args.tau, rows))', "new": 'L_fncl.append(fncl(t, t_a, gen[m2][0], gen[m2][1], args.tau))',
     "why": 'FNCL over all rows, incl. the zero features of rows missing m1'},
    {"file": "promise.py", "old": '        return x[m1], x_a[m1]\n', "new": '        return x[OTHER[m1]], x_a[OTHER[m1]]\n',
     "why": "FNCL partner (available): the real x_m2 everywhere instead of the paper's x_m1"},
    {"file": "promise.py", "old": '    if partner == "available":\n', "new": '    if partner != "available":\n',
     "why": "FNCL partner switch inverted: the default pairs x^_m2 with the real x_m2 on complete rows"},
    {"file": "promise.py", "old": 'return torch.where(has_m2, x[OTHER[m1]], x[m1]), torch.where(has_m2, x_a[OTHER[m1]], x_a[m1])',
     "new": 'return torch.where(has_m2, x[OTHER[m1]], x[m1]), torch.where(has_m2, x[OTHER[m1]], x_a[m1])',
     "why": "FNCL partner (reconstruction): the augmented partner is the original x_m2"},
    {"file": "promise.py", "old": '"--fncl-partner", default="available"', "new": '"--fncl-partner", default="reconstruction"',
     "why": "FNCL partner default is not the available modality (the paper's pairs)",
     "tests": ["tests/test_promise.py::test_parser_defaults_are_the_papers"]},
    {"file": "promise.py", "old": '    if args.nm2i:\n', "new": '    if False:\n',
     "why": "--nm2i on PROMISE not refused up front (it trains fully, then fails)",
     "tests": ["tests/test_promise.py::test_refused_up_front_with_the_reason"]},
    {"file": "promise.py", "old": 'if args.cache_features and args.backbone_dropout > 0 and args.backbone in', "new": 'if False and args.backbone in',
     "why": "--cache-features with --backbone-dropout on ViLT not refused (a cached run differs from an uncached one)",
     "tests": ["tests/test_promise.py::test_refused_up_front_with_the_reason"]},
    {"file": "promise.py", "old": 'args.backbone_dropout > 0 and args.backbone in ("vilt", "tiny-vilt")', "new": 'args.backbone_dropout > 0',
     "why": "--cache-features refused on CLIP too, where there is no backbone dropout",
     "tests": ["tests/test_promise.py::test_refused_up_front_with_the_reason"]},
    {"file": "promise.py", "old": '"review",\n     "inferred",', "new": '"review",\n     "stated",',
     "why": "PAPER_NUMBERS: the review's 70% headline marked as a stated setting (the missing type is a reading)",
     "tests": ["tests/test_promise.py::test_paper_numbers_are_the_sources_with_provenance"]},
    {"file": "promise.py", "old": '("food101", "both", 0.7, "both", 0.7, 88.10), ("hatememes", "both", 0.7, "both", 0.7, 67.17)',
     "new": '("food101", "both", 0.7, "both", 0.7, 67.17), ("hatememes", "both", 0.7, "both", 0.7, 88.10)',
     "why": "PAPER_NUMBERS: the two headline numbers swapped between datasets",
     "tests": ["tests/test_promise.py::test_paper_numbers_are_the_sources_with_provenance"]},
    {"file": "promise.py", "old": 'z = {m: torch.where(has[m], x[m], gen[m][0]) for m in MODALITIES}',
     "new": 'z = {m: torch.where(has[m] | self.training, x[m], gen[m][0]) for m in MODALITIES}',
     "why": "generated features never replace a missing modality while training (zeros enter the fusion)",
     "tests": ["tests/test_promise.py::test_training_mode_is_the_evaluation_forward_without_dropout"]},
    {"file": "promise.py", "old": 'return self.out(h), self.out_a(h)',
     "new": 'return self.out(F.dropout(h, 0.1, self.training)), self.out_a(h)',
     "why": "the generated feature passes through dropout, only while training",
     "tests": ["tests/test_promise.py::test_training_mode_is_the_evaluation_forward_without_dropout"]},
    {"file": "promise.py", "old": 'cccl(z[m], z_a[m], label', "new": 'cccl(x[m], x_a[m], label',
     "why": 'CCCL on x instead of z (generated features never enter)'},
    {"file": "promise.py", "old": 'L_contrast = args.alpha * L_fncl + (1 - args.alpha) * L_cccl', "new": 'L_contrast = args.alpha * L_fncl',
     "why": 'CCCL removed'},
    {"file": "promise.py", "old": 'x_m1[:, None]], 1)', "new": '0 * x_m1[:, None]], 1)',
     "why": 'Prompt Attention ignores its input: a constant generator'},
    {"file": "promise.py", "old": 'z_a = {m: torch.where(has[m], x_a[m], gen[m][1]) for m in MODALITIES}', "new": 'z_a = {m: gen[m][1] for m in MODALITIES}',
     "why": 'z_a generated everywhere'},
    {"file": "promise.py", "old": 'return {**self.ds[i], "view": view}', "new": 'return {**self.ds[i], "view": view and 0}',
     "why": 'Views always return view 0'},
    {"file": "promise.py", "old": '        self.epoch = epoch\n', "new": '        self.epoch += 1\n',
     "why": "a view counter (restarts at --resume) instead of the epoch fit is training"},
    {"file": "promise.py", "old": 'else self.epoch % self.cycle', "new": 'else 0',
     "why": 'the cached views never advance with the epoch'},
    {"file": "promise.py", "old": 'if not dist.is_initialized() or dist.get_world_size() == 1:', "new": 'if True:',
     "why": 'no gather under torchrun: each rank contrasts only its own rows'},
    {"file": "promise.py", "old": '    if t.requires_grad:\n', "new": '    if False:\n',
     "why": "gathered without gradients: other ranks' rows are constants"},
    {"file": "promise.py", "old": '"images": image_cache_key(ds, run.bb), ', "new": '',
     "why": 'cache key without the image files: replaced images reuse old features'},
    {"file": "promise.py", "old": '"missing": ds.missing_type, "rate": ds.rate, "table_hash": ds.table_hash, ', "new": '',
     "why": 'cache key without the missing table / rate'},
    {"file": "promise.py", "old": 'for split in ("val", "test") if args.eval_only else ("train", "val", "test"):', "new": 'for split in ("train", "val", "test"):',
     "why": '--eval-only --cache-features encodes the training split'},
    {"file": "promise.py", "old": 'directions.append(rows.any())', "new": 'directions.append(rows.any() | True)',
     "why": "FNCL averages in a direction without rows (as a zero)"},
    {"file": "promise.py", "old": '    keep = count > 0\n', "new": '    keep = count >= 0\n',
     "why": 'CCCL keeps anchors without a positive'},
    {"file": "promise.py", "old": 'valid = keep[:, None] & keep[None, :] & ~torch.eye', "new": 'valid = keep[:, None] & ~torch.eye',
     "why": 'NT-Xent: rows outside the selection stay in as negatives'},
    {"file": "promise.py", "old": 'return {**{f"{m}_a": f[m] for m in MODALITIES}, **f}', "new": 'return {**f, **{f"{m}_a": f[m] for m in MODALITIES}}',
     "why": 'the augmented view is ignored: x_a = x always'},
    # --- added: forward / Prompt Attention / fusion, the encoders, detaches, losses, defaults, views, cache, main ---
    {"file": "promise.py",
     "old": 'h = x_m1 + self.attn(seq[:, -1:], seq, seq, need_weights=False)[0][:, 0]',
     "new": 'h = self.attn(seq, seq, seq, need_weights=False)[0].mean(1)',
     "why": "Prompt Attention: the mean over the N * P + 1 outputs (x^ barely depends on the sample) instead of the x_m1 token + residual",
     "tests": ["tests/test_promise.py::test_generated_feature_carries_its_sample"]},
    {"file": "promise.py",
     "old": 'h = x_m1 + self.attn(seq[:, -1:], seq, seq, need_weights=False)[0][:, 0]',
     "new": 'h = self.attn(seq[:, -1:], seq, seq, need_weights=False)[0][:, 0]',
     "why": "Prompt Attention without the residual on the x_m1 token",
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'return self.out(h), self.out_a(h)',
     "new": 'return self.out(h), self.out(h)',
     "why": 'one linear layer for both heads: x^_m2_a == x^_m2',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'gen = {m: self.gen[m](x[OTHER[m]]) for m in MODALITIES}',
     "new": 'gen = {m: self.gen[m](f[OTHER[m]]) for m in MODALITIES}',
     "why": 'Prompt Attention reads the raw frozen feature instead of the projected x_m1',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'heads = 8 if d >= 256 else 2',
     "new": 'heads = 8 if d >= 256 else 1',
     "why": 'single-head attention at tiny widths (the header says 2)',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'norm_first=True)',
     "new": 'norm_first=False)',
     "why": 'post-LN crossmodal transformer instead of pre-LN',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'norm=nn.LayerNorm(d), enable_nested_tensor=False)',
     "new": 'norm=None, enable_nested_tensor=False)',
     "why": 'the head reads the CLS without the final LayerNorm',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'fused = self.fusion(tokens)[:, 0]',
     "new": 'fused = self.fusion(tokens)[:, 1:].mean(1)',
     "why": 'pools the mean of the modality tokens instead of the CLS token',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'dropout=0.0, activation="gelu"',
     "new": 'dropout=0.1, activation="gelu"',
     "why": 'dropout 0.1 in the crossmodal transformer (the header says 0)',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'z = {m: torch.where(has[m], x[m], gen[m][0]) for m in MODALITIES}',
     "new": 'z = {m: torch.where(has[m], x[m], gen[m][0].detach()) for m in MODALITIES}',
     "why": 'the classification loss never trains Prompt Attention (generated features detached)',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'L_fncl.append(fncl(t, t_a, gen[m2][0], gen[m2][1], args.tau, rows))',
     "new": 'L_fncl.append(fncl(t.detach(), t_a.detach(), gen[m2][0], gen[m2][1], args.tau, rows))',
     "why": 'FNCL stop-gradient on the real side: the projections get no FNCL gradient',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'L_fncl.append(fncl(t, t_a, gen[m2][0], gen[m2][1], args.tau, rows))',
     "new": 'L_fncl.append(fncl(t, t_a, gen[m2][0], gen[m2][0], args.tau, rows))',
     "why": 'FNCL without x^_m2_a: the augmented generated view is never contrasted',
     "tests": ["tests/test_promise.py::test_forward_and_gradient_equal_the_equations_per_sample"]},
    {"file": "promise.py",
     "old": 'same = (y.float() @ y.float().T > 0) if task',
     "new": 'same = (y[:, None] == y[None, :]).all(-1) if task',
     "why": 'CCCL multi-label positives = identical label sets instead of sharing >= 1 label',
     "tests": ["tests/test_promise.py::test_cccl_equals_brute_force_supcon"]},
    {"file": "promise.py",
     "old": '            for i in range(bb.num_layers):\n                x = bb.image_block(i, x)',
     "new": '            for i in range(bb.num_layers - 1):\n                x = bb.image_block(i, x)',
     "why": 'CLIP image feature from the second-to-last block (wrong layer)',
     "tests": ["tests/test_promise.py::test_unimodal_features_are_the_libraries_own"]},
    {"file": "promise.py",
     "old": 'f[m][rows[m]] = ((bb.final_norm(h) * valid).sum(1) / valid.sum(1))',
     "new": 'f[m][rows[m]] = ((h * valid).sum(1) / valid.sum(1))',
     "why": "ViLT unimodal feature without ViLT's final LayerNorm",
     "tests": ["tests/test_promise.py::test_unimodal_features_are_the_libraries_own"]},
    {"file": "promise.py",
     "old": 'f[m][rows[m]] = ((bb.final_norm(h) * valid).sum(1) / valid.sum(1))',
     "new": 'f[m][rows[m]] = ((bb.final_norm(h) * valid).sum(1) / valid.shape[1])',
     "why": 'ViLT mean divides by the padded length (padding counted as zeros)',
     "tests": ["tests/test_promise.py::test_unimodal_features_are_the_libraries_own"]},
    {"file": "promise.py",
     "old": 'bias = bb.attention_bias(valid, h.dtype)',
     "new": 'bias = bb.attention_bias(torch.ones_like(valid), h.dtype)',
     "why": 'ViLT single-modality pass attends to the padding tokens',
     "tests": ["tests/test_promise.py::test_unimodal_features_are_the_libraries_own"]},
    {"file": "promise.py",
     "old": 'p.add_argument("--alpha", type=float, default=0.5,',
     "new": 'p.add_argument("--alpha", type=float, default=0.7,',
     "why": 'default alpha 0.7 instead of the stated 0.5',
     "tests": ["tests/test_promise.py::test_parser_defaults_are_the_papers"]},
    {"file": "promise.py",
     "old": 'p.add_argument("--contrast-weight", type=float, default=1.0,',
     "new": 'p.add_argument("--contrast-weight", type=float, default=0.1,',
     "why": 'default lambda 0.1 instead of the stated 1',
     "tests": ["tests/test_promise.py::test_parser_defaults_are_the_papers"]},
    {"file": "promise.py",
     "old": 'p.add_argument("--crop-scale", type=float, default=0.5,',
     "new": 'p.add_argument("--crop-scale", type=float, default=0.08,',
     "why": "torchvision's crop scale 0.08 instead of the stated 0.5",
     "tests": ["tests/test_promise.py::test_parser_defaults_are_the_papers"]},
    {"file": "promise.py",
     "old": 'schedule="cosine", warmup=0.0,',
     "new": 'schedule="cosine", warmup=0.1,',
     "why": 'a 10% warm-up (the shared default) instead of none',
     "tests": ["tests/test_promise.py::test_parser_defaults_are_the_papers"]},
    {"file": "promise.py",
     "old": 'if rng.random() < 0.5:',
     "new": 'if rng.random() < 0.0:',
     "why": 'the augmented view is never flipped',
     "tests": ["tests/test_promise.py::test_augment_draws_the_stated_distributions"]},
    {"file": "promise.py",
     "old": 'area, ratio = rng.uniform(crop_scale, 1.0) * w * h,',
     "new": 'area, ratio = rng.uniform(crop_scale, 1.0) ** 2 * w * h,',
     "why": 'crop_scale read as a side fraction: crops down to 25% of the area',
     "tests": ["tests/test_promise.py::test_augment_draws_the_stated_distributions"]},
    {"file": "promise.py",
     "old": 'kept = [word for word in words if rng.random() >= text_dropout]',
     "new": 'kept = [word for word in words if rng.random() < text_dropout]',
     "why": 'word dropout inverted: keeps 10% of the words',
     "tests": ["tests/test_promise.py::test_augment_draws_the_stated_distributions"]},
    {"file": "promise.py",
     "old": '"max_text_len": args.max_text_len, ',
     "new": '',
     "why": 'cache key without the text length: a new --max-text-len reuses old features',
     "tests": ["tests/test_promise.py::test_cache_key_misses_when_images_rate_seed_or_backbone_change"]},
    {"file": "promise.py",
     "old": '"data": digest([ds.ids, ds.texts]),',
     "new": '"data": digest(ds.ids),',
     "why": 'cache key without the texts: edited captions reuse old features',
     "tests": ["tests/test_promise.py::test_cache_key_misses_when_images_rate_seed_or_backbone_change"]},
    {"file": "promise.py",
     "old": 'cycle=views if args.cache_features else None)',
     "new": 'cycle=views)',
     "why": 'without the cache the views cycle mod --aug-views instead of a fresh view each epoch',
     "tests": ["tests/test_promise.py::test_main_draws_a_fresh_view_each_epoch_without_the_cache"]},
]

FAST = ["--epochs", "1", "--batch-size", "512", "--micro-batch", "128"]   # toy train = 512: one optimiser step


def run_cli(tmp_path, name, *argv):
    return cli(promise.parser(), promise.main, ["--out", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"),
                                                *argv])


# --- brute-force oracles ------------------------------------------------------------------------------------
def unit(v):
    return [x / math.sqrt(sum(y * y for y in v)) for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def nt_xent_loop(u, v, tau):
    z = [unit(r) for r in u.tolist() + v.tolist()]
    n, total = len(u), 0.0
    for a in range(2 * n):
        den = sum(math.exp(dot(z[a], z[k]) / tau) for k in range(2 * n) if k != a)
        total += -math.log(math.exp(dot(z[a], z[(a + n) % (2 * n)]) / tau) / den)
    return total / (2 * n)


def supcon_loop(z, positive, tau):
    z = [unit(r) for r in z.tolist()]
    losses = []
    for a in range(len(z)):
        pos = [p for p in range(len(z)) if p != a and positive[a][p]]
        if not pos:
            continue
        den = sum(math.exp(dot(z[a], z[k]) / tau) for k in range(len(z)) if k != a)
        losses.append(-sum(math.log(math.exp(dot(z[a], z[p]) / tau) / den) for p in pos) / len(pos))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_fncl_equals_loop_of_symmetric_nt_xent(tau):
    g = torch.Generator().manual_seed(0)
    x, x_a, h, h_a = (torch.randn(7, 5, generator=g) for _ in range(4))
    expected = np.mean([nt_xent_loop(a, b, tau) for a in (x, x_a) for b in (h, h_a)])
    assert float(promise.fncl(x, x_a, h, h_a, tau)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_cccl_equals_brute_force_supcon(task):
    g = torch.Generator().manual_seed(1)
    n = 6
    z, z_a = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    if task == "multiclass":
        label = torch.tensor([0, 1, 1, 2, 0, 3])
        same = [[int(label[a % n]) == int(label[b % n]) for b in range(2 * n)] for a in range(2 * n)]
    else:                                                       # rows 2 and 5 share no label with anyone
        label = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
        same = [[bool((label[a % n] * label[b % n]).sum() > 0) for b in range(2 * n)] for a in range(2 * n)]
    positive = [[same[a][b] or (a != b and a % n == b % n) for b in range(2 * n)] for a in range(2 * n)]
    expected = supcon_loop(torch.cat([z, z_a]), positive, 0.1)
    assert float(promise.cccl(z, z_a, label, task, 0.1)) == pytest.approx(expected, rel=1e-4)


def test_supcon_excludes_anchors_without_positive():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 4, generator=g)
    label = torch.tensor([0, 0, 1, 2, 3, 3])                    # anchors 2 and 3 have no positive
    positive = label[:, None] == label[None, :]
    expected = supcon_loop(z, positive.tolist(), 0.07)
    assert float(promise.supcon(z, positive, 0.07)) == pytest.approx(expected, rel=1e-4)
    assert float(promise.supcon(z, torch.eye(6, dtype=torch.bool), 0.07)) == 0.0


# --- wiring: the loss over exactly the chosen rows and tensors ------------------------------------------------
def feature_model(n=12, d=8, seed=0, cases=(COMPLETE, TEXT_MISSING, IMAGE_MISSING), **flags):
    """PROMISE on cached-style features (no backbone): a (batch, model, args), rows cycling through `cases`."""
    args = promise.parser().parse_args(["--fusion-layers", "1", *sum(([f"--{k.replace('_', '-')}", str(v)]
                                                                       for k, v in flags.items()), [])])
    torch.manual_seed(seed)
    model = promise.PROMISE(types.SimpleNamespace(kind="clip", embed_dim=d), 3, args)
    g = torch.Generator().manual_seed(seed + 1)
    missing = torch.tensor(list(cases) * (n // len(cases)))
    batch = {"missing": missing, "label": torch.randint(0, 3, (n,), generator=g)}
    for m in promise.MODALITIES:
        absent = (missing == promise.ABSENT[m])[:, None]
        for k in (f"feat_{m}", f"feat_{m}_a"):
            batch[k] = torch.randn(n, d, generator=g).masked_fill(absent, 0.0)   # zeros where missing, as encoded
    return batch, model, args


@pytest.mark.parametrize("alpha,cases,partner", [
    (1.0, (COMPLETE, TEXT_MISSING, IMAGE_MISSING), "available"), (1.0, (COMPLETE, TEXT_MISSING, IMAGE_MISSING),
    "reconstruction"), (0.0, (COMPLETE, TEXT_MISSING, IMAGE_MISSING), "available"), (1.0, (TEXT_MISSING,), "available"),
    (1.0, (COMPLETE,), "available"), (1.0, (COMPLETE,), "reconstruction")])
def test_total_loss_equals_hand_wired_terms(alpha, cases, partner):
    """alpha = 1: L_cls + FNCL, direction m1 -> m2 over the rows that have m1 (directions without rows left out), the
    paper's four pairs (x_m1, x^_m2), (x_m1, x^_m2_a), (x_m1_a, x^_m2), (x_m1_a, x^_m2_a) on every such row
    (--fncl-partner available), or x^_m2's partner the real m2 where present else x_m1 (reconstruction);
    alpha = 0: L_cls + CCCL on z, z_a (real where present, generated where missing)."""
    batch, model, args = feature_model(alpha=alpha, contrast_weight=0.5, cases=cases, fncl_partner=partner)
    recon = partner == "reconstruction"
    model.train()
    out = model(batch)
    codes = batch["missing"].tolist()
    has = lambda m, k: codes[k] != promise.ABSENT[m]                   # noqa: E731
    x, x_a = {m: model.proj[m](batch[f"feat_{m}"]) for m in promise.MODALITIES}, \
        {m: model.proj[m](batch[f"feat_{m}_a"]) for m in promise.MODALITIES}
    L_cls = float(F.cross_entropy(out["logits"].detach(), batch["label"]))
    if alpha == 1.0:
        directions = []
        for m1, m2 in (("image", "text"), ("text", "image")):
            rows = [k for k in range(len(codes)) if has(m1, k)]
            if not rows:
                continue
            t = torch.stack([x[m2][k] if recon and has(m2, k) else x[m1][k] for k in rows])
            t_a = torch.stack([x_a[m2][k] if recon and has(m2, k) else x_a[m1][k] for k in rows])
            g, g_a = (model.gen[m2](x[m1])[i][rows] for i in (0, 1))
            directions.append(np.mean([nt_xent_loop(a.detach(), b.detach(), args.tau) for a in (t, t_a)
                                       for b in (g, g_a)]))
        contrast = np.mean(directions)
    else:
        terms = []
        for m in promise.MODALITIES:
            g, g_a = model.gen[m](x[promise.OTHER[m]])
            z = torch.stack([x[m][k] if has(m, k) else g[k] for k in range(len(codes))])
            z_a = torch.stack([x_a[m][k] if has(m, k) else g_a[k] for k in range(len(codes))])
            y = batch["label"].tolist() * 2
            positive = [[y[a] == y[b] or (a != b and a % len(codes) == b % len(codes)) for b in range(len(y))]
                        for a in range(len(y))]
            terms.append(supcon_loop(torch.cat([z, z_a]).detach(), positive, args.tau))
        contrast = np.mean(terms)
    total = float(promise.promise_loss(out, batch, "multiclass", args).detach())
    assert total == pytest.approx(L_cls + 0.5 * contrast, rel=1e-4)


def test_generator_reads_its_row_and_z_a_is_real_where_present():
    """Perturbing one row's image feature changes that row's generated text (both heads) and nothing else; in training
    z / z_a are the real x / x_a where present and the generated ones where missing."""
    batch, model, _ = feature_model()
    model.train()
    k = 0                                                       # a complete row
    before = model(batch)
    batch["feat_image"] = batch["feat_image"].clone()
    batch["feat_image"][k] += 1.0
    after = model(batch)
    for i in (0, 1):
        changed = (after["gen"]["text"][i] - before["gen"]["text"][i]).abs().amax(-1) > 1e-6
        assert changed.tolist() == [r == k for r in range(len(changed))]
        assert torch.equal(after["gen"]["image"][i], before["gen"]["image"][i])
    for m in promise.MODALITIES:
        present = (batch["missing"] != promise.ABSENT[m])[:, None]
        assert torch.equal(after["z_a"][m], torch.where(present, after["x_a"][m], after["gen"][m][1]))
        assert torch.equal(after["z"][m], torch.where(present, after["x"][m], after["gen"][m][0]))
        assert not torch.allclose(after["x_a"][m], after["x"][m])


# --- the forward and the gradient against the header's equations written out per sample -------------------------
def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def self_attention(seq, attn, heads):
    """Multi-head self-attention (Vaswani et al.) over seq (S, d), one sample: per head softmax(q k^T / sqrt(d_h)) v,
    heads concatenated, output projection; the weights read from torch's documented in_proj layout [W_q; W_k; W_v]."""
    d = seq.shape[-1]
    d_h = d // heads
    W, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = (seq @ W[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
    outputs = []
    for h in range(heads):
        cols = slice(h * d_h, (h + 1) * d_h)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d_h), -1)
        outputs.append(weights @ v[:, cols])
    return torch.cat(outputs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias


def hand_forward(model, batch, heads):
    """The header's model for each sample k: x_m = proj_m(f_m); Prompt Attention of m2 = MHA over [pool_m2 (N*P
    tokens); x_m1] -> the x_m1 token's output + x_m1 (residual) -> two linear layers (x^_m2, x^_m2_a); z_m = x_m where m is present else
    x^_m; tokens [CLS, z_image, z_text] + pos through pre-LN layers x + SA(LN1 x), x + W2 GELU(W1 LN2 x) (FFN 4d,
    dropout 0), final LayerNorm, linear head on the CLS."""
    codes = batch["missing"].tolist()
    rows = {k: [] for k in ("logits", "fused")}
    per = {k: {m: [] for m in promise.MODALITIES} for k in ("x", "x_a", "g", "g_a", "z", "z_a")}
    for k, code in enumerate(codes):
        x = {m: linear(batch[f"feat_{m}"][k], model.proj[m]) for m in promise.MODALITIES}
        x_a = {m: linear(batch[f"feat_{m}_a"][k], model.proj[m]) for m in promise.MODALITIES}
        z, z_a = {}, {}
        for m in promise.MODALITIES:
            pa = model.gen[m]
            seq = torch.cat([pa.pool, x[promise.OTHER[m]][None]], 0)                # (N * P + 1, d)
            h = x[promise.OTHER[m]] + self_attention(seq, pa.attn, heads)[-1]       # the x_m1 token + residual
            g, g_a = linear(h, pa.out), linear(h, pa.out_a)
            present = code != promise.ABSENT[m]
            z[m], z_a[m] = (x[m], x_a[m]) if present else (g, g_a)
            for key, value in (("x", x[m]), ("x_a", x_a[m]), ("g", g), ("g_a", g_a), ("z", z[m]), ("z_a", z_a[m])):
                per[key][m].append(value)
        t = torch.stack([model.cls[0, 0], z["image"], z["text"]]) + model.pos             # (3, d)
        for layer in model.fusion.layers:
            assert layer.linear1.out_features == 4 * t.shape[-1]
            t = t + self_attention(layer_norm(t, layer.norm1), layer.self_attn, heads)
            t = t + linear(F.gelu(linear(layer_norm(t, layer.norm2), layer.linear1)), layer.linear2)
        fused = layer_norm(t, model.fusion.norm)[0]
        rows["fused"].append(fused)
        rows["logits"].append(linear(fused, model.head))
    out = {k: torch.stack(v) for k, v in rows.items()}
    out.update({k: {m: torch.stack(v[m]) for m in promise.MODALITIES} for k, v in per.items()})
    return out


def nt_xent_terms(u, v, tau):
    """SimCLR's NT-Xent over the 2n vectors [u; v], anchor by anchor (differentiable torch scalars)."""
    z = [r / r.norm() for r in list(u) + list(v)]
    n = len(u)
    losses = []
    for a in range(2 * n):
        den = sum(torch.exp(z[a] @ z[k] / tau) for k in range(2 * n) if k != a)
        losses.append(-torch.log(torch.exp(z[a] @ z[(a + n) % (2 * n)] / tau) / den))
    return sum(losses) / len(losses)


def supcon_terms(z, positive, tau):
    """Khosla et al.'s L_out anchor by anchor; anchors without a positive left out (differentiable torch scalars)."""
    z = [r / r.norm() for r in z]
    losses = []
    for a in range(len(z)):
        pos = [p for p in range(len(z)) if p != a and positive[a][p]]
        if pos:
            den = sum(torch.exp(z[a] @ z[k] / tau) for k in range(len(z)) if k != a)
            losses.append(-sum(torch.log(torch.exp(z[a] @ z[p] / tau) / den) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def hand_loss(ref, batch, args):
    """L = CE + lambda [alpha FNCL + (1 - alpha) CCCL]: FNCL direction m1 -> m2 over the rows with m1, four pairs,
    partner of x^_m2 the available x_m1 (the paper's pairs; reconstruction: the real m2 where present else x_m1);
    CCCL per modality over [z; z_a], positives = same label or the other view of the same sample."""
    recon = args.fncl_partner == "reconstruction"
    codes, y = batch["missing"].tolist(), batch["label"].tolist()
    n = len(codes)
    has = lambda m, k: codes[k] != promise.ABSENT[m]                   # noqa: E731
    directions = []
    for m1, m2 in (("image", "text"), ("text", "image")):
        rows = [k for k in range(n) if has(m1, k)]
        if rows:
            t = torch.stack([ref["x"][m2 if recon and has(m2, k) else m1][k] for k in rows])
            t_a = torch.stack([ref["x_a"][m2 if recon and has(m2, k) else m1][k] for k in rows])
            g, g_a = ref["g"][m2][rows], ref["g_a"][m2][rows]
            directions.append(sum(nt_xent_terms(a, b, args.tau) for a in (t, t_a) for b in (g, g_a)) / 4)
    positive = [[y[a % n] == y[b % n] or (a != b and a % n == b % n) for b in range(2 * n)] for a in range(2 * n)]
    cccl = sum(supcon_terms(torch.cat([ref["z"][m], ref["z_a"][m]]), positive, args.tau)
               for m in promise.MODALITIES) / 2
    contrast = args.alpha * sum(directions) / len(directions) + (1 - args.alpha) * cccl
    return F.cross_entropy(ref["logits"], batch["label"]) + args.contrast_weight * contrast


@pytest.mark.parametrize("d,heads,train,partner", [(8, 2, False, "available"), (8, 2, True, "available"),
                                                   (8, 2, True, "reconstruction"), (256, 8, False, "available")])
def test_forward_and_gradient_equal_the_equations_per_sample(d, heads, train, partner):
    """Every output of PROMISE.forward (x, x_a, x^_m, x^_m_a, z, z_a, fused, logits) equals the header's equations
    written out sample by sample (`hand_forward`: attention per head from the weights, LayerNorm from its formula, the
    header's head count: 8, 2 below width 256), in eval and in training mode (dropout 0); in training the gradient of
    promise_loss on every trainable tensor equals autograd through `hand_forward` + `hand_loss` (brute-force NT-Xent /
    SupCon loops): no missing or extra stop-gradient, no other weighting."""
    batch, model, args = feature_model(d=d, fusion_layers=2, contrast_weight=0.5, alpha=0.4, fncl_partner=partner)
    model.train(train)
    out = model(batch)
    ref = hand_forward(model, batch, heads)
    for key in ("logits", "fused"):
        assert torch.allclose(out[key], ref[key], atol=1e-5, rtol=1e-4), key
    if not train:
        return
    for key, theirs in (("x", "x"), ("x_a", "x_a"), ("z", "z"), ("z_a", "z_a")):
        for m in promise.MODALITIES:
            assert torch.allclose(out[key][m], ref[theirs][m], atol=1e-5, rtol=1e-4), (key, m)
    for m in promise.MODALITIES:
        for i, key in enumerate(("g", "g_a")):
            assert torch.allclose(out["gen"][m][i], ref[key][m], atol=1e-5, rtol=1e-4), (key, m)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(promise.promise_loss(out, batch, "multiclass", args), params, allow_unused=True)
    expected_loss = hand_loss(ref, batch, args)
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    for p, a, b in zip(params, ours, expected):
        a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), p.shape


def test_generated_feature_carries_its_sample():
    """Prompt Attention can carry the sample, not only its class: on features whose text is a fixed rotation of the
    image (plus noise), with a sample-specific part as large as the class part, 100 Adam steps with the default flags
    leave x^_text = G_text(x_image) correlated (centred cosine over held-out samples) with the real x_text of the same
    sample more than with other samples of its class, and spread across samples like the real x_text."""
    d, n = 16, 64
    args = promise.parser().parse_args(["--fusion-layers", "1"])
    torch.manual_seed(0)
    model = promise.PROMISE(types.SimpleNamespace(kind="clip", embed_dim=d), 4, args)
    g = torch.Generator().manual_seed(1)
    R, centers = torch.linalg.qr(torch.randn(d, d, generator=g))[0], torch.randn(4, d, generator=g)

    def data(n):
        y = torch.randint(0, 4, (n,), generator=g)
        f = {"image": centers[y] + torch.randn(n, d, generator=g)}
        f["text"] = f["image"] @ R + 0.1 * torch.randn(n, d, generator=g)
        missing = torch.tensor([COMPLETE, TEXT_MISSING, IMAGE_MISSING] * n)[:n]
        batch = {"missing": missing, "label": y}
        for m in promise.MODALITIES:
            absent = (missing == promise.ABSENT[m])[:, None]
            batch[f"feat_{m}"] = f[m].masked_fill(absent, 0.0)
            batch[f"feat_{m}_a"] = (f[m] + 0.1 * torch.randn(n, d, generator=g)).masked_fill(absent, 0.0)
        return batch, f
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(100):
        batch, _ = data(n)
        loss = promise.promise_loss(model(batch), batch, "multiclass", args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch, f = data(48)
    with torch.no_grad():
        gen, real = model.gen["text"](model.proj["image"](f["image"]))[0], model.proj["text"](f["text"])
    assert gen.std(0).mean() > 0.2 * real.std(0).mean()                  # x^ varies across samples like x
    c = F.normalize(gen - gen.mean(0), dim=-1) @ F.normalize(real - real.mean(0), dim=-1).T
    y, eye = batch["label"], torch.eye(48, dtype=torch.bool)
    same_class = (y[:, None] == y[None]) & ~eye
    assert c.diag().mean() > 0.3 and c.diag().mean() > c[same_class].mean() + 0.02 > c[~eye].mean() + 0.02


def test_no_prompt_pool_is_a_working_ablation():
    batch, model, args = feature_model(num_prompts=0)
    model.train()
    assert model.gen["image"].pool.shape[0] == 0
    loss = promise.promise_loss(model(batch), batch, "multiclass", args)
    loss.backward()
    assert torch.isfinite(loss) and model.gen["image"].attn.in_proj_weight.grad.abs().sum() > 0
    for flag, value in (("--fusion-layers", "0"), ("--aug-views", "-1"), ("--num-prompts", "-1")):
        with pytest.raises(SystemExit, match=flag):
            cli(promise.parser(), promise.main, ["--backbone", "tiny-clip", flag, value])


def test_refused_up_front_with_the_reason(monkeypatch):
    """--nm2i (no prompts inside the encoder to measure) and --cache-features with --backbone-dropout on ViLT (the
    cache is encoded without dropout, an uncached run draws it every step) fail before setup; CLIP has no backbone
    dropout, so the cache is allowed there."""
    def no_setup(args):
        raise AssertionError("setup reached: the flag was not refused up front")
    monkeypatch.setattr(promise, "setup", no_setup)
    for argv, reason in ((["--backbone", "tiny-clip", "--nm2i"], "nothing to measure"),
                         (["--backbone", "tiny-vilt", "--cache-features", "--backbone-dropout", "0.1"], "without dropout")):
        with pytest.raises(SystemExit, match=reason):
            cli(promise.parser(), promise.main, argv)
    for argv in (["--backbone", "tiny-clip", "--cache-features", "--backbone-dropout", "0.1"],
                 ["--backbone", "tiny-vilt", "--cache-features"], ["--backbone", "tiny-vilt", "--backbone-dropout", "0.1"]):
        promise.check_args(finalize_args(promise.parser().parse_args(argv)))


def _ddp_worker(rank, world, store, batch, state, args, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = promise.PROMISE(types.SimpleNamespace(kind="clip", embed_dim=8), 3, args)
    model.load_state_dict(state)
    model.train()
    share = len(batch["missing"]) // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    loss = promise.promise_loss(model(mine), mine, "multiclass", args)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    for g in grads + [loss.detach()]:                          # what DistributedDataParallel does: the mean
        dist.all_reduce(g)
    if rank == 0:
        torch.save({"loss": loss.detach() / world, "grads": [g / world for g in grads]}, out)
    dist.destroy_process_group()


def test_ddp_gathers_the_contrastive_batch_with_gradients(tmp_path):
    """Two gloo processes with half the batch each: the loss and gradient equal one process on the whole batch."""
    import torch.multiprocessing as mp
    batch, model, args = feature_model()
    model.train()
    loss = promise.promise_loss(model(batch), batch, "multiclass", args)
    loss.backward()
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), batch, model.state_dict(), args, out),
                       nprocs=2, start_method="spawn")
    ddp = torch.load(out)
    assert float(ddp["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    for p, g in zip(model.parameters(), ddp["grads"]):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


# --- mechanism -------------------------------------------------------------------------------------------------
def build(backbone, n=16):
    args = finalize_args(promise.parser().parse_args(["--backbone", backbone, "--fusion-layers", "2"]))
    seed_everything(0)
    bb = load_backbone(args)
    model = promise.PROMISE(bb, 4, args)
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    collate = promise.PromiseCollate(Collate(bb, args.max_text_len), args)
    views = promise.Views(ds, 2)
    return args, model, collate(mixed_sizes([views[i] for i in range(n)]))      # ViLT: padded patches


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_generated_features_replace_only_missing_ones(backbone):
    """Perturb the generator of modality m: the fused feature changes exactly for the samples missing m."""
    _, model, batch = build(backbone)
    model.eval()
    assert {COMPLETE, TEXT_MISSING, IMAGE_MISSING} <= set(batch["missing"].tolist())
    for m, code in (("text", TEXT_MISSING), ("image", IMAGE_MISSING)):
        with torch.no_grad():
            torch.manual_seed(0)                                # ViLT draws its image-patch order at random
            before = model(batch)["fused"]
            model.gen[m].out.weight += torch.randn_like(model.gen[m].out.weight)
            model.gen[m].out_a.weight += 1.0
            torch.manual_seed(0)
            after = model(batch)["fused"]
        changed = (after - before).abs().amax(-1) > 1e-6
        assert torch.equal(changed, batch["missing"] == code), m


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_training_mode_is_the_evaluation_forward_without_dropout(backbone):
    """With the backbone dropout at 0, the training-mode forward (which also encodes the augmented view) gives the
    evaluation-mode logits within 1e-5 on the mixed batch: generated features where a modality is missing, nothing
    added only while training. With --backbone-dropout 0.1 on ViLT (uncached) the two differ."""
    _, model, batch = build(backbone)
    assert {COMPLETE, TEXT_MISSING, IMAGE_MISSING} <= set(batch["missing"].tolist())
    with torch.no_grad():
        trained, evaluated = train_and_eval_logits(model, batch)
        assert (trained - evaluated).abs().max() <= 1e-5
        if backbone == "tiny-vilt":
            model.bb.set_dropout(0.1)
            torch.manual_seed(0)
            assert (model.train()(batch)["logits"] - evaluated).abs().max() > 1e-4


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_unimodal_features_are_the_libraries_own(backbone):
    """unimodal_features, sample by sample, against the libraries' own forward: CLIP = open_clip's encode_image /
    encode_text of that one sample; ViLT (NON-PAPER ADAPTATION in the header) = HF's ViltEncoder + final layernorm run
    on that sample's valid text tokens alone (image tokens alone), then their mean. Zero rows where m is missing."""
    _, model, batch = build(backbone)
    bb, codes = model.bb, batch["missing"].tolist()
    with torch.no_grad():
        torch.manual_seed(0)                                    # ViLT draws its image-patch order at random
        feats = dict(zip(promise.MODALITIES, promise.unimodal_features(bb, batch)))
        if backbone == "tiny-clip":
            def reference(m, k):
                return (bb.model.encode_image(batch["image"][k:k + 1]) if m == "image" else
                        bb.model.encode_text(batch["text"][k:k + 1]))[0]
        else:
            torch.manual_seed(0)
            x, mask = bb.vilt.embeddings(batch["input_ids"], batch["text_mask"], None, batch["image"],
                                         batch["pixel_mask"], None, None)
            L_t = batch["input_ids"].shape[1]
            assert not batch["text_mask"].bool().all()          # some text padding: the mean must skip it

            def reference(m, k):
                part = slice(0, L_t) if m == "text" else slice(L_t, None)
                tokens = x[k, part][mask[k, part].bool()][None]          # the valid tokens only, no mask needed
                return bb.vilt.layernorm(bb.vilt.encoder(tokens).last_hidden_state)[0].mean(0)
    for m in promise.MODALITIES:
        for k, code in enumerate(codes):
            if code == promise.ABSENT[m]:
                assert not feats[m][k].any(), (m, k)
            else:
                assert torch.allclose(feats[m][k], reference(m, k), atol=1e-5, rtol=1e-4), (m, k)


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_encoder_never_sees_a_dummy_input(backbone, monkeypatch):
    """The frozen blocks run only on the rows whose modality is present (the dummy rows are never encoded)."""
    _, model, batch = build(backbone)
    rows = []
    if backbone == "tiny-clip":
        monkeypatch.setattr(model.bb, "image_block", lambda i, x, f=model.bb.image_block: rows.append(("image", i, len(x))) or f(i, x))
        monkeypatch.setattr(model.bb, "text_block", lambda i, x, f=model.bb.text_block: rows.append(("text", i, len(x))) or f(i, x))
    else:
        monkeypatch.setattr(model.bb, "block", lambda i, x, b, f=model.bb.block: rows.append(("any", i, len(x))) or f(i, x, b))
    model.eval()
    with torch.no_grad():
        model(batch)
    n_image = int((batch["missing"] != IMAGE_MISSING).sum())
    n_text = int((batch["missing"] != TEXT_MISSING).sum())
    assert n_image < len(batch["missing"]) and n_text < len(batch["missing"])
    if backbone == "tiny-clip":
        assert {r[2] for r in rows if r[0] == "image"} == {n_image} and {r[2] for r in rows if r[0] == "text"} == {n_text}
    else:                                                       # one text-only and one image-only pass per layer
        assert sorted(r[2] for r in rows if r[1] == 0) == sorted([n_text, n_image])


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_only_method_modules_get_gradients(backbone):
    args, model, batch = build(backbone)
    model.train()
    loss = promise.promise_loss(model(batch), batch, "multiclass", args)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.bb.parameters())
    own = [(n, p) for n, p in model.named_parameters() if not n.startswith("bb.")]
    assert own and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for _, p in own), \
        [n for n, p in own if p.grad is None]
    assert {n.split(".")[0] for n, _ in own} == {"proj", "gen", "cls", "pos", "fusion", "head"}
    pool = model.gen["image"].pool
    assert pool.shape == (args.num_prompts * args.prompt_length, model.bb.embed_dim if backbone == "tiny-clip" else 64)


def test_training_step_has_no_host_device_sync_ops():
    """The uncached CLIP path selects rows with the collate's index tensors and the losses use masked reductions: no
    op that needs the host to read a device value (nonzero, .item(), boolean indexing). ViLT's own embedding layer
    samples patches with such ops (HF's code), so only CLIP is checked."""
    from torch.utils._python_dispatch import TorchDispatchMode
    syncing = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "unique", "_unique2"}

    class Record(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name.startswith("index") and any(
                torch.is_tensor(t) and t.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for t in a)
            if name in syncing or bool_index:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))
    args, model, batch = build("tiny-clip")
    model.train()
    with Record():
        promise.promise_loss(model(batch), batch, "multiclass", args).backward()
    assert Record.ops == []


# --- views: fresh per epoch, from the epoch being trained, continued by --resume -----------------------------------
def test_views_follow_the_epoch_and_differ():
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    fresh, cached, none = promise.Views(ds, 3), promise.Views(ds, 3, cycle=3), promise.Views(ds, 0)
    seen = []
    for epoch in range(5):
        for v in (fresh, cached, none):
            v.set_epoch(epoch)
        seen.append((fresh[7]["view"], cached[7]["view"], none[7]["view"]))
    assert seen == [(e, e % 3, None) for e in range(5)]
    item = ds[7]
    images = [np.asarray(promise.augment(item, 0, v, 0.1, 0.5)["image"]) for v in range(3)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


class ProbeImage:
    """Stands in for a PIL image in `augment`: records the crop box and whether the view was flipped."""

    def __init__(self, size, log):
        self.size, self.log = size, log

    def crop(self, box):
        self.log.append({"box": box, "flip": False})
        return self

    def resize(self, size, resample):
        assert size == self.size
        return self

    def transpose(self, how):
        assert how == promise.Image.Transpose.FLIP_LEFT_RIGHT
        self.log[-1]["flip"] = True
        return self


def test_augment_draws_the_stated_distributions():
    """The header's augmentation, checked on its own terms over 600 (sample, view) draws of a 240 x 240 image and a
    60-word text: crop area fraction uniform in [crop_scale, 1] (so mean ~ (crop_scale + 1) / 2), aspect ratio in
    [3/4, 4/3] both ways, the box inside the image, a horizontal flip half the time, each word dropped with
    probability text_dropout (order kept; never empty), each sample with its own draw."""
    args = promise.parser().parse_args([])
    w, h, log = 240, 240, []
    words = [f"w{i}" for i in range(60)]
    kept = []
    for sample in range(60):
        item = {"id": f"s{sample}", "image": ProbeImage((w, h), log), "text": " ".join(words)}
        for view in range(10):
            out = promise.augment(item, 0, view, args.text_dropout, args.crop_scale)
            text = out["text"].split()
            assert text == [word for word in words if word in text]             # a subsequence, in order
            kept.append(len(text) / len(words))
    boxes = [r["box"] for r in log]
    assert all(0 <= left and 0 <= top and right <= w and bottom <= h for left, top, right, bottom in boxes)
    area = np.array([(right - left) * (bottom - top) / (w * h) for left, top, right, bottom in boxes])
    assert area.min() >= args.crop_scale - 0.01 and area.max() <= 1.0
    assert area.min() < args.crop_scale + 0.05 and area.max() > 0.95
    assert abs(area.mean() - (args.crop_scale + 1) / 2) < 0.05, area.mean()
    ratio = np.array([(right - left) / (bottom - top) for left, top, right, bottom in boxes
                      if right - left < w and bottom - top < h])        # unclamped boxes keep the drawn ratio
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert ratio.min() < 0.8 and ratio.max() > 1.25
    assert abs(np.mean([r["flip"] for r in log]) - 0.5) < 0.07
    assert abs(np.mean(kept) - (1 - args.text_dropout)) < 0.02, np.mean(kept)
    assert len(set(boxes[::10])) > 50                                       # view 0 of each sample: its own crop
    assert promise.augment({"id": "a", "image": ProbeImage((w, h), []), "text": "only"}, 0, 0, 1.0, 0.5)["text"] == \
        "only"


def test_aug_views_zero_means_x_a_equals_x():
    """--aug-views 0: training items carry no view; the cached collate adds no x_a and the model uses x_a = x."""
    batch, model, _ = feature_model()
    items = [{"id": str(k), "label": int(batch["label"][k]), "missing": int(batch["missing"][k]), "view": None,
              "feat_image": batch["feat_image"][k], "feat_text": batch["feat_text"][k]} for k in range(12)]
    batch = promise.PromiseCollate(None, promise.parser().parse_args([]))(items)
    assert "feat_image_a" not in batch
    model.train()
    out = model(batch)
    for m in promise.MODALITIES:
        assert torch.equal(out["x_a"][m], out["x"][m])


def test_main_draws_a_fresh_view_each_epoch_without_the_cache(tmp_path, monkeypatch):
    """Header: without --cache-features every epoch trains on its own view e (no repeat even when --aug-views is
    smaller than --epochs); with the cache epoch e reads view e mod V. main's Views, read epoch by epoch (fit and
    finish stubbed: nothing is trained)."""
    seen = {}

    def spy_fit(run, model, loss_fn):
        views = []
        for epoch in range(run.args.epochs):
            run.train_set.set_epoch(epoch)
            views.append(run.train_set[0]["view"])
        seen[run.args.out] = views
    monkeypatch.setattr(promise, "fit", spy_fit)
    monkeypatch.setattr(promise, "finish", lambda run, model, extra=None: extra)
    run_cli(tmp_path, "fresh", "--backbone", "tiny-clip", "--epochs", "5", "--aug-views", "2")
    assert seen[str(tmp_path / "fresh")] == [0, 1, 2, 3, 4]


CACHED = ["--backbone", "tiny-clip", "--cache-features", "--epochs", "2", "--batch-size", "256", "--micro-batch", "256"]


def test_resume_continues_the_views_bit_for_bit(tmp_path, monkeypatch):
    full = run_cli(tmp_path, "full", *CACHED)
    original = common.save_last

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt                                 # the process dies right after epoch 1's checkpoint
    monkeypatch.setattr(common, "save_last", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path, "resumed", *CACHED)
    monkeypatch.setattr(common, "save_last", original)
    resumed = run_cli(tmp_path, "resumed", *CACHED, "--resume")
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / n / "checkpoint.safetensors")) for n in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --eval-only --cache-features encodes val and test only
    evaluated = run_cli(tmp_path, "eval", "--eval-only", "--checkpoint", str(tmp_path / "full" / "checkpoint.safetensors"),
                        "--cache-features", "--cache-dir", str(tmp_path / "eval-cache"))
    assert "cache_train" not in evaluated and sorted(os.listdir(tmp_path / "eval-cache")) == sorted(
        os.path.basename(evaluated[f"cache_{s}"]["path"]) for s in ("val", "test"))
    assert evaluated["metrics"]["test"] == full["metrics"]["test"]


# --- the feature cache key -------------------------------------------------------------------------------------------
def cache_run(backbone, **over):
    args = finalize_args(promise.parser().parse_args(["--backbone", backbone]))
    vars(args).update(over)
    seed_everything(0)
    bb = load_backbone(args)
    run = types.SimpleNamespace(args=args, bb=bb, device=torch.device("cpu"), rank=0, world=1, main=True,
                                log=lambda *a: None, collate=promise.PromiseCollate(Collate(bb, args.max_text_len), args))
    return run, args


def test_cache_key_misses_when_images_rate_seed_or_backbone_change(tmp_path):
    """The key holds what the header lists: image files, ids and texts, backbone, missing table, rate, seed, text
    length and the augmentation; a changed input is a miss, an unchanged one a hit."""
    root = make_food101(tmp_path / "food", n_train=4, n_test=2)
    run, args = cache_run("tiny-clip", dataset="food101", data_root=root, cache_dir=str(tmp_path / "cache"))

    def split(rate=0.6, seed=0):
        return load_split("food101", root, "train", missing_type="both", rate=rate, seed=seed)
    key = promise.cache_key(run, args, split(), "train", 2)
    assert promise.cache_key(run, args, split(), "train", 2) == key
    assert promise.cache_key(run, args, split(rate=0.3), "train", 2) != key
    assert promise.cache_key(run, args, split(), "train", 3) != key
    edited = split()
    edited.texts[0] += " edited"                               # a changed caption: a miss
    assert promise.cache_key(run, args, edited, "train", 2) != key
    for flag, value in (("max_text_len", 40), ("crop_scale", 0.3), ("text_dropout", 0.2)):
        changed = types.SimpleNamespace(**{**vars(args), flag: value})
        assert promise.cache_key(run, changed, split(), "train", 2) != key, flag
    run_s, args_s = cache_run("tiny-clip", dataset="food101", data_root=root, seed=1)
    assert promise.cache_key(run_s, args_s, split(), "train", 2) != key
    run_v, args_v = cache_run("tiny-vilt", dataset="food101", data_root=root)
    assert promise.cache_key(run_v, args_v, split(), "train", 2) != key
    assert not promise.cached_split(run, args, split(), "train", 2)[1]["hit"]
    assert promise.cached_split(run, args, split(), "train", 2)[1]["hit"]
    image = split().images[0]                                   # replace one image: a miss, with new features
    from PIL import Image
    Image.new("RGB", (24, 24), (1, 2, 3)).save(image)
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10 ** 9))
    assert promise.cache_key(run, args, split(), "train", 2) != key
    assert not promise.cached_split(run, args, split(), "train", 2)[1]["hit"]


def test_paper_numbers_are_the_sources_with_provenance():
    """PAPER_NUMBERS holds exactly what its one source gives, typed here in the source's own layout (the review's
    Quick Facts line: "up to 67.17% AUROC on Hateful Memes and 88.10% accuracy on UPMC Food101 with 70% missing
    modality rates"), with its provenance: a public summary ("review"), the setting "inferred" (the source names
    a rate, not a missing type; 'both' is this repository's reading, said in the note)."""
    source = {"Hateful Memes": ("AUROC", 67.17), "UPMC Food101": ("accuracy", 88.10)}
    dataset = {"Hateful Memes": "hatememes", "UPMC Food101": "food101"}
    expected = {("promise", common.CLIP_L14, dataset[name], "both", 0.7, "both", 0.7, None): (value, "review", "inferred")
                for name, (_, value) in source.items()}
    got = {key: tuple((p.value, p.kind, p.setting) for p in papers) for key, papers in promise.PAPER_NUMBERS.items()}
    assert got == {key: (v,) for key, v in expected.items()}
    assert all("'both'" in p.note and "summary" in p.source for papers in promise.PAPER_NUMBERS.values() for p in papers)


def test_parser_defaults_are_the_papers():
    """The paper's numbers (Adam, lr 1e-4, batch 64, tau 0.07, 4 prompts x 16, 6 layers, ViT-L/14), then the values
    the header states for what the paper leaves open: alpha 0.5, lambda 1, the contrastive micro-batch = the batch,
    cosine without warm-up, no weight decay, 20 epochs, the view augmentation (crop area >= 0.5, word dropout 10%)."""
    a = promise.parser().parse_args([])
    assert (a.optimizer, a.lr, a.weight_decay, a.batch_size, a.tau, a.num_prompts, a.prompt_length,
            a.fusion_layers, a.clip_model, a.backbone or a.paper_backbone) == \
        ("adam", 1e-4, 0.0, 64, 0.07, 4, 16, 6, "ViT-L-14", "clip")
    assert a.aug_views is None and promise.views_of(a) == a.epochs == 20
    assert (a.alpha, a.contrast_weight, a.micro_batch, a.schedule, a.warmup, a.crop_scale, a.text_dropout) == \
        (0.5, 1.0, 64, "cosine", 0.0, 0.5, 0.1)
    assert a.fncl_partner == "available"                         # the paper's four pairs


# --- CLI ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_cached_and_uncached_agree_and_write_outputs(tmp_path, backbone, monkeypatch):
    models = {}
    real_finish = promise.finish

    def spy(run, model, extra=None):
        models[run.args.out] = (run, model)
        return real_finish(run, model, extra)
    monkeypatch.setattr(promise, "finish", spy)
    steps = FAST if backbone == "tiny-vilt" else ["--epochs", "2", "--batch-size", "256", "--micro-batch", "128"]
    plain = run_cli(tmp_path, "plain", "--backbone", backbone, *steps)          # CLIP: 4 steps over 2 epochs' views
    cached = run_cli(tmp_path, "cached", "--backbone", backbone, "--cache-features", *steps)
    for a, b in zip(cached["history"], plain["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert cached["metrics"]["val"]["accuracy"] == pytest.approx(plain["metrics"]["val"]["accuracy"], abs=1 / 64)
    for name in ("plain", "cached"):
        out = tmp_path / name
        for f in ("results.json", "predictions_test.csv", "checkpoint.safetensors"):
            assert (out / f).is_file(), f
        assert len((out / "predictions_test.csv").read_text().splitlines()) == 1 + 128
        assert json.loads((out / "results.json").read_text())["trainable_params"] > 0
    run, model = models[str(tmp_path / "plain")]                # the backbone is bit-identical after training
    seed_everything(run.args.seed)
    fresh = load_backbone(run.args)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.bb.state_dict()[k]), k


def test_toy_beats_majority_and_cache_is_reused(tmp_path):
    args = ["--backbone", "tiny-clip", "--cache-features", "--lr", "1e-3", "--batch-size", "32", "--micro-batch", "32",
            "--rate", "0.3", "--aug-views", "2"]
    res = run_cli(tmp_path, "toy", *args, "--epochs", "6")
    labels = load_split("toy", None, "test", missing_type="none", rate=0.0, seed=0).labels()
    majority = np.bincount(labels).max() / len(labels)
    assert res["metrics"]["test"]["accuracy"] >= majority + 0.15, (res["metrics"]["test"], majority)
    assert not res["cache_train"]["hit"] and os.path.isfile(res["cache_train"]["path"])
    changed = run_cli(tmp_path, "changed", *args, "--epochs", "1", "--text-dropout", "0.2")
    assert not changed["cache_train"]["hit"] and changed["cache_train"]["path"] != res["cache_train"]["path"]
    for split in ("val", "test"):                               # no augmented views: the same key, reused
        assert changed[f"cache_{split}"] == {**res[f"cache_{split}"], "hit": True, "build_s": 0.0}


def test_fixture_trees(tmp_path, food101_root, mmimdb_root):
    food = run_cli(tmp_path, "food", "--dataset", "food101", "--data-root", food101_root, "--backbone", "tiny-vilt",
                   "--epochs", "1", "--batch-size", "16", "--micro-batch", "16")
    assert food["task"] == "multiclass" and (tmp_path / "food" / "results.json").is_file()
    imdb = run_cli(tmp_path, "imdb", "--dataset", "mmimdb", "--data-root", mmimdb_root, "--backbone", "tiny-clip",
                   "--cache-features", "--epochs", "1", "--batch-size", "8", "--micro-batch", "8")
    assert imdb["task"] == "multilabel" and "f1_macro" in imdb["metrics"]["test"]
