"""A number is never silently wrong (common.py's run): a non-finite loss stops the run, --eval-only honours or refuses
the user's flags and evaluates last.safetensors too, run folders never collide, results.json names the selected check
and is strict JSON, every process restores its own random stream, the last partial batch is a step, --f1 is the one
reported, and `summarize` lists evaluations apart from runs."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import map as map_method
from common import cli, finalize_args

BASE = ["--backbone", "tiny-clip", "--prompt-length", "4", "--batch-size", "64", "--micro-batch", "32",
        "--lr", "1e-2", "--seed", "3"]


def run_map(argv):
    return cli(map_method.parser(), map_method.main, argv)


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """Best check (epoch 1) is not the last one (epoch 2): lr 0.3 on toy (as test_runs' resume test)."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    argv = BASE[:-6] + ["--lr", "0.3", "--seed", "3", "--batch-size", "128", "--micro-batch", "64", "--epochs", "2"]
    res = run_map(argv + ["--out", out])
    return out, res, argv


# ---- non-finite losses and metrics --------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run(tmp_path):
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match=r"step \d+: the training loss is nan.*--lr"):
        run_map(BASE[:-4] + ["--lr", "1e30", "--seed", "3", "--epochs", "2", "--out", out])
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert not os.path.exists(os.path.join(out, "predictions_test.csv"))


def test_results_json_is_strict(tmp_path):
    from data import write_json
    write_json(str(tmp_path / "r.json"), {"a": float("nan"), "b": [float("-inf"), np.float32(1.5)], "c": {"d": 2}})
    assert strict_json(str(tmp_path / "r.json")) == {"a": None, "b": [None, 1.5], "c": {"d": 2}}


# ---- selected check, steps, F1 -------------------------------------------------------------------------------------
def test_results_name_the_selected_check(two_epochs):
    out, res, _ = two_epochs
    saved = strict_json(os.path.join(out, "results.json"))
    checks = [(h["epoch"], c["step"], c["val"]["accuracy"]) for h in res["history"] for c in h["checks"]]
    best = max(checks, key=lambda c: c[2])                                # max keeps the first of ties
    assert saved["selected_check"] == {"stage": "train", "epoch": best[0], "step": best[1], "accuracy": best[2]}
    assert saved["selected_check"]["epoch"] == 0 and saved["metrics"]["val"]["accuracy"] == best[2]
    assert saved["protocol"]["last_batch"].startswith("kept") and saved["protocol"]["recipe"].startswith("the method")


def test_the_last_partial_batch_is_a_step(tmp_path):
    """512 toy training samples in global batches of 200: 3 optimiser steps an epoch (200, 200, 112), every sample
    seen once (the official loaders' drop_last False)."""
    res = run_map(BASE[:-6] + ["--batch-size", "200", "--micro-batch", "100", "--epochs", "1",
                               "--out", str(tmp_path / "r")])
    epoch = res["history"][0]
    assert [c["step"] for c in epoch["checks"]] == [3] and epoch["samples"] == 512


@pytest.mark.parametrize("f1", ["torchmetrics-0.9", "torchmetrics-1"])
def test_the_reported_f1_is_the_chosen_definition(f1, tmp_path):
    res = run_map(BASE + ["--dataset", "toy-multilabel", "--epochs", "1", "--f1", f1, "--out", str(tmp_path / "r")])
    labels, scores = [], []
    with open(tmp_path / "r" / "predictions_test.csv") as f:
        for row in csv.DictReader(f):
            labels.append([int(v) for k, v in row.items() if k.startswith("label_")])
            scores.append([float(v) for k, v in row.items() if k.startswith("score_")])
    ours = common.f1_scores(np.array(labels), np.array(scores), f1)
    assert res["metrics"]["test"]["f1_macro"] == pytest.approx(ours["f1_macro"], abs=1e-9)
    assert res["metrics"]["test"]["f1_macro"] == res["metrics"]["test"][f"f1_macro_{f1}"]
    assert res["protocol"]["f1"].startswith(f1)
    run = type("Run", (), {"task": "multilabel", "args": type("Args", (), {"f1": f1})()})()
    data = type("Data", (), {"labels": lambda self: np.array([[1, 0, 0], [0, 1, 0]])})()
    scores = np.array([[0.9, 0.1, 0.1], [0.2, 0.8, 0.1]])          # genre 2 never seen: 1.0 (0.9) vs 2/3 (1)
    assert common.evaluate(run, None, data, scores)["f1_macro"] == pytest.approx(
        {"torchmetrics-0.9": 1.0, "torchmetrics-1": 2 / 3}[f1])


