"""What the six method files share, except the data side (data.py). Sections, in reading order:
    Backbones         frozen open_clip CLIP and HF ViLT, cut into per-layer pieces (below); tiny configurations
    Metrics           accuracy, F1 (macro / micro / weighted / samples), AUROC; the task losses
    Command line      the flags every method file shares; --eval-only never writes into a training run's folder
    Files             checkpoints (safetensors, written atomically with data.atomic_write)
    Run setup         seed, device, torchrun processes, backbone, the three splits (data.load_data), the Collate
    Optimiser         autocast, fp32 logits, AdamW / Adam with the official weight-decay groups, warm-up schedules
    Training loop     `fit`: global batches from micro-batches, validation checks, the best check's state
    Resume            OUT/last.safetensors at every check; a resumed run equals an uninterrupted one
    Evaluation        `finish`: every sample once across processes, predictions_test.csv, results.json
    NM2I              AOEPT's diagnostic (this repository's estimator), k-means, prompt-free modality means
    Grid and seeds    --eval-grid, --seeds
    Papers' numbers   how the method files key their papers' numbers; `python common.py summarize RUN...`
    cli               the entry point of every method file
A run goes method -> common (setup) -> data (datasets, missing tables, preprocessing, image cache, dummy inputs,
loaders) -> common (fit, finish) -> method. Nothing here is described by any of the papers; everything a paper
describes, its numbers included, lives in its method file.

Shape glossary (used in every file):
    B    batch                     L_t  text tokens          L_v  image tokens (incl. [CLS])
    D    width of a stream         P    prompt length        N    prompted layers          C  outputs

Backbones (both frozen; `freeze` asserts it, `check_frozen` again around every epoch):
    clip       open_clip ViT-B-16, OpenAI weights (QuickGELU as the tag requires), dual stream.
    vilt       HF ViltModel dandelin/vilt-b32-mlm, single stream.
    tiny-clip  / tiny-vilt: the same classes and code paths with tiny random-initialised configurations.
    ViLT runs as the original: ViT LayerNorm eps 1e-6, and --backbone-dropout (MAP's drop_rate) only while the method
    trains (the frozen modules stay in eval mode; `FrozenViLT.train` switches only that dropout).

Per-layer interface. Prompts are always *prepended* to a sequence, so the pooled position moves by the
number of prompt tokens in front of it:
    CLIP image tower  x = bb.image_embed(img); x = bb.image_block(i, x); f = bb.image_pool(x, n_prompt)
    CLIP text tower   x = bb.text_embed(ids);  x = bb.text_block(i, x);  f = bb.text_pool(x, ids, n_prompt)
                      (the causal mask is built for the current length, cached; text tokens see all prompts)
    ViLT              x, mask = bb.embed(batch); bias = bb.attention_bias(mask); x = bb.block(i, x, bias)
                      f = pooler(bb.final_norm(x)[:, cls_index])
                      (block runs the layer's own modules with scaled_dot_product_attention; bb.block(i, x, bias,
                      kv_prefix=(K_p, V_p)) adds raw per-head key/value rows that every query sees)
With no prompts these reproduce open_clip's encode_image / encode_text and HF ViltModel's pooler_output
(tests/test_backbones.py).

Precision: the backbones and method modules run under the run's autocast (bf16 on CUDA); every similarity or
contrastive logit is computed in fp32 with autocast off, through `fp32_logits`.
"""
import argparse
import atexit
import collections
import contextlib
import copy
import hashlib
import importlib
import json
import math
import os
import random
import socket
import string
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import (COMPLETE, DATASETS, IMAGE_MISSING, METRIC, MISSING_NAMES, TEXT_MISSING, TOY_MAX_TEXT_LEN,
                  VILT_MAX_TEXT_LEN, Collate, DataError, atomic_write, global_batches, load_data, make_loader,
                  rank_batches, rank_micro_batches, table_counts, to_device, write_csv, write_json)

CLIP_DEFAULT, CLIP_PRETRAINED_DEFAULT, VILT_DEFAULT = "ViT-B-16", "openai", "dandelin/vilt-b32-mlm"
VIT_LAYER_NORM_EPS = 1e-6


class WeightsError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


# ---------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------
def freeze(module):
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    assert not any(p.requires_grad for p in module.parameters())
    return module


class FrozenCLIP(nn.Module):
    """open_clip CLIP, frozen, cut into embed / block / pool pieces for each tower."""
    kind = "clip"

    def __init__(self, model, tokenizer, preprocess, info):
        super().__init__()
        self.model = freeze(model)
        self.tokenizer, self.preprocess, self.info = tokenizer, preprocess, info
        visual = model.visual
        self.num_layers = len(visual.transformer.resblocks)
        assert self.num_layers == len(model.transformer.resblocks), "towers of different depth"
        self.width_image = visual.transformer.width
        self.width_text = model.transformer.width
        self.embed_dim = model.text_projection.shape[1]
        self.image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        self._masks = {}

    def train(self, mode=True):  # the backbone stays in eval mode whatever the method does
        return super().train(False)

    # image tower
    def image_embed(self, image):                                   # (B, 3, H, W) -> (B, L_v, D_v)
        return self.model.visual._embeds(image)

    def image_block(self, i, x):
        return self.model.visual.transformer.resblocks[i](x)

    def image_pool(self, x, n_prompt=0):                            # -> (B, E)
        pooled, _ = self.model.visual._pool(x[:, n_prompt:])
        return pooled @ self.model.visual.proj

    # text tower
    def text_embed(self, ids):                                      # (B, L <= 77) -> (B, L, D_t)
        return self.model.token_embedding(ids) + self.model.positional_embedding[:ids.shape[1]]

    def causal_mask(self, length, device, dtype):
        key = (length, device, dtype)
        if key not in self._masks:
            self._masks[key] = torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)
        return self._masks[key]

    def text_block(self, i, x):
        return self.model.transformer.resblocks[i](x, attn_mask=self.causal_mask(x.shape[1], x.device, x.dtype))

    def text_pool(self, x, ids, n_prompt=0):                        # -> (B, E): ln_final, EOT token, projection
        x = self.model.ln_final(x[:, n_prompt:])
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)] @ self.model.text_projection

    def encode(self, batch):
        """Prompt-free pooled features (image, text), each (B, E)."""
        x, t = self.image_embed(batch["image"]), self.text_embed(batch["text"])
        for i in range(self.num_layers):
            x, t = self.image_block(i, x), self.text_block(i, t)
        return self.image_pool(x), self.text_pool(t, batch["text"])


class FrozenViLT(nn.Module):
    """HF ViltModel, frozen, cut into embed / block / final_norm pieces over one joint sequence."""
    kind = "vilt"

    def __init__(self, model, tokenizer, info, dropout=0.0):
        super().__init__()
        self.vilt = freeze(model)
        self.tokenizer, self.info = tokenizer, info
        cfg = model.config
        self.num_layers, self.width = cfg.num_hidden_layers, cfg.hidden_size
        # ViLT's pixelbert resize (MAP): shorter side S, longer <= 1333/800 * S, multiples of the patch size.
        self.shorter, self.longer, self.patch = cfg.image_size, int(1333 / 800 * cfg.image_size), cfg.patch_size
        # The original ViLT (whose weights these are) has eps 1e-6 in its ViT LayerNorms (MAP vision_transformer_prompts.py,
        # norm_layer); HF's port uses its one layer_norm_eps 1e-12. The BERT text-embedding norm keeps 1e-12 (as in MAP).
        for layer in model.encoder.layer:
            layer.layernorm_before.eps = layer.layernorm_after.eps = VIT_LAYER_NORM_EPS
        model.layernorm.eps = VIT_LAYER_NORM_EPS
        self.set_dropout(dropout)

    def set_dropout(self, p):
        """--backbone-dropout: the drop_rate MAP and MemPrompt train the frozen ViLT with (timm ViT + BERT embeddings,
        MAP vision_transformer_prompts.py): after the text embeddings and after the image position embedding (pos_drop),
        after the attention projection (proj_drop), after the MLP activation and after the MLP output (Mlp.drop).
        No attention-probability dropout (attn_drop_rate 0). Weights stay frozen."""
        self.dropout = p
        self.vilt.embeddings.dropout.p = self.vilt.embeddings.text_embeddings.dropout.p = p
        self.train(False)

    def train(self, mode=True):
        """The frozen modules always run in eval mode; the method's mode switches only the backbone dropout, so it is
        on while the method trains and off whenever it evaluates."""
        super().train(False)
        self.dropout_active = bool(mode) and self.dropout > 0
        self.vilt.embeddings.dropout.train(self.dropout_active)
        self.vilt.embeddings.text_embeddings.dropout.train(self.dropout_active)
        return self

    def drop(self, x):
        return F.dropout(x, self.dropout, training=True) if self.dropout_active else x

    def embed(self, batch):
        """-> x (B, L_t + L_v, D) with text first, and the key mask (B, L_t + L_v); L_t = input_ids.shape[1]."""
        return self.vilt.embeddings(batch["input_ids"], batch["text_mask"], None, batch["image"],
                                    batch["pixel_mask"], None, None)

    @staticmethod
    def attention_bias(mask, dtype):                                # (B, L) -> additive (B, 1, 1, L)
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def block(self, i, x, bias, kv_prefix=None):
        """Layer i, pre-norm: x + Attn(LN(x)), then x + MLP(LN(x)), with the layer's own frozen modules and the
        attention through F.scaled_dot_product_attention (HF's eager ViltSelfAttention materialises the scores).
        bias: additive (B, 1, 1, L) over x's own keys (`attention_bias`). kv_prefix: None or raw (K_p, V_p), each
        (B, P, D), prepended to the keys/values after the frozen key/value projections, split per head like them and
        seen by every query (MAP's attention-level prompts, vision_transformer_prompts.py Attention.forward)."""
        layer = self.vilt.encoder.layer[i]
        attn = layer.attention.attention
        B, L, D = x.shape

        def heads(t):                                               # (B, S, D) -> (B, H, S, D / H)
            return t.view(B, t.shape[1], attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
        h = layer.layernorm_before(x)
        q, k, v = attn.query(h), attn.key(h), attn.value(h)
        if kv_prefix is not None:
            K_p, V_p = kv_prefix
            k, v = torch.cat([K_p.to(k.dtype), k], 1), torch.cat([V_p.to(v.dtype), v], 1)
            bias = torch.cat([bias.new_zeros(*bias.shape[:-1], K_p.shape[1]), bias], -1)   # the prefix: always seen
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias.to(q.dtype))
        x = x + self.drop(layer.attention.output.dense(a.transpose(1, 2).reshape(B, L, D)))
        m = self.drop(layer.intermediate(layer.layernorm_after(x)))     # fc1 + GELU (then timm's Mlp dropout)
        return x + self.drop(layer.output.dense(m))

    def final_norm(self, x):
        return self.vilt.layernorm(x)

    def pooler_copy(self):
        """A trainable copy of ViLT's pooler (MAP, MemPrompt and AOEPT train it; the backbone stays frozen)."""
        pooler = copy.deepcopy(self.vilt.pooler)
        for p in pooler.parameters():
            p.requires_grad_(True)
        return pooler

    def encode(self, batch):
        """Prompt-free forward -> (hidden states after the final norm (B, L, D), key mask (B, L))."""
        x, mask = self.embed(batch)
        bias = self.attention_bias(mask, x.dtype)
        for i in range(self.num_layers):
            x = self.block(i, x, bias)
        return self.final_norm(x), mask


