"""Data that real downloads contain, and the run around it: the official Food-101 split, the table seed, bad files
that must fail before training (naming file, line and fix), the image cache that must not change a run, and the
files a run writes. Every trap is a small file written by the test.

Oracles: the split files and JSON rows as written here, hashlib, numpy arithmetic, os.stat.
"""
import csv
import hashlib
import json
import os
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import map as map_method
from data import DataError, load_split, missing_table
from tests.fixtures import built_by_main, make_food101, make_hatememes, make_mmimdb


def load(dataset, root, split, **kwargs):
    return load_split(dataset, root, split, **{"missing_type": "none", "rate": 0.0, "seed": 0, **kwargs})


def args_for(dataset, root, **kw):
    base = dict(dataset=dataset, data_root=root, missing="both", rate=0.5, test_missing="both", test_rate=0.5,
                seed=0, table_seed=0, hm_test="seen", mmimdb_plots="all", food101_split="official")
    return types.SimpleNamespace(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------
# Food-101: the official validation split (MAP / MemPrompt's split.json, AOEPT's valid.csv)
# ----------------------------------------------------------------------------------------------------

def test_food101_official_split_json_is_the_default(tmp_path):
    """ROOT/split.json (MAP's format: file names) decides train and val; here val = rows 0 and 1 of each class, a
    choice the per-class carve (one row per class) cannot make."""
    root = make_food101(tmp_path, n_train=12, n_test=4)
    path = os.path.join(root, "split.json")
    official = json.load(open(path))
    names = official["train"] + official["val"]
    official["val"] = [n for n in names if n.rsplit("train", 1)[1] in ("0.jpg", "1.jpg")]
    official["train"] = [n for n in names if n not in official["val"]]
    json.dump(official, open(path, "w"))
    train, val, test = (load("food101", root, s) for s in ("train", "val", "test"))
    assert sorted(val.ids) == sorted(name[:-4] for name in official["val"]) and len(val) == 6
    assert sorted(train.ids) == sorted(name[:-4] for name in official["train"])
    assert test.ids == [name[:-4] for name in official["test"]]
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert val.source == {"file": os.path.abspath(path), "sha256": sha, "food101_split": "official"}
    assert train.source == val.source


def test_food101_split_json_train_list_is_honoured(tmp_path, capsys):
    """A train row that split.json lists in neither train nor val is left out, with a line that says so."""
    root = make_food101(tmp_path, n_train=12, n_test=2)
    path = os.path.join(root, "split.json")
    official = json.load(open(path))
    dropped = official["train"].pop(4)
    json.dump(official, open(path, "w"))
    train, val = load("food101", root, "train"), load("food101", root, "val")
    assert dropped[:-4] not in train.ids + val.ids and train.ids == [name[:-4] for name in official["train"]]
    assert "1 rows of train_titles.csv are in neither list" in capsys.readouterr().out


def test_food101_aoept_valid_csv_and_a_path(tmp_path):
    """AOEPT's valid.csv (header "id", stems): val = its rows, train = every other train row; a file given by path
    is read the same way."""
    root = make_food101(tmp_path / "f", n_train=12, n_test=2, split_file=False)
    chosen = ["apple_pie_train0", "bibimbap_train5", "bibimbap_train7"]
    with open(os.path.join(root, "valid.csv"), "w") as f:
        f.write("id\n" + "\n".join(chosen) + "\n")
    val, train = load("food101", root, "val"), load("food101", root, "train")
    assert val.ids == chosen and len(train) == 36 - 3 and not set(chosen) & set(train.ids)
    assert val.source["file"].endswith("valid.csv")
    other = tmp_path / "elsewhere.csv"
    other.write_text("id\napple_pie_train3\n")
    assert load("food101", root, "val", food101_split=str(other)).ids == ["apple_pie_train3"]


def test_food101_without_split_file_is_refused_and_per_class_is_the_opt_in(tmp_path, capsys):
    root = make_food101(tmp_path, n_train=12, n_test=2, split_file=False)
    with pytest.raises(DataError) as error:
        load("food101", root, "val")
    message = str(error.value)
    for needed in ("split.json", "valid.csv", "missing_aware_prompts", "AOEPT", "--food101-split per-class", root):
        assert needed in message
    with pytest.raises(DataError, match="file not found"):
        load("food101", root, "val", food101_split=str(tmp_path / "nope.json"))
    val = load("food101", root, "val", food101_split="per-class")
    assert np.bincount(val.labels()).tolist() == [1, 1, 1]
    assert val.source["food101_split"] == "per-class"
    assert "differs from the official split" in capsys.readouterr().out


def test_food101_split_flag_on_another_dataset_refused():
    with pytest.raises(DataError, match="--food101-split per-class applies to --dataset food101 only"):
        data.read_split(args_for("toy", None, food101_split="per-class"), "val")
    assert len(data.read_split(args_for("toy", None), "val")) == 128


def test_food101_split_recorded_in_the_protocol(tmp_path, monkeypatch, capsys):
    root = make_food101(tmp_path / "f", n_train=12, n_test=2)
    run, model, _ = built_by_main(map_method, ["--dataset", "food101", "--data-root", root, "--backbone", "tiny-clip",
                                               "--out", str(tmp_path / "run")], monkeypatch)
    splits = common.protocol(run)["splits"]
    assert splits["val"]["source"]["file"] == os.path.abspath(os.path.join(root, "split.json"))
    assert splits["val"]["source"]["sha256"] == data.file_sha256(os.path.join(root, "split.json"))
    assert splits["test"]["source"]["file"].endswith("test_titles.csv")
    assert "split.json" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Missing tables: their own seed, not the run's
# ----------------------------------------------------------------------------------------------------

def built_tables(monkeypatch, tmp_path, *extra):
    run, _, _ = built_by_main(map_method, ["--backbone", "tiny-clip", "--out", str(tmp_path / "r"), *extra],
                              monkeypatch)
    return run


def test_table_seed_is_not_the_run_seed(tmp_path, monkeypatch):
    a = built_tables(monkeypatch, tmp_path, "--seed", "0")
    b = built_tables(monkeypatch, tmp_path, "--seed", "5")
    for split in ("train_set", "val_set", "test_set"):
        assert np.array_equal(getattr(a, split).missing, getattr(b, split).missing)
    assert np.array_equal(b.test_set.missing, missing_table(128, "both", 0.7, dataset="toy", split="test", seed=0))
    assert common.protocol(b)["table_seed"] == 0 and common.protocol(b)["seed"] == 5
    redrawn = built_tables(monkeypatch, tmp_path, "--seed", "5", "--table-seed", "run")
    assert np.array_equal(redrawn.test_set.missing, missing_table(128, "both", 0.7, dataset="toy", split="test", seed=5))
    assert not np.array_equal(redrawn.test_set.missing, b.test_set.missing)
    assert common.protocol(redrawn)["table_seed"] == 5 and common.protocol(redrawn)["table_seed_setting"] == "run"
    fixed = built_tables(monkeypatch, tmp_path, "--seed", "5", "--table-seed", "3")
    assert common.protocol(fixed)["splits"]["test"]["table_hash"] == data.table_hash(
        missing_table(128, "both", 0.7, dataset="toy", split="test", seed=3))
    with pytest.raises(SystemExit):
        map_method.parser().parse_args(["--table-seed", "often"])


# ----------------------------------------------------------------------------------------------------
# Hateful Memes: a val / test split with one class has no AUROC
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split, name", [("val", "dev_seen.jsonl"), ("test", "test_seen.jsonl")])
def test_hatememes_one_class_split_refused(tmp_path, split, name):
    root = make_hatememes(tmp_path)
    path = os.path.join(root, name)
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps({**row, "label": 0}) + "\n" for row in rows)
    with pytest.raises(DataError, match="AUROC") as error:
        load("hatememes", root, split)
    assert name in str(error.value)
    assert len(load("hatememes", root, "train")) == 12


