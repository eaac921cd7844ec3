"""The data side shared by all six methods: everything between a file on disk and a batch on the device.
Sections, in reading order:
    Missing tables    which sample lacks its text or its image (MAP's codes: 0 = complete, 1 = text missing,
                      2 = image missing; no sample lacks both).
    Dataset           `MMDataset` / `load_split`: one split with its missing table; it always returns the real image
                      and text. Readers for the raw layouts users download (UPMC Food-101, MM-IMDb, Hateful Memes)
                      and three synthetic `toy` datasets that run in seconds.
    Preprocessing     each backbone's image preprocessing (ViLT's resize, CLIP's own transform, normalisation); the
                      parameters are the backbone's (bb.shorter, bb.longer, bb.patch, bb.preprocess).
    Files             atomic writes, JSON and CSV (also used by common.py for results and checkpoints).
    Image cache       --cache-images: each split decoded and resized once into a uint8 memory map; `load_data`,
                      one split as a run's arguments ask for it.
    Dummy inputs      `Collate`, the one place they are decided: text -> "" (tokenises to start/end tokens and
                      padding); image -> an all-ones tensor after normalisation, the size of the real image (MAP for
                      ViLT, DCP for CLIP). SyP zeroes the missing tower's feature itself before its head, as DCP's
                      code does (not its paper).
    Loaders           the global batches (the same whatever the number of processes), each rank's share, the
                      DataLoader, and the batch moved to the device.
This file imports nothing from common.py (common.py imports it).

Decisions (one line each):
- Missing table: a pure function of (dataset, split, type, rate, seed); each split is drawn independently.
- Rounding: total = floor(n * rate), computed exactly with Fraction(str(rate)) (0.7 * 10 -> 7).
- "both": total // 2 samples image-missing, the rest text-missing (MAP's rule), disjoint.
- Food-101: rows with an empty title are dropped (MAP skips text-less samples too); one line is printed.
- Food-101 val: carved from the official train rows with a fixed seed 0 (not the run seed), stratified:
  floor(n_c / 10) rows of each class c go to val, so |val| = sum_c floor(n_c / 10); train is the rest.
- MM-IMDb, mmimdb_plots="all" (default, MAP's make_arrow single_plot=False): one sample per (movie, plot), id
  "<movie>#<k>", so the metrics count plots; the missing table is drawn over the movies and each plot takes its movie's
  code (MAP indexes its table by movie). "first": one sample per movie, plot[0] (movie-level metrics, as AOEPT).
  A movie without a plot list uses its "plot outline" as its one text; empty plots are skipped.
- MM-IMDb: files are looked for in ROOT/dataset/ first (the archive's folder), then in ROOT.
- Hateful Memes: val = dev_seen.jsonl, test = test_seen.jsonl (hm_test="unseen": the *_unseen files).
- Toy data depend only on (dataset, split), never on the run seed.
"""
import csv
import hashlib
import json
import os
import tempfile
from fractions import Fraction

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2
MISSING_NAMES = {COMPLETE: "complete", TEXT_MISSING: "text", IMAGE_MISSING: "image"}
MISSING_TYPES = ("none", "text", "image", "both")
SPLITS = ("train", "val", "test")
DATASETS = ("food101", "mmimdb", "hatememes", "toy", "toy-multilabel", "toy-binary")
TASK = {"food101": "multiclass", "mmimdb": "multilabel", "hatememes": "binary",
        "toy": "multiclass", "toy-multilabel": "multilabel", "toy-binary": "binary"}
METRIC = {"multiclass": "accuracy", "multilabel": "f1_macro", "binary": "auroc"}
# Paper max text lengths for ViLT (MAP config; MemPrompt Sec. 4.2); CLIP always uses its 77 tokens.
VILT_MAX_TEXT_LEN = {"food101": 512, "mmimdb": 1024, "hatememes": 128}
TOY_MAX_TEXT_LEN = 40

# MAP's genre order; Adult, News, Reality-TV and Talk-Show are ignored.
MMIMDB_GENRES = ["Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
                 "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
                 "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir"]
FOOD101_VAL_SEED = 0
FOOD101_VAL_FRACTION = Fraction(1, 10)


class DataError(Exception):
    """A dataset file or field is missing or malformed; the message names it and the fix."""