def tiny_clip_config():
    return {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 4}}


def _register_tiny_clip():
    import open_clip
    if "tiny-clip" not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="tiny-clip-") as folder:    # read at once, then removed
            with open(os.path.join(folder, "tiny-clip.json"), "w") as f:
                json.dump(tiny_clip_config(), f)
            open_clip.add_model_config(folder)


@contextlib.contextmanager
def quiet_hub(local_only):
    """No hub retry warnings or library log lines while weights load (a failure ends in one WeightsError message);
    local_only: HF_HUB_OFFLINE=1 semantics for the call (the local cache only, no network)."""
    import logging
    from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or local_only
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        constants.HF_HUB_OFFLINE = offline


def from_cache_then_hub(create, what, error):
    """create() from the local cache first; if that fails and HF_HUB_OFFLINE is not set, one line says a download
    is tried (the hub retries quietly for up to a minute without a network), then create() online."""
    from huggingface_hub import constants
    try:
        with quiet_hub(local_only=True):
            return create()
    except error:
        if constants.HF_HUB_OFFLINE:
            raise
    print(f"{what}: not in the local cache, downloading from the Hugging Face hub (offline? set HF_HUB_OFFLINE=1 "
          f"to stop at once)", flush=True)
    with quiet_hub(local_only=False):
        return create()


def load_clip(model_name=CLIP_DEFAULT, pretrained=CLIP_PRETRAINED_DEFAULT, quick_gelu="auto"):
    """Frozen open_clip model. `pretrained`: a tag ('openai'), a local file, or '' for random init.
    QuickGELU: the tag's own setting (OpenAI weights were trained with it); for a local file 'auto' means on,
    since the papers' weights are OpenAI's. Recorded in every checkpoint."""
    import open_clip
    if model_name == "tiny-clip":
        _register_tiny_clip()
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if quick_gelu == "auto":
        quick = tag_cfg.get("quick_gelu", False) if tag_cfg else bool(pretrained)
    else:
        quick = quick_gelu == "on"
    def create():
        return open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None, force_quick_gelu=quick)
    try:
        model, _, preprocess = from_cache_then_hub(create, f"CLIP weights {model_name}/{pretrained}", RuntimeError)
    except RuntimeError as e:
        if pretrained and not os.path.isfile(pretrained):
            raise WeightsError(
                f"CLIP weights {model_name}/{pretrained} are not cached and cannot be downloaded here. "
                f"On a machine with internet run: python -c \"import open_clip; open_clip.create_model_and_transforms"
                f"('{model_name}', pretrained='{pretrained}')\" (cache: $HF_HOME/hub, default ~/.cache/huggingface/hub), "
                f"copy that cache to this machine, or pass --clip-pretrained /path/to/open_clip_pytorch_model.bin") from e
        raise
    quick_used = model.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    info = {"backbone": "tiny-clip" if model_name == "tiny-clip" else "clip", "model": model_name, "pretrained": pretrained, "quick_gelu": quick_used}
    return FrozenCLIP(model, open_clip.get_tokenizer("ViT-B-16"), preprocess, info)


def tiny_vilt_tokenizer():
    """A BERT WordPiece tokenizer built locally (the real one lives on the hub): lowercase letters as pieces
    plus the toy words, so any ascii text tokenises."""
    from transformers import BertTokenizer
    from data import TOY_FILLERS, TOY_WORDS
    letters = list(string.ascii_lowercase + string.digits)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    words += sorted({w for group in TOY_WORDS for w in group} | set(TOY_FILLERS) - set(words))
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def load_vilt(path=VILT_DEFAULT):
    """Frozen HF ViltModel + its BERT tokenizer, from the hub name or a local folder (save_pretrained layout);
    path 'tiny-vilt' builds the tiny random-initialised configuration."""
    from transformers import BertTokenizer, ViltConfig, ViltModel
    if path == "tiny-vilt":
        tokenizer = tiny_vilt_tokenizer()
        config = ViltConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                            image_size=32, patch_size=8, max_position_embeddings=40, vocab_size=len(tokenizer), initializer_range=0.1)
        torch.manual_seed(0)                                      # init std 0.1: random features that carry the input
        model = ViltModel(config)
        with torch.no_grad():                                     # HF leaves these zero: a padded patch would equal
            for p in model.parameters():                          # the image [CLS]; non-zero, as trained weights are
                if not p.any():
                    p.normal_(0.0, config.initializer_range)
    else:
        def create():
            return ViltModel.from_pretrained(path), BertTokenizer.from_pretrained(path)
        try:
            model, tokenizer = from_cache_then_hub(create, f"ViLT weights '{path}'", OSError)
        except OSError as e:
            raise WeightsError(
                f"ViLT weights '{path}' are not cached and cannot be downloaded here. On a machine with internet run: "
                f"python -c \"from transformers import ViltModel, BertTokenizer; ViltModel.from_pretrained('{path}')"
                f".save_pretrained('vilt'); BertTokenizer.from_pretrained('{path}').save_pretrained('vilt')\" and pass "
                f"--vilt-path vilt (or copy the HF cache, $HF_HOME/hub)") from e
    info = {"backbone": "tiny-vilt" if path == "tiny-vilt" else "vilt", "model": path}
    return FrozenViLT(model, tokenizer, info)


def extend_text_positions(bb, max_len):
    """ViLT's text position table stops at 40 (max_position_embeddings); stretch it to max_len as MAP, MemPrompt and
    AOEPT do: bilinear interpolation of the (1, 1, 40, D) table to (max_len, D), align_corners=False (half-pixel
    centres: position p reads row (p + 0.5) 40 / max_len - 0.5, clamped to the table). The backbone stays frozen."""
    emb = bb.vilt.embeddings.text_embeddings
    old = emb.position_embeddings.weight.data                       # (40, D)
    if max_len == old.shape[0]:
        return
    new = F.interpolate(old[None, None], size=(max_len, old.shape[1]), mode="bilinear", align_corners=False)[0, 0]
    emb.position_embeddings = freeze(nn.Embedding.from_pretrained(new, freeze=True))
    emb.position_ids = torch.arange(max_len, device=old.device)[None]
    emb.token_type_ids = torch.zeros(1, max_len, dtype=torch.long, device=old.device)
    bb.info["max_text_len"] = max_len


def load_backbone(args):
    if args.backbone in ("clip", "tiny-clip"):
        name = "tiny-clip" if args.backbone == "tiny-clip" else args.clip_model
        pretrained = "" if args.backbone == "tiny-clip" else args.clip_pretrained
        return load_clip(name, pretrained, args.clip_quick_gelu)
    bb = load_vilt("tiny-vilt" if args.backbone == "tiny-vilt" else args.vilt_path)
    bb.set_dropout(args.backbone_dropout)
    extend_text_positions(bb, args.max_text_len)
    return bb


# ---------------------------------------------------------------------------------------------------------
# Metrics (numpy). Scores: multiclass (N, C) logits/probs; multilabel (N, C) probabilities; binary (N,) p(1).
# ---------------------------------------------------------------------------------------------------------
def accuracy(labels, scores):
    return float(np.mean(np.asarray(scores).argmax(1) == np.asarray(labels)))


# Multi-label F1 as each official code computes it (a method's --f1 default names its code's definition):
#   torchmetrics-0.9  MAP / MemPrompt pin torchmetrics 0.9.3 (vilt/gadgets/my_metrics.py: f1_score on sigmoid
#                     probabilities): predicted at p >= 0.5; the macro mean leaves out every class with
#                     tp + fp + fn = 0 (absent from labels and predictions).
#   torchmetrics-1    AOEPT (torchmetrics >= 1) and scikit-learn's zero_division=0: predicted at p > 0.5; such a
#                     class counts as 0 in the macro mean.
# Micro, weighted (by support) and samples (a row with no true and no predicted label scores 0) agree in both.
F1_DEFINITIONS = ("torchmetrics-0.9", "torchmetrics-1")


def f1_scores(labels, probs, definition="torchmetrics-0.9"):
    """F1 macro / micro / weighted / samples under `definition` (F1_DEFINITIONS)."""
    if definition not in F1_DEFINITIONS:
        raise ValueError(f"F1 definition {definition!r}: choose one of {F1_DEFINITIONS}")
    y, probs = np.asarray(labels).astype(bool), np.asarray(probs)
    p = probs >= 0.5 if definition == "torchmetrics-0.9" else probs > 0.5
    tp, fp, fn = (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)
    seen = (tp + fp + fn) > 0
    per_class = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=seen)
    macro_classes = seen if definition == "torchmetrics-0.9" else np.ones(len(tp), dtype=bool)
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    row_tp, row_den = (y & p).sum(1), y.sum(1) + p.sum(1)
    samples = np.divide(2 * row_tp, row_den, out=np.zeros(len(row_tp)), where=row_den > 0)
    support = y.sum(0)
    return {"f1_macro": float(per_class[macro_classes].mean()) if macro_classes.any() else 0.0,
            "f1_micro": float(2 * tp.sum() / micro_den) if micro_den > 0 else 0.0,
            "f1_weighted": float((per_class * support).sum() / support.sum()) if support.sum() > 0 else 0.0,
            "f1_samples": float(samples.mean())}


def check_finite(scores):
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"{int((~np.isfinite(scores)).sum())} non-finite scores: the model diverged (lower "
                                 f"--lr, or check the inputs); no metric is computed from them")
    return scores


def auroc(labels, scores):
    """Binary AUROC = P(score_pos > score_neg) + 0.5 P(tie), via average ranks (ties as scikit-learn).
    A split with a single class has no AUROC: returns NaN (as scikit-learn, which also warns)."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group]          # 1-based ranks, a tie group's average
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute_metrics(task, labels, scores, f1="torchmetrics-0.9"):
    """The task's metrics; multi-label: the four F1s under `f1`, and F1-Macro under every definition
    (f1_macro_torchmetrics-0.9, f1_macro_torchmetrics-1). Non-finite scores are refused."""
    scores = check_finite(scores)
    if task == "multiclass":
        return {"accuracy": accuracy(labels, scores)}
    if task == "multilabel":
        return {**f1_scores(labels, scores, f1),
                **{f"f1_macro_{d}": f1_scores(labels, scores, d)["f1_macro"] for d in F1_DEFINITIONS}}
    return {"auroc": auroc(labels, scores), "accuracy": float(np.mean((np.asarray(scores) > 0.5) == np.asarray(labels)))}


def num_outputs(task, num_classes):
    """Binary uses 2 logits with softmax cross-entropy (MAP, Hateful Memes)."""
    return 2 if task == "binary" else num_classes


def task_loss(logits, labels, task):
    """Cross-entropy (Food-101, Hateful Memes: 2 logits), BCE-with-logits over genres (MM-IMDb)."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def scores_from_logits(logits, task):
    if task == "multiclass":
        return logits.float().softmax(-1)
    if task == "multilabel":
        return logits.float().sigmoid()
    return logits.float().softmax(-1)[:, 1]


