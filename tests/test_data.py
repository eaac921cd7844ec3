"""Tests for data.py: missing-table counts, the three readers on fixture trees, and the toy data.

Oracles are exact counts and values recomputed here from what the fixtures wrote.
"""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data import (COMPLETE, IMAGE_MISSING, TEXT_MISSING, DataError, load_split, missing_table, table_counts,
                  table_hash)
from tests.fixtures import MMIMDB_FIXTURE_GENRES, make_food101, make_hatememes, make_mmimdb

GENRES_MAP_ORDER = ["Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
                    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
                    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir"]


def load(dataset, root, split, **kwargs):
    kwargs = {"missing_type": "none", "rate": 0.0, "seed": 0, **kwargs}
    return load_split(dataset, root, split, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Missing tables
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, rate, total", [(10, 0.7, 7), (1001, 0.7, 700), (1001, 0.9, 900), (3, 0.5, 1),
                                            (100, 0.0, 0), (100, 1.0, 100), (22716, 0.7, 15901), (7, 0.3, 2),
                                            (90, 0.7, 63)])                # float: 90 * 0.7 = 62.999...
def test_missing_counts(n, rate, total):
    text = missing_table(n, "text", rate, dataset="d", split="train", seed=0)
    image = missing_table(n, "image", rate, dataset="d", split="train", seed=0)
    both = missing_table(n, "both", rate, dataset="d", split="train", seed=0)
    assert text.dtype == np.int8 and text.shape == (n,)
    assert table_counts(text) == {"complete": n - total, "text": total, "image": 0}
    assert table_counts(image) == {"complete": n - total, "text": 0, "image": total}
    assert table_counts(both) == {"complete": n - total, "text": total - total // 2, "image": total // 2}
    assert set(np.unique(both)) <= {COMPLETE, TEXT_MISSING, IMAGE_MISSING}


def test_missing_none_is_all_complete():
    table = missing_table(50, "none", 0.7, dataset="d", split="test", seed=3)
    assert (table == COMPLETE).all()


def test_missing_table_deterministic_and_seeded():
    args = dict(dataset="food101", split="train", seed=0)
    a = missing_table(1000, "both", 0.7, **args)
    assert np.array_equal(a, missing_table(1000, "both", 0.7, **args))
    assert table_hash(a) == table_hash(missing_table(1000, "both", 0.7, **args))
    assert len(table_hash(a)) == 16
    assert not np.array_equal(a, missing_table(1000, "both", 0.7, dataset="food101", split="train", seed=1))


def test_missing_tables_differ_between_splits():
    tables = [missing_table(500, "text", 0.5, dataset="mmimdb", split=s, seed=0) for s in ("train", "val", "test")]
    assert not np.array_equal(tables[0], tables[1])
    assert not np.array_equal(tables[0], tables[2])
    assert not np.array_equal(tables[1], tables[2])


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_missing_rate_out_of_range(rate):
    with pytest.raises(DataError, match="rate"):
        missing_table(10, "text", rate, dataset="d", split="train", seed=0)


def test_missing_unknown_type():
    with pytest.raises(DataError, match="missing type"):
        missing_table(10, "audio", 0.5, dataset="d", split="train", seed=0)


def test_dataset_attaches_table(food101_root):
    ds = load("food101", food101_root, "train", missing_type="both", rate=0.7, seed=5)
    expected = missing_table(len(ds), "both", 0.7, dataset="food101", split="train", seed=5)
    assert np.array_equal(ds.missing, expected)
    assert ds.table_hash == table_hash(expected)
    assert [ds[i]["missing"] for i in range(len(ds))] == expected.tolist()


# ----------------------------------------------------------------------------------------------------
# Food-101
# ----------------------------------------------------------------------------------------------------

CLASSES = ("apple_pie", "baby_back_ribs", "bibimbap")


def test_food101_counts_and_labels(food101_root):
    train, val, test = (load("food101", food101_root, s) for s in ("train", "val", "test"))
    # 12 train rows per class: floor(12 / 10) = 1 per class goes to val.
    assert (len(train), len(val), len(test)) == (33, 3, 12)
    assert train.class_names == sorted(CLASSES) and train.num_classes == 3
    for ds in (train, val, test):
        for i, sample_id in enumerate(ds.ids):
            assert ds.labels()[i] == CLASSES.index(sample_id.rsplit("_", 1)[0])
    assert np.bincount(val.labels(), minlength=3).tolist() == [1, 1, 1]
    assert not set(train.ids) & set(val.ids)
    assert all(i.rsplit("_", 1)[1].startswith("test") for i in test.ids)


def test_food101_item_and_text(food101_root):
    with open(os.path.join(food101_root, "texts", "test_titles.csv")) as f:
        rows = list(csv.reader(f))
    test = load("food101", food101_root, "test")
    item = test[0]
    assert item["id"] == rows[0][0][:-4] and item["text"] == rows[0][1]
    assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
    assert isinstance(item["label"], int) and test.labels().dtype == np.int64


def test_food101_stratified_val_rule(tmp_path):
    """--food101-split per-class: floor(n_c / 10) train rows of each class, a fixed carve."""
    root = make_food101(tmp_path, classes=("a_cls", "b_cls"), n_train=25, n_test=2, split_file=False)
    train, val = (load("food101", root, s, food101_split="per-class") for s in ("train", "val"))
    assert np.bincount(val.labels()).tolist() == [math.floor(25 / 10)] * 2
    assert len(train) == 50 - 4 and not set(train.ids) & set(val.ids)
    assert np.array_equal(val.ids, load("food101", root, "val", seed=7, food101_split="per-class").ids)


def test_food101_header_row_and_empty_titles(tmp_path, capsys):
    root = make_food101(tmp_path, n_train=12, n_test=4)
    path = os.path.join(root, "texts", "test_titles.csv")
    with open(path) as f:
        rows = list(csv.reader(f))
    rows[0][1] = ""
    rows[3][1] = "  "
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["filename", "text", "label"]] + rows)
    test = load("food101", root, "test")
    assert len(test) == 12 - 2
    assert "dropped 2" in capsys.readouterr().out