# ---- --eval-only: the user's flags -----------------------------------------------------------------------------------
def test_eval_only_honours_evaluation_flags(tmp_path, hatememes_root):
    out = str(tmp_path / "hm")
    argv = BASE + ["--dataset", "hatememes", "--data-root", hatememes_root, "--epochs", "1"]
    run_map(argv + ["--out", out])
    ckpt = os.path.join(out, "checkpoint.safetensors")
    res = run_map(["--eval-only", "--checkpoint", ckpt, "--data-root", hatememes_root, "--hm-test", "unseen",
                   "--out", str(tmp_path / "e")])
    assert res["config"]["hm_test"] == "unseen"
    with open(os.path.join(hatememes_root, "test_unseen.jsonl")) as f:
        unseen = [str(json.loads(line)["id"]) for line in f]
    with open(tmp_path / "e" / "predictions_test.csv") as f:
        assert [r["id"] for r in csv.DictReader(f)] == unseen
    seen = run_map(["--eval-only", "--checkpoint", ckpt, "--data-root", hatememes_root, "--out", str(tmp_path / "s")])
    assert seen["config"]["hm_test"] == "seen"                          # not given: the checkpoint's own


@pytest.mark.parametrize("flag,value,match", [("--dataset", "toy-binary", "--dataset toy-binary: .* trained with "
                                                                                  "--dataset toy"),
                                              ("--lr", "0.5", "--lr 0.5: .* trained with --lr 0.3"),
                                              ("--prompt-len", "8", "--prompt-length 8: .*--prompt-length 4")])
def test_eval_only_refuses_a_flag_that_would_be_replaced(two_epochs, tmp_path, flag, value, match):
    ckpt = os.path.join(two_epochs[0], "checkpoint.safetensors")
    with pytest.raises(SystemExit, match=match):
        run_map(["--eval-only", "--checkpoint", ckpt, flag, value, "--out", str(tmp_path / "e")])
    run_map(["--eval-only", "--checkpoint", ckpt, "--lr", "0.3", "--out", str(tmp_path / "same")])   # same value: fine


def test_eval_only_evaluates_the_last_weights(two_epochs):
    """last.safetensors holds the last check's weights (epoch 2), checkpoint.safetensors the best (epoch 1): each
    evaluation's validation metric is its own check's."""
    out, res, _ = two_epochs
    last = run_map(["--eval-only", "--checkpoint", os.path.join(out, "last.safetensors")])
    assert last["metrics"]["val"] == res["history"][-1]["val"] != res["metrics"]["val"]
    assert os.path.isfile(os.path.join(out, "eval-last-both0.7", "results.json"))
    best = run_map(["--eval-only", "--checkpoint", os.path.join(out, "checkpoint.safetensors")])
    assert best["metrics"] == res["metrics"]


# ---- run folders ------------------------------------------------------------------------------------------------------
def test_default_folders_name_the_non_default_options():
    def out_of(argv):
        return finalize_args(map_method.parser().parse_args(argv)).out
    plain, attention = out_of([]), out_of(["--prompt-type", "attention"])
    assert plain == os.path.join("runs", "map-toy-vilt-both0.7-seed0")
    assert attention == plain + "-prompt_type-attention"
    many = out_of(["--prompt-type", "attention", "--lr", "0.5", "--epochs", "3", "--prompt-length", "8", "--warmup", "0"])
    assert many.startswith(plain + "-cfg") and many != out_of(["--prompt-type", "attention", "--lr", "0.4",
                                                               "--epochs", "3", "--prompt-length", "8", "--warmup", "0"])