# ---------------------------------------------------------------------------------------------------------
# Command line (the contract every method file uses)
# ---------------------------------------------------------------------------------------------------------
def build_parser(method, doc, backbone):
    """The shared CLI. Each method adds its `# Method-specific` flags and sets its paper's defaults; `cli` puts those
    in their own group. --help states every default (`HelpFormatter`)."""
    from data import table_seed_arg
    p = Parser(prog=f"{method}.py", description=doc_title(doc), formatter_class=HelpFormatter,
                                epilog="Defaults given per dataset are those of the paper's backbone and the default "
                                       "--missing; --print-config prints the configuration any command line resolves "
                                       "to.")
    p.add_argument("--dataset", default="toy", choices=DATASETS,
                   help="toy sets: synthetic, generated in memory (offline); the others read --data-root")
    p.add_argument("--data-root", default=None, help="default: data/<dataset>")
    p.add_argument("--backbone", default=None, choices=["clip", "vilt", "tiny-clip", "tiny-vilt"],
                   help="the frozen backbone (the paper's); tiny-*: tiny random-initialised, offline")
    p.add_argument("--missing", default="both", choices=["none", "text", "image", "both"],
                   help="missing type of train and validation")
    p.add_argument("--rate", type=float, default=0.7, help="missing rate eta of train and validation")
    p.add_argument("--test-missing", default=None, choices=["none", "text", "image", "both"], help="default: --missing")
    p.add_argument("--test-rate", type=float, default=None, help="default: --rate")
    p.add_argument("--hm-test", default="seen", choices=["seen", "unseen"], help="Hateful Memes dev/test split")
    p.add_argument("--mmimdb-plots", default="all", choices=["all", "first"],
                   help="MM-IMDb: one sample per (movie, plot) as MAP's make_arrow, or per movie with its first plot")
    p.add_argument("--f1", default="torchmetrics-0.9", choices=F1_DEFINITIONS,
                   help="MM-IMDb F1 definition reported as f1_macro (the other is kept as f1_macro_<definition>): "
                        "torchmetrics-0.9 = MAP/MemPrompt's code (p >= 0.5, classes never seen left out of the macro "
                        "mean); torchmetrics-1 = AOEPT's (p > 0.5, such classes count 0)")
    p.add_argument("--food101-split", default="official", metavar="{official,per-class,PATH}",
                   help="Food-101 train/val: official = DATA_ROOT/split.json (MAP, MemPrompt) or DATA_ROOT/valid.csv "
                        "(AOEPT), else refused; PATH = such a file; per-class = this repository's 10%% carve per "
                        "class, seed 0 (differs from every official run)")
    p.add_argument("--table-seed", default=0, type=table_seed_arg,
                   help="seed of the missing tables, independent of --seed (the official tables are fixed files "
                        "shared by every seed and method); 'run' = redraw them with each --seed")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--val-interval", type=float, default=1.0,
                   help="validate every this fraction of an epoch and at its end (MAP, MemPrompt, MuAP: their official "
                        "config.py values)")
    p.add_argument("--batch-size", type=int, default=256, help="effective (global) batch per optimiser step")
    p.add_argument("--micro-batch", type=int, default=32, help="per-process forward batch; accumulation fills the rest")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (after the warm-up)")
    p.add_argument("--weight-decay", type=float, default=2e-2, help="decoupled weight decay (AdamW) / L2 (Adam)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="the optimiser")
    p.add_argument("--decay-exempt", default="bias-norm", choices=["bias-norm", "none"],
                   help="parameters without weight decay: bias-norm = names containing bias / LayerNorm. / norm. / norm1. / "
                        "norm2. (MAP, MemPrompt, DCP); none = every parameter decays (AOEPT)")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="after a linear warm-up")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of all optimiser steps")
    p.add_argument("--warmup-start", default="zero", choices=["zero", "one-step"],
                   help="warm-up lr factor at optimiser step s of W: zero = s / W (HF's polynomial schedule: MAP, "
                        "MemPrompt, DCP); one-step = (s + 1) / W (AOEPT's WarmUpStepLR)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off")
    p.add_argument("--backbone-dropout", type=float, default=0.0,
                   help="dropout inside the frozen ViLT while the method trains (MAP/MemPrompt: drop_rate 0.1); never at "
                        "evaluation. CLIP has none (DCP's CLIP code), so it does not apply there")
    p.add_argument("--max-text-len", type=int, default=None,
                   help="text tokens: CLIP's 77; ViLT's 40-row position table is stretched to the papers' lengths")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and the missing tables")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run once per seed and summarise mean/std (default: one run, with --seed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when a GPU is visible, else cpu; an explicit cuda without one is an error")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype on CUDA")
    p.add_argument("--num-workers", type=int, default=None, help="default: 4 on CUDA, 0 on CPU")
    p.add_argument("--out", default=None, help="run folder (default: runs/<method>-<dataset>-<backbone>-...; "
                                               "--eval-only: <checkpoint folder>/eval-<test missing><test rate>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint without training")
    p.add_argument("--checkpoint", default=None, help="a checkpoint.safetensors written by this method (--eval-only)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --eval-only write into a folder that holds a training run's results")
    p.add_argument("--eval-grid", action="store_true", help="evaluate on every test missing type x rate")
    p.add_argument("--grid-rates", type=float, nargs="+", default=[round(0.1 * k, 1) for k in range(11)],
                   help="test missing rates of --eval-grid")
    p.add_argument("--cache-images", action="store_true",
                   help="decode and resize each split once into a uint8 memory map (per backbone preprocessing)")
    p.add_argument("--image-cache-dir", default=os.path.join("runs", "cache", "images"),
                   help="where --cache-images keeps its files")
    p.add_argument("--nm2i", action="store_true",
                   help="NM2I diagnostic on the test split (AOEPT's; this repository's estimator), CLIP prompt methods")
    p.add_argument("--nm2i-clusters", type=int, default=10, help="k of the k-means discretisation in NM2I")
    p.add_argument("--clip-model", default=CLIP_DEFAULT, help="open_clip model name")
    p.add_argument("--clip-pretrained", default=CLIP_PRETRAINED_DEFAULT, help="open_clip tag or a local weights file")
    p.add_argument("--clip-quick-gelu", default="auto", choices=["auto", "on", "off"],
                   help="QuickGELU activations; auto: the weights' own (on for OpenAI's)")
    p.add_argument("--vilt-path", default=VILT_DEFAULT, help="HF hub name or local folder")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON and exit (nothing is loaded)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/tensorboard (needs the tensorboard package)")
    p.set_defaults(method=method, paper_backbone=backbone)
    for title, dests in OPTION_GROUPS.items():
        move_to_group(p, p.add_argument_group(title), [a for a in p._actions if a.dest in dests])
    p.shared_actions = list(p._actions)                # the rest, added by the method file, get their own group (cli)
    return p


# --help: the shared flags by topic (a flag added to build_parser and not listed here stays under "options").
OPTION_GROUPS = {
    "data and missing protocol": ("dataset", "data_root", "missing", "rate", "test_missing", "test_rate", "hm_test",
                                  "mmimdb_plots", "food101_split", "table_seed", "max_text_len", "cache_images",
                                  "image_cache_dir"),
    "backbone": ("backbone", "clip_model", "clip_pretrained", "clip_quick_gelu", "vilt_path", "backbone_dropout"),
    "optimisation": ("epochs", "val_interval", "batch_size", "micro_batch", "lr", "weight_decay", "optimizer",
                     "decay_exempt", "schedule", "warmup", "warmup_start", "clip_grad", "seed", "seeds"),
    "run and output": ("device", "precision", "num_workers", "out", "resume", "overwrite", "tensorboard",
                       "print_config"),
    "evaluation": ("eval_only", "checkpoint", "f1", "eval_grid", "grid_rates", "nm2i", "nm2i_clusters"),
}


def move_to_group(parser, group, actions):
    """Show `actions` under `group` in --help (argparse keeps each group's list in _group_actions; parsing is
    unaffected)."""
    for action in actions:
        for g in parser._action_groups:
            if action in g._group_actions:
                g._group_actions.remove(action)
        group._group_actions.append(action)


def method_options_group(parser):
    """The flags a method file added after build_parser returned, in a group of their own, listed first."""
    own = [a for a in parser._actions if a not in getattr(parser, "shared_actions", parser._actions)]
    if own and not any(g.title.endswith("-specific options") for g in parser._action_groups):
        group = parser.add_argument_group(f"{parser.get_default('method')}-specific options")
        move_to_group(parser, group, own)
        parser._action_groups.insert(2, parser._action_groups.pop())


def doc_title(doc):
    """A method docstring's first paragraph, as one line (the --help description)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


class HelpFormatter(argparse.HelpFormatter):
    """--help with every default: the flag's value, the per-dataset value a recipe resolves a None / per-dataset
    default to (`resolved`, filled by `Parser.format_help`), or the help's own words where it says 'default'."""

    def __init__(self, prog, resolved=None, **kw):
        super().__init__(prog, max_help_position=32, **kw)
        self.resolved = resolved or {}

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.dest in self.resolved:
            return f"{text} (default: {self.resolved[action.dest]})"
        return f"{text} (default: {show_value(action.default, action)})"


def show_value(value, action=None):
    if isinstance(action, argparse._StoreTrueAction):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value).replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """argparse, with --help resolving the defaults a recipe sets per dataset (`resolved_defaults`)."""

    def _get_formatter(self):
        return self.formatter_class(prog=self.prog, resolved=getattr(self, "_resolved", None))

    def format_help(self):
        self._resolved = resolved_defaults(self)
        try:
            return super().format_help()
        finally:
            self._resolved = None


def resolved_defaults(parser):
    """{dest: text} for each flag whose default is None or per dataset: the value the run would use, per dataset
    (parse_args + finalize_args + the method's own resolution before setup), for the paper's backbone and the
    default --missing."""
    values = {}
    for dataset in DATASETS:
        try:
            args = resolved_config(getattr(parser, "main", None), finalize_args(parser.parse_args(["--dataset", dataset])))
        except (DataError, SystemExit, ValueError):
            continue
        for action in parser._actions:
            if action.default is None or isinstance(action.default, dict):
                values.setdefault(action.dest, {})[dataset] = getattr(args, action.dest, None)
    text = {}
    for dest, per_dataset in values.items():
        groups = {}
        for dataset, value in per_dataset.items():
            groups.setdefault(show_value(value), []).append(dataset)
        if len(groups) == 1:
            text[dest] = next(iter(groups))
        else:
            text[dest] = "; ".join(f"{v} for {', '.join(names)}" for v, names in groups.items()).replace(
                "toy, toy-multilabel, toy-binary", "toy sets")
    return text


# Arguments that may differ between a run and its resumption / evaluation.
RUNTIME_ARGS = {"resume", "device", "num_workers", "out", "eval_only", "checkpoint", "eval_grid", "grid_rates",
                "seeds", "data_root", "test_missing", "test_rate", "micro_batch", "cache_images", "image_cache_dir",
                "cache_dir", "cache_features", "nm2i", "nm2i_clusters", "overwrite"}   # cache_*: AOEPT's, PROMISE's
RUNTIME_ARGS |= {"print_config", "tensorboard"}


def resolve_shared(args):
    """The shared options whose default depends on others (backbone, dataset, the training setting)."""
    args.backbone = args.backbone or args.paper_backbone
    args.data_root = args.data_root or os.path.join("data", args.dataset)
    args.test_missing = args.test_missing or args.missing
    args.test_rate = args.rate if args.test_rate is None else args.test_rate
    if args.max_text_len is None:
        args.max_text_len = 77 if "clip" in args.backbone else VILT_MAX_TEXT_LEN.get(args.dataset, TOY_MAX_TEXT_LEN)
    if isinstance(args.val_interval, dict):                         # a method's official value per dataset, else 1
        args.val_interval = args.val_interval.get(args.dataset, 1.0)
    return args