def test_food101_missing_image_named(tmp_path):
    root = make_food101(tmp_path)
    missing = os.path.join(root, "images", "test", "bibimbap", "bibimbap_test1.jpg")
    os.remove(missing)
    with pytest.raises(DataError, match="bibimbap_test1.jpg"):
        load("food101", root, "test")


def test_unreadable_image_named_on_access(tmp_path):
    root = make_food101(tmp_path)
    test = load("food101", root, "test")
    with open(test.images[2], "wb") as f:
        f.write(b"this is not a jpeg")
    test[1]
    with pytest.raises(DataError, match=os.path.basename(test.images[2])):
        test[2]


@pytest.mark.parametrize("dataset", ["food101", "mmimdb", "hatememes"])
def test_missing_root_prints_layout(tmp_path, dataset):
    with pytest.raises(DataError, match="expected layout") as error:
        load(dataset, str(tmp_path / "nowhere"), "train")
    assert "nowhere" in str(error.value)
    with pytest.raises(DataError, match="expected layout"):
        load(dataset, None, "train")


def test_missing_file_prints_layout(tmp_path):
    with pytest.raises(DataError, match="split.json") as error:
        load("mmimdb", str(tmp_path), "train")
    assert "expected layout" in str(error.value)


# ----------------------------------------------------------------------------------------------------
# MM-IMDb
# ----------------------------------------------------------------------------------------------------