# ----------------------------------------------------------------------------------------------------
# Every image checked before training, every bad file named at once
# ----------------------------------------------------------------------------------------------------

def test_bad_images_all_reported_before_training(tmp_path):
    root = make_food101(tmp_path, n_train=12, n_test=2)
    train, test = load("food101", root, "train"), load("food101", root, "test")
    truncated, empty = train.images[4], test.images[1]
    noise = np.random.default_rng(0).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated, quality=95)              # mostly scan data after a short header
    with open(truncated, "rb") as f:
        head = f.read()
    with open(truncated, "wb") as f:
        f.write(head[:len(head) // 2])                              # header intact, the scan cut short
    open(empty, "wb").close()
    with Image.open(truncated):                                     # PIL opens its header without complaint
        pass
    with pytest.raises(DataError) as error:
        data.read_splits(args_for("food101", root))
    message = str(error.value)
    assert "2 image file(s)" in message and truncated in message and empty in message
    assert "truncated" in message and "re-download" in message


def test_truncated_png_and_good_files_pass(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(good)
    assert data.image_problem(str(good)) is None
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-20])
    assert "truncated" in data.image_problem(str(cut))


def png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height (its pixels are never decoded: PIL reads the size from the header)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def test_decompression_bomb_named(tmp_path):
    root = make_hatememes(tmp_path)
    ds = load("hatememes", root, "test")
    os.remove(ds.images[0])
    png_header_only(tmp_path / "big.png", 20000, 10000)             # 200 megapixels
    os.replace(tmp_path / "big.png", ds.images[0])
    with pytest.raises(DataError, match="too many pixels") as error:
        data.check_images([ds])
    assert ds.images[0] in str(error.value)
    with pytest.raises(DataError, match=os.path.basename(ds.images[0])):
        ds[0]


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    root = make_hatememes(tmp_path)
    ds = load("hatememes", root, "train")
    values = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113 % 65536).astype(np.uint16)
    Image.fromarray(values).save(ds.images[3])
    assert Image.open(ds.images[3]).mode.startswith("I;16")
    rgb = np.asarray(ds[3]["image"])
    expected = np.round(values / 257.0).astype(np.uint8)
    assert rgb.shape == (24, 24, 3) and (rgb == expected[..., None]).all()