def finalize_args(args):
    resolve_shared(args)
    if not 0 < args.val_interval <= 1:
        raise DataError(f"--val-interval {args.val_interval}: give a fraction of an epoch in (0, 1] (1 = once per epoch)")
    if args.num_workers is None:
        args.num_workers = 4 if str(args.device).startswith("cuda") else 0
    if args.out is None and args.eval_only:                # never the training run's own folder
        weights = "-last" if os.path.basename(args.checkpoint) == "last.safetensors" else ""
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                f"eval{weights}-{args.test_missing}{args.test_rate}")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.method}-{args.dataset}-{args.backbone}-{args.missing}{args.rate}"
                                        f"-seed{args.seed}{options_suffix(args)}")
    if args.eval_only and not args.overwrite:
        refuse_training_folder(args.out)
    return args


NAMED_IN_OUT = {"method", "dataset", "backbone", "missing", "rate", "seed", "paper_backbone"}


def options_suffix(args):
    """The default run folder's tail: the options that differ from the method's defaults, e.g. '-prompt_type-attention'
    (a short hash of them when they do not fit in 48 characters), so two configurations never share a folder."""
    try:
        defaults = importlib.import_module(args.method).parser().parse_args([])
    except (ImportError, AttributeError, SystemExit):
        return ""
    for k in NAMED_IN_OUT | {"data_root"}:
        setattr(defaults, k, getattr(args, k))
    defaults = vars(resolve_shared(defaults))
    changed = {k: v for k, v in sorted(config_of(args).items())
               if k not in NAMED_IN_OUT | {"data_root"} and k in defaults and v != defaults[k]}
    if not changed:
        return ""
    words = "_".join(f"{k}-{'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in changed.items())
    words = "".join(c if c.isalnum() or c in "._-" else "-" for c in words)
    if len(words) <= 48:
        return "-" + words
    return "-cfg" + hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]


RUN_FILES = ("results.json", "checkpoint.safetensors", "last.safetensors", "predictions_test.csv", "grid.json",
             "grid.csv", "robustness.png", "summary.json")


def refuse_run_folder(out, overwrite):
    """Training never lands silently in a folder that holds a finished or interrupted run: --resume continues it,
    --overwrite replaces it (its run files are removed first), anything else is refused."""
    found = [f for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
    if found and not overwrite:
        raise DataError(f"{out} holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite to replace "
                        f"it, or choose another --out")
    if found and int(os.environ.get("RANK", "0")) == 0:
        for f in found:
            os.remove(os.path.join(out, f))


TRAINING_FILES = ("checkpoint.safetensors", "last.safetensors")


def refuse_training_folder(out):
    """--eval-only writes results.json and predictions_test.csv: never over a training run's own."""
    path = os.path.join(out, "results.json")
    trained = any(os.path.isfile(os.path.join(out, f)) for f in TRAINING_FILES)
    if os.path.isfile(path):
        with open(path) as f:
            trained = trained or not json.load(f).get("eval_only", False)
    if trained:
        raise DataError(f"--eval-only: {out} holds a training run, whose results.json and predictions would be "
                        f"replaced; drop --out (default: a subfolder of the checkpoint's folder named after the "
                        f"test setting), choose another --out, or pass --overwrite")


# ---------------------------------------------------------------------------------------------------------
# Files: checkpoints (written with data.atomic_write)
# ---------------------------------------------------------------------------------------------------------
def method_state(model):
    """Everything the method owns: the model's state minus the frozen backbone (kept under `model.bb`)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("bb.")}


def save_tensors(path, tensors, meta):
    atomic_write(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata={k: json.dumps(v) for k, v in meta.items()}))


def read_checkpoint(path):
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise DataError(f"checkpoint not found: {path} (pass the checkpoint.safetensors of a finished run)")
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(path), meta


def cached_tensors(run, name, key, build):
    """A frozen pass's per-sample tensors, stored like a build artefact: <--cache-dir>/<name>-<digest of key>.safetensors
    is reused while the key stored in it equals `key` (a dict of everything the tensors depend on); otherwise
    build() -> {name: tensor} runs and rank 0 writes the file. Returns (tensors, path, hit). AOEPT's MCP bank and
    PROMISE's feature cache use it."""
    key = json.loads(json.dumps(key))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(run.args.cache_dir, f"{name}-{digest}.safetensors")
    if os.path.isfile(path):
        tensors, meta = read_checkpoint(path)
        if meta.get("key") == key:
            run.log(f"{name}: reusing {path}")
            return tensors, path, True
    tensors = build()
    if run.main:
        save_tensors(path, tensors, {"key": key})
    return tensors, path, False


def checkpoint_meta(run):
    return {"method": run.args.method, "config": config_of(run.args), "backbone": run.bb.info}


def config_of(args):
    return {k: v for k, v in vars(args).items() if k not in RUNTIME_ARGS}


# ---------------------------------------------------------------------------------------------------------
# Run setup: seeding, device, distributed, the splits
# ---------------------------------------------------------------------------------------------------------
class Run:
    """What a method's main needs: args, device, rank/world, the backbone and the three splits."""

    def __init__(self, args):
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
            dist.init_process_group(backend)
        if str(args.device).startswith("cuda") and self.world > 1:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if args.batch_size % self.world:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {self.world} processes; "
                             f"choose a global batch that is")
        self.main = self.rank == 0
        self.stage_index = 0
        self.history = []
        self.started = time.time()

    def log(self, *msg):
        """One line to stdout on rank 0, through tqdm so it never sticks to a progress bar. The first call of a run
        prints the environment header first (`environment_lines`): device, precision, versions, commit, config."""
        if not self.main:
            return
        if not getattr(self, "header_logged", False):
            self.header_logged = True
            for line in environment_lines(self.args):
                tqdm.write(line, file=sys.stdout)
        tqdm.write(" ".join(str(m) for m in msg), file=sys.stdout)
        sys.stdout.flush()


def package_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit():
    """The repository's commit (+ whether tracked files differ from it), or None outside a git checkout."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment_info(args):
    """What ran where, for the log's first lines and results.json: device and its name, precision as run, versions,
    the commit (absent outside a git checkout), processes."""
    import platform
    device = torch.device(args.device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    info = {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "precision": "bf16 autocast" if cuda and args.precision == "bf16" else "fp32",
            "processes": int(os.environ.get("WORLD_SIZE", "1")), "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "open_clip": package_version("open_clip_torch"), "transformers": package_version("transformers")}
    if cuda:
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    info.update(git_commit() or {})
    return info


def environment_lines(args):
    e = environment_info(args)
    memory = f", {e['device_memory_gib']} GiB" if "device_memory_gib" in e else ""
    commit = f"; commit {e['commit'][:12]}{' (modified)' if e['dirty'] else ''}" if "commit" in e else ""
    return [f"device: {e['device']} ({e['device_name']}{memory}), precision {e['precision']}, {e['processes']} "
            f"process(es), {e['cpu_threads']} CPU threads",
            f"versions: python {e['python']}, torch {e['torch']} (CUDA {e['cuda']}), open_clip {e['open_clip']}, "
            f"transformers {e['transformers']}{commit}",
            "config: " + json.dumps(config_of(args), sort_keys=True, default=str)]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(args):
    """Seed, device, datasets, backbone, run folder. Everything a method needs before building its model. The data
    is read and checked (files, fields, every image) before the weights load: bad data fails at once."""
    from data import read_splits, with_image_cache
    run = Run(args)
    if run.main:                                           # before anything is loaded: the folder is ours to write
        if not args.eval_only and not args.resume:
            refuse_run_folder(args.out, args.overwrite)
        claim_folder(args.out)
    seed_everything(args.seed)
    splits = read_splits(args)
    run.bb = load_backbone(args).to(run.device)
    run.train_set, run.val_set, run.test_set = (with_image_cache(args, run.bb, ds) for ds in splits)
    run.task, run.num_classes = run.train_set.task, run.train_set.num_classes
    run.num_outputs = num_outputs(run.task, run.num_classes)
    run.metric = METRIC[run.task]
    run.collate = Collate(run.bb, args.max_text_len, trim_clip_text=True)   # exact: see data.Collate (a method that
                                                                            # needs the padding sets it off)
    run.log(f"{args.method}: {args.dataset} ({run.task}, {len(run.train_set)}/{len(run.val_set)}/{len(run.test_set)}) "
            f"on {args.backbone}, train/val missing {args.missing} {args.rate}, test {args.test_missing} "
            f"{args.test_rate}, out {args.out}")
    return run


def claim_folder(out):
    """Create OUT, check it is writable now (not at the first check after hours of training), and take OUT/.lock:
    a second live run into the same folder is refused; a lock whose process is gone (killed run) is taken over."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-probe-"):
            pass
    except OSError as e:
        raise DataError(f"--out {out} is not writable ({e.strerror}): choose a folder you can write to") from e
    lock = os.path.join(out, ".lock")
    mine = f"{socket.gethostname()} {os.getpid()}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with open(lock) as f:
            host, _, pid = f.read().partition(" ")
        if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            raise DataError(f"{out} is in use by another live run (process {pid}, {lock}): wait for it, or choose "
                            f"another --out") from None
        fd = os.open(lock, os.O_WRONLY | os.O_TRUNC)          # a stale lock (that process is gone), or our own
    with os.fdopen(fd, "w") as f:
        f.write(mine)
    atexit.register(release_folder, lock, mine)


def release_folder(lock, mine):
    with contextlib.suppress(OSError):
        with open(lock) as f:
            if f.read() != mine:
                return
        os.remove(lock)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def count_trainable(model):
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("bb."))


def check_frozen(model):
    """Only the method's own modules train; the backbone is frozen and gets no gradient (asserted before and after
    every epoch, also with --backbone-dropout). Returns the trainable count."""
    assert not any(p.requires_grad or p.grad is not None for p in model.bb.parameters()), "the backbone must be frozen"
    return count_trainable(model)


# ---------------------------------------------------------------------------------------------------------
# Optimiser: precision, weight-decay groups, schedule
# ---------------------------------------------------------------------------------------------------------
def autocast(run):
    if run.device.type == "cuda" and run.args.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fp32_logits(*tensors):
    """Every similarity / contrastive logit (cosine top-k, InfoNCE, prototype scores) is computed in fp32 with autocast
    off: under bf16 autocast a matmul runs in bf16 even on .float() inputs. Yields the tensors cast to fp32 (gradients
    flow through the casts):  with fp32_logits(u, z) as (u, z): logits = u @ z.T"""
    with torch.autocast(tensors[0].device.type, enabled=False):
        yield tuple(t.float() for t in tensors)


# MAP / MemPrompt / DCP set_schedule (vilt/modules/vilt_utils.py): no weight decay for a parameter whose name contains
# one of these. Matched on names, as there: the LayerNorm of an nn.Sequential head ("head.1.weight") is decayed.
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias", "norm1.weight",
            "norm2.bias", "norm2.weight")