def test_mmimdb_counts_genres_and_text(mmimdb_root):
    sizes = {}
    for split in ("train", "val", "test"):
        ds = load("mmimdb", mmimdb_root, split, mmimdb_plots="first")
        sizes[split] = len(ds)
        labels = ds.labels()
        assert labels.dtype == np.float32 and labels.shape == (len(ds), 23)
        assert ds.class_names == GENRES_MAP_ORDER
        for i, movie in enumerate(ds.ids):
            k = (int(movie) - 1000) // 7
            expected = np.zeros(23, dtype=np.float32)
            for genre in MMIMDB_FIXTURE_GENRES[k % len(MMIMDB_FIXTURE_GENRES)]:
                if genre in GENRES_MAP_ORDER:
                    expected[GENRES_MAP_ORDER.index(genre)] = 1
            assert np.array_equal(labels[i], expected)
            assert np.array_equal(ds[i]["label"], expected)
            prefix = "outline" if k % 3 == 2 else "plot"
            assert ds.texts[i].startswith(f"{prefix} {k} ")
    assert sizes == {"train": 12, "val": 4, "test": 4}
    with open(os.path.join(mmimdb_root, "split.json")) as f:
        assert load("mmimdb", mmimdb_root, "val", mmimdb_plots="first").ids == json.load(f)["dev"]


def fixture_plots(root, split):
    """(movie, text) per sample as MAP's make_arrow (single_plot=False) and its dataset's index_mapper give them:
    every plot of every movie, in split order; a movie without plots contributes its outline (our fallback)."""
    with open(os.path.join(root, "split.json")) as f:
        movies = json.load(f)[{"train": "train", "val": "dev", "test": "test"}[split]]
    pairs = []
    for movie in movies:
        with open(os.path.join(root, "dataset", f"{movie}.json")) as f:
            meta = json.load(f)
        pairs += [(movie, text) for text in meta.get("plot", [meta.get("plot outline")])]
    return movies, pairs


def test_mmimdb_all_plots_one_sample_each_missing_drawn_per_movie(mmimdb_root, tmp_path):
    import common
    for split in ("train", "val", "test"):
        movies, pairs = fixture_plots(mmimdb_root, split)
        ds = load("mmimdb", mmimdb_root, split, missing_type="both", rate=0.7, seed=4)
        first = load("mmimdb", mmimdb_root, split, missing_type="both", rate=0.7, seed=4, mmimdb_plots="first")
        assert len(ds) == len(pairs) > len(movies) and len(set(ds.ids)) == len(ds)
        assert [(i.split("#")[0], t) for i, t in zip(ds.ids, ds.texts)] == pairs
        assert [int(i.split("#")[1]) for i in ds.ids[:2]] == [0, 1]
        # the table is drawn over the movies (MAP indexes it by movie): every plot carries its movie's code
        code = dict(zip(first.ids, first.missing))
        assert [int(code[i.split("#")[0]]) for i in ds.ids] == ds.missing.tolist()
        assert table_counts(first.missing)["complete"] == len(movies) - len(movies) * 7 // 10
        label = dict(zip(first.ids, first.labels().tolist()))
        assert [label[i.split("#")[0]] for i in ds.ids] == ds.labels().tolist()
    path = tmp_path / "predictions.csv"
    common.write_predictions(str(path), ds, np.full((len(ds), 23), 0.25), "multilabel", ds.class_names)
    with open(path) as f:
        assert [r["id"] for r in csv.DictReader(f)] == ds.ids


def test_mmimdb_flat_root_and_missing_fields(tmp_path):
    root = make_mmimdb(tmp_path / "archive")
    flat = tmp_path / "flat"
    shutil.copytree(os.path.join(root, "dataset"), flat)
    shutil.copy(os.path.join(root, "split.json"), flat)
    assert len(load("mmimdb", str(flat), "val", mmimdb_plots="first")) == 4
    with open(os.path.join(root, "split.json")) as f:
        movie = json.load(f)["test"][0]
    json_path = os.path.join(root, "dataset", f"{movie}.json")
    with open(json_path, "w") as f:
        json.dump({"genres": ["Drama"]}, f)
    with pytest.raises(DataError, match="plot outline"):
        load("mmimdb", root, "test")
    with open(json_path, "w") as f:
        json.dump({"plot": ["a plot"]}, f)
    with pytest.raises(DataError, match="genres"):
        load("mmimdb", root, "test")


# ----------------------------------------------------------------------------------------------------
# Hateful Memes
# ----------------------------------------------------------------------------------------------------

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split, filename", [("train", "train.jsonl"), ("val", "dev_seen.jsonl"),
                                             ("test", "test_seen.jsonl")])
