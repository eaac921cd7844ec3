"""The data side shared by all six methods: everything between a file on disk and a batch on the device.
Sections, in reading order:
    Missing tables    which sample lacks its text or its image (MAP's codes: 0 = complete, 1 = text missing,
                      2 = image missing; no sample lacks both).
    Dataset           `MMDataset` / `load_split`: one split with its missing table; it always returns the real image
                      and text. Readers for the raw layouts users download (UPMC Food-101, MM-IMDb, Hateful Memes)
                      and three synthetic `toy` datasets that run in seconds.
    Preprocessing     each backbone's image preprocessing (ViLT's resize, CLIP's own transform, normalisation); the
                      parameters are the backbone's (bb.shorter, bb.longer, bb.patch, bb.preprocess).
    Files             atomic writes (mode from the umask; stale temporary files of killed runs removed), JSON and
                      CSV (also used by common.py for results and checkpoints).
    Image cache       --cache-images: each split decoded and resized once into a uint8 memory map.
    A run's splits    `read_splits`: the three splits as a run's arguments ask for them, every image checked and
                      overlaps warned about, before any weights load; `load_data`: one split (the robustness grid).
    Dummy inputs      `Collate`, the one place they are decided: text -> "" (tokenises to start/end tokens and
                      padding); image -> an all-ones tensor after normalisation, the size of the real image (MAP for
                      ViLT, DCP for CLIP). SyP zeroes the missing tower's feature itself before its head, as DCP's
                      code does (not its paper).
    Loaders           the global batches (the same whatever the number of processes), each rank's share, the
                      DataLoader, and the batch moved to the device.
This file imports nothing from common.py (common.py imports it).

Decisions (one line each):
- Missing table: a pure function of (dataset, split, type, rate, table seed); each split is drawn independently. The
  table seed is its own setting (--table-seed, default 0), not the run seed: like the official tables (files keyed by
  split, type and rate, drawn once and reused by every seed and method), `--seeds 0 1 2` and two methods see the
  same tables. `--table-seed run` redraws them with each run seed.
- Rounding: total = floor(n * rate), computed exactly with Fraction(str(rate)) (0.7 * 10 -> 7).
- "both": total // 2 samples image-missing, the rest text-missing (MAP's rule), disjoint.
- Food-101: rows with an empty title are dropped (MAP skips text-less samples too); one line is printed.
- Food-101 val: the official split (MAP's and MemPrompt's datasets/Food101/split.json: train 61,142 / val 6,846;
  AOEPT's data/food101/valid.csv holds the same val list less one row), read from ROOT/split.json, ROOT/valid.csv
  or --food101-split PATH; with split.json train is its "train" list, with valid.csv every other row. Absent, the
  run is refused. `--food101-split per-class` carves floor(n_c / 10) rows of each class c with a fixed seed 0
  instead (differs from every official run). The source file and its sha256 are recorded.
- Reading: every text file is UTF-8 (a BOM is skipped); a bad byte, a malformed JSON line or a missing field is a
  DataError naming file, line and field. Every image of every split is checked before training (its header
  decodes; a JPEG / PNG holds its end marker in its last 64 KiB, so a JPEG with a longer trailer after its end is
  refused too) and all bad files are reported at once. 16-bit greyscale is scaled to 8 bits (v / 257). Duplicate
  ids and val / test samples also in train are warned about with counts.
- MM-IMDb: "plot" given as a string is one plot; "genres" as a string must be one genre name (else refused).
- Hateful Memes: a val or test file with a single class is refused (AUROC needs both).
- MM-IMDb, mmimdb_plots="all" (default, MAP's make_arrow single_plot=False): one sample per (movie, plot), id
  "<movie>#<k>", so the metrics count plots; the missing table is drawn over the movies and each plot takes its movie's
  code (MAP indexes its table by movie). "first": one sample per movie, plot[0] (movie-level metrics, as AOEPT).
  A movie without a plot list uses its "plot outline" as its one text; empty plots are skipped.
- MM-IMDb: files are looked for in ROOT/dataset/ first (the archive's folder), then in ROOT.
- Hateful Memes: val = dev_seen.jsonl, test = test_seen.jsonl (hm_test="unseen": the *_unseen files).
- Toy data depend only on (dataset, split), never on the run seed.
"""
import codecs
import csv
import hashlib
import io
import json
import os
import re
import socket
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
# The official Food-101 split, looked for in the data root in this order (MAP / MemPrompt's, then AOEPT's).
FOOD101_SPLIT_FILES = ("split.json", "valid.csv")
FOOD101_SPLIT_SOURCES = ("https://github.com/YiLunLee/missing_aware_prompts/raw/main/datasets/Food101/split.json "
                         "(MAP and MemPrompt; save it as ROOT/split.json) or "
                         "https://github.com/Jian-Lang/AOEPT/raw/master/data/food101/valid.csv (AOEPT; save it as "
                         "ROOT/valid.csv)")