def decay_groups(model, args):
    """The trainable parameters in two groups: decayed, and exempt (--decay-exempt bias-norm: the NO_DECAY names;
    none: no exemption, AOEPT's get_optimizer). The official heads' lr_mult is 1 for these tasks: one learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {n for n, _ in named if args.decay_exempt == "bias-norm" and any(k in n for k in NO_DECAY)}
    decayed, exempt = [p for n, p in named if n not in exempt], [p for n, p in named if n in exempt]
    return [g for g in ({"params": decayed, "weight_decay": args.weight_decay}, {"params": exempt, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(model, args):
    """AdamW with MAP's betas (0.9, 0.98) unless a method sets `betas` (AOEPT: torch's), eps 1e-8; or Adam (PROMISE).
    Weight decay by `decay_groups`."""
    if args.optimizer == "adam":
        return torch.optim.Adam(decay_groups(model, args), lr=args.lr)
    return torch.optim.AdamW(decay_groups(model, args), lr=args.lr, betas=tuple(getattr(args, "betas", (0.9, 0.98))),
                             eps=1e-8)


def make_schedule(optimizer, total_steps, args):
    """Linear warm-up over `--warmup` of the steps (W = int(warmup * steps), as MAP's set_schedule), then linear decay
    to 0 (MAP), cosine (AOEPT) or constant. Warm-up factor at step s: s / W or (s + 1) / W (--warmup-start)."""
    warmup = int(args.warmup * total_steps)
    shift = 1 if args.warmup_start == "one-step" else 0

    def factor(step):
        if step < warmup:
            return (step + shift) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0 if args.schedule == "constant" else max(0.0, 1.0 - progress)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------
# Training loop. A method supplies `model(batch) -> dict(logits=(B, C), ...)` and `loss_fn(out, batch)`.
# ---------------------------------------------------------------------------------------------------------
def check_steps(steps, interval):
    """The optimiser steps (1..steps) of an epoch after which fit validates: every max(1, int(interval * steps)) steps
    and at the epoch's end (Lightning's val_check_interval, as MAP, MemPrompt and DCP run it, counts the per-GPU
    micro-batches instead, so it can validate inside an accumulation window: Hateful Memes at 0.11, 11 checks an
    epoch there vs 9 here. A check here always follows a whole optimiser step.)"""
    every = max(1, int(interval * steps))
    return sorted(set(range(every, steps + 1, every)) | {steps})


def train_one_epoch(run, net, loss_fn, optimizer, schedule, params, epoch, epochs=None, stage="train"):
    """One epoch of optimiser steps over global batches, each accumulated from micro-batches; the loss of a
    micro-batch is weighted by its share of the global batch, so the step equals one big-batch step.
    A generator: at each validation check it yields (step, mean loss, seconds, samples) since the previous check.
    It starts where the schedule stands (the schedule counts the steps taken: a run resumed at a mid-epoch check).
    Progress: a bar on a terminal; otherwise (SLURM, nohup) about ten `progress` lines an epoch."""
    args = run.args
    if hasattr(run.train_set, "set_epoch"):                # items that depend on the epoch (PROMISE's views)
        run.train_set.set_epoch(epoch)
    batches = global_batches(len(run.train_set), args.batch_size, args.seed, epoch, min_last=run.world)
    checks, done = check_steps(len(batches), args.val_interval), schedule.last_epoch - epoch * len(batches)
    micro = [rank_micro_batches(b, run.rank, run.world, args.micro_batch) for b in batches[done:]]
    loader = iter(make_loader(run, run.train_set, [m for ms in micro for m in ms]))
    net.train()
    total, samples, t0 = torch.zeros((), device=run.device), 0, time.time()
    name = f"[{stage}] epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")      # as fit's check lines count
    terminal = sys.stderr.isatty()
    bar = tqdm(total=sum(len(b) for b in batches), initial=sum(len(b) for b in batches[:done]), desc=name,
               leave=False, disable=not run.main or not terminal)
    every, seen, tick = max(1, len(batches) // 10), 0, (time.time(), sum(len(b) for b in batches[:done]))
    for step, (batch_ids, micro_ids) in enumerate(zip(batches[done:], micro), done + 1):
        finite = torch.ones((), dtype=torch.bool, device=run.device)
        for k, ids in enumerate(micro_ids):
            batch = to_device(next(loader), run.device)
            last = k == len(micro_ids) - 1
            sync = contextlib.nullcontext() if last or run.world == 1 else net.no_sync()
            with sync:
                with autocast(run):
                    loss = loss_fn(net(batch), batch)
                (loss * (len(ids) * run.world / len(batch_ids))).backward()
            total += loss.detach() * len(ids)
            finite &= torch.isfinite(loss.detach())
            seen += len(ids)
            bar.update(len(ids) * run.world)
        stop_if_not_finite(run, finite, total, epoch, step)
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(batch_ids)
        if run.main and step % every == 0 and step not in checks:      # a check prints its own line
            tick = progress(run, bar, name, step, len(batches), float(total) / seen, lr, tick,
                            sum(len(b) for b in batches[:step]), sum(len(b) for b in batches), terminal)
            tensorboard_log(run, {f"{stage}/train_loss": float(total) / seen, f"{stage}/lr": lr}, schedule.last_epoch)
        if step in checks:
            if run.world > 1:
                dist.all_reduce(total)
            run.step_lr = lr                                        # the lr of the step the check follows
            yield step, float(total) / samples, time.time() - t0, samples
            if run.history and run.history[-1]["checks"]:          # fit recorded the check meanwhile
                check = run.history[-1]["checks"][-1]
                tensorboard_log(run, {f"{stage}/train_loss": check["train_loss"], f"{stage}/lr": lr,
                                      **{f"{stage}/val_{k}": v for k, v in check["val"].items()}}, schedule.last_epoch)
            if step < len(batches):                                 # validation left the model in eval mode
                net.train()
            total, samples, seen, t0 = torch.zeros((), device=run.device), 0, 0, time.time()
            tick = (time.time(), sum(len(b) for b in batches[:step]))
    bar.close()


def stop_if_not_finite(run, finite, total, epoch, step):
    """A non-finite loss on any process stops the run before the optimiser step (all processes agree)."""
    finite = finite.to(torch.int32)
    if run.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise FloatingPointError(
            f"epoch {epoch + 1} step {step}: the training loss is {float(total):.4g} (not finite), training stopped "
            f"before the optimiser step. Lower --lr (now {run.args.lr:g}), set --clip-grad, or check the inputs; "
            f"OUT/last.safetensors holds the last validation check")


def progress(run, bar, name, step, steps, loss, lr, tick, done, size, terminal):
    """Mean loss since the last check and lr on the bar; off a terminal, one log line with samples/s and the epoch's
    ETA over the samples since the previous line. Returns the new (time, samples done) mark."""
    now = time.time()
    rate = (done - tick[1]) / max(now - tick[0], 1e-9)
    if terminal:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    else:
        eta = (size - done) / rate if rate > 0 else float("nan")
        run.log(f"{name} step {step}/{steps}  loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} samples/s  "
                f"epoch ETA {format_seconds(eta)}")
    return now, done


def format_seconds(s):
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def tensorboard_log(run, scalars, step):
    """--tensorboard: scalars into OUT/tensorboard (rank 0; the writer opens at the first call, flushes each)."""
    if not getattr(run.args, "tensorboard", False) or not run.main:
        return
    if getattr(run, "tensorboard", None) is None:
        from torch.utils.tensorboard import SummaryWriter
        run.tensorboard = SummaryWriter(os.path.join(run.args.out, "tensorboard"))
    for tag, value in scalars.items():
        run.tensorboard.add_scalar(tag, value, step)
    run.tensorboard.flush()


def record_check(run, stage, epoch, step, loss, seconds, samples, val):
    """run.history holds one entry per epoch (mean loss so far, the latest check's val) with every check inside."""
    h = run.history[-1] if run.history else {}
    if (h.get("stage"), h.get("epoch")) != (stage, epoch):
        h = {"stage": stage, "epoch": epoch, "train_loss": 0.0, "seconds": 0.0, "samples": 0, "checks": []}
        run.history.append(h)
    h["train_loss"] = (h["train_loss"] * h["samples"] + loss * samples) / (h["samples"] + samples)
    h["seconds"], h["samples"] = h["seconds"] + seconds, h["samples"] + samples
    h["samples_per_s"], h["val"] = h["samples"] / h["seconds"], val
    h["checks"].append({"step": step, "train_loss": loss, "lr": getattr(run, "step_lr", None), "val": val})


def fit(run, model, loss_fn, epochs=None, stage="train"):
    """Train the trainable (requires_grad) parameters; validate with the training missing setting every --val-interval
    of an epoch and at each epoch's end, keep the best check's state on the validation metric (MAP, AOEPT), and write
    OUT/last.safetensors at every check for --resume (which continues from that check).
    Called once per stage (MuAP calls it three times); each call restarts the optimiser and schedule."""
    args = run.args
    run.stage_index += 1
    if args.eval_only:
        return
    epochs = args.epochs if epochs is None else epochs
    params = [p for p in model.parameters() if p.requires_grad]
    run.trainable_params = check_frozen(model)
    run.log(f"[{stage}] trainable parameters: {run.trainable_params:,} (backbone frozen)")
    optimizer = make_optimizer(model, args)
    steps = len(global_batches(len(run.train_set), args.batch_size, 0, 0, min_last=run.world))
    schedule = make_schedule(optimizer, epochs * steps, args)
    net = model
    if run.world > 1:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    best = {"metric": -math.inf, "epoch": -1, "step": 0, "state": method_state(model)}
    start = resume(run, model, optimizer, schedule, best) if args.resume else 0
    if start >= epochs:                                    # resumed past this stage's last epoch
        if best["epoch"] >= 0:                             # its own best was restored: select it, as uninterrupted
            model.load_state_dict(best["state"], strict=False)
            run.best_val = {"stage": stage, "epoch": best["epoch"], "step": best["step"], run.metric: best["metric"]}
        return                                             # (an earlier stage keeps the state resume restored)
    for epoch in range(start, epochs):
        for step, train_loss, seconds, samples in train_one_epoch(run, net, loss_fn, optimizer, schedule, params, epoch,
                                                                   epochs=epochs, stage=stage):
            val = evaluate(run, model, run.val_set)
            score = val[run.metric] if not math.isnan(val[run.metric]) else -math.inf
            if score > best["metric"] or best["epoch"] < 0:
                best.update(metric=score, epoch=epoch, step=step, state=method_state(model))
            record_check(run, stage, epoch, step, train_loss, seconds, samples, val)
            run.log(f"[{stage}] epoch {epoch + 1}/{epochs} step {step}/{steps}  loss {train_loss:.4f}  val {run.metric} "
                    f"{val[run.metric]:.4f}  best {best['metric']:.4f} (epoch {best['epoch'] + 1} step {best['step']})  "
                    f"{seconds:.1f}s")
            save_last(run, model, optimizer, schedule, best, epoch, step == steps)
        check_frozen(model)
    model.load_state_dict(best["state"], strict=False)
    run.best_val = {"stage": stage, "epoch": best["epoch"], "step": best["step"], run.metric: best["metric"]}


# ---------------------------------------------------------------------------------------------------------
# Resume: OUT/last.safetensors holds the method state, the best state, optimiser/schedule state, RNG states
# ---------------------------------------------------------------------------------------------------------
def rng_states(run):
    """Every process's torch (and CUDA) RNG state, gathered to all ranks: {rank: {"torch": t, "cuda": t}}."""
    mine = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(run.device)
    if run.world == 1:
        return {0: mine}
    parts = [None] * run.world
    dist.all_gather_object(parts, mine)
    return dict(enumerate(parts))


def save_last(run, model, optimizer, schedule, best, epoch, epoch_end=True):
    states = rng_states(run)                               # every rank takes part, rank 0 writes
    if not run.main:
        return
    tensors = {f"model.{k}": v for k, v in method_state(model).items()}
    tensors.update({f"best.{k}": v for k, v in best["state"].items()})
    opt = optimizer.state_dict()
    scalars = {}
    for i, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    for rank, state in states.items():                     # each process's own stream (dropout differs per rank)
        tensors.update({f"rng.{name}.{rank}": v for name, v in state.items()})
    meta = {"method": run.args.method, "backbone": run.bb.info, "world": run.world,
            "config": config_of(run.args), "stage_index": run.stage_index, "epoch": epoch, "epoch_end": epoch_end,
            "best": {"metric": best["metric"], "epoch": best["epoch"], "step": best["step"]},
            "param_groups": opt["param_groups"],
            "optim_scalars": scalars, "schedule": schedule.state_dict(), "history": run.history}
    save_tensors(os.path.join(run.args.out, "last.safetensors"), tensors, meta)


def resume(run, model, optimizer, schedule, best):
    """Restore from OUT/last.safetensors (written at a validation check); returns the epoch to start at, the same
    epoch after a mid-epoch check (train_one_epoch continues after it). A different config is refused."""
    path = os.path.join(run.args.out, "last.safetensors")
    if not os.path.isfile(path):
        raise DataError(f"--resume: {path} does not exist; run without --resume first (same --out)")
    tensors, meta = read_checkpoint(path)
    current = json.loads(json.dumps(config_of(run.args)))
    if meta["config"] != current:
        diff = sorted(k for k in set(current) | set(meta["config"]) if current.get(k) != meta["config"].get(k))
        raise DataError(f"--resume: {path} was written by a different configuration (differs in: {', '.join(diff)}); "
                        f"use the same arguments or another --out")
    if meta["stage_index"] < run.stage_index:          # a stage that had not started: keep the earlier stage's best
        return 0
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    if meta["stage_index"] > run.stage_index:          # this stage finished before the interruption
        return 10 ** 9
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for k, v in meta["optim_scalars"].items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    best.update(metric=meta["best"]["metric"], epoch=meta["best"]["epoch"], step=meta["best"]["step"],
                state={k[5:]: v.to(run.device) for k, v in tensors.items() if k.startswith("best.")})
    if meta.get("world", 1) != run.world:
        raise DataError(f"--resume: {path} was written by {meta.get('world', 1)} processes, this run has {run.world}: "
                        f"resume with the same number of processes (each restores its own random stream)")
    torch.set_rng_state(tensors[f"rng.torch.{run.rank}"])
    if f"rng.cuda.{run.rank}" in tensors and run.device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{run.rank}"], run.device)
    run.history = meta["history"]
    run.log(f"resumed from {path} after epoch {meta['epoch'] + 1}, step {schedule.last_epoch} of this stage")
    return meta["epoch"] + (1 if meta["epoch_end"] else 0)


# ---------------------------------------------------------------------------------------------------------
# Evaluation: every sample exactly once across processes, gathered to all ranks before any metric
# ---------------------------------------------------------------------------------------------------------
def gather_rows(run, batches, rows):
    """Per-sample rows (a dict of tensors, first axis = this rank's samples in `batches` order) -> every rank's rows
    in dataset order, on every rank. Used by evaluation and by passes that encode a whole split (AOEPT, PROMISE)."""
    if run.world == 1:
        return rows
    parts = [None] * run.world
    dist.all_gather_object(parts, ([i for b in batches for i in b], {k: v.cpu() for k, v in rows.items()}))
    order = np.argsort(np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]), kind="stable")
    return {k: torch.cat([p[1][k] for p in parts])[torch.from_numpy(order)] for k in rows}


