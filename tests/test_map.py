"""MAP: outputs of a short CLI run, what trains and what stays frozen, per-case prompt routing, toy learning."""
import json

import numpy as np
import pytest
import torch

import map as map_method
from common import Collate, cli, finalize_args, load_backbone, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, load_split

FAST = ["--epochs", "1", "--batch-size", "256", "--micro-batch", "128"]


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
@pytest.mark.parametrize("prompt_type", ["input", "attention"])
def test_cli_writes_outputs(tmp_path, backbone, prompt_type):
    out = tmp_path / "run"
    res = cli(map_method.parser(), map_method.main,
              ["--backbone", backbone, "--prompt-type", prompt_type, "--out", str(out)] + FAST)
    for name in ("results.json", "predictions_test.csv", "checkpoint.safetensors", "last.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["test"]["accuracy"] == res["metrics"]["test"]["accuracy"]
    assert saved["protocol"]["splits"]["train"]["counts"] == {"complete": 154, "text": 179, "image": 179}
    assert len((out / "predictions_test.csv").read_text().splitlines()) == 1 + 128
    assert res["trainable_params"] > 0


def build(backbone, prompt_type="input", **kw):
    args = finalize_args(map_method.parser().parse_args(["--backbone", backbone, "--prompt-type", prompt_type]))
    bb = load_backbone(args)
    model = map_method.MAP(bb, 4, prompt_type, args.prompt_length, args.prompt_depth)
    ds = load_split("toy", None, "train", missing_type="both", rate=0.6, seed=0)
    batch = Collate(bb, args.max_text_len)([ds[i] for i in range(12)])
    return model, batch


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_only_prompts_and_head_train_backbone_untouched(backbone):
    model, batch = build(backbone)
    before = {k: v.clone() for k, v in model.bb.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    model.train()
    for _ in range(3):
        loss = task_loss(model(batch)["logits"], batch["label"], "multiclass")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    expected = {"prompts", "pooler", "head"} if backbone == "tiny-vilt" else {"image_prompts", "text_prompts", "head"}
    assert with_grad == expected
    assert all(p.grad is None for p in model.bb.parameters())
    for k, v in model.bb.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
@pytest.mark.parametrize("prompt_type", ["input", "attention"])
def test_each_sample_uses_the_prompt_of_its_case(backbone, prompt_type):
    """Perturb only the text-missing prompts: exactly the text-missing samples of the mixed batch change."""
    model, batch = build(backbone, prompt_type)
    model.eval()
    cases = batch["missing"]
    assert {COMPLETE, TEXT_MISSING, IMAGE_MISSING} <= set(cases.tolist())
    with torch.no_grad():
        before = model(batch)["logits"]
        for prompts in [m for m in model.modules() if isinstance(m, map_method.MissingAwarePrompts)]:
            prompts.prompts[TEXT_MISSING] += torch.randn_like(prompts.prompts[TEXT_MISSING])
        after = model(batch)["logits"]
    changed = (after - before).abs().amax(-1) > 1e-6
    assert torch.equal(changed, cases == TEXT_MISSING)


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-vilt"])
def test_prompts_change_the_output(backbone):
    model, batch = build(backbone)
    model.eval()
    with torch.no_grad():
        a = model(batch)["logits"]
        for prompts in [m for m in model.modules() if isinstance(m, map_method.MissingAwarePrompts)]:
            prompts.prompts.normal_()
        b = model(batch)["logits"]
    assert (a - b).abs().max() > 1e-4


def test_toy_training_beats_majority(tmp_path):
    res = cli(map_method.parser(), map_method.main,
              ["--backbone", "tiny-clip", "--missing", "both", "--rate", "0.3", "--epochs", "12", "--batch-size", "32",
               "--prompt-length", "4",
               "--out", str(tmp_path / "run")])
    labels = load_split("toy", None, "test", missing_type="none", rate=0, seed=0).labels()
    majority = np.bincount(labels).max() / len(labels)
    assert res["metrics"]["test"]["accuracy"] >= majority + 0.15, (res["metrics"]["test"], majority)
