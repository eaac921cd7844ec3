"""PROMISE: FNCL / CCCL against brute-force loops, generated features only where a modality is missing, the
encoder never sees a dummy input, cached and uncached training agree, CLI outputs, frozen backbone, toy learning."""
import json
import math
import os

import numpy as np
import pytest
import torch

import promise
from common import Collate, cli, finalize_args, load_backbone, seed_everything
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, load_split

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


# --- mechanism -------------------------------------------------------------------------------------------------
def build(backbone, n=16):
    args = finalize_args(promise.parser().parse_args(["--backbone", backbone, "--fusion-layers", "2"]))
    seed_everything(0)
    bb = load_backbone(args)
    model = promise.PROMISE(bb, 4, args)
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    collate = promise.PromiseCollate(Collate(bb, args.max_text_len), args)
    views = promise.Views(ds, 0, 2)
    return args, model, collate([views[i] for i in range(n)])


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


# --- CLI ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_cached_and_uncached_agree_and_write_outputs(tmp_path, backbone, monkeypatch):
    models = {}
    real_finish = promise.finish

    def spy(run, model, extra=None):
        models[run.args.out] = (run, model)
        return real_finish(run, model, extra)
    monkeypatch.setattr(promise, "finish", spy)
    plain = run_cli(tmp_path, "plain", "--backbone", backbone, *FAST)
    cached = run_cli(tmp_path, "cached", "--backbone", backbone, "--cache-features", *FAST)
    assert cached["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], rel=1e-4)
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
            "--rate", "0.3"]
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