def dataset_layout(dataset):
    """The folder layout `load_split` expects for `dataset`, for error messages."""
    layouts = {
        "food101": ("ROOT/images/{train,test}/<class>/<file>.jpg\n"
                    "ROOT/texts/{train,test}_titles.csv   (no header: filename,text,class)"),
        "mmimdb": ("ROOT/split.json   (keys train/dev/test)\n"
                   "ROOT/dataset/<id>.jpeg, ROOT/dataset/<id>.json   (or directly in ROOT)"),
        "hatememes": ("ROOT/img/<id>.png\n"
                      "ROOT/{train,dev_seen,test_seen}.jsonl   (fields id, img, label, text)\n"
                      "ROOT/{dev_unseen,test_unseen}.jsonl   (only for --hm-test unseen)"),
    }
    return layouts.get(dataset, "synthetic: generated in memory, no root needed")


def _stable_seed(key):
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


# ----------------------------------------------------------------------------------------------------
# Missing tables
# ----------------------------------------------------------------------------------------------------

def missing_table(n, missing_type, rate, *, dataset, split, seed):
    """int8 missing codes of shape (n,), a pure function of (dataset, split, type, rate, seed).

    total = floor(n * rate), exact (Fraction(str(rate))). text: total text-missing; image: total
    image-missing; both: total // 2 image-missing and total - total // 2 text-missing, disjoint;
    none: all complete (rate ignored). Which samples: a permutation from a generator seeded by
    sha256(f"{dataset}/{split}/{missing_type}/{rate}/{seed}").
    """
    if missing_type not in MISSING_TYPES:
        raise DataError(f"unknown missing type {missing_type!r}; use one of {MISSING_TYPES}")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"missing rate {rate} is outside [0, 1]; pass e.g. --rate 0.7")
    table = np.full(n, COMPLETE, dtype=np.int8)
    if missing_type == "none":
        return table
    exact_rate = Fraction(str(rate))
    total = n * exact_rate.numerator // exact_rate.denominator
    rng = np.random.default_rng(_stable_seed(f"{dataset}/{split}/{missing_type}/{rate}/{seed}"))
    order = rng.permutation(n)
    if missing_type == "text":
        table[order[:total]] = TEXT_MISSING
    elif missing_type == "image":
        table[order[:total]] = IMAGE_MISSING
    else:
        n_image = total // 2
        table[order[:n_image]] = IMAGE_MISSING
        table[order[n_image:total]] = TEXT_MISSING
    return table


def table_hash(table):
    """Short sha256 (16 hex chars) of the table's int8 bytes, recorded with every run."""
    return hashlib.sha256(np.asarray(table, dtype=np.int8).tobytes()).hexdigest()[:16]


def table_counts(table):
    """{"complete": n0, "text": n_text_missing, "image": n_image_missing}."""
    table = np.asarray(table)
    return {name: int((table == code).sum()) for code, name in MISSING_NAMES.items()}


# ----------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------

class MMDataset(torch.utils.data.Dataset):
    """Image-text samples of one split with their missing codes.

    `images[i]` is a file path (loaded lazily) or a uint8 (H, W, 3) array (toy data).
    """

    def __init__(self, name, split, class_names, ids, images, texts, labels, *, missing_type, rate, seed, groups=None):
        self.name, self.split = name, split
        self.task = TASK[name]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ids, self.images, self.texts, self._labels = list(ids), images, list(texts), labels
        self.missing_type, self.rate = missing_type, rate
        # groups[i]: the row of the table sample i takes (MM-IMDb: its movie); default one row per sample.
        groups = np.arange(len(self.ids)) if groups is None else np.asarray(groups, dtype=np.int64)
        n_rows = int(groups.max()) + 1 if len(groups) else 0
        self.missing = missing_table(n_rows, missing_type, rate, dataset=name, split=split, seed=seed)[groups]
        self.table_hash = table_hash(self.missing)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        label = self._labels[i]
        label = np.asarray(label, dtype=np.float32) if self.task == "multilabel" else int(label)
        return dict(id=self.ids[i], image=self.load_image(i), text=self.texts[i], label=label,
                    missing=int(self.missing[i]))

    def load_image(self, i):
        image = self.images[i]
        if isinstance(image, np.ndarray):
            return Image.fromarray(image)
        try:
            with Image.open(image) as f:
                return f.convert("RGB")
        except OSError as e:
            raise DataError(f"cannot read image {image} ({e}); re-download or remove this sample") from e

    def labels(self):
        """All labels without loading images: int64 (N,) or float32 multi-hot (N, C)."""
        if self.task == "multilabel":
            return np.asarray(self._labels, dtype=np.float32).reshape(len(self), self.num_classes)
        return np.asarray(self._labels, dtype=np.int64)