@torch.no_grad()
def predict(run, model, dataset):
    model.eval()
    batches = rank_batches(run, len(dataset))
    scores = []
    for batch in tqdm(make_loader(run, dataset, batches), total=len(batches), leave=False,
                      desc=f"predicting {getattr(dataset, 'split', '')}", disable=not run.main or not sys.stderr.isatty()):
        batch = to_device(batch, run.device)
        with autocast(run):
            logits = model(batch)["logits"]
        scores.append(scores_from_logits(logits, run.task).cpu())
    scores = torch.cat(scores) if scores else torch.zeros(0, *(() if run.task == "binary" else (run.num_outputs,)))
    return gather_rows(run, batches, {"scores": scores})["scores"].numpy()


def evaluate(run, model, dataset, scores=None):
    scores = predict(run, model, dataset) if scores is None else scores
    return compute_metrics(run.task, dataset.labels(), scores, run.args.f1)


def write_predictions(path, dataset, scores, task, class_names):
    """predictions_test.csv: id, missing, then label(s) and score(s) (multiclass: the predicted class and its score)."""
    labels, missing = dataset.labels(), [MISSING_NAMES[int(m)] for m in dataset.missing]
    if task == "multilabel":
        header = ["id", "missing"] + [f"label_{c}" for c in class_names] + [f"score_{c}" for c in class_names]
        rows = [[int(v) for v in labels[i]] + [f"{v:.6f}" for v in scores[i]] for i in range(len(labels))]
    elif task == "binary":
        header = ["id", "missing", "label", "score"]
        rows = [[int(labels[i]), f"{scores[i]:.6f}"] for i in range(len(labels))]
    else:
        header, k = ["id", "missing", "label", "prediction", "score"], scores.argmax(1)
        rows = [[int(labels[i]), int(k[i]), f"{scores[i, k[i]]:.6f}"] for i in range(len(labels))]
    write_csv(path, header, [[sid, m, *row] for sid, m, row in zip(dataset.ids, missing, rows)])


def protocol(run):
    from data import TABLE_SEED_DEFAULT, table_seed
    args = run.args
    splits = {}
    for name, ds in (("train", run.train_set), ("val", run.val_set), ("test", run.test_set)):
        splits[name] = {"size": len(ds), "missing": ds.missing_type, "rate": ds.rate,
                        "counts": table_counts(ds.missing), "table_hash": ds.table_hash,
                        "source": getattr(ds, "source", None)}
    return {"missing": args.missing, "rate": args.rate, "test_missing": args.test_missing,
            "test_rate": args.test_rate, "seed": args.seed, "table_seed": table_seed(args),
            "table_seed_setting": getattr(args, "table_seed", TABLE_SEED_DEFAULT), "splits": splits,
            "f1": f"{args.f1} (F1-Macro as that torchmetrics computes it; both definitions kept in metrics)"
                  if run.task == "multilabel" else None,
            "schedule": f"{args.schedule} after a warm-up of int({args.warmup} x steps) steps from "
                        f"{'s / W' if args.warmup_start == 'zero' else '(s + 1) / W'}",
            "last_batch": "kept (its step averages the loss over its own samples)",
            "val_checks": f"every int({args.val_interval} x steps) optimiser steps and at each epoch's end",
            "selection": "the validation check with the best val metric (first of ties)",
            "recipe": getattr(args, "recipe", None) or "the method file's defaults (its header names each one's source)",
            "dummy_inputs": "missing text -> ''; missing image -> all-ones normalised tensor"}


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finish(run, model, extra=None):
    """Evaluate the selected state on test, write predictions_test.csv, checkpoint.safetensors, results.json
    (and the robustness grid with --eval-grid). Returns the results dict."""
    args = run.args
    if args.eval_only:
        load_checkpoint_into(model, args.checkpoint, run.device)
    run.trainable_params = getattr(run, "trainable_params", None) or count_trainable(model)
    if args.nm2i:
        extra = dict(extra or {}, nm2i=nm2i(run, model, args.nm2i_clusters))
    val = evaluate(run, model, run.val_set)
    scores = predict(run, model, run.test_set)
    test = evaluate(run, model, run.test_set, scores)
    run.log(f"test {run.metric} {test[run.metric]:.4f}  ({args.test_missing} {args.test_rate})")
    epochs = [h for h in run.history if "samples_per_s" in h]
    results = {"method": args.method, "backbone": run.bb.info, "dataset": args.dataset, "task": run.task,
               "metric": run.metric, "protocol": protocol(run), "metrics": {"val": val, "test": test},
               "trainable_params": run.trainable_params, "eval_only": args.eval_only,
               "selected_check": None if args.eval_only else getattr(run, "best_val", None),
               "checkpoint": os.path.abspath(args.checkpoint) if args.eval_only else None,
               "train_samples_per_s": float(np.mean([h["samples_per_s"] for h in epochs])) if epochs else None,
               "wall_time_s": time.time() - run.started, "peak_memory_mb": peak_memory_mb(run.device),
               "history": run.history, "config": config_of(args), "environment": environment_info(args),
               **(extra or {})}
    if run.main:
        write_predictions(os.path.join(args.out, "predictions_test.csv"), run.test_set, scores, run.task,
                          run.test_set.class_names)
        if not args.eval_only:
            save_tensors(os.path.join(args.out, "checkpoint.safetensors"), method_state(model), checkpoint_meta(run))
    if args.eval_grid:
        results["grid"] = eval_grid(run, model)
    if run.main:
        write_json(os.path.join(args.out, "results.json"), results)
    return results


def load_checkpoint_into(model, path, device):
    tensors, meta = read_checkpoint(path)
    if any(k.startswith("model.") for k in tensors) and "stage_index" in meta:      # last.safetensors: its weights
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = set(method_state(model)) - set(tensors)
    if missing:
        raise DataError(f"{path} lacks tensors {sorted(missing)[:3]}...: it was written by another method or config")
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)


# --eval-only: options that choose how the checkpoint is evaluated (the test split, where the weights are, the F1
# definition, the dtype): the command line's value when given, else the checkpoint's. Every other option defines the
# trained model: given with another value than the checkpoint's, it is refused.
EVAL_ARGS = {"hm_test", "mmimdb_plots", "vilt_path", "clip_pretrained", "precision", "f1", "table_seed",
             "food101_split"}


def given_options(parser, argv):
    """The dests the command line sets explicitly (abbreviations and --flag=value included)."""
    bare = copy.deepcopy(parser)
    bare._defaults = {}
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return vars(type(bare).parse_args(bare, argv))             # the class's own parse (a method may wrap its parser's)


def apply_checkpoint_config(args, given):
    """--eval-only: the checkpoint's own config (method, dataset, backbone, method options) is used; runtime arguments
    (data root, test setting, device, out) and EVAL_ARGS come from the command line when given. A flag given with
    another value than the checkpoint's own is refused, never replaced. --checkpoint takes checkpoint.safetensors (the
    best validation check) or last.safetensors (the last check's weights)."""
    if not args.checkpoint:
        raise DataError("--eval-only needs --checkpoint PATH (the checkpoint.safetensors of a training run)")
    _, meta = read_checkpoint(args.checkpoint)
    if "method" not in meta:
        raise DataError(f"{args.checkpoint} records no method: pass a checkpoint.safetensors or last.safetensors "
                        f"written by a run of this repository")
    config = meta.get("config", {})
    if meta.get("method") != args.method:
        raise DataError(f"{args.checkpoint} was trained by {meta.get('method')}.py, not {args.method}.py: "
                        f"evaluate it with {meta.get('method')}.py")
    for k, v in sorted(given.items()):
        if k in config and k not in RUNTIME_ARGS | EVAL_ARGS and json.loads(json.dumps(v)) != config[k]:
            flag = "--" + k.replace("_", "-")
            raise DataError(f"{flag} {v}: {args.checkpoint} was trained with {flag} {config[k]}; --eval-only evaluates "
                            f"the checkpoint as trained: drop {flag} (or pass {config[k]})")
    for k, v in config.items():
        if k not in RUNTIME_ARGS and not (k in EVAL_ARGS and k in given):
            setattr(args, k, v)
    for k in ("test_missing", "test_rate"):
        if k not in given:
            setattr(args, k, config.get(k))