def test_a_folder_holding_a_run_is_refused(two_epochs, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(two_epochs[0], run)
    before = (run / "results.json").read_bytes()
    with pytest.raises(SystemExit, match="holds a run .*--resume.*--overwrite"):
        run_map(two_epochs[2] + ["--out", str(run)])
    assert (run / "results.json").read_bytes() == before
    os.remove(run / "results.json")
    os.remove(run / "checkpoint.safetensors")                 # an interrupted run: last.safetensors alone
    with pytest.raises(SystemExit, match="holds a run"):
        run_map(two_epochs[2] + ["--out", str(run)])
    res = run_map(two_epochs[2] + ["--epochs", "1", "--out", str(run), "--overwrite"])
    assert strict_json(str(run / "results.json"))["metrics"] == json.loads(json.dumps(res["metrics"]))


def test_a_live_run_holds_its_folder(tmp_path):
    import socket
    import subprocess
    import sys
    out = str(tmp_path / "f")
    os.makedirs(out)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(out, ".lock"), "w") as f:
            f.write(f"{socket.gethostname()} {other.pid}")
        with pytest.raises(common.DataError, match=f"in use by another live run \\(process {other.pid}"):
            common.claim_folder(out)
    finally:
        other.kill()
        other.wait()
    common.claim_folder(out)                                  # that process is gone: its lock is taken over
    with open(os.path.join(out, ".lock")) as f:
        assert f.read() == f"{socket.gethostname()} {os.getpid()}"
    common.release_folder(os.path.join(out, ".lock"), f"{socket.gethostname()} {os.getpid()}")
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_an_unwritable_out_fails_at_setup(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out .* is not writable"):
        run_map(BASE + ["--epochs", "1", "--out", str(tmp_path / "file" / "run")])

    def read_only(*args, **kwargs):                           # a folder that exists but refuses writes (root, as
        raise PermissionError(13, "Permission denied")        # here and in CI, ignores the permission bits)
    monkeypatch.setattr(common.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(common.DataError, match="is not writable \\(Permission denied\\)"):
        common.claim_folder(str(tmp_path / "ro"))


# ---- every process's random stream -------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, rank, out):
        self.rank, self.world, self.main, self.device = rank, 2, rank == 0, torch.device("cpu")
        self.args = finalize_args(map_method.parser().parse_args(["--out", out, "--resume"]))
        self.stage_index, self.history = 1, []
        self.bb = type("BB", (), {"info": {"backbone": "tiny-clip"}})()

    def log(self, *msg):
        pass


def test_each_process_resumes_its_own_random_stream(tmp_path, monkeypatch):
    """Under torchrun every rank's dropout stream differs: last.safetensors stores each rank's RNG state and each
    rank restores its own (rank 1 does not continue rank 0's stream)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    best = {"metric": 0.5, "epoch": 0, "step": 1, "state": common.method_state(model)}
    states = {0: torch.Generator().manual_seed(10).get_state(), 1: torch.Generator().manual_seed(11).get_state()}

    def all_gather_object(parts, mine):
        parts[:] = [{"torch": states[0]}, {"torch": states[1]}]
    monkeypatch.setattr(common.dist, "all_gather_object", all_gather_object)
    common.save_last(FakeRun(0, str(tmp_path)), model, optimizer, schedule, best, 0)
    for rank in (1, 0):
        common.resume(FakeRun(rank, str(tmp_path)), model, optimizer, schedule, dict(best))
        assert torch.equal(torch.get_rng_state(), states[rank]), rank
    single = FakeRun(0, str(tmp_path))
    single.world = 1
    with pytest.raises(common.DataError, match="written by 2 processes"):
        common.resume(single, model, optimizer, schedule, dict(best))


# ---- the summary ------------------------------------------------------------------------------------------------------
def test_summary_lists_evaluations_apart_from_runs(two_epochs, tmp_path):
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs[0], out, ignore=shutil.ignore_patterns("eval*"))
    ckpt = os.path.join(out, "checkpoint.safetensors")
    run_map(["--eval-only", "--checkpoint", ckpt])
    rows = common.summary_rows([out])
    assert sorted(((r["runs"], r["evaluation"]) for r in rows), key=str) == sorted([(1, None), (1, ckpt)], key=str)
    assert all(r["std"] is None for r in rows)
    table = common.summary_markdown(rows)
    assert table.count("+- - (1)") == 2 and f"[evaluation of {ckpt}]" in table


MUTATIONS = [
    {"file": "common.py", "old": "        stop_if_not_finite(run, finite, total, epoch, step)\n", "new": "",
     "why": "a non-finite training loss does not stop the run"},
    {"file": "common.py", "old": "            finite &= torch.isfinite(loss.detach())\n", "new": "",
     "why": "the NaN guard never looks at the loss"},
    {"file": "data.py", "old": "return float(obj) if np.isfinite(obj) else None", "new": "return float(obj)",
     "why": "results.json holds bare NaN / Infinity"},
    {"file": "common.py", "old": "\"selected_check\": None if args.eval_only else getattr(run, \"best_val\", None),",
     "new": "\"selected_check\": None,", "why": "results.json does not name the selected check"},
    {"file": "common.py", "old": "strict=False)\n    run.best_val = {\"stage\": stage, \"epoch\": best[\"epoch\"],",
     "new": "strict=False)\n    run.best_val = {\"stage\": stage, \"epoch\": epoch,",
     "why": "the selected check names the last epoch, not the best one"},
    {"file": "common.py", "old": "global_batches(len(run.train_set), args.batch_size, args.seed, epoch, min_last=run.world)",
     "new": "global_batches(len(run.train_set), args.batch_size, args.seed, epoch, min_last=args.batch_size)",
     "why": "training drops the last partial batch"},
    {"file": "common.py", "old": "        if k in config and k not in RUNTIME_ARGS | EVAL_ARGS and",
     "new": "        if False and k in config and k not in RUNTIME_ARGS | EVAL_ARGS and",
     "why": "--eval-only silently replaces a model flag the user passed"},
    {"file": "common.py", "old": "        if k not in RUNTIME_ARGS and not (k in EVAL_ARGS and k in given):",
     "new": "        if k not in RUNTIME_ARGS:", "why": "--eval-only replaces --hm-test (an evaluation flag) by the checkpoint's"},
    {"file": "common.py", "old": "        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith(\"model.\")}",
     "new": "        tensors = {k[5:]: v for k, v in tensors.items() if k.startswith(\"best.\")}",
     "why": "--eval-only of last.safetensors evaluates the best state instead of the last weights"},
    {"file": "common.py", "old": "                                        f\"-seed{args.seed}{options_suffix(args)}\")",
     "new": "                                        f\"-seed{args.seed}\")",
     "why": "the default run folder ignores the method's non-default options (two configurations collide)"},
    {"file": "common.py", "old": "        if not args.eval_only and not args.resume:\n            refuse_run_folder(args.out, args.overwrite)\n",
     "new": "", "why": "training silently replaces a run in the same folder"},
    {"file": "common.py", "old": "        if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):",
     "new": "        if False:", "why": "a second live run into the same folder is not refused"},
    {"file": "common.py", "old": "        with tempfile.NamedTemporaryFile(dir=out, prefix=\".tmp-probe-\"):\n            pass\n",
     "new": "        pass\n", "why": "an unwritable --out is found only at the first check", "tests": ["tests/test_protocol.py::test_an_unwritable_out_fails_at_setup"]},
    {"file": "common.py", "old": "    torch.set_rng_state(tensors[f\"rng.torch.{run.rank}\"])",
     "new": "    torch.set_rng_state(tensors[\"rng.torch.0\"])", "why": "every rank restores rank 0's RNG state on --resume"},
    {"file": "common.py", "old": "                     \"std\": None if averaged or len(values) < 2 else",
     "new": "                     \"std\": None if averaged else 0.0 if len(values) < 2 else",
     "why": "summarize shows +- 0.00 for a single run"},
    {"file": "common.py", "old": "                       evaluation)                             # an evaluation",
     "new": "                       None)                             # an evaluation",
     "why": "summarize counts an evaluation as another seed of the run"},
]
