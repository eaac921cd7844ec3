"""Speed and memory of every method against the frozen backbone's floors, the official measurements'
configurations (presets), a one-command GPU check, and image loading with and without the uint8 image cache.
Not a test: pytest collects test_*.py only (tests/test_benchmark.py runs the GPU check's tiny CPU configuration).

Real-size open_clip ViT-B-16 (QuickGELU) and HF ViltModel(ViltConfig()), random weights (cost does not depend on them);
synthetic batches of the real shapes, missing codes 0/1/2 in turn with data.Collate's dummy inputs, 101 classes.
Each method is built by its own file's classes with its parser's paper defaults (--dataset food101). In one process,
per method x backbone, after the warm-ups, the median over the repeats, method and references interleaved per round:
    train    forward, the method's own loss, backward, its optimiser's step (and --clip-grad)
    infer    no_grad forward, eval mode
    floors   (a) inference: bb.encode. (b) training: one learnable vector added to the layer-0 input of each stream,
             a linear head, the task loss, the method's optimiser. (c) token-matched: (b) with as many plain learnable
             tokens in front of each layer's sequence as the method has there (forward pre-hooks on the library's
             blocks during one method forward), for training and inference.
    memory   one training step: CUDA max_memory_allocated; CPU the peak sampled RSS minus the RSS at its start.
Variants: map-attn (MAP's attention-level prompts); muap is a step with both prompts trainable, muap-align the
alignment stage (the teachers' logits looked up: muap.py computes them once per stage, one pass over train, not
timed here). PROMISE runs its encoder path (no --cache-features): batches carry aug_* copies.

--preset NAME: the configuration at which an official implementation was measured (PRESETS: its text length, image
size, prompt sizes, task, batch 4, 2 threads, 2 warm-ups, median of 5), our ratios printed next to the official ones.
--preset real-lengths: per dataset, MAP (MemPrompt pads alike) and AOEPT on ViLT, our training step on batches padded
to their longest text (data.Collate), whose lengths are drawn from ASSUMED_LENGTHS (stated, printed) or the train
split's tokenised texts (--lengths-from), against the training floor (b) on the same rows padded to the official
length (padding="max_length": MAP/MemPrompt 512 / 1024 / 128, AOEPT 40 / 77 / 40): text tokens per step and the ratio.
--gpu-check: every method x backbone x dataset size, a few bf16 training and inference steps; checks finite losses
and logits and an unchanged frozen backbone; prints step times, samples/s, peak memory, ratios to the floors,
host-device syncs per step (CUDA: torch.cuda.set_sync_debug_mode) and a 20-epoch Food-101 wall-time estimate.
Exit status 1 if a check fails. On CPU it runs tiny backbones at tiny sizes (--size tiny), as the test suite does.

Usage:
    python tests/benchmark.py                                 # GPU: batch 32, bf16, every method, both backbones
    python tests/benchmark.py --quick --threads 2             # CPU: batch 2, 1 warm-up, median of 3, no variants
    python tests/benchmark.py --quick --methods map,aoept --backbones clip --out runs/benchmark.json
    python tests/benchmark.py --preset all                    # CPU: the official measurements' configurations
    python tests/benchmark.py --preset map-hatememes --quick  # 1 warm-up, median of 3
    python tests/benchmark.py --preset real-lengths           # + --lengths-from food101=ROOT mmimdb=ROOT ...
    python tests/benchmark.py --device cuda --gpu-check       # real sizes, bf16, batch 32; --datasets to restrict
    python tests/benchmark.py --images                        # images/s: JPEG decode + preprocess vs the cache
    python tests/benchmark.py --sdpa --text-len 512 --batch-size 4 --threads 2 --warmup 1 --repeats 5 [--profile 15]
                                                              # ViLT floor (b): bb.block (SDPA) vs HF's eager layer
"""
import argparse
import contextlib
import ctypes
import importlib
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
from data import IMAGE_MISSING, TEXT_MISSING, MMDataset  # noqa: E402

NUM_CLASSES, TASK = 101, "multiclass"
METHODS = ("map", "map-attn", "muap", "muap-align", "memprompt", "syp", "aoept", "promise")
ROW_KEYS = ("method", "backbone", "train_s", "infer_s", "train_ratio_floor", "train_ratio_token_floor",
            "infer_ratio_floor", "infer_ratio_token_floor", "peak_mem_ratio_floor", "trainable_params")

# The official implementations' CPU measurements (2 threads, batch 4, random-init real-size backbones, 2 warm-ups,
# median of 5, method and floor interleaved), training and inference step / floor, and the configuration of each:
# MAP's Hateful Memes config (YiLunLee/missing_aware_prompts @9aa5381, config.py: max_text_len 128, 384 images,
# prompt_length 16, prompt_layers 0-5); AOEPT's MM-IMDb text-missing configs (Jian-Lang/AOEPT @b312905,
# core/model/AOEPT/AOEPT_{CLIP,ViLT}_MMIMDB_text.yaml: L 12 / 8 prompt tokens, depth 4 / 6, seq_len 77; the cluster
# files hold K = 128 / 256 prototypes). Both AOEPT configs also train L shared prompt tokens (use_shared_prompt, on
# by default there), which aoept.py does not have: its towers carry L prompt tokens where the official carry 2 L.
PRESETS = {
    "map-hatememes": {
        "method": "map", "backbone": "vilt", "text_len": 128, "image": (384, 384), "outputs": 2, "task": "binary",
        "missing": "both", "argv": ["--dataset", "hatememes", "--prompt-type", "input", "--prompt-length", "16",
                                    "--prompt-depth", "6"],
        "config": "ViLT, text 128, 384x384, input prompts 16 x 6 layers", "official": ("1.34-1.38", "1.31-1.33")},
    "aoept-clip-mmimdb-text": {
        "method": "aoept", "backbone": "clip", "text_len": 77, "image": (224, 224), "outputs": 23,
        "task": "multilabel", "missing": "text",
        "argv": ["--dataset", "mmimdb", "--missing", "text", "--prompt-length", "12", "--prompt-depth", "4",
                 "--clusters", "128"],
        "config": "CLIP ViT-B/16, text 77, 224x224, M 12 x 4 layers, K 128", "official": ("1.22-1.23", "1.19-1.22")},
    "aoept-vilt-mmimdb-text": {
        "method": "aoept", "backbone": "vilt", "text_len": 77, "image": (384, 384), "outputs": 23,
        "task": "multilabel", "missing": "text",
        "argv": ["--dataset", "mmimdb", "--missing", "text", "--prompt-length", "8", "--prompt-depth", "6",
                 "--clusters", "256"],
        "config": "ViLT, text 77, 384x384, M 8 x 6 layers, K 256", "official": ("1.12", "1.08-1.11")},
}
MISSING_CODES = {"both": (0, TEXT_MISSING, IMAGE_MISSING), "text": (TEXT_MISSING, 0), "image": (IMAGE_MISSING, 0)}

