"""Speed and memory of every method against the frozen backbone's floors, and image loading with and without the
uint8 image cache (issue 11). Not a test: pytest collects test_*.py only.

Real-size open_clip ViT-B-16 (QuickGELU) and HF ViltModel(ViltConfig()), random weights (cost does not depend on them);
synthetic batches of the real shapes, missing codes 0/1/2 in turn with common.Collate's dummy inputs, 101 classes.
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
alignment stage (two teacher forwards). PROMISE runs its encoder path (no --cache-features): batches carry aug_* copies.

Usage:
    python tests/benchmark.py                                 # GPU: batch 32, bf16, every method, both backbones
    python tests/benchmark.py --quick --threads 2             # CPU: batch 2, 1 warm-up, median of 3, no variants
    python tests/benchmark.py --quick --methods map,aoept --backbones clip --out runs/benchmark.json
    python tests/benchmark.py --images                        # images/s: JPEG decode + preprocess vs the cache
    python tests/benchmark.py --sdpa --quick --text-len 512 --batch-size 4 --threads 2 --warmup 0
                                                              # ViLT floor (b): bb.block (SDPA) vs HF's eager layer
"""
import argparse
import contextlib
import ctypes
import importlib
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from data import IMAGE_MISSING, TEXT_MISSING, MMDataset  # noqa: E402

NUM_CLASSES, TASK = 101, "multiclass"
METHODS = ("map", "map-attn", "muap", "muap-align", "memprompt", "syp", "aoept", "promise")
ROW_KEYS = ("method", "backbone", "train_s", "infer_s", "train_ratio_floor", "train_ratio_token_floor",
            "infer_ratio_floor", "infer_ratio_token_floor", "peak_mem_ratio_floor", "trainable_params")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 32; 2 with --quick")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="bf16 = autocast; default bf16 on CUDA")
    p.add_argument("--methods", nargs="+", default=None, help=f"of {', '.join(METHODS)} (or a,b); --quick: no variants")
    p.add_argument("--backbones", nargs="+", default=["clip", "vilt"], choices=["clip", "vilt"])
    p.add_argument("--text-len", type=int, default=40, help="L_t of the ViLT batches (positions extended past 40)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=None, help="default 2; 1 with --quick")
    p.add_argument("--repeats", type=int, default=None, help="default 5; 3 with --quick")
    p.add_argument("--quick", action="store_true", help="CPU-sized: batch 2, 1 warm-up, median of 3, no variants")
    p.add_argument("--images", action="store_true", help="only the image-loading benchmark")
    p.add_argument("--sdpa", action="store_true", help="only the ViLT training floor: SDPA block vs HF eager ViltLayer")
    p.add_argument("--num-images", type=int, default=300, help="generated JPEGs for --images")
    p.add_argument("--out", default=None, help="also write the results as JSON (atomically)")
    args = p.parse_args(argv)
    args.methods = [m for a in args.methods for m in a.split(",") if m] if args.methods else \
        [m for m in METHODS if not (args.quick and "-" in m)]
    args.batch_size = args.batch_size or (2 if args.quick else 32)
    args.warmup = (1 if args.quick else 2) if args.warmup is None else args.warmup
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


# ---------------------------------------------------------------------------------------------------------
# Backbones, batches, methods
# ---------------------------------------------------------------------------------------------------------
def build_backbone(name, text_len):
    if name == "clip":
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None, force_quick_gelu=True)
        info = {"backbone": "clip", "model": "ViT-B-16", "pretrained": "", "quick_gelu": True}
        return common.FrozenCLIP(model, open_clip.get_tokenizer("ViT-B-16"), preprocess, info)
    from transformers import ViltConfig, ViltModel
    bb = common.FrozenViLT(ViltModel(ViltConfig()), common.tiny_vilt_tokenizer(), {"backbone": "vilt", "model": "random"})
    common.extend_text_positions(bb, text_len)
    return bb


def synthetic_batch(bb, B, text_len, device):
    """Codes 0, 1, 2 in turn with the dummy inputs ('' and an all-ones image), texts of varied length, padding."""
    g = torch.Generator().manual_seed(0)
    missing = torch.arange(B) % 3
    lengths = [0 if missing[k] == TEXT_MISSING else 8 + 13 * k % 30 for k in range(B)]   # words between the ends
    batch = {"missing": missing, "label": torch.randint(NUM_CLASSES, (B,), generator=g)}
    if bb.kind == "clip":
        ids = torch.zeros(B, 77, dtype=torch.long)                  # SOT words EOT, then zeros
        for k, n in enumerate(lengths):
            ids[k, 0], ids[k, 1:n + 1], ids[k, n + 1] = 49406, torch.randint(1, 49406, (n,), generator=g), 49407
        batch.update(text=ids, image=torch.randn(B, 3, bb.image_size, bb.image_size, generator=g))
    else:
        tok, S = bb.tokenizer, bb.shorter
        ids = torch.randint(len(tok.all_special_ids), bb.vilt.config.vocab_size, (B, text_len), generator=g)
        mask = torch.zeros(B, text_len, dtype=torch.long)
        for k, n in enumerate(lengths):
            n = min(n, text_len - 2)
            ids[k, 0], ids[k, n + 1], ids[k, n + 2:], mask[k, :n + 2] = tok.cls_token_id, tok.sep_token_id, 0, 1
        batch.update(input_ids=ids, text_mask=mask, image=torch.randn(B, 3, S, S, generator=g),
                     pixel_mask=torch.ones(B, S, S, dtype=torch.long))
    batch["image"][missing == IMAGE_MISSING] = 1.0
    batch = {k: v.to(device) for k, v in batch.items()}
    return {**batch, **{f"aug_{k}": v for k, v in batch.items()}}  # PROMISE's augmented view; others ignore it