def load_split(dataset, root, split, *, missing_type, rate, seed, hm_test="seen", mmimdb_plots="all"):
    """Read one split ("train", "val" or "test") and attach its missing table."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    groups = None                                                   # each sample's table row (MM-IMDb: its movie)
    if dataset.startswith("toy"):
        class_names, ids, images, texts, labels = make_toy(dataset, split)
    else:
        if root is None or not os.path.isdir(root):
            raise DataError(f"data root not found: {root}\nexpected layout:\n{dataset_layout(dataset)}")
        reader = {"food101": read_food101, "mmimdb": read_mmimdb, "hatememes": read_hatememes}[dataset]
        extra = {"hatememes": {"hm_test": hm_test}, "mmimdb": {"plots": mmimdb_plots}}.get(dataset, {})
        class_names, ids, images, texts, labels, *rows = reader(root, split, **extra)
        groups = rows[0] if rows else None
    return MMDataset(dataset, split, class_names, ids, images, texts, labels,
                     missing_type=missing_type, rate=rate, seed=seed, groups=groups)


def _require_file(path, dataset):
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}\nexpected layout:\n{dataset_layout(dataset)}")


# ----------------------------------------------------------------------------------------------------
# UPMC Food-101
# ----------------------------------------------------------------------------------------------------

def _read_food101_csv(root, official_split, class_names):
    """Rows (filename, text, class index) of texts/<split>_titles.csv whose image exists."""
    csv_path = os.path.join(root, "texts", f"{official_split}_titles.csv")
    _require_file(csv_path, "food101")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and rows[0] and rows[0][0] == "filename":
        rows = rows[1:]
    class_index = {name: k for k, name in enumerate(class_names)}
    samples, n_empty, seen_classes = [], 0, set()
    for line, row in enumerate(rows, start=1):
        if len(row) != 3:
            raise DataError(f"{csv_path} row {line}: expected 3 columns (filename,text,class), got {len(row)}")
        filename, text, class_name = row
        if class_name not in class_index:
            raise DataError(f"{csv_path} row {line}: class {class_name!r} has no folder images/train/{class_name}")
        image = os.path.join(root, "images", official_split, class_name, filename)
        if not os.path.isfile(image):
            raise DataError(f"{csv_path} row {line}: image file not found: {image}")
        seen_classes.add(class_name)
        if not text.strip():
            n_empty += 1
            continue
        samples.append((filename, image, text, class_index[class_name]))
    if official_split == "train" and seen_classes != set(class_names):
        missing = sorted(set(class_names) - seen_classes)
        raise DataError(f"{csv_path}: no rows for class folders {missing[:5]}; the CSV and images/train disagree")
    if n_empty:
        print(f"food101 {official_split}: dropped {n_empty} rows with an empty title")
    return samples


def _food101_val_rows(labels):
    """Indices of the val rows: floor(n_c / 10) rows per class c, drawn with the fixed seed 0."""
    rng = np.random.default_rng(FOOD101_VAL_SEED)
    labels = np.asarray(labels)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_val = len(rows) * FOOD101_VAL_FRACTION.numerator // FOOD101_VAL_FRACTION.denominator
        val.extend(rng.permutation(rows)[:n_val].tolist())
    return sorted(val)


def read_food101(root, split):
    """Food-101: class names = sorted folders of images/train; val carved from official train."""
    train_dir = os.path.join(root, "images", "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"folder not found: {train_dir}\nexpected layout:\n{dataset_layout('food101')}")
    class_names = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    samples = _read_food101_csv(root, "test" if split == "test" else "train", class_names)
    if split != "test":
        val = set(_food101_val_rows([s[3] for s in samples]))
        samples = [s for k, s in enumerate(samples) if (k in val) == (split == "val")]
    ids, images, texts, labels = (list(column) for column in zip(*samples)) if samples else ([], [], [], [])
    ids = [os.path.splitext(name)[0] for name in ids]
    return class_names, ids, images, texts, np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# MM-IMDb
# ----------------------------------------------------------------------------------------------------

def _mmimdb_texts(meta, json_path, plots):
    """The movie's texts: every non-empty plot ("all") or the first ("first"); else its "plot outline"."""
    found = [p for p in meta.get("plot") or [] if isinstance(p, str) and p.strip()]
    if found:
        return found if plots == "all" else found[:1]
    outline = meta.get("plot outline")
    if isinstance(outline, str) and outline.strip():
        return [outline]
    raise DataError(f"{json_path}: no 'plot' or 'plot outline' field; this movie has no text to read")