# GPU check sizes: dataset -> (ViLT text tokens (data.VILT_MAX_TEXT_LEN), outputs, task). CLIP: 77 tokens at 224;
# ViLT: the largest image the pixelbert resize makes (384 x 640). Tiny: tiny-clip / tiny-vilt at their own sizes.
CHECK_DATASETS = {"food101": (data.VILT_MAX_TEXT_LEN["food101"], 101, "multiclass"),
                  "hatememes": (data.VILT_MAX_TEXT_LEN["hatememes"], 2, "binary"),
                  "mmimdb": (data.VILT_MAX_TEXT_LEN["mmimdb"], 23, "multilabel")}
REAL_SIZES = {"vilt_image": (384, 640), "tiny_text": 40, "tiny_vilt_image": (32, 48)}
# UPMC Food-101 split sizes (data.py): 67,988 official train rows less 16 without a title, floor(10%) of each class to
# validation; test 22,716. About: the estimate needs no more.
FOOD101_SIZES = {"train": 61_200, "val": 6_800, "test": 22_716}
EPOCHS = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 32; 2 with --quick; 4 with --preset")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="bf16 = autocast; default bf16 on CUDA")
    p.add_argument("--methods", nargs="+", default=None, help=f"of {', '.join(METHODS)} (or a,b); --quick: no variants")
    p.add_argument("--backbones", nargs="+", default=["clip", "vilt"], choices=["clip", "vilt"])
    p.add_argument("--text-len", type=int, default=40, help="L_t of the ViLT batches (positions extended past 40)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2 with --preset)")
    p.add_argument("--warmup", type=int, default=None, help="default 2; 1 with --quick or --gpu-check")
    p.add_argument("--repeats", type=int, default=None, help="default 5; 3 with --quick or --gpu-check")
    p.add_argument("--quick", action="store_true", help="CPU-sized: batch 2, 1 warm-up, median of 3, no variants")
    p.add_argument("--preset", default=None, choices=list(PRESETS) + ["all", "real-lengths"],
                   help="an official measurement's configuration (batch 4, 2 threads, 2 warm-ups, median of 5); "
                        "real-lengths: ViLT at drawn text lengths against the floor padded to the official length")
    p.add_argument("--lengths-from", nargs="+", default=[], metavar="[DATASET=]ROOT",
                   help="real-lengths: tokenise the train split under ROOT (DATASET=ROOT per dataset; a bare ROOT "
                        "with one --datasets) instead of the assumed distribution")
    p.add_argument("--tokenizer", default=common.VILT_DEFAULT, help="--lengths-from: the ViLT (BERT) tokenizer")
    p.add_argument("--lengths-sample", type=int, default=5000, help="--lengths-from: texts tokenised per dataset")
    p.add_argument("--gpu-check", action="store_true", help="every method x backbone x dataset: checks and timings")
    p.add_argument("--datasets", nargs="+", default=list(CHECK_DATASETS), choices=list(CHECK_DATASETS),
                   help="--gpu-check: the datasets whose sizes are run")
    p.add_argument("--size", default=None, choices=["real", "tiny"],
                   help="backbones and inputs (default: real on CUDA, tiny on CPU for --gpu-check, real otherwise)")
    p.add_argument("--images", action="store_true", help="only the image-loading benchmark")
    p.add_argument("--sdpa", action="store_true", help="only the ViLT training floor: SDPA block vs HF eager ViltLayer")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="--sdpa: also profile one training step of each (torch.profiler), the top ROWS operators")
    p.add_argument("--num-images", type=int, default=300, help="generated JPEGs for --images")
    p.add_argument("--out", default=None, help="also write the results as JSON (atomically)")
    args = p.parse_args(argv)
    args.methods = [m for a in args.methods for m in a.split(",") if m] if args.methods else \
        [m for m in METHODS if not (args.quick and "-" in m)]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; use any of {', '.join(METHODS)}")
    short, cuda = args.quick or args.gpu_check, args.device.startswith("cuda")
    args.batch_size = args.batch_size or (4 if args.preset or (args.gpu_check and not cuda) else 2 if args.quick else 32)
    args.warmup = (1 if short else 2) if args.warmup is None else args.warmup
    args.repeats = args.repeats or (3 if short else 5)
    args.threads = args.threads or (2 if args.preset else None)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.size = args.size or ("tiny" if args.gpu_check and not cuda else "real")
    args.lengths_from = lengths_roots(p, args.lengths_from, args.datasets)
    return args


def lengths_roots(p, given, datasets):
    """--lengths-from -> {dataset: root}; a bare ROOT names the one dataset of --datasets."""
    roots = {}
    for item in given:
        name, sep, root = item.partition("=")
        if not sep:
            if len(datasets) != 1:
                p.error(f"--lengths-from {item}: name the dataset (food101=ROOT ...) or pass one --datasets")
            name, root = datasets[0], item
        if name not in CHECK_DATASETS:
            p.error(f"--lengths-from {item}: unknown dataset {name!r}; use one of {', '.join(CHECK_DATASETS)}")
        roots[name] = root
    return roots