# ---------------------------------------------------------------------------------------------------------
# NM2I, AOEPT's diagnostic (AOEPT paper, its NM2I analysis): the official code has no estimator, so this one is ours;
# any method whose forward returns "prompt_means" {modality: (B, N, D_m)} can be measured with --nm2i.
# k-means (also AOEPT's prototype clustering) and the prompt-free per-layer modality means live here too.
# ---------------------------------------------------------------------------------------------------------
def sq_dists(X, C):                                                 # (n, D), (K, D) -> (n, K)
    return ((X * X).sum(1, keepdim=True) - 2 * X @ C.T + (C * C).sum(1)).clamp_min(0)


def kmeans(X, k, seed, iters=300, init=None):
    """Lloyd's algorithm on X's device, k-means++ seeded by a CPU generator. -> centres (k, D), labels (n,)."""
    if init is None:
        g = torch.Generator().manual_seed(seed)
        chosen = [int(torch.randint(len(X), (1,), generator=g))]
        d2 = sq_dists(X, X[chosen])[:, 0]
        for _ in range(1, k):
            weights = d2.double().cpu()                             # D^2 sampling; uniform if all points coincide
            chosen.append(int(torch.multinomial(weights + (weights.sum() == 0), 1, generator=g)))
            d2 = torch.minimum(d2, sq_dists(X, X[chosen[-1:]])[:, 0])
        init = X[chosen]
    C, labels = init.clone(), None
    for _ in range(iters):
        assign = sq_dists(X, C).argmin(1)                           # nearest centre
        if labels is not None and torch.equal(assign, labels):
            break
        labels = assign
        counts = torch.bincount(labels, minlength=len(C)).to(X.dtype)[:, None]
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        C = torch.where(counts > 0, sums / counts.clamp_min(1), C)  # centre = mean of its members
    return C, labels


def masked_mean(h, mask):                                           # (B, L, D), (B, L) -> (B, D)
    mask = mask.to(h.dtype)[..., None]
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1)


def clip_text_mask(ids):                            # (B, 77) SOT..EOT; ASSUMPTION: text means skip the padding
    return torch.arange(ids.shape[1], device=ids.device)[None] <= ids.argmax(-1, keepdim=True)


@torch.no_grad()
def modality_tokens(bb, batch, depth):
    """Prompt-free pass: mean-pooled tokens of each modality at the input of layers 0..N-1 -> (B, N, D_m)."""
    text, image = [], []
    if bb.kind == "clip":
        x, t, tmask = bb.image_embed(batch["image"]), bb.text_embed(batch["text"]), clip_text_mask(batch["text"])
        for l in range(depth):                                      # l = 0: the embedding output
            x, t = (bb.image_block(l - 1, x), bb.text_block(l - 1, t)) if l else (x, t)
            image.append(x.mean(1))
            text.append(masked_mean(t, tmask))
    else:
        x, mask = bb.embed(batch)                                   # (B, L_t + L_v, D)
        bias, L_t = bb.attention_bias(mask, x.dtype), batch["input_ids"].shape[1]
        for l in range(depth):
            x = bb.block(l - 1, x, bias) if l else x
            text.append(masked_mean(x[:, :L_t], mask[:, :L_t]))
            image.append(masked_mean(x[:, L_t:], mask[:, L_t:]))
    return {"text": torch.stack(text, 1).float(), "image": torch.stack(image, 1).float()}


def normalized_mutual_info(a, b):
    """NMI of two labelings, arithmetic-mean normalisation (numpy; as sklearn's normalized_mutual_info_score)."""
    ua, a = np.unique(a, return_inverse=True)
    ub, b = np.unique(b, return_inverse=True)
    if len(ua) == len(ub) == 1:
        return 1.0
    p = np.zeros((len(ua), len(ub)))
    np.add.at(p, (a, b), 1.0 / len(a))                              # joint distribution
    pa, pb, nz = p.sum(1), p.sum(0), p > 0
    mi = max(0.0, float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()))
    entropy = [-float((q * np.log(q)).sum()) for q in (pa, pb)]
    return mi / max(float(np.mean(entropy)), np.finfo(np.float64).eps)


@torch.no_grad()
def nm2i(run, model, k):
    """Per modality m and layer l, on test samples missing m: NMI of the k-means labels of the pooled instance-aware
    m-prompt and of m's ground-truth latent (prompt-free pass on the real input); the mean over layers."""
    model.eval()
    ds, mb, seed = run.test_set, run.args.micro_batch, run.args.seed
    result = {"estimator": "this repository's estimator (AOEPT's official code has none)", "k": k,
              "text": None, "image": None}
    for m, code in (("text", TEXT_MISSING), ("image", IMAGE_MISSING)):
        rows = np.flatnonzero(ds.missing == code)
        if len(rows) < 2:
            continue
        U, Z = [], []
        for s in range(0, len(rows), mb):
            items = [ds[int(i)] for i in rows[s:s + mb]]
            seen = to_device(run.collate(items), run.device)
            real = to_device(run.collate([{**it, "missing": COMPLETE} for it in items]), run.device)
            with autocast(run):
                out = model(seen)
                if "prompt_means" not in out:
                    raise DataError(f"--nm2i: {run.args.method}.py on {run.args.backbone} has no modality-specific "
                                    f"prompts to measure (run it with a CLIP backbone, or drop --nm2i)")
                U.append(out["prompt_means"][m].float().cpu())          # (b, N, D_m)
                depth = U[-1].shape[1]
                Z.append(modality_tokens(run.bb, real, depth)[m].cpu())  # truth = the input of layer l
        U, Z, kk = torch.cat(U).double(), torch.cat(Z).double(), min(k, len(rows))
        per_layer = [normalized_mutual_info(kmeans(U[:, l], kk, seed)[1].numpy(),
                                            kmeans(Z[:, l], kk, seed)[1].numpy()) for l in range(depth)]
        result[m] = {"per_layer": per_layer, "mean": float(np.mean(per_layer)), "samples": len(rows)}
        run.log(f"NM2I ({m} missing, {len(rows)} test samples): {result[m]['mean']:.4f}")
    return result


# ---------------------------------------------------------------------------------------------------------
# Robustness grid and seeds
# ---------------------------------------------------------------------------------------------------------
def eval_grid(run, model):
    """Test metric for every test missing type and rate (none once, at rate 0): OUT/grid.json, grid.csv and,
    when matplotlib is installed, robustness.png."""
    args, rows = run.args, []
    for missing_type in ("none", "text", "image", "both"):
        for rate in ([0.0] if missing_type == "none" else args.grid_rates):
            ds = load_data(args, run.bb, "test", missing_type, rate)
            metrics = evaluate(run, model, ds)
            rows.append({"missing": missing_type, "rate": rate, **table_counts(ds.missing), **metrics})
            run.log(f"grid {missing_type:5s} {rate:.2f}  {run.metric} {metrics[run.metric]:.4f}")
    if run.main:
        write_json(os.path.join(args.out, "grid.json"), rows)
        write_csv(os.path.join(args.out, "grid.csv"), list(rows[0]), [list(r.values()) for r in rows])
        plot_grid(rows, run.metric, os.path.join(args.out, "robustness.png"), title=grid_title(args))
    return rows


GRID_LABELS = {"text": "text missing", "image": "image missing", "both": "mixed (text or image)"}


def grid_title(args):
    """robustness.png's title: method, dataset, backbone and the training setting."""
    return f"{args.method} on {args.dataset}, {args.backbone}; trained with {args.missing} missing {args.rate:g}"


def pyplot():
    """matplotlib.pyplot (Agg), or None with a one-line note when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot drawn (pip install matplotlib)", flush=True)
        return None
    return plt


def plot_grid(rows, metric, path, title=None):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for missing_type in ("text", "image", "both"):
        sel = [r for r in rows if r["missing"] == missing_type]
        ax.plot([r["rate"] for r in sel], [r[metric] for r in sel], marker="o", label=GRID_LABELS[missing_type])
    ax.set_xlabel("test missing rate")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(title="test samples missing")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def history_rows(history, metric):
    """One row per validation check: stage, epoch (1-based), step, the fractional epoch over all stages (x of the
    curves), train loss since the previous check, lr of the check's step, every validation metric."""
    rows, offset, stage = [], 0.0, None
    for h in history:
        if h["stage"] != stage and rows:                 # a new stage (MuAP) continues the x axis
            offset = rows[-1]["x"]
        stage, steps = h["stage"], max(c["step"] for c in h["checks"])
        for c in h["checks"]:
            rows.append({"stage": h["stage"], "epoch": h["epoch"] + 1, "step": c["step"],
                         "x": offset + h["epoch"] + c["step"] / steps, "train_loss": c["train_loss"],
                         "lr": c.get("lr"), **{f"val_{k}": v for k, v in c["val"].items()}})
    return rows