def read_mmimdb(root, split, plots="all"):
    """MM-IMDb: movies from split.json (val = "dev"); 23 genres in MAP's order; one sample per (movie, plot) or per
    movie (plots="first"). Returns also each sample's movie row, which its missing code follows."""
    if plots not in ("all", "first"):
        raise DataError(f"unknown --mmimdb-plots {plots!r}; use 'all' (one sample per plot) or 'first'")
    split_path = os.path.join(root, "split.json")
    _require_file(split_path, "mmimdb")
    with open(split_path) as f:
        movies = [str(i) for i in json.load(f)[{"train": "train", "val": "dev", "test": "test"}[split]]]
    folder = os.path.join(root, "dataset") if os.path.isdir(os.path.join(root, "dataset")) else root
    genre_index = {g: k for k, g in enumerate(MMIMDB_GENRES)}
    ids, images, texts, labels, rows = [], [], [], [], []
    for row, movie in enumerate(movies):
        json_path, image = os.path.join(folder, f"{movie}.json"), os.path.join(folder, f"{movie}.jpeg")
        _require_file(json_path, "mmimdb")
        _require_file(image, "mmimdb")
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
        if "genres" not in meta:
            raise DataError(f"{json_path}: no 'genres' field; MM-IMDb labels come from it")
        label = np.zeros(len(MMIMDB_GENRES), dtype=np.float32)
        for genre in meta["genres"]:
            if genre in genre_index:
                label[genre_index[genre]] = 1.0
        for k, text in enumerate(_mmimdb_texts(meta, json_path, plots)):
            ids.append(f"{movie}#{k}" if plots == "all" else movie)
            images.append(image)
            texts.append(text)
            labels.append(label)
            rows.append(row)
    labels = np.stack(labels) if labels else np.zeros((0, len(MMIMDB_GENRES)), dtype=np.float32)
    return MMIMDB_GENRES, ids, images, texts, labels, rows


# ----------------------------------------------------------------------------------------------------
# Hateful Memes
# ----------------------------------------------------------------------------------------------------

def read_hatememes(root, split, hm_test="seen"):
    """Hateful Memes: train.jsonl, dev_<hm_test>.jsonl, test_<hm_test>.jsonl; images via the `img` field."""
    if hm_test not in ("seen", "unseen"):
        raise DataError(f"unknown hm_test {hm_test!r}; use 'seen' or 'unseen'")
    jsonl = {"train": "train.jsonl", "val": f"dev_{hm_test}.jsonl", "test": f"test_{hm_test}.jsonl"}[split]
    path = os.path.join(root, jsonl)
    _require_file(path, "hatememes")
    ids, images, texts, labels = [], [], [], []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for line, row in enumerate(rows, start=1):
        if "label" not in row:
            raise DataError(f"{path} row {line}: no 'label'; this split has no labels (like Kaggle's test.jsonl); "
                            f"use test_seen.jsonl (Kaggle williamberrios/hateful-memes)")
        if row["label"] not in (0, 1):
            raise DataError(f"{path} row {line}: label {row['label']!r} is not 0 or 1")
        image = os.path.join(root, row["img"])
        _require_file(image, "hatememes")
        ids.append(str(row["id"]).zfill(5))
        images.append(image)
        texts.append(row["text"])
        labels.append(row["label"])
    return ["not_hateful", "hateful"], ids, images, texts, np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# Toy data: image latent a and text latent b, each in {0,1,2,3}; labels need both
# ----------------------------------------------------------------------------------------------------

TOY_SIZES = {"train": 512, "val": 128, "test": 128}
TOY_IMAGE_SIZE = 64
TOY_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.float32)
TOY_WORDS = [["apple", "pear", "plum"], ["river", "lake", "ocean"],
             ["train", "truck", "bus"], ["violin", "drum", "flute"]]