# ---------------------------------------------------------------------------------------------------------
# Backbones, batches, methods
# ---------------------------------------------------------------------------------------------------------
def build_backbone(name, text_len, size="real", clip_model="ViT-B-16"):
    """Random-init real-size backbone (ViLT positions extended to text_len), or tiny-clip / tiny-vilt."""
    if size == "tiny":
        bb = common.load_clip("tiny-clip", "") if name == "clip" else common.load_vilt("tiny-vilt")
        if name == "vilt":
            common.extend_text_positions(bb, text_len)
        return bb
    if name == "clip":
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms(clip_model, pretrained=None, force_quick_gelu=True)
        info = {"backbone": "clip", "model": clip_model, "pretrained": "", "quick_gelu": True}
        return common.FrozenCLIP(model, open_clip.get_tokenizer(clip_model), preprocess, info)
    from transformers import ViltConfig, ViltModel
    bb = common.FrozenViLT(ViltModel(ViltConfig()), common.tiny_vilt_tokenizer(), {"backbone": "vilt", "model": "random"})
    common.extend_text_positions(bb, text_len)
    return bb


def synthetic_batch(bb, B, text_len, device, image=None, outputs=NUM_CLASSES, task=TASK, missing="both",
                    words=None):
    """Missing codes in turn (both: 0, 1, 2) with the dummy inputs ('' and an all-ones image), texts of varied
    length (words: the tokens between the ends of each row, else 8 + 13 k mod 30), padding to text_len.
    image: ViLT (H, W), default S x S; CLIP always its own size. Labels of the task."""
    g = torch.Generator().manual_seed(0)
    codes = MISSING_CODES[missing]
    missing = torch.tensor([codes[k % len(codes)] for k in range(B)])
    words = words or [8 + 13 * k % 30 for k in range(B)]
    lengths = [0 if missing[k] == TEXT_MISSING else words[k] for k in range(B)]   # words between the ends
    if task == "multilabel":
        label = (torch.rand(B, outputs, generator=g) < 0.2).float()
    else:
        label = torch.randint(outputs, (B,), generator=g)
    batch = {"missing": missing, "label": label}
    if bb.kind == "clip":
        ids = torch.zeros(B, 77, dtype=torch.long)                  # SOT words EOT, then zeros
        for k, n in enumerate(lengths):
            ids[k, 0], ids[k, 1:n + 1], ids[k, n + 1] = 49406, torch.randint(1, 49406, (n,), generator=g), 49407
        batch.update(text=ids, image=torch.randn(B, 3, bb.image_size, bb.image_size, generator=g))
    else:
        tok, (H, W) = bb.tokenizer, image or (bb.shorter, bb.shorter)
        ids = torch.randint(len(tok.all_special_ids), bb.vilt.config.vocab_size, (B, text_len), generator=g)
        mask = torch.zeros(B, text_len, dtype=torch.long)
        for k, n in enumerate(lengths):
            n = min(n, text_len - 2)
            ids[k, 0], ids[k, n + 1], ids[k, n + 2:], mask[k, :n + 2] = tok.cls_token_id, tok.sep_token_id, 0, 1
        batch.update(input_ids=ids, text_mask=mask, image=torch.randn(B, 3, H, W, generator=g),
                     pixel_mask=torch.ones(B, H, W, dtype=torch.long))
    batch["image"][missing == IMAGE_MISSING] = 1.0
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["ids"] = [f"sample-{k}" for k in range(B)]                # sample ids, as data.Collate gives them
    return {**batch, **{f"aug_{k}": v for k, v in batch.items()}}  # PROMISE's augmented view; others ignore it


def method_args(name, argv=("--dataset", "food101")):
    mod = importlib.import_module(name.split("-")[0])
    return mod, mod.parser().parse_args(list(argv) + (["--prompt-type", "attention"] if name == "map-attn" else []))


def build_method(name, bb, device, batch, argv=("--dataset", "food101"), outputs=NUM_CLASSES, task=TASK):
    """-> (model on device, loss_fn(out, batch), the method's args), through the method file's own classes; the
    method's defaults for bb's kind (AOEPT's recipe differs between CLIP and ViLT) unless argv names --backbone."""
    argv = list(argv) + ([] if "--backbone" in argv else ["--backbone", bb.kind])
    mod, a = method_args(name, argv)
    kind = mod.__name__

    def task_loss(out, batch):
        return common.task_loss(out["logits"], batch["label"], task)
    if kind == "map":
        return mod.MAP(bb, outputs, a.prompt_type, a.prompt_length, a.prompt_depth).to(device), task_loss, a
    if kind == "muap":
        model = mod.MuAP(bb, outputs, a.fusion, a.prompt_length, a.prompt_depth, a.head_combine).to(device)
        mod.set_stage(model, text=True, image=True)
        if name != "muap-align":
            return model, task_loss, a
        with torch.no_grad():                                       # the teachers' logits, computed once per stage
            y_t, y_v = (mod.snapshot(model)(batch)["logits"].float() for _ in range(2))
        model.teachers = mod.TeacherTable(batch["ids"], y_t, y_v)
        return model, lambda out, batch: mod.alignment_loss(out, batch["label"], task, a.lambda_t, a.lambda_v), a
    if kind == "memprompt":
        a = mod.resolve_defaults(a)
        return mod.MemPrompt(bb, outputs, a.prompt_length, a.memory_size, a.top_n, a.prompt_depth, a.placement,
                             a.softmax_over, a.query_pad, a.gen_layers, a.shared_layers).to(device), task_loss, a
    if kind == "syp":
        return mod.SyP(bb, outputs, a.prompt_length, a.prompt_depth, a.reduction, dynamic=not a.no_dynamic,
                       static=not a.no_static, adapter=not a.no_adapter).to(device), task_loss, a
    if kind == "aoept":
        depth = min(a.prompt_depth, bb.num_layers)
        D_t, D_v = (bb.width_text, bb.width_image) if bb.kind == "clip" else (bb.width, bb.width)
        bank = {"text": torch.randn(depth, a.clusters, D_t), "image": torch.randn(depth, a.clusters, D_v)}  # K-means'
        return mod.AOEPT(bb, bank, outputs, a, depth).to(device), mod.make_loss(a.cr_weight, task), a
    if kind == "promise":
        return mod.PROMISE(bb, outputs, a).to(device), lambda out, batch: mod.promise_loss(out, batch, task, a), a
    raise ValueError(f"unknown method {name}; use one of {METHODS}")