def write_history(history, metric, out):
    """OUT/history.csv (`history_rows`) and, when matplotlib is installed, OUT/curves.png: train loss, lr and the
    validation metric over epochs."""
    rows = history_rows(history, metric)
    if not rows:
        return
    header = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(os.path.join(out, "history.csv"), header, [[r.get(k) for k in header] for r in rows])
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    x = [r["x"] for r in rows]
    for ax, key, label in zip(axes, ("train_loss", "lr", f"val_{metric}"),
                              ("train loss", "learning rate", f"validation {metric}")):
        ax.plot(x, [float("nan") if r.get(key) is None else r[key] for r in rows], marker=".")
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    atomic_write(os.path.join(out, "curves.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def summarize_seeds(results):
    """mean and sample standard deviation (ddof=1; 0 for one seed) of every val/test metric."""
    out = {}
    for split in ("val", "test"):
        for name in results[0]["metrics"][split]:
            values = np.array([r["metrics"][split][name] for r in results], dtype=float)
            out[f"{split}/{name}"] = {"mean": float(values.mean()),
                                      "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                      "values": values.tolist()}
    return out


def run_seeds(args, main):
    """--seeds: one run per seed in OUT/seed<k>/, then OUT/summary.json with mean and std of every metric."""
    backbone = args.backbone or args.paper_backbone
    base = args.out or os.path.join("runs", f"{args.method}-{args.dataset}-{backbone}-{args.missing}{args.rate}-seeds")
    results = []
    for seed in args.seeds:
        a = copy.deepcopy(args)
        a.seed, a.seeds, a.out = seed, None, os.path.join(base, f"seed{seed}")
        results.append(main(finalize_args(a)))
    summary = {"seeds": args.seeds, "metric": results[0]["metric"], "summary": summarize_seeds(results)}
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(os.path.join(base, "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------------------------------------------
# The papers' numbers (each method file keeps its own as PAPER_NUMBERS, with its provenance) and the summary
# ---------------------------------------------------------------------------------------------------------
# Key: (method, backbone as the source ran it, dataset, train missing, train rate, test missing, test rate, variant).
#   backbone: "vilt" (dandelin/vilt-b32-mlm) or "clip <open_clip model>" with OpenAI weights.
#   variant: None = the method as its paper runs it; else a named configuration (`run_variant`).
#   "avg" as test missing: the mean over test types text / image / both at the test rate (one trained model);
#   "avg" as train and test missing: the mean over three runs whose train = test type is text / image / both.
# Value: the tuple of Paper(value in percent, source, kind, setting, note) that report this configuration; the
# summary compares with the first stated one and lists the others.
#   kind: "paper" (the method's own paper, read in its text), "re-report" (another paper's table),
#         "review" (the paper's number as a public review or summary of it gives it), "issue" (as quoted in a
#         public issue thread of the official code).
#   setting: "stated" (the source gives the missing type and rate) or "inferred" (it gives the number; the
#            setting is this repository's reading, said in the note).
Paper = collections.namedtuple("Paper", "value source kind setting note")
CLIP_B16, CLIP_L14 = "clip ViT-B-16", "clip ViT-L-14"
METHODS = ("map", "muap", "memprompt", "syp", "aoept", "promise")


def paper_table(method, groups):
    """A method file's PAPER_NUMBERS: groups (backbone, variant, source, kind, setting, note, rows), each row
    (dataset, train missing, train rate, test missing, test rate, value) -> {key: (Paper, ...)}."""
    table = {}
    for backbone, variant, source, kind, setting, note, rows in groups:
        for dataset, missing, rate, test_missing, test_rate, value in rows:
            key = (method, backbone, dataset, missing, rate, test_missing, test_rate, variant)
            table[key] = table.get(key, ()) + (Paper(value, source, kind, setting, note),)
    return table


def type_grid(values, rate=0.7):
    """Rows of a train type x test type table (text / image / both, MemPrompt Table 1's layout), per dataset."""
    types = ("text", "image", "both")
    return [(dataset, train, rate, test, rate, v) for dataset, grid in values.items()
            for train, row in zip(types, grid) for test, v in zip(types, row)]


def paper_numbers_of(methods=METHODS):
    """The PAPER_NUMBERS that the method files keep (each its paper's numbers), merged; unknown methods have none."""
    return {k: v for m in methods if m in METHODS for k, v in importlib.import_module(m).PAPER_NUMBERS.items()}


def paper_backbone(info):
    """The backbone a run used, named as PAPER_NUMBERS names them; None for tiny or random-init backbones."""
    if info.get("backbone") == "vilt":
        return "vilt"
    if info.get("backbone") == "clip" and info.get("pretrained"):
        pretrained = str(info["pretrained"])
        if pretrained == "openai" or os.path.isfile(pretrained) or os.sep in pretrained:   # OpenAI weights offline
            return f"clip {info.get('model')}"
    return None


def run_variant(results):
    """Which named configuration of its paper a run is: the method's own `paper_variant` in results.json (SyP),
    MAP's prompt type; None for the rest (the method as its paper runs it)."""
    if "paper_variant" in results:
        return results["paper_variant"]
    if results["method"] == "map":
        return results.get("config", {}).get("prompt_type", "input")
    return None


def paper_numbers(method, backbone, dataset, missing, rate, test_missing, test_rate, variant=None):
    """Every Paper entry for exactly this configuration, the one to compare with first (stated before inferred)."""
    table = paper_numbers_of([method])
    found = table.get((method, backbone, dataset, missing, round(rate, 2), test_missing, round(test_rate, 2), variant), ())
    return sorted(found, key=lambda p: p.setting != "stated")


def paper_number(*config, **kw):
    """The Paper entry to compare this configuration with, or None."""
    return (paper_numbers(*config, **kw) or [None])[0]


def paper_backbones(method, dataset, missing, rate, test_missing, test_rate, variant=None):
    """The backbones under which a source reports this setting (to say why a run gets no comparison)."""
    setting = (method, dataset, missing, round(rate, 2), test_missing, round(test_rate, 2), variant)
    return sorted({k[1] for k in paper_numbers_of([method]) if k[:1] + k[2:] == setting})


def _average_rows(groups):
    """The 'avg' settings the sources report, from the runs: test types text / image / both of one trained setting,
    and train = test type text / image / both at one rate."""
    types, out = ("text", "image", "both"), {}
    means = {k: float(np.mean(v)) for k, v in groups.items()}
    for (method, backbone, dataset, missing, rate, test_missing, test_rate, variant, metric, ev), _ in groups.items():
        if test_rate != rate:
            continue
        per_test = [(method, backbone, dataset, missing, rate, t, rate, variant, metric, ev) for t in types]
        per_run = [(method, backbone, dataset, t, rate, t, rate, variant, metric, ev) for t in types]
        for avg_key, members in (((method, backbone, dataset, missing, rate, "avg", rate, variant, metric, ev), per_test),
                                 ((method, backbone, dataset, "avg", rate, "avg", rate, variant, metric, ev), per_run)):
            if all(m in means for m in members) and paper_backbones(*avg_key[:1], *avg_key[2:8]):
                out[avg_key] = [float(np.mean([means[m] for m in members]))] * min(len(groups[m]) for m in members)
    return out


def summary_rows(folders):
    """One row per setting over run folders (results.json directly inside, or in seed*/ below): mean +- std of the
    headline test metric in percent and, only where the run is the source's configuration (method, backbone,
    dataset, train and test setting, variant), the paper's number, the difference and the number's provenance.
    Averages over missing types that a source reports get their own rows ('avg', std over runs not defined)."""
    groups = {}
    for folder in folders:
        for root, _, files in sorted(os.walk(folder)):
            if "results.json" in files:
                with open(os.path.join(root, "results.json")) as f:
                    r = json.load(f)
                p = r["protocol"]
                evaluation = (r.get("checkpoint") or root) if r.get("eval_only") else None
                key = (r["method"], paper_backbone(r["backbone"]) or r["backbone"]["backbone"], r["dataset"],
                       p["missing"], p["rate"], p["test_missing"], p["test_rate"], run_variant(r), r["metric"],
                       evaluation)                             # an evaluation of a checkpoint is not another run
                groups.setdefault(key, []).append(100 * r["metrics"]["test"][r["metric"]])
    rows = []
    for key, values in sorted({**groups, **_average_rows(groups)}.items(), key=lambda kv: str(kv[0])):
        method, backbone, dataset, missing, rate, test_missing, test_rate, variant, metric, evaluation = key
        papers = paper_numbers(*key[:8])
        paper, mean, averaged = (papers or [None])[0], float(np.mean(values)), "avg" in (missing, test_missing)
        note, others = paper.note if paper else "", paper_backbones(*key[:1], *key[2:8])
        if paper is None and others:
            note = f"no comparison: the source ran {' / '.join(others)}, this run {backbone}"
        for p in papers[1:]:
            note += f"; also {p.value:.2f} ({p.source} [{p.kind}], setting {p.setting})"
        rows.append({"method": method, "backbone": backbone, "variant": variant, "evaluation": evaluation,
                     "dataset": dataset,
                     "train": f"{missing} {rate}", "test": f"{test_missing} {test_rate}", "metric": metric,
                     "runs": len(values), "mean": round(mean, 2),
                     "std": None if averaged or len(values) < 2 else round(float(np.std(values, ddof=1)), 2),
                     "paper": paper.value if paper else None, "diff": round(mean - paper.value, 2) if paper else None,
                     "setting": paper.setting if paper else None, "source": paper.source if paper else None,
                     "kind": paper.kind if paper else None, "note": note})
    return rows


def summary_markdown(rows):
    """The table; an inferred setting is marked with '*' next to the paper's number."""
    lines = ["| method | backbone | variant | dataset | train | test | metric | mean +- std (n) | paper | diff "
             "| source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "-" if r["paper"] is None else f"{r['paper']:.2f}" + ("*" if r["setting"] == "inferred" else "")
        diff = "-" if r["diff"] is None else f"{r['diff']:+.2f}"
        std = f" +- {r['std']:.2f}" if r["std"] is not None else (" +- -" if r["runs"] == 1 and not r["test"].startswith("avg") else "")
        variant = (r["variant"] or "-") + (f" [evaluation of {r['evaluation']}]" if r.get("evaluation") else "")
        source = "; ".join(s for s in (r["source"] and f"{r['source']} [{r['kind']}]", r["note"]) if s) or "-"
        lines.append(f"| {r['method']} | {r['backbone']} | {variant} | {r['dataset']} | {r['train']} | "
                     f"{r['test']} | {r['metric']} | {r['mean']:.2f}{std} ({r['runs']}) | {paper} | {diff} | "
                     f"{source} |")
    if any(r["setting"] == "inferred" for r in rows):
        lines.append("\n\\* the source gives the number but not its missing setting: the setting is this "
                     "repository's reading (see the source column).")
    return "\n".join(lines)


class _Resolved(Exception):
    """Raised by `resolved_config`'s stand-in for setup, carrying main's arguments."""


def resolved_config(main, args):
    """The arguments `main` runs with: what its code before `setup` resolves (MemPrompt's per-dataset defaults, MuAP's
    stage epochs) applied to args, with nothing loaded (setup is replaced by a stop for the call)."""
    scope = getattr(main, "__globals__", {})
    if scope.get("setup") is not setup:
        return args
    def stop(a):
        raise _Resolved(a)
    scope["setup"] = stop
    try:
        main(args)
    except _Resolved as stopped:
        return stopped.args[0]
    finally:
        scope["setup"] = setup
    return args


def check_device(args):
    """An explicit --device cuda on a machine whose CUDA torch cannot see is an error, never a CPU fallback."""
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here (built for CUDA "
                        f"{torch.version.cuda or 'none: a CPU-only build'}; CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): fix the driver / install, or pass "
                        f"--device cpu")


def check_tensorboard(args):
    if getattr(args, "tensorboard", False):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise DataError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop "
                            "--tensorboard)") from None


def write_run_records(results, args):
    """After a training run (rank 0): OUT/history.csv, one row per validation check, and curves.png."""
    if int(os.environ.get("RANK", "0")) == 0 and not args.eval_only and results.get("history"):
        write_history(results["history"], results["metric"], args.out)


def cli(parser, main, argv=None):
    """Entry point of every method file: parse, apply --eval-only's checkpoint config, --print-config, --seeds, run,
    then the history CSV and curves."""
    argv = sys.argv[1:] if argv is None else argv
    parser.main = main                                  # --help resolves per-dataset defaults through main
    method_options_group(parser)
    args = parser.parse_args(argv)

    def run(a):
        results = main(a)
        write_run_records(results, a)
        return results
    try:
        check_device(args)
        check_tensorboard(args)
        if args.eval_only:
            apply_checkpoint_config(args, given_options(parser, argv))
        if args.print_config:
            config = vars(resolved_config(main, finalize_args(copy.deepcopy(args))))
            print(json.dumps(config, indent=1, sort_keys=True, default=str))
            return config
        if args.seeds:
            return run_seeds(args, run)
        args = finalize_args(args)
        return run(args)
    except (DataError, WeightsError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    # python common.py summarize RUN_FOLDER... [--csv FILE]: one table of every run below the folders.
    cmd = argparse.ArgumentParser(prog="common.py", description="Summarise run folders next to the papers' numbers")
    cmd.add_argument("command", choices=["summarize"])
    cmd.add_argument("folders", nargs="+")
    cmd.add_argument("--csv", default=None, help="also write the table as CSV")
    opts = cmd.parse_args()
    table = summary_rows(opts.folders)
    print(summary_markdown(table))
    if opts.csv and table:
        write_csv(opts.csv, list(table[0]), [list(r.values()) for r in table])