def test_hatememes_counts_and_labels(hatememes_root, split, filename):
    rows = read_jsonl(os.path.join(hatememes_root, filename))
    ds = load("hatememes", hatememes_root, split)
    assert len(ds) == len(rows) == {"train": 12, "val": 4, "test": 4}[split]
    assert ds.labels().tolist() == [row["label"] for row in rows]
    assert ds.ids == [f"{row['id']:05d}" for row in rows]
    assert ds.class_names == ["not_hateful", "hateful"]
    assert ds[0]["image"].mode == "RGB" and ds[0]["text"] == rows[0]["text"]


def test_hatememes_unseen(hatememes_root):
    rows = read_jsonl(os.path.join(hatememes_root, "test_unseen.jsonl"))
    ds = load("hatememes", hatememes_root, "test", hm_test="unseen")
    assert ds.ids == [f"{row['id']:05d}" for row in rows]


def test_hatememes_unlabeled_test_file(tmp_path):
    root = make_hatememes(tmp_path)
    os.replace(os.path.join(root, "test.jsonl"), os.path.join(root, "test_seen.jsonl"))
    with pytest.raises(DataError, match="no labels") as error:
        load("hatememes", root, "test")
    assert "test_seen.jsonl" in str(error.value)


def test_hatememes_bad_label(tmp_path):
    root = make_hatememes(tmp_path)
    path = os.path.join(root, "dev_seen.jsonl")
    rows = read_jsonl(path)
    rows[1]["label"] = 2
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with pytest.raises(DataError, match="not 0 or 1"):
        load("hatememes", root, "val")


# ----------------------------------------------------------------------------------------------------
# Toy data
# ----------------------------------------------------------------------------------------------------

TOYS = ["toy", "toy-multilabel", "toy-binary"]


@pytest.mark.parametrize("dataset", TOYS)
def test_toy_sizes_and_determinism(dataset):
    for split, n in (("train", 512), ("val", 128), ("test", 128)):
        a = load(dataset, None, split, seed=0)
        b = load(dataset, "/ignored", split, seed=99)
        assert len(a) == n and a.ids[0] == f"{split}-0000"
        assert np.array_equal(a.labels(), b.labels()) and a.texts == b.texts
        assert np.array_equal(np.asarray(a[5]["image"]), np.asarray(b[5]["image"]))
    item = a[0]
    assert item["image"].size == (64, 64) and item["image"].mode == "RGB"
    assert item["text"].isascii() and item["text"] == item["text"].lower()
    assert not np.array_equal(load(dataset, None, "val").labels(), load(dataset, None, "test").labels())