# ---------------------------------------------------------------------------------------------------------
# Floors: the frozen backbone, one learnable vector per stream, plain learnable tokens per layer, a linear head
# ---------------------------------------------------------------------------------------------------------
def streams(bb):
    """{stream: (width, one module per layer that receives the layer's input first)}: CLIP's blocks; ViLT's
    layernorm_before (FrozenViLT.block runs the layer's submodules through SDPA, never the ViltLayer itself)."""
    if bb.kind == "clip":
        return {"image": (bb.width_image, bb.model.visual.transformer.resblocks),
                "text": (bb.width_text, bb.model.transformer.resblocks)}
    return {"joint": (bb.width, [layer.layernorm_before for layer in bb.vilt.encoder.layer])}


@torch.no_grad()
def sequence_lengths(forward, bb, batch):
    """{stream: [longest sequence entering block i during forward(batch)]}."""
    lengths = {s: [0] * bb.num_layers for s in streams(bb)}

    def hook(s, i):
        def record(module, inputs):
            lengths[s][i] = max(lengths[s][i], inputs[0].shape[1])
        return record
    handles = [block.register_forward_pre_hook(hook(s, i)) for s, (_, blocks) in streams(bb).items()
               for i, block in enumerate(blocks)]
    try:
        forward(batch)
    finally:
        for h in handles:
            h.remove()
    return lengths


def extra_tokens(model, bb, batch):
    """{stream: [tokens the method adds in front of layer i]}; >= 0 (PROMISE's ViLT passes are one modality each)."""
    model.eval()
    method, base = sequence_lengths(model, bb, batch), sequence_lengths(bb.encode, bb, batch)
    return {s: [max(0, m - b) for m, b in zip(method[s], base[s])] for s in method}


class Floor(nn.Module):
    """(b) with extra=None, (c) otherwise: extra[s][i] learnable tokens in front of stream s at layer i, new ones
    prepended where the count grows, the oldest dropped where it shrinks."""

    def __init__(self, bb, num_outputs, extra=None):
        super().__init__()
        self.bb, widths = bb, {s: D for s, (D, _) in streams(bb).items()}
        self.extra = extra or {s: [0] * bb.num_layers for s in widths}
        self.v0 = nn.ParameterDict({s: nn.Parameter(torch.zeros(D)) for s, D in widths.items()})   # (D,)
        self.tokens = nn.ParameterDict()                            # f"{stream}{layer}": (new tokens, D)
        for s, counts in self.extra.items():
            for i, (before, n) in enumerate(zip([0] + counts[:-1], counts)):
                if n > before:
                    self.tokens[f"{s}{i}"] = nn.Parameter(0.02 * torch.randn(n - before, widths[s]))
        self.head = nn.Linear(2 * bb.embed_dim if bb.kind == "clip" else bb.width, num_outputs)

    def grow(self, s, i, x):                                        # (B, L + extra[i-1], D) -> (B, L + extra[i], D)
        n, before = self.extra[s][i], self.extra[s][i - 1] if i else 0
        if n > before:
            return torch.cat([self.tokens[f"{s}{i}"].to(x.dtype).expand(len(x), -1, -1), x], 1)
        return x[:, before - n:]

    def forward(self, batch):
        bb = self.bb
        if bb.kind == "clip":
            x, t = bb.image_embed(batch["image"]), bb.text_embed(batch["text"])     # (B, L_v, D_v), (B, 77, D_t)
            x, t = x + self.v0["image"].to(x.dtype), t + self.v0["text"].to(t.dtype)
            for i in range(bb.num_layers):
                x, t = bb.image_block(i, self.grow("image", i, x)), bb.text_block(i, self.grow("text", i, t))
            n_v, n_t = self.extra["image"][-1], self.extra["text"][-1]
            return {"logits": self.head(torch.cat([bb.image_pool(x, n_v), bb.text_pool(t, batch["text"], n_t)], -1))}
        x, mask = bb.embed(batch)                                   # (B, L_t + L_v, D)
        x, biases = x + self.v0["joint"].to(x.dtype), {}
        for i, n in enumerate(self.extra["joint"]):
            if n not in biases:                                     # once per distinct length
                biases[n] = bb.attention_bias(torch.cat([mask.new_ones(len(x), n), mask], 1), x.dtype)
            x = bb.block(i, self.grow("joint", i, x), biases[n])
        return {"logits": self.head(bb.final_norm(x)[:, self.extra["joint"][-1]])}   # text [CLS]