TOY_FILLERS = ["the", "a", "some", "this", "photo", "shows", "of", "with", "near", "very", "small", "today"]
TOY_FLIP = 0.05


def _toy_images(rng, a):
    """(N, 64, 64, 3) uint8: background colour by a, per-pixel noise, a random square as nuisance."""
    n, s = len(a), TOY_IMAGE_SIZE
    images = TOY_COLOURS[a][:, None, None, :] + rng.normal(0.0, 25.0, size=(n, s, s, 3))
    for i in range(n):
        side = rng.integers(8, 21)
        top, left = rng.integers(0, s - side, size=2)
        images[i, top:top + side, left:left + side] = rng.integers(0, 256, size=3)
    return np.clip(images, 0, 255).astype(np.uint8)


def _toy_text(rng, b):
    words = list(rng.choice(TOY_FILLERS, size=rng.integers(4, 7)))
    words.insert(rng.integers(0, len(words) + 1), rng.choice(TOY_WORDS[b]))
    return " ".join(words)


def _toy_labels(rng, dataset, a, b):
    if dataset == "toy":  # y = 2 (a mod 2) + (b mod 2): each modality alone fixes one bit
        y = 2 * (a % 2) + b % 2
        flip = rng.random(len(y)) < TOY_FLIP
        return np.where(flip, (y + rng.integers(1, 4, size=len(y))) % 4, y).astype(np.int64)
    if dataset == "toy-multilabel":  # [a mod 2, a div 2, b mod 2, b div 2]
        y = np.stack([a % 2, a // 2, b % 2, b // 2], axis=1).astype(np.float32)
        flip = rng.random(y.shape) < TOY_FLIP
        return np.where(flip, 1.0 - y, y).astype(np.float32)
    y = (a + b >= 4).astype(np.int64)  # toy-binary: positive rate 6/16
    flip = rng.random(len(y)) < TOY_FLIP
    return np.where(flip, 1 - y, y)


def make_toy(dataset, split):
    """Deterministic synthetic split; the generator depends only on (dataset, split)."""
    rng = np.random.default_rng(_stable_seed(f"toy-data/{dataset}/{split}"))
    n = TOY_SIZES[split]
    a, b = rng.integers(0, 4, size=n), rng.integers(0, 4, size=n)
    images = _toy_images(rng, a)
    texts = [_toy_text(rng, int(b_i)) for b_i in b]
    labels = _toy_labels(rng, dataset, a, b)
    class_names = {"toy": ["class0", "class1", "class2", "class3"],
                   "toy-multilabel": ["a_odd", "a_high", "b_odd", "b_high"],
                   "toy-binary": ["negative", "positive"]}[dataset]
    ids = [f"{split}-{i:04d}" for i in range(n)]
    return class_names, ids, list(images), texts, labels


# ----------------------------------------------------------------------------------------------------
# Each backbone's image preprocessing (the parameters are the backbone's: bb.shorter, bb.preprocess, ...)
# ----------------------------------------------------------------------------------------------------

def vilt_resize(img, bb):
    """MAP's pixelbert resize: shorter side to S, longer <= 1333/800 S, floored to patch multiples, bicubic."""
    w, h = img.size
    scale = bb.shorter / min(w, h)
    if max(w, h) * scale > bb.longer:
        scale = bb.longer / max(w, h)
    nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)             # round, then floor to patch multiples
    nw, nh = max(bb.patch, nw // bb.patch * bb.patch), max(bb.patch, nh // bb.patch * bb.patch)
    return img.resize((nw, nh), Image.BICUBIC)


def resize_image(img, bb):
    """The geometric part of the backbone's preprocessing -> uint8 (H, W, 3). CLIP: its own Resize + CenterCrop."""
    if bb.kind == "clip":
        for t in bb.preprocess.transforms[:-2]:                     # all but ToTensor and Normalize
            img = t(img)
        return np.array(img.convert("RGB"), dtype=np.uint8)
    return np.array(vilt_resize(img, bb), dtype=np.uint8)


def normalise_image(arr, bb):
    """uint8 (H, W, 3) -> normalised (3, H, W): CLIP's mean/std, ViLT's 0.5/0.5."""
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 255.0          # copy: memmaps are read-only
    if bb.kind == "clip":
        norm = bb.preprocess.transforms[-1]
        return (x - torch.tensor(norm.mean)[:, None, None]) / torch.tensor(norm.std)[:, None, None]
    return (x - 0.5) / 0.5


def vilt_transform(img, bb):
    return normalise_image(resize_image(img, bb), bb)


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes (the image cache here; results and checkpoints in common.py)
# ----------------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(tmp_path) then rename: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=float)
    atomic_write(path, write)


def write_csv(path, header, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------
# Image cache (--cache-images): decoded and resized once, a uint8 memory map
# ----------------------------------------------------------------------------------------------------

class CachedImages(torch.utils.data.Dataset):
    """--cache-images: a split whose images are decoded and resized once into a uint8 memory-mapped array for this
    backbone's preprocessing (rebuilt when the files or the preprocessing change). Items carry the normalised
    tensor; everything else (labels, missing table, ids) is the wrapped split's."""

    def __init__(self, dataset, bb, folder, workers=0):
        self.dataset, self.bb = dataset, bb
        key = image_cache_key(dataset, bb)
        base = os.path.join(folder, f"{dataset.name}-{dataset.split}-{key}")
        if not os.path.isfile(base + ".json"):
            build_image_cache(dataset, bb, base, workers)
        with open(base + ".json") as f:
            self.index = json.load(f)
        self.array = np.memmap(base + ".u8", dtype=np.uint8, mode="r")
        self._labels = dataset.labels()

    def __getattr__(self, name):                                     # labels(), ids, missing, task, ...
        return getattr(self.__dict__["dataset"], name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        offset, h, w = self.index[i]
        arr = self.array[offset:offset + h * w * 3].reshape(h, w, 3)
        label = self._labels[i] if self.dataset.task == "multilabel" else int(self._labels[i])
        return dict(id=self.dataset.ids[i], image=normalise_image(arr, self.bb), text=self.dataset.texts[i],
                    label=label, missing=int(self.dataset.missing[i]))


def image_cache_key(dataset, bb):
    h = hashlib.sha256(json.dumps([bb.info, getattr(bb, "image_size", None), getattr(bb, "shorter", None),
                                   str(getattr(bb, "preprocess", ""))]).encode())
    for i, image in enumerate(dataset.images):
        if isinstance(image, np.ndarray):
            h.update(image.tobytes())
        else:
            st = os.stat(image)
            h.update(f"{image}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class _Resized(torch.utils.data.Dataset):
    def __init__(self, dataset, bb):
        self.dataset, self.bb = dataset, bb

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return resize_image(self.dataset.load_image(i), self.bb)


def build_image_cache(dataset, bb, base, workers):
    """Decode + resize every image once (in DataLoader workers), append to a flat uint8 file, then write the index;
    the index appears last and atomically, so a half-built cache is never used."""
    loader = torch.utils.data.DataLoader(_Resized(dataset, bb), batch_size=None, num_workers=workers)
    index, offset = [], 0

    def write(tmp):
        nonlocal offset
        with open(tmp, "wb") as f:
            for arr in tqdm(loader, total=len(dataset), desc=f"caching {dataset.name}/{dataset.split} images"):
                arr = np.asarray(arr, dtype=np.uint8)
                f.write(arr.tobytes())
                index.append([offset, arr.shape[0], arr.shape[1]])
                offset += arr.size
    atomic_write(base + ".u8", write)
    write_json(base + ".json", index)


def load_data(args, bb, split, missing_type=None, rate=None):
    """One split as the run's arguments say: train / val with --missing --rate, test with --test-missing --test-rate
    (or the given type and rate, for the robustness grid); with --cache-images, read through the image cache."""
    if split == "test":
        missing_type, rate = missing_type or args.test_missing, args.test_rate if rate is None else rate
    else:
        missing_type, rate = args.missing, args.rate
    ds = load_split(args.dataset, args.data_root, split, missing_type=missing_type, rate=rate, seed=args.seed,
                    hm_test=args.hm_test, mmimdb_plots=args.mmimdb_plots)
    if args.cache_images:
        ds = CachedImages(ds, bb, args.image_cache_dir, args.num_workers)
    return ds


# ----------------------------------------------------------------------------------------------------
# The dummy inputs of a missing modality, and the batch (in DataLoader workers)
# ----------------------------------------------------------------------------------------------------

class Collate:
    """list of dataset items -> batch dict. Applies the dummy input of a missing modality (module docstring).
    CLIP batch: image (B,3,S,S), text (B,77). ViLT batch: image (B,3,H,W) zero-padded, pixel_mask (B,H,W),
    input_ids / text_mask (B, L_t) padded to the longest in the batch, truncated at max_text_len.
    Both: label, missing (B,) codes, ids (list).
    trim_clip_text: CLIP text cut after the batch's last EOT (`trim`). Under the causal mask no later position
    reaches a pooled EOT feature, so this is exact for a method whose prompt rows do not attend to the padding and
    whose text queries / means skip it (tests/test_truncation.py); off by default (the full 77)."""

    def __init__(self, bb, max_text_len, trim_clip_text=False):
        self.bb, self.max_text_len, self.trim_clip_text = bb, max_text_len, trim_clip_text

    @staticmethod
    def trim(ids):
        """(B, 77) CLIP ids -> (B, E + 1), E the batch's last EOT: the EOT is the largest id (open_clip pools at the
        argmax, as FrozenCLIP.text_pool), and only padding follows it."""
        return ids[:, :int(ids.argmax(-1).max()) + 1].contiguous()

    def image(self, item):
        if torch.is_tensor(item["image"]):                          # already preprocessed (an image cache)
            pixels = item["image"]
        elif self.bb.kind == "clip":
            pixels = self.bb.preprocess(item["image"])
        else:
            pixels = vilt_transform(item["image"], self.bb)
        return torch.ones_like(pixels) if item["missing"] == IMAGE_MISSING else pixels

    def __call__(self, items):
        texts = ["" if it["missing"] == TEXT_MISSING else it["text"] for it in items]
        images = [self.image(it) for it in items]
        batch = {"ids": [it["id"] for it in items],
                 "missing": torch.tensor([it["missing"] for it in items], dtype=torch.long),
                 "label": torch.as_tensor(np.stack([np.asarray(it["label"]) for it in items]))}
        if self.bb.kind == "clip":
            ids = self.bb.tokenizer(texts)                              # (B, 77)
            batch["text"] = self.trim(ids) if self.trim_clip_text else ids
            batch["image"] = torch.stack(images)
            return batch
        tok = self.bb.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                return_tensors="pt")
        batch["input_ids"], batch["text_mask"] = tok["input_ids"], tok["attention_mask"]
        H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        batch["image"] = torch.zeros(len(images), 3, H, W)
        batch["pixel_mask"] = torch.zeros(len(images), H, W, dtype=torch.long)
        for k, img in enumerate(images):
            batch["image"][k, :, :img.shape[1], :img.shape[2]] = img
            batch["pixel_mask"][k, :img.shape[1], :img.shape[2]] = 1
        return batch


# ----------------------------------------------------------------------------------------------------
# Loaders: the global batch is the same whatever the number of processes; each rank loads its share
# ----------------------------------------------------------------------------------------------------

def global_batches(n, batch_size, seed, epoch):
    """Seeded permutation of the training set cut into global batches; an incomplete last batch is dropped
    (unless the split is smaller than one batch). Identical on every rank."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    steps = max(1, n // batch_size)
    size = min(batch_size, n)
    return [order[k * size:(k + 1) * size] for k in range(steps)]


def rank_micro_batches(batch, rank, world, micro):
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    share = len(batch) // world
    mine = batch[rank * share:(rank + 1) * share] if rank < world - 1 else batch[(world - 1) * share:]
    return [mine[k:k + micro] for k in range(0, len(mine), micro)]


def rank_batches(run, n):
    """This process's share of n samples (every rank-th index), cut into micro-batches: each sample once overall."""
    mine = list(range(run.rank, n, run.world))
    return [mine[k:k + run.args.micro_batch] for k in range(0, len(mine), run.args.micro_batch)]


def make_loader(run, dataset, batches):
    """Batches given as index lists. Its own generator: opening a loader draws no number from the global RNG, so a run
    resumed mid-epoch (a new loader) continues the same random stream (dropout) as the uninterrupted one."""
    workers = run.args.num_workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=run.collate, num_workers=workers,
                                       pin_memory=run.device.type == "cuda", persistent_workers=False,
                                       generator=torch.Generator().manual_seed(run.args.seed))


def to_device(batch, device):
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
