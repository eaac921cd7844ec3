"""Run helpers through map.py: --eval-only, --eval-grid, --seeds summary, the summary table, --resume, and
torchrun DDP against a single process with the same global batch."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import common
import map as map_method
from common import cli, summarize_seeds, summary_markdown, summary_rows
from data import missing_table, table_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--backbone", "tiny-clip", "--prompt-length", "4", "--batch-size", "64", "--micro-batch", "32",
        "--lr", "1e-2", "--seed", "3"]


def read_predictions(folder):
    with open(os.path.join(folder, "predictions_test.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained") / "run")
    res = cli(map_method.parser(), map_method.main, BASE + ["--epochs", "2", "--out", out])
    return out, res


def test_eval_only_reproduces_test_metrics(trained, tmp_path):
    out, res = trained
    again = cli(map_method.parser(), map_method.main,
                ["--eval-only", "--checkpoint", os.path.join(out, "checkpoint.safetensors"), "--out", str(tmp_path)])
    assert again["metrics"]["test"] == res["metrics"]["test"]
    assert again["backbone"]["backbone"] == "tiny-clip" and again["eval_only"]
    assert read_predictions(str(tmp_path)) == read_predictions(out)


def test_eval_only_refuses_other_method_or_backbone(trained, tmp_path):
    import memprompt
    ckpt = os.path.join(trained[0], "checkpoint.safetensors")
    with pytest.raises(SystemExit, match="trained by map.py"):
        cli(memprompt.parser(), memprompt.main, ["--eval-only", "--checkpoint", ckpt, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="backbone tiny-clip"):
        cli(map_method.parser(), map_method.main,
            ["--eval-only", "--checkpoint", ckpt, "--backbone", "tiny-vilt", "--out", str(tmp_path)])


def test_eval_grid_covers_every_type_and_rate(trained, tmp_path):
    rates = [0.0, 0.3, 1.0]
    res = cli(map_method.parser(), map_method.main,
              ["--eval-only", "--checkpoint", os.path.join(trained[0], "checkpoint.safetensors"), "--eval-grid",
               "--grid-rates"] + [str(r) for r in rates] + ["--out", str(tmp_path)])
    rows = json.loads((tmp_path / "grid.json").read_text())
    assert [(r["missing"], r["rate"]) for r in rows] == [("none", 0.0)] + [(t, r) for t in ("text", "image", "both")
                                                                          for r in rates]
    for r in rows:                                   # counts equal the missing tables of the test split (128 samples)
        expected = table_counts(missing_table(128, r["missing"], r["rate"], dataset="toy", split="test", seed=3))
        assert {k: r[k] for k in ("complete", "text", "image")} == expected
    assert rows[0]["accuracy"] == res["metrics"]["test"]["accuracy"] or res["protocol"]["test_missing"] != "none"
    with open(tmp_path / "grid.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_seeds_summary_mean_and_std():
    results = [{"metric": "accuracy", "metrics": {"val": {"accuracy": v}, "test": {"accuracy": t}}}
               for v, t in ((0.5, 0.6), (0.7, 0.8), (0.9, 0.7))]
    s = summarize_seeds(results)
    assert s["test/accuracy"]["mean"] == pytest.approx(0.7)
    assert s["test/accuracy"]["std"] == pytest.approx(0.1)            # sample std of 0.6, 0.8, 0.7
    assert s["val/accuracy"]["std"] == pytest.approx(0.2)


def test_summary_table_has_paper_numbers(tmp_path):
    for seed, acc in ((0, 0.80), (1, 0.82)):
        folder = tmp_path / "syp-food101" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "method": "syp", "backbone": {"backbone": "clip"}, "dataset": "food101", "metric": "accuracy",
            "protocol": {"missing": "both", "rate": 0.7, "test_missing": "both", "test_rate": 0.7},
            "metrics": {"test": {"accuracy": acc}}}))
    rows = summary_rows([str(tmp_path)])
    assert len(rows) == 1
    row = rows[0]
    assert row["paper"] == 82.45 and row["mean"] == 81.0 and row["diff"] == pytest.approx(-1.45)
    assert row["std"] == pytest.approx(np.std([80, 82], ddof=1), abs=0.01)
    assert "82.45" in summary_markdown(rows) and "-1.45" in summary_markdown(rows)


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted(trained, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    original = common.save_last

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted                          # the process dies right after epoch 1's checkpoint
    monkeypatch.setattr(common, "save_last", save_then_stop)
    with pytest.raises(Interrupted):
        cli(map_method.parser(), map_method.main, BASE + ["--epochs", "2", "--out", out])
    monkeypatch.setattr(common, "save_last", original)
    assert not os.path.exists(os.path.join(out, "results.json"))
    res = cli(map_method.parser(), map_method.main, BASE + ["--epochs", "2", "--out", out, "--resume"])
    assert res["metrics"] == trained[1]["metrics"]
    assert read_predictions(out) == read_predictions(trained[0])
    with pytest.raises(SystemExit, match="different configuration.*lr"):
        cli(map_method.parser(), map_method.main, BASE + ["--epochs", "2", "--out", out, "--resume", "--lr", "0.5"])


def test_torchrun_two_processes_match_single_process(trained, tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(ROOT, "map.py")] + BASE + ["--epochs", "2", "--out", out, "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = read_predictions(out), read_predictions(trained[0])
    assert sorted(r["id"] for r in ddp) == sorted(r["id"] for r in single) and len({r["id"] for r in ddp}) == 128
    assert [r["id"] for r in ddp] == [r["id"] for r in single]
    scores_ddp = np.array([float(r["score"]) for r in ddp])
    scores_single = np.array([float(r["score"]) for r in single])
    assert np.abs(scores_ddp - scores_single).max() < 1e-3
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert res["metrics"]["test"]["accuracy"] == pytest.approx(trained[1]["metrics"]["test"]["accuracy"], abs=1 / 128)


@pytest.mark.parametrize("method,extra,prefix", [
    ("aoept", ["--prompt-length", "4"], "aoept-mcp-"),
    ("promise", ["--cache-features", "--aug-views", "1"], "promise-toy-train-")])
def test_torchrun_splits_the_encoding_passes(tmp_path, method, extra, prefix):
    """AOEPT's MCP pass and PROMISE's feature cache are shared across ranks: 2 processes give the same file as 1."""
    from safetensors.torch import load_file
    argv = ["--backbone", "tiny-clip", "--epochs", "1", "--batch-size", "64", "--micro-batch", "16",
            "--device", "cpu"] + extra
    env = dict(os.environ, OMP_NUM_THREADS="1")
    folders = {}
    for n in (1, 2):
        folders[n] = tmp_path / f"cache{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29540 + n), os.path.join(ROOT, f"{method}.py")] + argv + [
               "--cache-dir", str(folders[n]), "--out", str(tmp_path / f"run{n}")]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = {n: [f for f in os.listdir(folders[n]) if f.startswith(prefix)] for n in (1, 2)}
    assert len(files[1]) == 1 and files[1] == files[2]
    one, two = (load_file(str(folders[n] / files[n][0])) for n in (1, 2))
    assert one.keys() == two.keys()
    for k in one:
        assert torch_allclose(one[k], two[k]), k


def torch_allclose(a, b):
    import torch
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_seeds_run_each_seed_and_summarise(tmp_path):
    out = tmp_path / "seeds"
    summary = cli(map_method.parser(), map_method.main,
                  ["--backbone", "tiny-vilt", "--prompt-length", "2", "--epochs", "1", "--batch-size", "128",
                   "--seeds", "0", "1", "--out", str(out)])
    per_seed = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["protocol"]["seed"] for r in per_seed] == [0, 1]
    accs = [r["metrics"]["test"]["accuracy"] for r in per_seed]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["summary"]["test/accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert saved["summary"]["test/accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert saved == json.loads(json.dumps(summary))


def test_nm2i_for_other_prompt_methods(trained, tmp_path):
    """--nm2i on MAP and SyP (CLIP). MAP's prompt depends only on the missing case, so within the samples that miss
    m its pooled prompt is one point and the NMI with anything is exactly 0; SyP's depends on the input."""
    import syp
    res = cli(map_method.parser(), map_method.main,
              ["--eval-only", "--checkpoint", os.path.join(trained[0], "checkpoint.safetensors"), "--nm2i",
               "--out", str(tmp_path / "map")])
    for m in ("text", "image"):
        assert res["nm2i"][m]["per_layer"] == pytest.approx([0.0] * 4, abs=1e-9)
    res = cli(syp.parser(), syp.main, ["--backbone", "tiny-clip", "--prompt-length", "4", "--epochs", "1",
                                       "--batch-size", "128", "--nm2i", "--out", str(tmp_path / "syp")])
    saved = json.loads((tmp_path / "syp" / "results.json").read_text())
    for m in ("text", "image"):
        assert len(saved["nm2i"][m]["per_layer"]) == 4 and all(0 <= v <= 1 for v in saved["nm2i"][m]["per_layer"])
    assert res["nm2i"]["estimator"].startswith("this repository's estimator")
    with pytest.raises(SystemExit, match="no modality-specific prompts"):
        cli(map_method.parser(), map_method.main, ["--backbone", "tiny-vilt", "--epochs", "1", "--batch-size", "256",
                                                   "--prompt-length", "2", "--nm2i", "--out", str(tmp_path / "v")])