def build_method(name, bb, device):
    """-> (model on device, loss_fn(out, batch), the method's args), through the method file's own classes."""
    mod = importlib.import_module(name.split("-")[0])
    kind = mod.__name__
    a = mod.parser().parse_args(["--dataset", "food101"] + (["--prompt-type", "attention"] if name == "map-attn" else []))

    def task_loss(out, batch):
        return common.task_loss(out["logits"], batch["label"], TASK)
    if kind == "map":
        return mod.MAP(bb, NUM_CLASSES, a.prompt_type, a.prompt_length, a.prompt_depth).to(device), task_loss, a
    if kind == "muap":
        model = mod.MuAP(bb, NUM_CLASSES, a.fusion, a.prompt_length, a.prompt_depth).to(device)
        mod.set_stage(model, text=True, image=True)
        if name != "muap-align":
            return model, task_loss, a
        model.teachers = [mod.snapshot(model), mod.snapshot(model)]
        return model, lambda out, batch: mod.alignment_loss(out, batch["label"], TASK, a.lambda_t, a.lambda_v), a
    if kind == "memprompt":
        a = mod.resolve_defaults(a)
        return mod.MemPrompt(bb, NUM_CLASSES, a.prompt_length, a.memory_size, a.top_n, a.prompt_depth, a.placement,
                             a.softmax_over).to(device), task_loss, a
    if kind == "syp":
        return mod.SyP(bb, NUM_CLASSES, a.prompt_length, a.prompt_depth, a.reduction, dynamic=not a.no_dynamic,
                       static=not a.no_static, adapter=not a.no_adapter).to(device), task_loss, a
    if kind == "aoept":
        depth = min(a.prompt_depth, bb.num_layers)
        D_t, D_v = (bb.width_text, bb.width_image) if bb.kind == "clip" else (bb.width, bb.width)
        bank = {"text": torch.randn(depth, a.clusters, D_t), "image": torch.randn(depth, a.clusters, D_v)}  # K-means'
        return mod.AOEPT(bb, bank, NUM_CLASSES, a, depth).to(device), mod.make_loss(a.cr_weight, TASK), a
    if kind == "promise":
        return mod.PROMISE(bb, NUM_CLASSES, a).to(device), lambda out, batch: mod.promise_loss(out, batch, TASK, a), a
    raise ValueError(f"unknown method {name}; use one of {METHODS}")


# ---------------------------------------------------------------------------------------------------------
# Floors: the frozen backbone, one learnable vector per stream, plain learnable tokens per layer, a linear head
# ---------------------------------------------------------------------------------------------------------
def streams(bb):
    """{stream: (width, the library's block modules)}."""
    if bb.kind == "clip":
        return {"image": (bb.width_image, bb.model.visual.transformer.resblocks),
                "text": (bb.width_text, bb.model.transformer.resblocks)}
    return {"joint": (bb.width, bb.vilt.encoder.layer)}


@torch.no_grad()
def sequence_lengths(forward, bb, batch):
    """{stream: [longest sequence entering block i during forward(batch)]} (SyP also runs a prompt-free pass)."""
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
    return step


def inferer(forward, batch, precision):
    @torch.no_grad()
    def step():
        if isinstance(forward, nn.Module):
            forward.eval()
        with precision():
            forward(batch)
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


def benchmark(name, bb, batch, args, device):
    precision = contextlib.nullcontext if args.dtype == "fp32" else \
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    model, loss_fn, margs = build_method(name, bb, device)
    extra = extra_tokens(model, bb, batch)
    floor, token_floor = Floor(bb, NUM_CLASSES).to(device), Floor(bb, NUM_CLASSES, extra).to(device)

    def floor_loss(out, batch):
        return common.task_loss(out["logits"], batch["label"], TASK)
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
# Image loading: JPEG decode + preprocess on the fly vs common.CachedImages (uint8 memory map)
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
            collate = common.Collate(bb, args.text_len)
            decode = images_per_s(lambda i: collate.image(ds[i]), n)
            t0 = time.perf_counter()
            cached = common.CachedImages(ds, bb, os.path.join(tmp, "cache"))
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
    bb = build_backbone("vilt", args.text_len).to(device)
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
              "warmup": args.warmup, "repeats": args.repeats, "text_len": args.text_len}
    if args.images:
        result["images"] = image_loading(args)
    elif args.sdpa:
        result["sdpa"] = sdpa_vs_eager(args, device)
    else:
        result["rows"] = rows = []
        for name in args.backbones:
            bb = build_backbone(name, args.text_len).to(device)
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
        common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