TABLE_SEED_DEFAULT = 0


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


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def table_seed_arg(value):
    """--table-seed: an integer, or "run" (the run's --seed: tables redrawn with every seed)."""
    if value == "run":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--table-seed takes an integer or 'run', not {value!r}") from None


def table_seed(args):
    """The seed the missing tables are drawn with: --table-seed, or the run seed under --table-seed run."""
    seed = getattr(args, "table_seed", TABLE_SEED_DEFAULT)
    return args.seed if seed == "run" else int(seed)


# ----------------------------------------------------------------------------------------------------
# Missing tables
# ----------------------------------------------------------------------------------------------------

def missing_table(n, missing_type, rate, *, dataset, split, seed):
    """int8 missing codes of shape (n,), a pure function of (dataset, split, type, rate, seed); `seed` is the table
    seed (`table_seed(args)`), not the run seed.

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

    `images[i]` is a file path (loaded lazily) or a uint8 (H, W, 3) array (toy data). `source`: the files this split
    was read from and how (recorded in results.json).
    """

    def __init__(self, name, split, class_names, ids, images, texts, labels, *, missing_type, rate, seed, groups=None,
                 source=None):
        self.name, self.split = name, split
        self.task = TASK[name]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ids, self.images, self.texts, self._labels = list(ids), images, list(texts), labels
        self.missing_type, self.rate = missing_type, rate
        self.source = source or {}
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
                return to_rgb(f)
        except (OSError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {image} ({e}); re-download or remove this sample") from e

    def labels(self):
        """All labels without loading images: int64 (N,) or float32 multi-hot (N, C)."""
        if self.task == "multilabel":
            return np.asarray(self._labels, dtype=np.float32).reshape(len(self), self.num_classes)
        return np.asarray(self._labels, dtype=np.int64)


def to_rgb(img):
    """A PIL image -> RGB. 16-bit greyscale (mode I;16 or I) is scaled to 8 bits, v -> round(v / 257):
    convert("RGB") would clip every value above 255 to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def load_split(dataset, root, split, *, missing_type, rate, seed, hm_test="seen", mmimdb_plots="all",
               food101_split="official"):
    """Read one split ("train", "val" or "test") and attach its missing table (`seed`: the table seed)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    if dataset.startswith("toy"):
        class_names, ids, images, texts, labels = make_toy(dataset, split)
        read = dict(class_names=class_names, ids=ids, images=images, texts=texts, labels=labels,
                    source={"generated": f"make_toy({dataset!r}, {split!r})"})
    else:
        if root is None or not os.path.isdir(root):
            raise DataError(f"data root not found: {root}\nexpected layout:\n{dataset_layout(dataset)}")
        reader = {"food101": read_food101, "mmimdb": read_mmimdb, "hatememes": read_hatememes}[dataset]
        extra = {"hatememes": {"hm_test": hm_test}, "mmimdb": {"plots": mmimdb_plots},
                 "food101": {"food101_split": food101_split}}[dataset]
        read = reader(root, split, **extra)
    return MMDataset(dataset, split, missing_type=missing_type, rate=rate, seed=seed, **read)


def _require_file(path, dataset):
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}\nexpected layout:\n{dataset_layout(dataset)}")