# ----------------------------------------------------------------------------------------------------
# Text files: bad bytes, malformed JSON, missing fields, a BOM, MM-IMDb's other shapes
# ----------------------------------------------------------------------------------------------------

def test_non_utf8_bytes_named_with_file_and_line(tmp_path):
    food = make_food101(tmp_path / "f", n_train=12, n_test=2)
    path = os.path.join(food, "texts", "test_titles.csv")
    lines = open(path, "rb").read().split(b"\n")
    lines[2] = lines[2].replace(b",", b" caf\xe9,", 1)
    open(path, "wb").write(b"\n".join(lines))
    with pytest.raises(DataError, match=r"test_titles.csv line 3: byte 0xe9 is not UTF-8"):
        load("food101", food, "test")
    hm = make_hatememes(tmp_path / "h")
    path = os.path.join(hm, "dev_seen.jsonl")
    lines = open(path, "rb").read().split(b"\n")
    lines[1] = lines[1].replace(b'"text": "', b'"text": "\xff', 1)
    open(path, "wb").write(b"\n".join(lines))
    with pytest.raises(DataError, match=r"dev_seen.jsonl line 2: byte 0xff"):
        load("hatememes", hm, "val")
    mm = make_mmimdb(tmp_path / "m")
    movie = json.load(open(os.path.join(mm, "split.json")))["dev"][1]
    path = os.path.join(mm, "dataset", f"{movie}.json")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw.replace(b"movie", b"m\xf6vie", 1))
    with pytest.raises(DataError, match=rf"{movie}.json line 1: byte 0xf6"):
        load("mmimdb", mm, "val")


