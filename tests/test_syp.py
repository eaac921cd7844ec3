"""SyP on the tiny backbones: the CLI writes the standard outputs (both backbones, the README's headline command
on a Food-101 tree), only SyP's modules train, the first-layer prompt equals a per-sample loop over the paper's
formulas, S_d lies in [0, 1] and follows the input, layer i's prompt is a function of layer i-1's, each ablation
removes exactly its parameters, and toy training beats the majority class."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import syp
from common import Collate, check_frozen, cli, load_clip, load_vilt, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, load_split

FAST = ["--batch-size", "32", "--micro-batch", "32", "--prompt-length", "4"]


def toy_batch(bb, n=8, missing="both", rate=0.5, start=0):
    ds = load_split("toy", None, "train", missing_type=missing, rate=rate, seed=0)
    return Collate(bb, 40)([ds[i] for i in range(start, start + n)])


def backbone(kind):
    torch.manual_seed(0)
    return load_clip("tiny-clip", "") if kind == "tiny-clip" else load_vilt("tiny-vilt")


def expected_params(bb, length, C, r=16, dynamic=True, static=True, adapter=True):
    """Parameter count of SyP from the sizes alone (brute force over the components)."""
    towers = [bb.width_image, bb.width_text] if bb.kind == "clip" else [bb.width]
    d_x, d = (2 * bb.embed_dim, sum(towers)) if bb.kind == "clip" else (2 * bb.width, bb.width)
    depth = min(6, bb.num_layers)
    count = {"base": 3 * length * sum(towers) if dynamic else 0,
             "adapter": sum(d_x * (d_x // r) + d_x // r + (d_x // r) * D + D for D in towers) if dynamic and adapter else 0,
             "static": 3 * length * (d_x // 2) if static else 0,
             "project": sum((d_x // 2) * D + D for D in towers) if static else 0,
             "F": (depth - 1) * (2 * 2 * d + sum(d * (d // r) + d // r + (d // r) * D + D for D in towers))}
    if bb.kind == "clip":
        count["head"] = 2 * bb.embed_dim * C + C
    else:
        count["head"] = bb.width * C + C + bb.width * bb.width + bb.width      # Linear(D, C) + pooler copy
    return count


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_cli_writes_outputs_and_checkpoint_holds_only_syp(tmp_path, kind):
    out = tmp_path / kind
    results = cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", kind, "--epochs", "1", *FAST,
                                           "--out", str(out)])
    for name in ("results.json", "predictions_test.csv", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["method"] == "syp"
    assert len((out / "predictions_test.csv").read_text().splitlines()) == 128 + 1
    model = syp.SyP(backbone(kind), 4, length=4)
    names = {n for n, _ in model.named_parameters() if not n.startswith("bb.")}
    saved = load_file(out / "checkpoint.safetensors")
    assert set(saved) == names and not any(k.startswith("bb.") for k in saved)
    assert results["trainable_params"] == sum(expected_params(model.bb, 4, C=4).values())


def test_headline_command_on_food101_tree(tmp_path, food101_root):
    out = tmp_path / "food"
    results = cli(syp.parser(), syp.main, ["--dataset", "food101", "--missing", "text", "--rate", "0.7",
                                           "--data-root", food101_root, "--backbone", "tiny-clip", "--epochs", "1",
                                           "--out", str(out)])
    assert (out / "checkpoint.safetensors").is_file() and results["protocol"]["splits"]["train"]["counts"]["text"] > 0
    assert results["config"]["prompt_length"] == 36 and results["config"]["lr"] == 1e-3
    assert results["config"]["batch_size"] == 32 and results["config"]["weight_decay"] == 2e-2


def test_only_syp_trains_and_backbone_is_bit_identical():
    bb = backbone("tiny-clip")
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    model = syp.SyP(bb, 4, length=4)
    check_frozen(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        batch = toy_batch(bb, start=8 * step)
        task_loss(model(batch)["logits"], batch["label"], "multiclass").backward()
        for name, p in model.named_parameters():
            if name.startswith("bb."):
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
    assert not bb.training
    for k, v in bb.state_dict().items():
        assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_first_prompt_matches_per_sample_formulas(kind):
    """P^0_k = sigmoid(W_2 ReLU(W_1 X)) * P_b[m] + F_k(P_s[m]), one sample at a time."""
    bb = backbone(kind)
    model = syp.SyP(bb, 4, length=5).eval()
    sp = model.prompt
    m = torch.tensor([COMPLETE, TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING])
    X = torch.randn(4, sp.static.shape[-1] * 2)
    with torch.no_grad():
        P, S_d = sp.first(m, X)
        for k in sp.towers:
            a = sp.adapter[k]
            for b in range(4):
                s = torch.sigmoid(a[2].weight @ torch.relu(a[0].weight @ X[b] + a[0].bias) + a[2].bias)
                static = sp.static[m[b]] @ sp.project[k].weight.T + sp.project[k].bias
                assert torch.allclose(S_d[k][b], s, atol=1e-6)
                assert torch.allclose(P[k][b], s * sp.base[k][m[b]] + static, atol=1e-6)


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_scale_in_unit_interval_and_follows_input(kind):
    bb = backbone(kind)
    model = syp.SyP(bb, 4, length=4).eval()
    with torch.no_grad():
        a, b = model(toy_batch(bb, start=0))["S_d"], model(toy_batch(bb, start=8))["S_d"]
        batch = toy_batch(bb, missing="none")
        full = model(batch)["S_d"]
        batch["missing"] = torch.full_like(batch["missing"], IMAGE_MISSING)      # X_I zeroed, same pixels
        no_image = model(batch)["S_d"]
    widths = [bb.width_image, bb.width_text] if kind == "tiny-clip" else [bb.width]
    assert a.shape == (8, sum(widths))
    assert (a >= 0).all() and (a <= 1).all() and (b >= 0).all() and (b <= 1).all()
    assert (a - b).abs().max() > 1e-4                                          # other inputs, other scales
    assert (a[0] - a[1:]).abs().amax(dim=1).min() > 1e-6                       # per sample, not per batch
    assert (full - no_image).abs().max() > 1e-4                                # the missing modality counts


def record_blocks(bb):
    """Wrap the per-layer calls to keep every layer's input and output sequences, per tower."""
    seen = {k: ([], []) for k in ("image", "text", "joint")}

    def wrap(k, block):
        def recorded(i, x, *rest):
            y = block(i, x, *rest)
            seen[k][0].append(x)
            seen[k][1].append(y)
            return y
        return recorded
    if bb.kind == "clip":
        bb.image_block, bb.text_block = wrap("image", bb.image_block), wrap("text", bb.text_block)
    else:
        bb.block = wrap("joint", bb.block)
    return seen


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_layer_prompt_is_propagated_from_previous_layer(kind):
    """Inside the forward, layer i's prompt tokens (1 <= i < M) are F^i of layer i-1's prompt tokens and of the
    layer input's pooled token while the other tokens pass on; layers >= M take the previous outputs unchanged;
    perturbing P^{i-1} of one tower alone changes P^i in every tower."""
    bb = backbone(kind)
    n, depth = 4, 3
    model = syp.SyP(bb, 4, length=n, depth=depth).eval()
    batch = toy_batch(bb)
    seen = record_blocks(bb)
    with torch.no_grad():
        model(batch)
    towers = list(model.prompt.towers)
    seen = {k: (ins[-bb.num_layers:], outs[-bb.num_layers:]) for k, (ins, outs) in seen.items()}  # CLIP: after encode
    rows = torch.arange(8)
    eot = n + batch["text"].argmax(-1) if kind == "tiny-clip" else None
    with torch.no_grad():
        for i in range(1, bb.num_layers):
            for k in towers:
                x_in, prev_out = seen[k][0][i], seen[k][1][i - 1]
                assert torch.equal(x_in[:, n:], prev_out[:, n:])
                assert torch.equal(x_in[:, :n], prev_out[:, :n]) == (i >= depth), (k, i)
            if i >= depth:
                continue
            prev = {k: seen[k][0][i - 1][:, :n] for k in towers}
            h = {k: seen[k][0][i][rows, eot] if k == "text" else seen[k][0][i][:, n] for k in towers}
            P = model.prompt.F[i - 1](prev, h)
            for k in towers:
                assert torch.allclose(seen[k][0][i][:, :n], P[k], atol=1e-5), (k, i)
            first = towers[0]
            poked = dict(prev, **{first: prev[first] + 0.5 * torch.randn_like(prev[first])})
            P2 = model.prompt.F[i - 1](poked, h)
            for k in towers:
                assert (P2[k] - P[k]).abs().max() > 1e-4, (k, i)