def _read_text(path):
    """A text file as str: UTF-8, a leading BOM skipped; a byte that is not UTF-8 is an error naming its line."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; re-save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)") from None


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix the file or "
                        f"download it again") from None


def _read_jsonl(path):
    """[(line number, object)] of a JSON-lines file; blank lines are skipped."""
    rows = []
    for line, content in enumerate(_read_text(path).splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line}: not valid JSON ({e.msg}, column {e.colno}); fix or remove this "
                            f"line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {line}: expected a JSON object with fields id, img, label, text")
        rows.append((line, row))
    return rows


def _source(path, **how):
    return {"file": os.path.abspath(path), "sha256": file_sha256(path), **how}


# ----------------------------------------------------------------------------------------------------
# UPMC Food-101
# ----------------------------------------------------------------------------------------------------

def _read_food101_csv(root, official_split, class_names):
    """Rows (filename, image path, text, class index) of texts/<split>_titles.csv whose title is not empty."""
    csv_path = os.path.join(root, "texts", f"{official_split}_titles.csv")
    _require_file(csv_path, "food101")
    reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""))
    class_index = {name: k for k, name in enumerate(class_names)}
    samples, n_empty, seen_classes = [], 0, set()
    for row in reader:
        line = reader.line_num
        if line == 1 and row and row[0] == "filename":
            continue
        if len(row) != 3:
            raise DataError(f"{csv_path} line {line}: expected 3 columns (filename,text,class), got {len(row)}")
        filename, text, class_name = row
        if class_name not in class_index:
            raise DataError(f"{csv_path} line {line}: class {class_name!r} has no folder images/train/{class_name}")
        image = os.path.join(root, "images", official_split, class_name, filename)
        if not os.path.isfile(image):
            raise DataError(f"{csv_path} line {line}: image file not found: {image}")
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
    """--food101-split per-class: indices of the val rows, floor(n_c / 10) rows per class c, fixed seed 0."""
    rng = np.random.default_rng(FOOD101_VAL_SEED)
    labels = np.asarray(labels)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_val = len(rows) * FOOD101_VAL_FRACTION.numerator // FOOD101_VAL_FRACTION.denominator
        val.extend(rng.permutation(rows)[:n_val].tolist())
    return sorted(val)


def food101_split_file(root, choice):
    """The official split file: --food101-split PATH, else ROOT/split.json or ROOT/valid.csv; None for per-class."""
    if choice == "per-class":
        return None
    if choice != "official":
        if not os.path.isfile(choice):
            raise DataError(f"--food101-split {choice}: file not found; pass MAP's split.json or AOEPT's valid.csv, "
                            f"or 'per-class'")
        return choice
    for name in FOOD101_SPLIT_FILES:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(f"Food-101: the official validation split is not in {root} (looked for "
                    f"{' and '.join(FOOD101_SPLIT_FILES)}). Download {FOOD101_SPLIT_SOURCES}, or pass "
                    f"--food101-split PATH. --food101-split per-class carves 10% of each class with seed 0 instead, "
                    f"a split that differs from every official run")


def read_food101_split(path):
    """(val names, train names or None) as file stems: MAP's split.json ({"train", "val", "test"} lists of
    "<class>_<n>.jpg") or AOEPT's valid.csv (header "id", one "<class>_<n>" a line; train = every other row)."""
    if path.endswith(".json"):
        split = _read_json(path)
        if not isinstance(split, dict) or not isinstance(split.get("val"), list):
            raise DataError(f"{path}: expected MAP's Food-101 split.json, an object with a 'val' list of file names")
        stems = {key: {os.path.splitext(str(name))[0] for name in split[key]}
                 for key in ("train", "val") if isinstance(split.get(key), list)}
        return stems["val"], stems.get("train")
    rows = list(csv.reader(io.StringIO(_read_text(path), newline="")))
    if not rows or rows[0] != ["id"]:
        raise DataError(f"{path}: expected AOEPT's valid.csv, a header 'id' then one '<class>_<n>' a line")
    return {os.path.splitext(row[0])[0] for row in rows[1:] if row}, None