def test_malformed_json_line_and_missing_text_named(tmp_path):
    root = make_hatememes(tmp_path)
    path = os.path.join(root, "train.jsonl")
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-3] + "\n")
    with pytest.raises(DataError, match=r"train.jsonl line 2: not valid JSON"):
        load("hatememes", root, "train")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows[:2])
        f.write(json.dumps({k: v for k, v in rows[2].items() if k != "text"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl line 3: no 'text' field"):
        load("hatememes", root, "train")
    mm = make_mmimdb(tmp_path / "m")
    open(os.path.join(mm, "split.json"), "w").write('{"train": ["1000",], "dev": [], "test": []}')
    with pytest.raises(DataError, match=r"split.json line 1: not valid JSON"):
        load("mmimdb", mm, "train")


def test_food101_csv_with_a_bom(tmp_path):
    root = make_food101(tmp_path, n_train=12, n_test=2)
    path = os.path.join(root, "texts", "test_titles.csv")
    rows = list(csv.reader(open(path)))
    raw = open(path, "rb").read()
    open(path, "wb").write(b"\xef\xbb\xbf" + raw)
    test = load("food101", root, "test")
    assert test.ids[0] == rows[0][0][:-4] and test.texts == [r[1] for r in rows]


def test_mmimdb_plot_and_genres_as_strings(tmp_path):
    root = make_mmimdb(tmp_path)
    movie = json.load(open(os.path.join(root, "split.json")))["test"][0]
    path = os.path.join(root, "dataset", f"{movie}.json")
    json.dump({"genres": "Comedy", "plot": "one plot as a string"}, open(path, "w"))
    ds = load("mmimdb", root, "test")
    rows = [k for k, i in enumerate(ds.ids) if i.split("#")[0] == movie]
    assert [ds.texts[k] for k in rows] == ["one plot as a string"]
    assert ds.labels()[rows[0]].tolist() == [float(g == "Comedy") for g in data.MMIMDB_GENRES]
    json.dump({"genres": "Drama, Comedy", "plot": ["p"]}, open(path, "w"))
    with pytest.raises(DataError, match="'genres' is the string 'Drama, Comedy'") as error:
        load("mmimdb", root, "test")
    assert f"{movie}.json" in str(error.value)


def test_duplicates_and_test_in_train_warned_with_counts(tmp_path, capsys):
    root = make_mmimdb(tmp_path)
    path = os.path.join(root, "split.json")
    split = json.load(open(path))
    split["test"] = split["test"] + split["train"][:2]              # two train movies also in test
    split["train"] = split["train"] + split["train"][3:4]           # one movie twice in train
    json.dump(split, open(path, "w"))
    data.read_splits(args_for("mmimdb", root, mmimdb_plots="first"))
    out = capsys.readouterr().out
    assert "mmimdb train: 1 repeated sample ids" in out
    assert "mmimdb test: 2 samples also in train" in out
    assert "val" not in out
    data.read_splits(args_for("mmimdb", make_mmimdb(tmp_path / "clean"), mmimdb_plots="first"))
    assert "warning" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Data before weights
# ----------------------------------------------------------------------------------------------------

def no_weights(*args, **kwargs):
    raise AssertionError("the weights were loaded before the data was checked")


def test_missing_data_fails_before_the_weights_load(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_backbone", no_weights)
    with pytest.raises(SystemExit, match="data root not found"):
        common.cli(map_method.parser(), map_method.main,
                   ["--dataset", "hatememes", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    root = make_hatememes(tmp_path / "hm")
    open(os.path.join(root, load("hatememes", root, "test").images[0]), "wb").close()
    with pytest.raises(SystemExit, match="1 image file"):
        common.cli(map_method.parser(), map_method.main,
                   ["--dataset", "hatememes", "--data-root", root, "--out", str(tmp_path / "r")])


# ----------------------------------------------------------------------------------------------------
# --cache-images: the run that builds the cache equals the run that hits it
# ----------------------------------------------------------------------------------------------------

def test_image_cache_build_and_hit_give_the_same_run(tmp_path):
    argv = ["--backbone", "tiny-clip", "--prompt-length", "2", "--epochs", "1", "--batch-size", "128",
            "--micro-batch", "64", "--cache-images", "--image-cache-dir", str(tmp_path / "cache")]
    built = common.cli(map_method.parser(), map_method.main, argv + ["--out", str(tmp_path / "a")])
    assert os.listdir(tmp_path / "cache")
    hit = common.cli(map_method.parser(), map_method.main, argv + ["--out", str(tmp_path / "b")])
    assert [h["loss"] for h in built["history"] if "loss" in h] == [h["loss"] for h in hit["history"] if "loss" in h]
    assert built["metrics"] == hit["metrics"]
    a, b = (load_file(str(tmp_path / o / "checkpoint.safetensors")) for o in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# Files a run writes: the umask's mode, no stale temporary files
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_written_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        data.write_json(str(tmp_path / "r.json"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "r.json").st_mode & 0o777 == 0o666 & ~mask


def test_stale_temporary_files_removed_on_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f".tmp-{data.HOST}-{dead.pid}-abcd_123"
    live = f".tmp-{data.HOST}-{os.getpid()}-zzzz_999"
    other_host = f".tmp-elsewhere-{dead.pid}-abcd_123"
    theirs = ".tmp-notes"
    for name in (stale, live, other_host, theirs):
        (tmp_path / name).write_text("x")
    data.write_json(str(tmp_path / "results.json"), {})
    assert sorted(os.listdir(tmp_path)) == sorted([live, other_host, theirs, "results.json"])


# Semantic breaks of the data guards these tests must catch (python tests/mutations.py --match "trap").
MUTATIONS = [
    {"file": "data.py", "old": '    for name in FOOD101_SPLIT_FILES:\n        if os.path.isfile(os.path.join(root, name)):\n            return os.path.join(root, name)\n',
     "new": "    return None\n", "why": "trap: Food-101 ignores the official split file in the data root (per-class carve)"},
    {"file": "data.py", "old": "    if choice == \"per-class\":\n        return None\n", "new": "",
     "why": "trap: --food101-split per-class is not honoured"},
    {"file": "data.py", "old": "samples = val if split == \"val\" else train", "new": "samples = train if split == \"val\" else val",
     "why": "trap: Food-101 official split with train and val swapped"},
    {"file": "data.py", "old": "stem not in val_names and (train_names is None or stem in train_names)]",
     "new": "stem not in val_names]", "why": "trap: Food-101 train ignores split.json's train list"},
    {"file": "data.py", "old": "    raise DataError(f\"Food-101: the official validation split is not in",
     "new": "    return None\n    raise DataError(f\"Food-101: the official validation split is not in",
     "why": "trap: Food-101 without a split file silently carves per class"},
    {"file": "data.py", "old": "    if food101_split != \"official\" and args.dataset != \"food101\":\n", "new": "    if False:\n",
     "why": "trap: --food101-split on another dataset silently ignored"},
    {"file": "data.py", "old": "return args.seed if seed == \"run\" else int(seed)", "new": "return args.seed",
     "why": "trap: the missing tables follow the run seed again"},
    {"file": "data.py", "old": "return args.seed if seed == \"run\" else int(seed)", "new": "return int(seed) if seed != \"run\" else 0",
     "why": "trap: --table-seed run does not redraw the tables"},
    {"file": "data.py", "old": "    if split != \"train\" and len(set(labels)) < 2:\n", "new": "    if False:\n",
     "why": "trap: a one-class Hateful Memes val/test split is accepted (NaN AUROC)"},
    {"file": "data.py", "old": "            if END_MARKERS[fmt] not in f.read():\n", "new": "            if False:\n",
     "why": "trap: a truncated image passes the check (fails after training)"},
    {"file": "data.py", "old": "                bad[image] = (ds.split, problem)\n", "new": "                raise DataError(problem)\n",
     "why": "trap: the image check stops at the first bad file, unnamed"},
    {"file": "data.py", "old": "    except Image.DecompressionBombError as e:\n        return f\"too many pixels",
     "new": "    except ZeroDivisionError as e:\n        return f\"too many pixels", "why": "trap: a decompression bomb is not named"},
    {"file": "data.py", "old": "    if img.mode.startswith(\"I;16\") or img.mode == \"I\":\n", "new": "    if False:\n",
     "why": "trap: a 16-bit PNG clipped to white by convert(RGB)"},
    {"file": "data.py", "old": "        line = raw[:e.start].count(b\"\\n\") + 1\n", "new": "        line = 1\n",
     "why": "trap: a non-UTF-8 byte reported without its line"},
    {"file": "data.py", "old": "    if raw.startswith(codecs.BOM_UTF8):\n", "new": "    if False:\n",
     "why": "trap: a UTF-8 BOM becomes part of the first Food-101 file name"},
    {"file": "data.py", "old": "            raise DataError(f\"{path} line {line}: not valid JSON", "new": "            raise ValueError(f\"{path} line {line}: not valid JSON",
     "why": "trap: a malformed JSON line is not a DataError"},
    {"file": "data.py", "old": "            if field not in row:\n", "new": "            if field not in row and field != \"text\":\n",
     "why": "trap: a Hateful Memes row without text is a KeyError"},
    {"file": "data.py", "old": "    plot = [plot] if isinstance(plot, str) else plot\n", "new": "",
     "why": "trap: an MM-IMDb plot string is read one sample per character"},
    {"file": "data.py", "old": "        genres = [genres]\n", "new": "",
     "why": "trap: an MM-IMDb genres string gives an all-zero label"},
    {"file": "data.py", "old": "        if genres not in MMIMDB_GENRES and genres not in MMIMDB_IGNORED_GENRES:\n", "new": "        if False:\n",
     "why": "trap: a joined MM-IMDb genres string is guessed, not refused"},
    {"file": "data.py", "old": "        if repeated:\n", "new": "        if False:\n", "why": "trap: repeated ids not warned"},
    {"file": "data.py", "old": "    for split in (\"val\", \"test\"):\n        shared", "new": "    for split in ():\n        shared",
     "why": "trap: test samples also in train not warned"},
    {"file": "common.py", "old": "    splits = read_splits(args)\n    run.bb = load_backbone(args).to(run.device)\n",
     "new": "    run.bb = load_backbone(args).to(run.device)\n    splits = read_splits(args)\n",
     "why": "trap: the weights load before the data is checked"},
    {"file": "data.py", "old": "                                         generator=torch.Generator().manual_seed(0))\n",
     "new": ")\n", "why": "trap: the image-cache build draws from the global RNG (build run differs from a hit)"},
    {"file": "data.py", "old": "    os.chmod(tmp, 0o666 & ~_umask())\n", "new": "",
     "why": "trap: written files are 0600 whatever the umask"},
    {"file": "data.py", "old": "        if m and m[\"host\"] == HOST and not _alive(int(m[\"pid\"])):\n",
     "new": "        if m and m[\"host\"] == HOST:\n", "why": "trap: a live run's temporary file is removed"},
    {"file": "data.py", "old": "        remove_stale_temp(folder)\n", "new": "        pass\n",
     "why": "trap: stale temporary files are never removed"},
    {"file": "common.py", "old": "\"table_hash\": ds.table_hash,\n                        \"source\": getattr(ds, \"source\", None)}",
     "new": "\"table_hash\": ds.table_hash}", "why": "trap: results.json does not record the Food-101 split file"},
]