def probe_scores(dataset):
    """Logistic-regression probe on mean RGB and on bag of words: test metric per modality."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.multioutput import MultiOutputClassifier

    train, test = load(dataset, None, "train"), load(dataset, None, "test")
    rgb = [np.stack([np.asarray(ds[i]["image"], np.float32).mean(axis=(0, 1)) / 255 for i in range(len(ds))])
           for ds in (train, test)]
    vectorizer = CountVectorizer().fit(train.texts)
    words = [vectorizer.transform(ds.texts).toarray() for ds in (train, test)]
    features = {"image": rgb, "text": words, "both": [np.hstack(pair) for pair in zip(rgb, words)]}
    scores = {}
    for modality, (x_train, x_test) in features.items():
        model = LogisticRegression(C=10, max_iter=2000)
        if train.task == "multilabel":
            model = MultiOutputClassifier(model)
        model.fit(x_train, train.labels())
        if train.task == "multiclass":
            scores[modality] = accuracy_score(test.labels(), model.predict(x_test))
        elif train.task == "multilabel":
            scores[modality] = f1_score(test.labels(), model.predict(x_test), average="macro", zero_division=0)
        else:
            scores[modality] = roc_auc_score(test.labels(), model.predict_proba(x_test)[:, 1])
    return scores


# Measured: toy 0.41 / 0.54 / 0.95; toy-multilabel 0.74 / 0.74 / 0.96; toy-binary 0.75 / 0.83 / 0.97
# (image / text / both). Asserted margins leave room for solver differences.
@pytest.mark.parametrize("dataset, margin, floor", [("toy", 0.30, 0.85), ("toy-multilabel", 0.15, 0.85),
                                                    ("toy-binary", 0.08, 0.90)])
def test_toy_modalities_are_complementary(dataset, margin, floor):
    scores = probe_scores(dataset)
    assert scores["both"] >= floor
    assert scores["both"] - max(scores["image"], scores["text"]) >= margin, scores


# Semantic breaks of data.py these tests must catch (python tests/mutations.py --file data.py).
MUTATIONS = [
    {"file": "data.py", "old": "missing_type or args.test_missing, args.test_rate", "new": "missing_type or args.missing, args.test_rate",
     "why": "the test split is drawn with the training missing type",
     "tests": ["tests/test_memprompt.py::test_train_text_missing_test_image_missing"]},
    {"file": "data.py", "old": "total = n * exact_rate.numerator // exact_rate.denominator", "new": "total = int(n * rate)",
     "why": "the missing count in floating point (90 x 0.7 -> 62)"},
    {"file": "data.py", "old": "        n_image = total // 2\n", "new": "        n_image = total - total // 2\n",
     "why": "'both': the odd sample goes to image-missing instead of text-missing"},
    {"file": "data.py", "old": "        table[order[:total]] = TEXT_MISSING\n", "new": "        table[order[:total]] = IMAGE_MISSING\n",
     "why": "'text' marks the image missing"},
    {"file": "data.py", "old": "_stable_seed(f\"{dataset}/{split}/{missing_type}/{rate}/{seed}\")",
     "new": "_stable_seed(f\"{dataset}/{missing_type}/{rate}/{seed}\")", "why": "every split gets the same missing table"},
    {"file": "data.py", "old": "_stable_seed(f\"{dataset}/{split}/{missing_type}/{rate}/{seed}\")",
     "new": "_stable_seed(f\"{dataset}/{split}/{missing_type}/{rate}\")", "why": "the missing table ignores the run seed"},
    {"file": "data.py", "old": "if (k in val) == (split == \"val\")]", "new": "if (k in val) != (split == \"val\")]",
     "why": "Food-101 train and val swapped"},
    {"file": "data.py", "old": "n_val = len(rows) * FOOD101_VAL_FRACTION.numerator // FOOD101_VAL_FRACTION.denominator",
     "new": "n_val = len(rows) // 5", "why": "Food-101 val carves 20% instead of 10% per class"},
    {"file": "data.py", "old": "        if not text.strip():\n", "new": "        if not text:\n",
     "why": "Food-101 keeps whitespace-only titles"},
    {"file": "data.py", "old": "{\"train\": \"train\", \"val\": \"dev\", \"test\": \"test\"}[split]",
     "new": "{\"train\": \"train\", \"val\": \"test\", \"test\": \"test\"}[split]",
     "why": "MM-IMDb validates on the test split"},
    {"file": "data.py", "old": "if genre in genre_index:", "new": "if genre in genre_index and genre != \"Drama\":",
     "why": "a genre of the 23 is dropped"},
    {"file": "data.py", "old": "\"val\": f\"dev_{hm_test}.jsonl\"", "new": "\"val\": f\"test_{hm_test}.jsonl\"",
     "why": "Hateful Memes validates on the test file"},
    {"file": "data.py", "old": "ids.append(str(row[\"id\"]).zfill(5))", "new": "ids.append(str(row[\"id\"]))",
     "why": "Hateful Memes ids lose their zero padding (no longer the image file names)"},
    {"file": "data.py", "old": 'return found if plots == "all" else found[:1]', "new": "return found[:1]",
     "why": "--mmimdb-plots all keeps only the first plot"},
    {"file": "data.py", "old": "self.missing = missing_table(n_rows, missing_type, rate, dataset=name, split=split, seed=seed)[groups]",
     "new": "self.missing = missing_table(len(groups), missing_type, rate, dataset=name, split=split, seed=seed)",
     "why": "the MM-IMDb missing table drawn over plots, not movies"},
]
