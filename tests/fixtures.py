"""Tiny dataset trees in the real download layouts, generated on the fly (never real data).

Each writer fills `root` and returns it as a string. Counts are small so tests stay fast.
"""
import csv
import json
import math
import os
import random
import socket

import numpy as np
import torch
from PIL import Image

WORDS = ["tasty", "fresh", "recipe", "home", "easy", "best", "quick", "classic", "spicy", "sweet",
         "movie", "story", "family", "night", "city", "love", "war", "dark", "funny", "old"]


class Built(Exception):
    """Raised by `built_by_main`'s stand-in for fit: main's run, model and loss, before any training."""


def built_by_main(module, argv, monkeypatch):
    """Run module.main through common.cli up to fit (patched on the module) -> (run, model, loss_fn)."""
    import pytest
    from common import cli

    def stop(run, model, loss_fn, **kw):
        raise Built(run, model, loss_fn)
    monkeypatch.setattr(module, "fit", stop)
    with pytest.raises(Built) as stopped:
        cli(module.parser(), module.main, argv)
    return stopped.value.args


def bce_by_a_loop(logits, labels):
    """Binary cross-entropy averaged over samples and classes, one term at a time (the multi-label task loss)."""
    z, y = logits.double(), labels.double()
    terms = [-(y[b, c] * math.log(torch.sigmoid(z[b, c])) + (1 - y[b, c]) * math.log(1 - torch.sigmoid(z[b, c])))
             for b in range(z.shape[0]) for c in range(z.shape[1])]
    return float(sum(terms) / len(terms))


def train_and_eval_logits(model, batch):
    """The same batch through the model in training mode and in eval mode, each after torch.manual_seed(0) (so any
    dropout draws the same masks on both sides) -> (trained, evaluated) logits."""
    torch.manual_seed(0)
    trained = model.train()(batch)["logits"]
    torch.manual_seed(0)
    return trained, model.eval()(batch)["logits"]


def free_port():
    """A TCP port no process listens on now (torchrun's rendezvous; a fixed port fails where one is taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_image(path, rng, size=(24, 24)):
    colour = tuple(rng.randrange(256) for _ in range(3))
    Image.new("RGB", size, colour).save(path)


def _sentence(rng, n_words=5):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def food101_fixture_val(labels):
    """Rows (indices into the train CSV) the fixture's split.json puts in val: floor(n_c / 10) of each class c,
    drawn as --food101-split per-class draws them (numpy default_rng(0), one permutation per class in label order),
    so the fixture trees give the same train / val with either choice (tests that need them apart write their own
    split file)."""
    rng, labels, val = np.random.default_rng(0), np.asarray(labels), []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        val.extend(rng.permutation(rows)[:len(rows) // 10].tolist())
    return sorted(val)


def make_food101(root, classes=("apple_pie", "baby_back_ribs", "bibimbap"), n_train=12, n_test=4, split_file=True):
    """images/{train,test}/<class>/<class>_<n>.jpg, texts/{train,test}_titles.csv (no header) and, as MAP's
    datasets/Food101/split.json, split.json {"train", "val", "test": lists of file names} whose val holds the
    rows `food101_fixture_val` names (split_file=False: no split file).

    n_train and n_test are per class; rows are written class by class.
    """
    rng = random.Random(0)
    os.makedirs(os.path.join(root, "texts"), exist_ok=True)
    official = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for name in classes:
            folder = os.path.join(root, "images", split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                filename = f"{name}_{split}{i}.jpg"
                _write_image(os.path.join(folder, filename), rng)
                rows.append([filename, _sentence(rng), name])
        with open(os.path.join(root, "texts", f"{split}_titles.csv"), "w", newline="") as f:
            csv.writer(f).writerows(rows)
        official[split] = [row[0] for row in rows]
    if split_file:
        val = set(food101_fixture_val([sorted(classes).index(row[2]) for row in rows_of(root, "train")]))
        official["val"] = [name for k, name in enumerate(official["train"]) if k in val]
        official["train"] = [name for k, name in enumerate(official["train"]) if k not in val]
        with open(os.path.join(root, "split.json"), "w") as f:
            json.dump(official, f)
    return str(root)


def rows_of(root, split):
    with open(os.path.join(root, "texts", f"{split}_titles.csv"), newline="") as f:
        return list(csv.reader(f))


# Genres cycled through the fixture's movies; News and Reality-TV are outside the 23 and must be ignored.
MMIMDB_FIXTURE_GENRES = [["Drama"], ["Comedy", "Romance"], ["Film-Noir", "News"], ["Sci-Fi", "Action", "Drama"],
                         ["Reality-TV"], ["Documentary", "Short"]]


def make_mmimdb(root, n=(12, 4, 4)):
    """split.json (train/dev/test, 7-char ids) and dataset/<id>.jpeg + dataset/<id>.json.

    Movie k gets genres MMIMDB_FIXTURE_GENRES[k % 6]; every third movie has only "plot outline".
    """
    rng = random.Random(1)
    folder = os.path.join(root, "dataset")
    os.makedirs(folder, exist_ok=True)
    split, k = {}, 0
    for key, count in zip(("train", "dev", "test"), n):
        split[key] = []
        for _ in range(count):
            movie = f"{1000 + 7 * k:07d}"
            meta = {"genres": MMIMDB_FIXTURE_GENRES[k % len(MMIMDB_FIXTURE_GENRES)], "title": f"movie {k}"}
            if k % 3 == 2:
                meta["plot outline"] = f"outline {k} " + _sentence(rng)
            else:
                meta["plot"] = [f"plot {k} " + _sentence(rng), "second plot " + _sentence(rng)]
            with open(os.path.join(folder, f"{movie}.json"), "w") as f:
                json.dump(meta, f)
            _write_image(os.path.join(folder, f"{movie}.jpeg"), rng)
            split[key].append(movie)
            k += 1
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump(split, f)
    return str(root)


def make_hatememes(root, n=(12, 4, 4)):
    """img/<5-digit id>.png and train/dev_seen/test_seen/dev_unseen/test_unseen.jsonl, plus Kaggle's
    unlabeled test.jsonl. Ids start below 10000 (zero-padded file names, integer ids in the JSONL).
    Row k has label k % 2.
    """
    rng = random.Random(2)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    files = {"train.jsonl": n[0], "dev_seen.jsonl": n[1], "test_seen.jsonl": n[2],
             "dev_unseen.jsonl": n[1], "test_unseen.jsonl": n[2]}
    k = 0
    for name, count in files.items():
        rows = []
        for _ in range(count):
            meme = 1235 + 997 * k
            img = f"img/{meme:05d}.png"
            _write_image(os.path.join(root, img), rng)
            rows.append({"id": meme, "img": img, "label": k % 2, "text": _sentence(rng)})
            k += 1
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if name == "test_seen.jsonl":
            with open(os.path.join(root, "test.jsonl"), "w") as f:
                f.writelines(json.dumps({key: row[key] for key in ("id", "img", "text")}) + "\n" for row in rows)
    return str(root)