@pytest.mark.parametrize("kind", ["tiny-clip", "tiny-vilt"])
def test_ablations_remove_exactly_their_parameters(kind):
    bb = backbone(kind)

    def params(**flags):
        model = syp.SyP(bb, 3, length=4, **flags)
        return {n: p.numel() for n, p in model.named_parameters() if not n.startswith("bb.")}, model

    full, _ = params()
    count = expected_params(bb, 4, C=3)
    assert sum(full.values()) == sum(count.values())
    for flags, removed in (({"dynamic": False}, ("base", "adapter")), ({"static": False}, ("static", "project")),
                           ({"adapter": False}, ("adapter",))):
        names, ablated = params(**flags)
        gone = set(full) - set(names)
        assert set(names) <= set(full)
        assert gone == {n for n in full if n.split(".")[1] in removed}, flags
        assert sum(full[n] for n in gone) == sum(count[c] for c in removed), flags
        with torch.no_grad():
            out = ablated.eval()(toy_batch(bb))
        assert out["logits"].shape == (8, 3) and (out["S_d"] is None) == ("adapter" in removed)
    with pytest.raises(SystemExit):
        syp.parser().parse_args(["--no-dynamic", "--no-static"])                  # no prompt would remain


def test_cli_ablation_flags_reach_the_model(tmp_path):
    """Table 4's "base prompt only" row: --no-static --no-adapter leaves P_b, F^i and the head."""
    out = tmp_path / "base-only"
    results = cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", "tiny-vilt", "--epochs", "1", *FAST,
                                           "--no-static", "--no-adapter", "--out", str(out)])
    count = expected_params(load_vilt("tiny-vilt"), 4, C=4, static=False, adapter=False)
    assert results["trainable_params"] == sum(count.values())
    assert {k.split(".")[1] for k in load_file(out / "checkpoint.safetensors") if k.startswith("prompt.")} == {"base", "F"}


def test_toy_training_beats_majority(tmp_path):
    """Measured: accuracy 0.53 against a majority class of 0.28 (seed 0, three epochs, lr 1e-2: the random tiny
    backbone learns slowly at the paper's 1e-3)."""
    results = cli(syp.parser(), syp.main, ["--dataset", "toy", "--backbone", "tiny-clip", "--missing", "both",
                                           "--rate", "0.3", "--epochs", "3", "--lr", "1e-2", *FAST,
                                           "--out", str(tmp_path / "toy")])
    labels = load_split("toy", None, "test", missing_type="none", rate=0.0, seed=0).labels()
    majority = np.bincount(np.asarray(labels)).max() / len(labels)
    assert results["metrics"]["test"]["accuracy"] >= majority + 0.15, (results["metrics"]["test"], majority)
    assert os.path.isfile(tmp_path / "toy" / "results.json")