def _food101_official(samples, path, split):
    """Train and val rows of texts/train_titles.csv as the split file names them, and the source record."""
    val_names, train_names = read_food101_split(path)
    stems = [os.path.splitext(s[0])[0] for s in samples]
    found = val_names & set(stems)
    if val_names and not found:
        raise DataError(f"{path}: none of its {len(val_names)} validation names is a row of texts/train_titles.csv; "
                        f"is it the Food-101 split?")
    if len(found) < len(val_names) and split == "val":
        print(f"food101 val: {len(val_names) - len(found)} of the {len(val_names)} names in {path} have no row in "
              f"train_titles.csv (empty title or no image); left out")
    val = [s for s, stem in zip(samples, stems) if stem in val_names]
    train = [s for s, stem in zip(samples, stems) if stem not in val_names and (train_names is None or stem in train_names)]
    left_out = len(samples) - len(val) - len(train)
    if left_out and split == "val":
        print(f"food101: {left_out} rows of train_titles.csv are in neither list of {path}; left out")
    return train, val, _source(path, food101_split="official")


def read_food101(root, split, food101_split="official"):
    """Food-101: class names = sorted folders of images/train; val = the official split's list (or per-class)."""
    train_dir = os.path.join(root, "images", "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"folder not found: {train_dir}\nexpected layout:\n{dataset_layout('food101')}")
    class_names = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    path = food101_split_file(root, food101_split)                  # refused before anything is read
    samples = _read_food101_csv(root, "test" if split == "test" else "train", class_names)
    if split == "test":
        source = _source(os.path.join(root, "texts", "test_titles.csv"))
    elif path is None:
        val = set(_food101_val_rows([s[3] for s in samples]))
        samples = [s for k, s in enumerate(samples) if (k in val) == (split == "val")]
        source = {"food101_split": "per-class", "rule": "floor(n_c / 10) train rows of each class, seed 0 (this "
                                                        "repository's; differs from every official run)"}
    else:
        train, val, source = _food101_official(samples, path, split)
        samples = val if split == "val" else train
    if split == "val":
        print(f"food101 val: {len(samples)} rows, split {source.get('file', 'per-class 10% carve, seed 0')}"
              + (f" (sha256 {source['sha256'][:16]})" if "sha256" in source else
                 " (differs from the official split of MAP, MemPrompt and AOEPT)"))
    ids, images, texts, labels = (list(column) for column in zip(*samples)) if samples else ([], [], [], [])
    ids = [os.path.splitext(name)[0] for name in ids]
    return dict(class_names=class_names, ids=ids, images=images, texts=texts,
                labels=np.asarray(labels, dtype=np.int64), source=source)


# ----------------------------------------------------------------------------------------------------
# MM-IMDb
# ----------------------------------------------------------------------------------------------------

def _mmimdb_texts(meta, json_path, plots):
    """The movie's texts: every non-empty plot ("all") or the first ("first"); else its "plot outline".
    A "plot" given as one string is one plot."""
    plot = meta.get("plot") or []
    plot = [plot] if isinstance(plot, str) else plot
    if not isinstance(plot, list):
        raise DataError(f"{json_path}: 'plot' is a {type(plot).__name__}; give a list of strings (or one string)")
    found = [p for p in plot if isinstance(p, str) and p.strip()]
    if found:
        return found if plots == "all" else found[:1]
    outline = meta.get("plot outline")
    if isinstance(outline, str) and outline.strip():
        return [outline]
    raise DataError(f"{json_path}: no 'plot' or 'plot outline' field; this movie has no text to read")


MMIMDB_IGNORED_GENRES = ("Adult", "News", "Reality-TV", "Talk-Show")


def _mmimdb_genres(meta, json_path):
    """The "genres" list; one string must be one genre name (a joined "Drama, Comedy" is refused, not guessed)."""
    if "genres" not in meta:
        raise DataError(f"{json_path}: no 'genres' field; MM-IMDb labels come from it")
    genres = meta["genres"]
    if isinstance(genres, str):
        if genres not in MMIMDB_GENRES and genres not in MMIMDB_IGNORED_GENRES:
            raise DataError(f"{json_path}: 'genres' is the string {genres!r}, not a genre name; give a list, "
                            f"e.g. [\"Drama\", \"Comedy\"]")
        genres = [genres]
    if not isinstance(genres, list):
        raise DataError(f"{json_path}: 'genres' is a {type(genres).__name__}; give a list of genre names")
    return genres


def read_mmimdb(root, split, plots="all"):
    """MM-IMDb: movies from split.json (val = "dev"); 23 genres in MAP's order; one sample per (movie, plot) or per
    movie (plots="first"). Returns also each sample's movie row (groups), which its missing code follows."""
    if plots not in ("all", "first"):
        raise DataError(f"unknown --mmimdb-plots {plots!r}; use 'all' (one sample per plot) or 'first'")
    split_path = os.path.join(root, "split.json")
    _require_file(split_path, "mmimdb")
    key = {"train": "train", "val": "dev", "test": "test"}[split]
    split_lists = _read_json(split_path)
    if not isinstance(split_lists, dict) or not isinstance(split_lists.get(key), list):
        raise DataError(f"{split_path}: no '{key}' list of movie ids; expected {{\"train\": [...], \"dev\": [...], "
                        f"\"test\": [...]}}")
    movies = [str(i) for i in split_lists[key]]
    folder = os.path.join(root, "dataset") if os.path.isdir(os.path.join(root, "dataset")) else root
    genre_index = {g: k for k, g in enumerate(MMIMDB_GENRES)}
    ids, images, texts, labels, rows = [], [], [], [], []
    for row, movie in enumerate(movies):
        json_path, image = os.path.join(folder, f"{movie}.json"), os.path.join(folder, f"{movie}.jpeg")
        _require_file(json_path, "mmimdb")
        _require_file(image, "mmimdb")
        meta = _read_json(json_path)
        if not isinstance(meta, dict):
            raise DataError(f"{json_path}: expected a JSON object with 'genres' and 'plot'")
        label = np.zeros(len(MMIMDB_GENRES), dtype=np.float32)
        for genre in _mmimdb_genres(meta, json_path):
            if genre in genre_index:
                label[genre_index[genre]] = 1.0
        for k, text in enumerate(_mmimdb_texts(meta, json_path, plots)):
            ids.append(f"{movie}#{k}" if plots == "all" else movie)
            images.append(image)
            texts.append(text)
            labels.append(label)
            rows.append(row)
    labels = np.stack(labels) if labels else np.zeros((0, len(MMIMDB_GENRES)), dtype=np.float32)
    return dict(class_names=MMIMDB_GENRES, ids=ids, images=images, texts=texts, labels=labels, groups=rows,
                source=_source(split_path, key=key, plots=plots))


# ----------------------------------------------------------------------------------------------------
# Hateful Memes
# ----------------------------------------------------------------------------------------------------

HATEMEMES_FIELDS = {"id": "the meme id", "img": "the image path, e.g. img/01235.png", "text": "the meme's text"}


def read_hatememes(root, split, hm_test="seen"):
    """Hateful Memes: train.jsonl, dev_<hm_test>.jsonl, test_<hm_test>.jsonl; images via the `img` field.
    A val or test file with one class is refused: its AUROC is undefined."""
    if hm_test not in ("seen", "unseen"):
        raise DataError(f"unknown hm_test {hm_test!r}; use 'seen' or 'unseen'")
    jsonl = {"train": "train.jsonl", "val": f"dev_{hm_test}.jsonl", "test": f"test_{hm_test}.jsonl"}[split]
    path = os.path.join(root, jsonl)
    _require_file(path, "hatememes")
    ids, images, texts, labels = [], [], [], []
    for line, row in _read_jsonl(path):
        if "label" not in row:
            raise DataError(f"{path} line {line}: no 'label'; this split has no labels (like Kaggle's test.jsonl); "
                            f"use test_seen.jsonl (Kaggle williamberrios/hateful-memes)")
        if row["label"] not in (0, 1):
            raise DataError(f"{path} line {line}: label {row['label']!r} is not 0 or 1")
        for field, meaning in HATEMEMES_FIELDS.items():
            if field not in row:
                raise DataError(f"{path} line {line}: no '{field}' field ({meaning}); every row needs id, img, "
                                f"label and text")
        if not isinstance(row["text"], str):
            raise DataError(f"{path} line {line}: 'text' is a {type(row['text']).__name__}, not a string")
        image = os.path.join(root, row["img"])
        _require_file(image, "hatememes")
        ids.append(str(row["id"]).zfill(5))
        images.append(image)
        texts.append(row["text"])
        labels.append(row["label"])
    if split != "train" and len(set(labels)) < 2:
        found = f"every row has label {labels[0]}" if labels else "no rows"
        raise DataError(f"{path}: {found}; AUROC needs both classes, so this {split} split cannot be scored. Use "
                        f"the full {jsonl} of the download")
    return dict(class_names=["not_hateful", "hateful"], ids=ids, images=images, texts=texts,
                labels=np.asarray(labels, dtype=np.int64), source=_source(path))


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

HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
# Our temporary files: .tmp-<host>-<pid>-<mkstemp's 8 characters>; a stale one is this host's, of a dead process.
TMP_PATTERN = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]{8}")
_swept = set()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                         # another user's live process
        return True
    return True