# ---------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------
def trainer(model, loss_fn, margs, batch, precision):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.make_optimizer(model, margs)

    def step():
        model.train()
        with precision():
            loss = loss_fn(model(batch), batch)
        loss.backward()
        if margs.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, margs.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def inferer(forward, batch, precision):
    @torch.no_grad()
    def step():
        if isinstance(forward, nn.Module):
            forward.eval()
        with precision():
            return forward(batch)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(calls, device, warmup, repeats):
    """calls {name: fn}, each run once per round, interleaved -> {name: median seconds of the rounds after warm-up}."""
    times = [{k: seconds(fn, device) for k, fn in calls.items()} for _ in range(warmup + repeats)][warmup:]
    return {k: statistics.median(r[k] for r in times) for k in calls}


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device):
    """Bytes. CUDA: max_memory_allocated during fn. CPU: peak RSS (sampled every 0.5 ms) minus the RSS at the start,
    with glibc serving blocks >= 64 KiB by mmap meanwhile, so that a free lowers the RSS (32 MiB again after)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        seconds(fn, device)
        return torch.cuda.max_memory_allocated(device)
    libc, M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = ctypes.CDLL(None), -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 10)
    libc.malloc_trim(0)
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    return max(peak[0], rss()) - start


def precision_of(args, device):
    if args.dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def benchmark(name, bb, batch, args, device, argv=("--dataset", "food101"), outputs=NUM_CLASSES, task=TASK):
    precision = precision_of(args, device)
    model, loss_fn, margs = build_method(name, bb, device, batch, argv, outputs, task)
    extra = extra_tokens(model, bb, batch)
    floor, token_floor = Floor(bb, outputs).to(device), Floor(bb, outputs, extra).to(device)

    def floor_loss(out, batch):
        return common.task_loss(out["logits"], batch["label"], task)
    calls = {"train": trainer(model, loss_fn, margs, batch, precision),
             "train_floor": trainer(floor, floor_loss, margs, batch, precision),
             "train_token_floor": trainer(token_floor, floor_loss, margs, batch, precision),
             "infer": inferer(model, batch, precision), "infer_floor": inferer(bb.encode, batch, precision),
             "infer_token_floor": inferer(token_floor, batch, precision)}
    t = measure(calls, device, args.warmup, args.repeats)
    memory = {k: peak_memory(calls[k], device) for k in ("train", "train_floor")}   # optimiser states exist now
    ratios = {f"{k}_ratio_{f}": t[k] / t[f"{k}_{f}"] for k in ("train", "infer") for f in ("floor", "token_floor")}
    return {"method": name, "backbone": bb.kind, "train_s": t["train"], "infer_s": t["infer"], **ratios,
            "peak_mem_ratio_floor": memory["train"] / max(1, memory["train_floor"]),
            "trainable_params": common.count_trainable(model), "extra_tokens": extra,
            "peak_mem_mb": memory["train"] / 2 ** 20, "floor_peak_mem_mb": memory["train_floor"] / 2 ** 20,
            **{f"{k}_s": v for k, v in t.items() if "floor" in k}}


def markdown(rows):
    lines = ["| method | backbone | train s | infer s | train/floor | train/token floor | infer/floor | "
             "infer/token floor | mem/floor | trainable | extra tokens (max) |", "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['backbone']} | error: {r['error']} |" + " |" * 8)
            continue
        cells = [f"{r[k]:.3f}" for k in ROW_KEYS[2:4]] + [f"{r[k]:.2f}" for k in ROW_KEYS[4:9]]
        tokens = "/".join(str(max(v)) for v in r["extra_tokens"].values())
        lines.append(f"| {r['method']} | {r['backbone']} | {' | '.join(cells)} | {r['trainable_params']:,} | {tokens} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Presets: the official measurements' configurations, ours next to theirs
# ---------------------------------------------------------------------------------------------------------
def run_presets(args, device):
    rows = []
    for name in PRESETS if args.preset == "all" else [args.preset]:
        pre = PRESETS[name]
        bb = build_backbone(pre["backbone"], pre["text_len"], args.size).to(device)
        image = pre["image"] if args.size == "real" else None
        batch = synthetic_batch(bb, args.batch_size, pre["text_len"], device, image, pre["outputs"], pre["task"],
                                pre["missing"])
        row = benchmark(pre["method"], bb, batch, args, device, pre["argv"], pre["outputs"], pre["task"])
        config = pre["config"] + ("" if args.size == "real" else " (tiny backbone: not comparable)")
        rows.append({"preset": name, "config": config, "official_train_ratio_floor": pre["official"][0],
                     "official_infer_ratio_floor": pre["official"][1], **row})
        print(preset_markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)   # each as it comes
    return rows


def preset_markdown(rows):
    lines = ["| preset | configuration | train/floor | official | infer/floor | official | train/token floor | "
             "extra tokens (max) |", "|" + "---|" * 8]
    for r in rows:
        tokens = "/".join(str(max(v)) for v in r["extra_tokens"].values())
        lines.append(f"| {r['preset']} | {r['config']} | {r['train_ratio_floor']:.2f} | "
                     f"{r['official_train_ratio_floor']} | {r['infer_ratio_floor']:.2f} | "
                     f"{r['official_infer_ratio_floor']} | {r['train_ratio_token_floor']:.2f} | {tokens} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Real text lengths: our ViLT step at the lengths users have against the floor at the official padded length
# ---------------------------------------------------------------------------------------------------------
# ASSUMPTION (no data here): ViLT (BERT WordPiece) tokens per text, [CLS] and [SEP] included, log-normal with this
# median and 90th percentile, clipped to [3, the method's max length]. Food-101: data.py reads the UPMC
# texts/*_titles.csv, web-page titles (a dish name and often the site's name: ~10-20 words); MM-IMDb: IMDb plot
# summaries, one paragraph of ~100-300 words; Hateful Memes: the text written on the meme, one or two short
# sentences. The official loaders pad every one of these to their fixed length (--lengths-from measures the real ones).
ASSUMED_LENGTHS = {"food101": (22, 40), "mmimdb": (180, 380), "hatememes": (18, 32)}
# The official text lengths (padding="max_length"): MAP and MemPrompt 512 / 1024 / 128 (MAP config.py, MemPrompt
# Sec. 4.2; data.VILT_MAX_TEXT_LEN), AOEPT 40 / 77 / 40 (aoept.OFFICIAL, its per-setting configs' seq_len).
REAL_LENGTH_METHODS = ("map", "aoept")


def official_text_len(method, dataset):
    return data.VILT_MAX_TEXT_LEN[dataset] if method == "map" else \
        importlib.import_module("aoept").OFFICIAL["vilt", dataset]["text"]


def lognormal_lengths(median, p90, n, rng, high):
    """n lengths from the log-normal with this median and 90th percentile (z_0.9 = 1.2816), clipped to [3, high]."""
    sigma = math.log(p90 / median) / 1.2815516
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), 3, high).astype(int)


def real_text_lengths(dataset, root, tokenizer, n, seed=0):
    """Tokenised lengths ([CLS] and [SEP] included, untruncated) of up to n texts of the train split under root."""
    ds = data.load_split(dataset, root, "train", missing_type="none", rate=0.0, seed=0)
    texts = [ds.texts[i] for i in np.random.default_rng(seed).permutation(len(ds.texts))[:n]]
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]])


def length_source(args, dataset):
    """-> (draw(n, rng, high) of text lengths, the distribution in words)."""
    if dataset in args.lengths_from:
        from transformers import BertTokenizerFast
        try:
            tokenizer = BertTokenizerFast.from_pretrained(args.tokenizer)
        except OSError as e:
            raise data.DataError(f"--tokenizer {args.tokenizer}: not found offline ({e}); pass a local folder with "
                                 f"the ViLT/BERT vocab.txt (e.g. a save_pretrained copy of {common.VILT_DEFAULT})")
        lengths = real_text_lengths(dataset, args.lengths_from[dataset], tokenizer, args.lengths_sample)
        described = (f"real: {len(lengths)} train texts of {args.lengths_from[dataset]}, median "
                     f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f} tokens")
        return (lambda n, rng, high: np.minimum(rng.choice(lengths, n), high)), described
    median, p90 = ASSUMED_LENGTHS[dataset]
    return (lambda n, rng, high: lognormal_lengths(median, p90, n, rng, high)), \
        f"ASSUMED: log-normal tokens, median {median}, p90 {p90}, clipped to [3, max length]"


def cycle(steps):
    """Call the next of steps (one per round, the same round's batch for every contender)."""
    state = {"k": -1}

    def step():
        state["k"] = (state["k"] + 1) % len(steps)
        return steps[state["k"]]()
    return step


def real_lengths(args, device):
    """Per dataset and method (MAP stands for MAP and MemPrompt, which pad alike; AOEPT): rounds of batches whose
    rows take drawn lengths (missing codes 0, 1, 2 in turn; a missing text is the dummy [CLS] [SEP]). Ours: the
    method's training step on the batch padded to its longest text (data.Collate). Ours padded: the same step on the
    same rows padded to the official length (what padding alone costs). Official floor: the training floor (b) on
    the rows padded to the official length (the official step costs at least that)."""
    precision, rng, rows = precision_of(args, device), np.random.default_rng(0), []
    longest = max(official_text_len(m, d) for m in REAL_LENGTH_METHODS for d in args.datasets)
    bb = build_backbone("vilt", longest, args.size).to(device)
    image = (384, 384) if args.size == "real" else None
    for dataset in args.datasets:
        draw, described = length_source(args, dataset)
        print(f"{dataset} text lengths: {described}", flush=True)
        _, outputs, task = CHECK_DATASETS[dataset]
        for method in REAL_LENGTH_METHODS:
            L_off = official_text_len(method, dataset)
            codes = MISSING_CODES["both"]                             # synthetic_batch's rows: 0, 1, 2 in turn
            words = [[0 if codes[k % len(codes)] == TEXT_MISSING else int(n) - 2 for k, n in enumerate(row)]
                     for row in (draw(args.batch_size, rng, L_off) for _ in range(args.warmup + args.repeats))]
            ours = [synthetic_batch(bb, args.batch_size, max(w) + 2, device, image, outputs, task, "both", w)
                    for w in words]
            padded = [synthetic_batch(bb, args.batch_size, L_off, device, image, outputs, task, "both", w)
                      for w in words]
            argv = ["--dataset", dataset, "--backbone", "vilt"]
            model, loss_fn, margs = build_method(method, bb, device, ours[0], argv, outputs, task)
            floor = Floor(bb, outputs).to(device)

            def floor_loss(out, batch):
                return common.task_loss(out["logits"], batch["label"], task)
            calls = {"ours": cycle([trainer(model, loss_fn, margs, b, precision) for b in ours]),
                     "ours_padded": cycle([trainer(model, loss_fn, margs, b, precision) for b in padded]),
                     "official_floor": cycle([trainer(floor, floor_loss, margs, b, precision) for b in padded])}
            t = measure(calls, device, args.warmup, args.repeats)
            timed, timed_official = ours[args.warmup:], padded[args.warmup:]
            rows.append({"dataset": dataset, "method": method, "lengths": described, "official_text_len": L_off,
                         "drawn": [[n + 2 for n in w] for w in words[args.warmup:]],   # tokens; 2: a missing text
                         "our_text_tokens": statistics.mean(b["input_ids"].numel() for b in timed),
                         "official_text_tokens": statistics.mean(b["input_ids"].numel() for b in timed_official),
                         "our_longest": statistics.mean(b["input_ids"].shape[1] for b in timed),
                         "ours_s": t["ours"], "ours_padded_s": t["ours_padded"],
                         "official_floor_s": t["official_floor"], "ratio": t["ours"] / t["official_floor"],
                         "padding_ratio": t["ours"] / t["ours_padded"]})
            print(real_lengths_markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def real_lengths_markdown(rows):
    lines = ["| dataset | method | official text | our longest (mean) | text tokens/step ours / official | "
             "ours s | ours padded s | official floor s | ours / official floor | ours / ours padded |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['method']} | {r['official_text_len']} | {r['our_longest']:.0f} | "
                     f"{r['our_text_tokens']:.0f} / {r['official_text_tokens']:.0f} | {r['ours_s']:.3f} | "
                     f"{r['ours_padded_s']:.3f} | {r['official_floor_s']:.3f} | {r['ratio']:.2f} | "
                     f"{r['padding_ratio']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# GPU check: every method x backbone x dataset size, a few steps; finite, frozen, timings, syncs, an estimate
# ---------------------------------------------------------------------------------------------------------
def frozen_state(bb):
    return {k: v.detach().clone() for k, v in bb.state_dict().items()}


def frozen_changes(bb, reference):
    """Names of the backbone's tensors that changed, train, or hold a gradient since `reference` was taken."""
    changed = [k for k, v in bb.state_dict().items() if not torch.equal(v, reference[k])]
    return changed + [n for n, p in bb.named_parameters() if p.requires_grad or p.grad is not None]


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def syncs(fn, device):
    """Host-device synchronisations in one call of fn: torch.cuda.set_sync_debug_mode warns on each (it misses
    some, torch says); None on CPU, where there is no device to wait for."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_sizes(dataset, kind, size):
    """-> (text_len, ViLT image (H, W) or None, outputs, task) of the GPU check for one dataset and backbone."""
    text_len, outputs, task = CHECK_DATASETS[dataset]
    if size == "tiny":
        return REAL_SIZES["tiny_text"], REAL_SIZES["tiny_vilt_image"] if kind == "vilt" else None, outputs, task
    return (77, None, outputs, task) if kind == "clip" else (text_len, REAL_SIZES["vilt_image"], outputs, task)


def check_method(name, bb, batch, args, device, dataset, outputs, task, reference):
    precision = precision_of(args, device)
    model, loss_fn, margs = build_method(name, bb, device, batch, ["--dataset", dataset], outputs, task)
    floor = Floor(bb, outputs).to(device)

    def floor_loss(out, batch):
        return common.task_loss(out["logits"], batch["label"], task)
    calls = {"train": trainer(model, loss_fn, margs, batch, precision),
             "train_floor": trainer(floor, floor_loss, margs, batch, precision),
             "infer": inferer(model, batch, precision), "infer_bare": inferer(bb.encode, batch, precision)}
    losses = [calls["train"]() for _ in range(args.warmup + 1)]      # the checked steps
    logits = [calls["infer"]()["logits"] for _ in range(2)]
    t = measure(calls, device, 1, args.repeats)                     # one round warms the floors (first CUDA calls)
    memory = {k: peak_memory(calls[k], device) for k in ("train", "train_floor")}
    changed = frozen_changes(bb, reference)
    B = len(batch["missing"])
    return {"dataset": dataset, "method": name, "backbone": bb.kind, "model": bb.info.get("model"), "batch": B,
            "finite": all_finite(losses + logits), "frozen": not changed, "changed": changed[:5],
            "losses": [float(x) for x in losses], "train_s": t["train"], "infer_s": t["infer"],
            "train_samples_per_s": B / t["train"], "infer_samples_per_s": B / t["infer"],
            "train_ratio_floor": t["train"] / t["train_floor"], "infer_ratio_bare": t["infer"] / t["infer_bare"],
            "floor_train_s": t["train_floor"], "bare_infer_s": t["infer_bare"],
            "peak_mem_mb": memory["train"] / 2 ** 20, "peak_mem_ratio_floor": memory["train"] / max(1, memory["train_floor"]),
            "syncs_train": syncs(calls["train"], device), "syncs_infer": syncs(calls["infer"], device),
            "trainable_params": common.count_trainable(model)}


def estimate_hours(rows, epochs=EPOCHS, sizes=FOOD101_SIZES):
    """Food-101 wall time of an `epochs`-epoch run per method x backbone, compute only (data loading hidden by the
    workers or --cache-images): per epoch train/B training steps and val/B inference steps, then test/B; AOEPT adds
    its bank pass (train/B bare forwards); MuAP trains 1/4 + 1/4 of the epochs single-stage, 1/2 aligned (muap.py's
    default 5/5/10) when muap-align was measured; PROMISE is its encoder path (--cache-features is faster)."""
    by = {(r["method"], r["backbone"]): r for r in rows if r["dataset"] == "food101" and "error" not in r}
    out = {}
    for (name, kind), r in by.items():
        if name == "muap-align":                                    # a stage of muap, not a run
            continue
        steps = {k: math.ceil(n / r["batch"]) for k, n in sizes.items()}
        epoch = {name: steps["train"] * r["train_s"]}
        if name == "muap" and ("muap-align", kind) in by:
            quarter = max(1, epochs // 4)
            train = 2 * quarter * r["train_s"] + (epochs - 2 * quarter) * by["muap-align", kind]["train_s"]
            total = steps["train"] * train
        else:
            total = epochs * epoch[name]
        total += epochs * steps["val"] * r["infer_s"] + steps["test"] * r["infer_s"]
        if name == "aoept":
            total += steps["train"] * r["bare_infer_s"]
        out[f"{name}/{kind}"] = total / 3600
    return out


def gpu_check(args, device):
    rows = []
    for dataset in args.datasets:
        for kind in args.backbones:
            text_len, image, outputs, task = check_sizes(dataset, kind, args.size)
            models = {}                                             # clip model -> methods (PROMISE: ViT-L-14)
            for name in args.methods:
                clip_model = method_args(name, ["--dataset", dataset])[1].clip_model if kind == "clip" else ""
                models.setdefault(clip_model, []).append(name)
            for clip_model, names in models.items():
                bb = build_backbone(kind, text_len, args.size, clip_model or "ViT-B-16").to(device)
                batch = synthetic_batch(bb, args.batch_size, text_len, device, image, outputs, task)
                reference = frozen_state(bb)
                for name in names:
                    try:
                        rows.append(check_method(name, bb, batch, args, device, dataset, outputs, task, reference))
                    except Exception as e:                          # report it, check the rest
                        rows.append({"dataset": dataset, "method": name, "backbone": kind,
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                    print(f"gpu-check {dataset} {name} on {kind}: {rows[-1].get('error', 'done')}", file=sys.stderr,
                          flush=True)
                del bb, batch, reference
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def check_ok(row):
    return "error" not in row and row["finite"] and row["frozen"]


def check_markdown(rows, hours):
    def cell(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    lines = ["| dataset | method | backbone | ok | train s | samples/s | infer s | train/floor | infer/bare | "
             "peak MB | mem/floor | syncs train/infer |", "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['method']} | {r['backbone']} | error: {r['error']} |" + " |" * 8)
            continue
        ok = "yes" if check_ok(r) else ("not finite " if not r["finite"] else "") + \
            (f"frozen changed: {', '.join(r['changed'])}" if not r["frozen"] else "")
        lines.append(f"| {r['dataset']} | {r['method']} | {r['backbone']} | {ok} | {r['train_s']:.3f} | "
                     f"{r['train_samples_per_s']:.1f} | {r['infer_s']:.3f} | {r['train_ratio_floor']:.2f} | "
                     f"{r['infer_ratio_bare']:.2f} | {r['peak_mem_mb']:.0f} | {r['peak_mem_ratio_floor']:.2f} | "
                     f"{cell(r['syncs_train'], 'd')}/{cell(r['syncs_infer'], 'd')} |")
    lines += ["", f"Estimated {EPOCHS}-epoch Food-101 run (compute only, this device and batch):", ""]
    lines += [f"- {k}: {v:.2f} h" for k, v in hours.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Image loading: JPEG decode + preprocess on the fly vs data.CachedImages (uint8 memory map)
# ---------------------------------------------------------------------------------------------------------
def write_jpegs(folder, n):
    """n generated 640 x 480 JPEGs (smooth colour fields plus noise); both backbones' preprocessing resizes them."""
    from PIL import Image
    rng, paths = np.random.default_rng(0), []
    for k in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (480, 640, 3)), 0, 255)
        paths.append(os.path.join(folder, f"{k:05d}.jpg"))
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def images_per_s(get, n):
    t0 = time.perf_counter()
    for i in np.random.default_rng(1).permutation(n):              # shuffled, as a training epoch reads them
        get(int(i))
    return n / (time.perf_counter() - t0)


def image_loading(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, args.num_images)
        n = len(paths)
        ds = MMDataset("food101", "train", ["dish"], [str(k) for k in range(n)], paths, ["a dish"] * n, [0] * n,
                       missing_type="none", rate=0.0, seed=0)
        for name in args.backbones:
            bb = build_backbone(name, args.text_len)
            collate = data.Collate(bb, args.text_len)
            decode = images_per_s(lambda i: collate.image(ds[i]), n)
            t0 = time.perf_counter()
            cached = data.CachedImages(ds, bb, os.path.join(tmp, "cache"))
            build_s = time.perf_counter() - t0
            read = images_per_s(lambda i: collate.image(cached[i]), n)
            rows.append({"backbone": name, "images": n, "decode_images_per_s": decode, "cached_images_per_s": read,
                         "speedup": read / decode, "cache_build_s": build_s})
            print(f"{name}: decode + preprocess {decode:.0f} images/s, cached {read:.0f} images/s, "
                  f"speedup {read / decode:.1f}x (cache built in {build_s:.1f}s)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# ViLT attention: FrozenViLT.block (scaled_dot_product_attention) against HF's eager ViltLayer
# ---------------------------------------------------------------------------------------------------------
def sdpa_vs_eager(args, device):
    """The ViLT training floor (b), once with bb.block and once with HF's own ViltLayer (eager attention, the
    (B, H, L, L) scores materialised), interleaved in one process; inference too unless --quick."""
    precision = contextlib.nullcontext if args.dtype == "fp32" else \
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    bb = build_backbone("vilt", args.text_len, args.size).to(device)
    batch = synthetic_batch(bb, args.batch_size, args.text_len, device)
    margs = importlib.import_module("map").parser().parse_args(["--dataset", "food101"])
    floor = Floor(bb, NUM_CLASSES).to(device)
    blocks = {"sdpa": common.FrozenViLT.block.__get__(bb),
              "eager": lambda i, x, bias, kv_prefix=None: bb.vilt.encoder.layer[i](x, bias)[0]}

    def using(kind, step):
        def run():
            bb.block = blocks[kind]
            step()
        return run
    train = trainer(floor, lambda out, b: common.task_loss(out["logits"], b["label"], TASK), margs, batch, precision)
    infer = inferer(floor, batch, precision)
    steps = (("train", train),) if args.quick else (("train", train), ("infer", infer))
    t = measure({f"{k}_{kind}": using(kind, fn) for k, fn in steps for kind in blocks}, device, args.warmup, args.repeats)
    if args.profile:                                                # one training step of each, top operators
        from torch.profiler import ProfilerActivity, profile
        for kind in blocks:
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                                               else [])) as prof:
                seconds(using(kind, train), device)
            print(f"{kind}: one training step\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                             row_limit=args.profile), flush=True)
    bb.block = blocks["sdpa"]
    row = {"sequence": args.text_len + (bb.shorter // bb.patch) ** 2 + 1, **{f"{k}_s": v for k, v in t.items()},
           **{f"{k}_speedup": t[f"{k}_eager"] / t[f"{k}_sdpa"] for k, _ in steps}}
    print(f"ViLT floor, text {args.text_len} + image {bb.shorter}x{bb.shorter} ({row['sequence']} tokens), batch "
          f"{args.batch_size}: " + "; ".join(f"{k} {t[k + '_eager']:.2f}s eager / {t[k + '_sdpa']:.2f}s SDPA = "
                                             f"{row[k + '_speedup']:.2f}x" for k, _ in steps), flush=True)
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu, {torch.get_num_threads()} threads", "batch_size": args.batch_size, "dtype": args.dtype,
              "warmup": args.warmup, "repeats": args.repeats, "text_len": args.text_len, "size": args.size}
    if args.images:
        result["images"] = image_loading(args)
    elif args.sdpa:
        result["sdpa"] = sdpa_vs_eager(args, device)
    elif args.preset == "real-lengths":
        result["real_lengths"] = rows = real_lengths(args, device)
        print(real_lengths_markdown(rows))
    elif args.preset:
        result["presets"] = rows = run_presets(args, device)
        print(preset_markdown(rows))
    elif args.gpu_check:
        result["checks"] = rows = gpu_check(args, device)
        result["food101_hours"] = hours = estimate_hours(rows)
        result["ok"] = all(check_ok(r) for r in rows)
        print(check_markdown(rows, hours))
        print(f"gpu-check: {sum(map(check_ok, rows))}/{len(rows)} passed", flush=True)
    else:
        result["rows"] = rows = []
        for name in args.backbones:
            bb = build_backbone(name, args.text_len, args.size).to(device)
            batch = synthetic_batch(bb, args.batch_size, args.text_len, device)
            for method in args.methods:
                t0 = time.perf_counter()
                try:
                    rows.append(benchmark(method, bb, batch, args, device))
                except Exception as e:                              # a method file mid-edit must not stop the rest
                    rows.append({**dict.fromkeys(ROW_KEYS), "method": method, "backbone": name,
                                 "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{method} on {name}: {time.perf_counter() - t0:.0f}s {rows[-1].get('error', '')}",
                      file=sys.stderr, flush=True)
        print(markdown(rows))
    if args.out:
        data.write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