def remove_stale_temp(folder):
    """Remove the temporary files a killed run left in `folder`: only names of our own pattern, written on this
    host by a process that no longer runs. Returns the names removed."""
    removed = []
    for name in os.listdir(folder):
        m = TMP_PATTERN.fullmatch(name)
        if m and m["host"] == HOST and not _alive(int(m["pid"])):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:                               # another process removed it first
                pass
    return removed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """write(tmp_path) then rename: a crash never leaves a half-written file. The file gets the mode a plain open()
    would give (0o666 less the umask; mkstemp's own is 0o600). The first write into a folder removes stale
    temporary files of killed runs."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if folder not in _swept:
        _swept.add(folder)
        remove_stale_temp(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{HOST}-{os.getpid()}-")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite_json(obj):
    """Strict JSON: a non-finite number (an undefined metric, an unset best) is written as null, never as NaN."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(finite_json(obj), f, indent=2, default=float, allow_nan=False)
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
    # Its own generator: the loader's worker seed is not drawn from the global RNG, so the run that builds the cache
    # and every run that hits it draw the same numbers afterwards (the same model initialisation and dropout).
    loader = torch.utils.data.DataLoader(_Resized(dataset, bb), batch_size=None, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
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


# ----------------------------------------------------------------------------------------------------
# A run's splits: read and checked (files, fields, every image) before any weights load
# ----------------------------------------------------------------------------------------------------

END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
END_WINDOW = 1 << 16                                                # bytes at a file's end searched for the marker
_checked = set()                                                    # (path, size, mtime) found good in this process


def image_problem(path):
    """Why the image at `path` cannot be used, or None: its header must decode (format, size, not a decompression
    bomb) and a JPEG / PNG must hold its end marker in its last 64 KiB (a truncated download does not)."""
    try:
        st = os.stat(path)
        if (path, st.st_size, st.st_mtime_ns) in _checked:
            return None
        with Image.open(path) as img:
            fmt = img.format
    except Image.DecompressionBombError as e:
        return f"too many pixels for PIL ({e}); resize it"
    except (OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if fmt in END_MARKERS:
        with open(path, "rb") as f:
            f.seek(max(0, st.st_size - END_WINDOW))
            if END_MARKERS[fmt] not in f.read():
                return f"truncated: no {fmt} end marker"
    _checked.add((path, st.st_size, st.st_mtime_ns))
    return None


def check_images(datasets):
    """Every image file of the given splits, checked at once: one DataError listing every bad file."""
    bad = {}
    for ds in datasets:
        for image in dict.fromkeys(i for i in ds.images if isinstance(i, str)):
            problem = image_problem(image)
            if problem:
                bad[image] = (ds.split, problem)
    if bad:
        lines = "\n".join(f"  {path} ({split}): {problem}" for path, (split, problem) in bad.items())
        raise DataError(f"{len(bad)} image file(s) cannot be read:\n{lines}\nre-download these files (or remove "
                        f"their rows from the split's file); nothing was trained")


def warn_overlaps(splits):
    """Warn (with counts) about ids repeated within a split and val / test samples whose id is also in train.
    MM-IMDb's "<movie>#<k>" counts as its movie."""
    base = {ds.split: [i.split("#")[0] if ds.name == "mmimdb" else i for i in ds.ids] for ds in splits}
    for ds in splits:
        ids = ds.ids
        repeated = len(ids) - len(set(ids))
        if repeated:
            print(f"warning: {ds.name} {ds.split}: {repeated} repeated sample ids (each is read as a sample)")
    train = set(base.get("train", []))
    for split in ("val", "test"):
        shared = sorted(set(base.get(split, [])) & train)
        if shared:
            print(f"warning: {splits[0].name} {split}: {len(shared)} samples also in train "
                  f"(e.g. {', '.join(shared[:3])}); its {split} numbers are not held-out numbers")


def read_split(args, split, missing_type=None, rate=None):
    """One split as the run's arguments say: train / val with --missing --rate, test with --test-missing --test-rate
    (or the given type and rate, for the robustness grid); tables drawn with `table_seed(args)`. No weights needed."""
    food101_split = getattr(args, "food101_split", "official")
    if food101_split != "official" and args.dataset != "food101":
        raise DataError(f"--food101-split {food101_split} applies to --dataset food101 only, not {args.dataset}")
    if split == "test":
        missing_type, rate = missing_type or args.test_missing, args.test_rate if rate is None else rate
    else:
        missing_type, rate = args.missing, args.rate
    return load_split(args.dataset, args.data_root, split, missing_type=missing_type, rate=rate, seed=table_seed(args),
                      hm_test=args.hm_test, mmimdb_plots=args.mmimdb_plots,
                      food101_split=food101_split)


def read_splits(args):
    """train, val, test read and checked (every image file, repeated ids, overlaps): a run's data, before weights."""
    splits = [read_split(args, s) for s in SPLITS]
    check_images(splits)
    warn_overlaps(splits)
    return splits


def with_image_cache(args, bb, ds):
    """--cache-images: the split read through the image cache for this backbone's preprocessing."""
    return CachedImages(ds, bb, args.image_cache_dir, args.num_workers) if args.cache_images else ds


def load_data(args, bb, split, missing_type=None, rate=None):
    """One split read, its images checked, and (--cache-images) cached: what the robustness grid evaluates on."""
    ds = read_split(args, split, missing_type, rate)
    check_images([ds])
    return with_image_cache(args, bb, ds)


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

def global_batches(n, batch_size, seed, epoch, min_last=1):
    """Seeded permutation of the training set cut into global batches. The incomplete last batch is kept, as the
    official loaders do (drop_last False): its step averages the loss over its own samples. Only a remainder smaller
    than `min_last` (the number of processes, which each need a sample) is dropped. Identical on every rank."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    batches = [order[k:k + batch_size] for k in range(0, n, batch_size)]
    return batches if len(batches) == 1 or len(batches[-1]) >= min_last else batches[:-1]


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
