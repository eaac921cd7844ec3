"""MuAP (muap.py): CLI runs on toy and fixture trees, crosswise prompt generation, per-sample routing, the
freezing of each multi-step stage, the alignment loss against a brute-force KL with teachers rebuilt from their
files, the teacher logits table, rounds, honest stage/epoch errors, where the fusions put the prompts, and both forwards
against a per-sample brute force on HF's ViltLayer and open_clip's own modules on images of different sizes; the
header's own-code lines run verbatim, teachers in evaluation mode, teacher files of another configuration refused,
the initial missing-type prompts not one vector, and the training-mode forward (with ViLT's backbone dropout)."""
import csv
import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import muap
from common import cli, load_clip, load_vilt, task_loss
from data import COMPLETE, IMAGE_MISSING, TEXT_MISSING, Collate, DataError, load_split, to_device

FAST = ["--batch-size", "64", "--micro-batch", "64", "--prompt-length", "2"]


def toy_batch(bb, codes, max_text_len=40):
    """A toy batch whose samples have the given missing codes (dummies applied by the shared Collate)."""
    ds = load_split("toy", None, "train", missing_type="both", rate=0.7, seed=0)
    rows, used = [], set()
    for code in codes:
        i = next(k for k in range(len(ds)) if ds.missing[k] == code and k not in used)
        used.add(i)
        rows.append(ds[i])
    return Collate(bb, max_text_len)(rows)


MIXED = [COMPLETE, TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING, COMPLETE, IMAGE_MISSING]
SIZES = [(32, 32), (56, 32), (32, 48), (40, 40), (64, 24), (24, 40)]


def mixed_size_batch(bb, codes=MIXED):
    """As toy_batch, with PIL images of different sizes (ViLT: padded patches, a different count per sample)."""
    ds = load_split("toy", None, "train", missing_type="both", rate=0.7, seed=0)
    rng, rows, used = np.random.default_rng(0), [], set()
    for code, (w, h) in zip(codes, SIZES * len(codes)):
        i = next(k for k in range(len(ds)) if ds.missing[k] == code and k not in used)
        used.add(i)
        rows.append(dict(ds[i], image=Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
    batch = Collate(bb, 40)(rows)
    if bb.kind == "vilt":
        assert len(set(batch["pixel_mask"].sum((1, 2)).tolist())) > 2
    return batch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a small shared VM two OpenMP threads made this file
    about 5x slower (126 s vs 22 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip("tiny-clip", "")


@pytest.fixture(scope="module")
def tiny_vilt():
    return load_vilt("tiny-vilt")


def model_for(bb, fusion, length=3, depth=6, seed=0, combine="add"):
    torch.manual_seed(seed)
    return muap.MuAP(bb, 4, fusion, length, depth, combine)


def oracle_logits(model, path, batch):
    """A teacher rebuilt independently: a fresh MuAP of the same shape loaded from OUT/teacher-<stage>.safetensors."""
    from safetensors.torch import load_file
    fresh = muap.MuAP(model.bb, model.head[-1].out_features, model.fusion, model.length, model.depth, model.combine)
    fresh.load_state_dict(load_file(path), strict=False)
    with torch.no_grad():
        return fresh.eval()(batch)["logits"]


def alignment_check(run, model, loss_fn, out, stage):
    """At the start of an alignment stage: the loss on 8 training samples, its task part, and the brute-force
    KL to the teachers rebuilt from their files; and the teacher logits the model used."""
    batch = to_device(run.collate([run.train_set[k] for k in range(8)]), run.device)
    tag = stage[len("alignment"):]
    y_t, y_v = (oracle_logits(model, os.path.join(out, f"teacher-{s}{tag}.safetensors"), batch)
                for s in ("text-step", "image-step"))
    got = model.train()(batch)
    y = got["logits"].detach()
    return {"loss": float(loss_fn(got, batch).detach()), "task": float(task_loss(y, batch["label"], run.task)),
            "kl_t": brute_kl(y_t, y, run.task), "kl_v": brute_kl(y_v, y, run.task),
            "used": (got.get("logits_t"), got.get("logits_v")), "oracle": (y_t, y_v), "teachers": model.teachers}


def missing_type_prompts(gen):
    """P_v^miss of an image-missing sample and P_t^miss of a text-missing one."""
    with torch.no_grad():
        return {"image": gen(torch.tensor([IMAGE_MISSING]))[1][0].clone(),
                "text": gen(torch.tensor([TEXT_MISSING]))[0][0].clone()}


# ---------------------------------------------------------------------------------------------------------
# One real training run, shared: tiny-clip, head-fusion, with a spy on every `fit` call (= stage)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("muap-clip")
    stages, backbone = [], {}
    real_fit = muap.fit

    def spy_fit(run, model, loss_fn, epochs=None, stage="train"):
        if not backbone:
            backbone.update({k: v.clone() for k, v in model.bb.state_dict().items()})
            backbone["model"] = model
        groups = {"text": model.generator.text, "image": model.generator.image}
        before = {g: {n: p.detach().clone() for n, p in m.named_parameters()} for g, m in groups.items()}
        generated, teachers = missing_type_prompts(model.generator), model.teachers
        trains = {g: [p.requires_grad for p in m.parameters()] for g, m in groups.items()}
        check = alignment_check(run, model, loss_fn, str(out), stage) if stage == "alignment" else None
        real_fit(run, model, loss_fn, epochs, stage)
        after = {g: {n: p.detach().clone() for n, p in m.named_parameters()} for g, m in groups.items()}
        moved = {m: not torch.equal(generated[m], p) for m, p in missing_type_prompts(model.generator).items()}
        stages.append({"stage": stage, "epochs": epochs, "before": before, "after": after, "trains": trains,
                       "teachers": teachers, "check": check, "missing_type_moved": moved})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(muap, "fit", spy_fit)
        results = cli(muap.parser(), muap.main,
                      ["--dataset", "toy", "--backbone", "tiny-clip", "--fusion", "head", "--missing", "both",
                       "--rate", "0.3", "--stage-epochs", "1", "1", "2", "--batch-size", "16", "--micro-batch", "64",
                       "--prompt-length", "2", "--lambda-t", "0.3", "--lambda-v", "2.0", "--out", str(out)])
    return {"results": results, "out": out, "stages": stages, "backbone": backbone}


def test_clip_head_on_toy_writes_standard_outputs(clip_run):
    out, results = clip_run["out"], clip_run["results"]
    for name in ("results.json", "predictions_test.csv", "checkpoint.safetensors"):
        assert os.path.isfile(out / name), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "muap" and saved["metric"] == "accuracy"
    assert saved["stage_epochs"] == {"text-step": 1, "image-step": 1, "alignment": 2}
    assert [h["stage"] for h in saved["history"]] == ["text-step", "image-step", "alignment", "alignment"]
    for stage in ("text-step", "image-step"):
        assert os.path.isfile(out / f"teacher-{stage}.safetensors")
    with open(out / "predictions_test.csv") as f:
        assert len(list(csv.DictReader(f))) == 128
    from safetensors.torch import load_file
    tensors = load_file(out / "checkpoint.safetensors")
    assert not any(k.startswith(("bb.", "teachers")) for k in tensors)       # no backbone, no teacher copies
    assert set(tensors) == set(clip_run["backbone"]["model"].state_dict()) - {
        k for k in clip_run["backbone"]["model"].state_dict() if k.startswith("bb.")}
    assert results["trainable_params"] == sum(t.numel() for t in tensors.values())


def test_stages_freeze_the_other_modality_and_alignment_trains_both(clip_run):
    stages = {s["stage"]: s for s in clip_run["stages"]}
    assert list(stages) == ["text-step", "image-step", "alignment"]
    assert [s["epochs"] for s in clip_run["stages"]] == [1, 1, 2]
    expect = {"text-step": (True, False), "image-step": (False, True), "alignment": (True, True)}
    for name, (text, image) in expect.items():
        s = stages[name]
        assert all(f == text for f in s["trains"]["text"]) and all(f == image for f in s["trains"]["image"])
        for group, trained in (("text", text), ("image", image)):
            changed = [n for n in s["before"][group] if not torch.equal(s["before"][group][n], s["after"][group][n])]
            if trained:
                assert "complete" in changed and len(changed) == len(s["before"][group]), (name, group, changed)
            else:
                assert changed == [], (name, group, changed)
    assert [s["teachers"] is None for s in clip_run["stages"]] == [True, True, False]
    assert isinstance(stages["alignment"]["teachers"], muap.TeacherTable)


def test_parameter_level_freezing_moves_the_frozen_modalitys_missing_type_prompt(clip_run):
    """The chosen semantics: the text-step leaves P_v^c and f_v untouched (above), yet P_v^miss = f_v(P_t^c) moves
    with P_t^c; likewise P_t^miss = f_t(P_v^c) in the image-step."""
    moved = {s["stage"]: s["missing_type_moved"] for s in clip_run["stages"]}
    assert moved["text-step"]["image"] and moved["image-step"]["text"]


def test_alignment_loss_adds_lambda_times_kl_to_each_teacher_rebuilt_from_its_file(clip_run):
    """The run's alignment loss = task loss + 0.3 KL(y_t || y) + 2.0 KL(y_v || y), y_t / y_v the logits of fresh
    models loaded from OUT/teacher-text-step / teacher-image-step (best-validation states), by brute force."""
    check = next(s["check"] for s in clip_run["stages"] if s["stage"] == "alignment")
    assert check["kl_t"] > 1e-3                                # the text-step teacher differs from the student
    assert abs(check["loss"] - (check["task"] + 0.3 * check["kl_t"] + 2.0 * check["kl_v"])) < 1e-5
    for used, oracle in zip(check["used"], check["oracle"]):
        assert torch.allclose(used, oracle, atol=1e-5) and not used.requires_grad


def test_backbone_bit_identical_after_training(clip_run):
    saved = clip_run["backbone"]
    model = saved["model"]
    now = model.bb.state_dict()
    assert set(now) == set(saved) - {"model"}
    assert all(torch.equal(now[k], saved[k]) for k in now)
    assert not any(p.requires_grad for p in model.bb.parameters())
    assert model.teachers is None


def test_toy_training_beats_majority(clip_run):
    labels = load_split("toy", None, "test", missing_type="both", rate=0.3, seed=0).labels()
    majority = np.bincount(labels).max() / len(labels)
    accuracy = clip_run["results"]["metrics"]["test"]["accuracy"]
    assert accuracy >= majority + 0.2, (accuracy, majority)           # measured: 0.555 vs 0.281


# ---------------------------------------------------------------------------------------------------------
# The other CLI runs: ViLT on toy, both fusions on both backbones, fixture trees in the real layouts
# ---------------------------------------------------------------------------------------------------------
def check_outputs(out, results, n_test, stages=("text-step", "image-step", "alignment")):
    for name in ("results.json", "predictions_test.csv", "checkpoint.safetensors"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "predictions_test.csv")) as f:
        assert len(list(csv.DictReader(f))) == n_test
    assert [h["stage"] for h in results["history"]] == list(stages)
    assert not math.isnan(results["metrics"]["test"][results["metric"]])


def spy_alignment(monkeypatch, out, seen):
    """Wrap muap.fit: at the start of each alignment stage record `alignment_check`."""
    real_fit = muap.fit

    def spy(run, model, loss_fn, epochs=None, stage="train"):
        if stage.startswith("alignment"):
            seen[stage] = alignment_check(run, model, loss_fn, str(out), stage)
        return real_fit(run, model, loss_fn, epochs, stage)
    monkeypatch.setattr(muap, "fit", spy)


def test_vilt_head_on_toy_with_both_lambdas_0_trains_alignment_on_the_task_loss(tmp_path, monkeypatch, capsys):
    seen = {}
    spy_alignment(monkeypatch, tmp_path, seen)
    results = cli(muap.parser(), muap.main, ["--dataset", "toy", "--backbone", "tiny-vilt", "--fusion", "head",
                                             "--stage-epochs", "1", "1", "1", "--lambda-t", "0", "--lambda-v", "0",
                                             "--out", str(tmp_path)] + FAST)
    check_outputs(tmp_path, results, 128)
    check = seen["alignment"]
    assert check["teachers"] is None and check["loss"] == check["task"]
    assert "trains on the task loss only" in capsys.readouterr().out and len(results["warnings"]) == 1


def test_clip_cross_on_food101_tree_skipping_the_image_step(tmp_path, food101_root):
    """--stage-epochs with a 0 skips that stage (its snapshot is the model as it stands)."""
    results = cli(muap.parser(), muap.main, ["--dataset", "food101", "--data-root", food101_root, "--backbone",
                                             "tiny-clip", "--fusion", "cross", "--stage-epochs", "1", "0", "1",
                                             "--out", str(tmp_path)] + FAST)
    check_outputs(tmp_path, results, 12, stages=["text-step", "alignment"])
    assert any("0-epoch image-step" in w for w in results["warnings"])


def test_vilt_cross_on_mmimdb_tree(tmp_path, mmimdb_root):
    """Multi-label: the alignment stage runs the Bernoulli KL; one prediction row per (movie, plot) test sample."""
    results = cli(muap.parser(), muap.main, ["--dataset", "mmimdb", "--data-root", mmimdb_root, "--backbone",
                                             "tiny-vilt", "--fusion", "cross", "--max-text-len", "40",
                                             "--stage-epochs", "1", "1", "1", "--out", str(tmp_path)] + FAST)
    test_set = load_split("mmimdb", mmimdb_root, "test", missing_type="both", rate=0.7, seed=0)
    assert len({i.split("#")[0] for i in test_set.ids}) < len(test_set)    # the fixture has movies with 2+ plots
    check_outputs(tmp_path, results, len(test_set))
    assert results["metric"] == "f1_macro"


class Interrupted(Exception):
    pass


def test_resume_restores_the_teachers(tmp_path, food101_root, monkeypatch):
    """Interrupted in the second alignment epoch, --resume continues the alignment stage with the same
    text-step and image-step teachers (read back from OUT/teacher-*.safetensors) and finishes."""
    argv = ["--dataset", "food101", "--data-root", food101_root, "--backbone", "tiny-vilt", "--fusion", "cross",
            "--stage-epochs", "1", "1", "2", "--out", str(tmp_path)] + FAST
    teachers = {"first": [], "resumed": []}
    real_snapshot, real_epoch = muap.snapshot, common.train_one_epoch

    def record(name):
        def spy(model):
            teachers[name].append({k: v.clone() for k, v in model.state_dict().items() if not k.startswith("bb.")})
            return real_snapshot(model)
        return spy

    def epoch_or_interrupt(run, net, loss_fn, optimizer, schedule, params, epoch, **kw):
        if epoch == 1:                                         # only the alignment stage has a second epoch
            raise Interrupted
        return real_epoch(run, net, loss_fn, optimizer, schedule, params, epoch, **kw)

    monkeypatch.setattr(muap, "snapshot", record("first"))
    monkeypatch.setattr(common, "train_one_epoch", epoch_or_interrupt)
    with pytest.raises(Interrupted):
        cli(muap.parser(), muap.main, argv)
    monkeypatch.setattr(common, "train_one_epoch", real_epoch)
    monkeypatch.setattr(muap, "snapshot", record("resumed"))
    results = cli(muap.parser(), muap.main, argv + ["--resume"])
    check_outputs(tmp_path, results, 12, stages=["text-step", "image-step", "alignment", "alignment"])
    assert len(teachers["first"]) == len(teachers["resumed"]) == 2
    for first, resumed in zip(teachers["first"], teachers["resumed"]):
        assert set(first) == set(resumed) and all(torch.equal(first[k], resumed[k]) for k in first)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, food101_root):
    """tiny-vilt, 2 epochs per stage, validation rigged so that the first check (of --val-interval's several per
    epoch) of every stage is its best; the state at every check, (stage, epoch, step), and the teacher objects are
    recorded."""
    out = tmp_path_factory.mktemp("muap-best")
    argv = ["--dataset", "food101", "--data-root", food101_root, "--backbone", "tiny-vilt", "--stage-epochs", "2", "2",
            "2", "--out", str(out)] + FAST
    states, teachers, calls = {}, [], [0]
    real_epoch, real_evaluate, real_snapshot = common.train_one_epoch, common.evaluate, muap.snapshot

    def epoch_spy(run, net, loss_fn, optimizer, schedule, params, epoch, **kw):  # train_one_epoch yields at checks
        for check in real_epoch(run, net, loss_fn, optimizer, schedule, params, epoch, **kw):
            states[(run.stage_index, epoch, check[0])] = common.method_state(net)
            yield check

    def falling_evaluate(run, model, dataset, scores=None):
        calls[0] += 1
        return dict(real_evaluate(run, model, dataset, scores), accuracy=1.0 - 0.01 * calls[0])

    def snapshot_spy(model):
        teachers.append(real_snapshot(model))
        return teachers[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "train_one_epoch", epoch_spy)
        mp.setattr(common, "evaluate", falling_evaluate)
        mp.setattr(muap, "snapshot", snapshot_spy)
        results = cli(muap.parser(), muap.main, argv)
        first_teachers = list(teachers)
        from safetensors.torch import load_file
        saved = {name: load_file(out / name) for name in ("teacher-text-step.safetensors",
                                                          "teacher-image-step.safetensors", "checkpoint.safetensors")}
        with open(out / "predictions_test.csv") as f:
            predictions = f.read()
        resumed = cli(muap.parser(), muap.main, argv + ["--resume"])
        resumed_checkpoint = load_file(out / "checkpoint.safetensors")
    return {"results": results, "states": states, "teachers": first_teachers, "saved": saved,
            "predictions": predictions, "resumed": resumed, "resumed_checkpoint": resumed_checkpoint, "out": out}


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def checks_of(states, stage_index):
    """The states at a stage's validation checks, in training order."""
    return [states[k] for k in sorted(k for k in states if k[0] == stage_index)]


def test_teachers_are_the_best_validation_states(best_run):
    """Each stage keeps its own best check (the header's decision): the teachers are the single stages' best states
    and the final checkpoint is the alignment stage's best, although the rigged validation scored every single-stage
    check above every alignment check (the best over all stages would be the text-step's first check)."""
    states, saved = best_run["states"], best_run["saved"]
    for stage_index, name in ((1, "teacher-text-step"), (2, "teacher-image-step")):
        first, *later = checks_of(states, stage_index)
        assert len(later) >= 1
        assert same(saved[f"{name}.safetensors"], first)                  # the best: the first check of the stage
        assert not any(same(saved[f"{name}.safetensors"], s) for s in later)
    assert same(saved["checkpoint.safetensors"], checks_of(states, 3)[0])
    assert not same(saved["checkpoint.safetensors"], checks_of(states, 1)[0])


def test_teachers_are_deep_copies_head_and_pooler_included(best_run):
    """After the later stages trained the student's prompts, pooler and head, each teacher still holds the state
    of its own stage."""
    text_teacher, image_teacher = best_run["teachers"]
    for teacher, name in ((text_teacher, "teacher-text-step"), (image_teacher, "teacher-image-step")):
        state = common.method_state(teacher)
        assert same(state, best_run["saved"][f"{name}.safetensors"])
        assert any(k.startswith("pooler.") for k in state) and any(k.startswith("head.") for k in state)
    assert text_teacher.bb is image_teacher.bb                   # the frozen backbone is shared, not copied


def test_resume_after_the_final_epoch_changes_nothing(best_run):
    """--resume of a finished run evaluates and saves the same (best) state as the run itself, not the last one."""
    assert not same(best_run["resumed_checkpoint"], checks_of(best_run["states"], 3)[-1])
    assert same(best_run["resumed_checkpoint"], best_run["saved"]["checkpoint.safetensors"])
    with open(best_run["out"] / "predictions_test.csv") as f:
        assert f.read() == best_run["predictions"]


def test_rounds_repeat_the_three_stages_each_with_its_own_teachers(tmp_path, food101_root, monkeypatch):
    """--rounds 2: text-step, image-step, alignment twice; round 2's alignment uses round 2's snapshots."""
    seen = {}
    spy_alignment(monkeypatch, tmp_path, seen)
    results = cli(muap.parser(), muap.main, ["--dataset", "food101", "--data-root", food101_root, "--backbone",
                                             "tiny-clip", "--fusion", "cross", "--rounds", "2", "--stage-epochs", "1",
                                             "1", "1", "--out", str(tmp_path)] + FAST)
    stages = [f"{s}-{r}" for r in (1, 2) for s in ("text-step", "image-step", "alignment")]
    check_outputs(tmp_path, results, 12, stages=stages)
    assert results["config"]["epochs"] == 6 and results["rounds"] == 2
    for r in (1, 2):
        check = seen[f"alignment-{r}"]
        assert abs(check["loss"] - (check["task"] + check["kl_t"] + check["kl_v"])) < 1e-5
        assert all(torch.allclose(u, o, atol=1e-5) for u, o in zip(check["used"], check["oracle"]))
    assert not torch.allclose(seen["alignment-1"]["oracle"][0], seen["alignment-2"]["oracle"][0], atol=1e-4)


def test_live_teachers_run(tmp_path, food101_root, monkeypatch):
    """--teachers live: the alignment stage gets y_t, y_v from the model itself (detached) and finishes."""
    seen = {}
    spy_alignment(monkeypatch, tmp_path, seen)
    results = cli(muap.parser(), muap.main, ["--dataset", "food101", "--data-root", food101_root, "--backbone",
                                             "tiny-vilt", "--teachers", "live", "--stage-epochs", "1", "1", "1",
                                             "--out", str(tmp_path)] + FAST)
    check_outputs(tmp_path, results, 12)
    check = seen["alignment"]
    assert check["teachers"] is muap.live_teachers and not check["used"][0].requires_grad
    assert check["kl_t"] > 1e-6


def test_prompt_depth_0_runs_the_prompt_free_model_and_says_so(tmp_path, food101_root, capsys):
    results = cli(muap.parser(), muap.main, ["--dataset", "food101", "--data-root", food101_root, "--backbone",
                                             "tiny-vilt", "--prompt-depth", "0", "--stage-epochs", "1", "1", "1",
                                             "--out", str(tmp_path)] + FAST)
    check_outputs(tmp_path, results, 12)
    assert "no prompt tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "2"], "--epochs 2 cannot give each stage"),
    (["--epochs", "8", "--rounds", "3"], "in 3 equal round(s)"),
    (["--epochs", "9", "--stage-epochs", "1", "1", "2"], "--epochs 9 contradicts"),
    (["--stage-epochs", "0", "0", "0"], "not all 0"),
    (["--prompt-depth", "-1"], "--prompt-depth"),
])
def test_epochs_that_cannot_be_honoured_are_an_error(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(muap.parser(), muap.main, ["--backbone", "tiny-vilt", "--out", str(tmp_path)] + argv)
    assert message in str(e.value)
    assert not os.listdir(tmp_path)                            # refused before anything ran


def test_stage_epochs_split_the_epochs_of_each_round():
    def split(*argv):
        args = muap.parser().parse_args(list(argv))
        return muap.stage_epochs(args), args.epochs
    assert split() == ([5, 5, 10], 20)
    assert split("--epochs", "3") == ([1, 1, 1], 3)
    assert split("--epochs", "7") == ([1, 1, 5], 7)
    assert split("--epochs", "16", "--rounds", "2") == ([2, 2, 4], 16)
    assert split("--stage-epochs", "3", "0", "4", "--rounds", "2") == ([3, 0, 4], 14)
    assert split("--stage-epochs", "3", "0", "4", "--epochs", "7") == ([3, 0, 4], 7)


# ---------------------------------------------------------------------------------------------------------
# Mechanisms: crosswise generation, routing, stage gradients, teachers, loss, token layout
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["tiny_clip", "tiny_vilt"])
def test_missing_prompts_come_from_the_other_modality(backbone, request):
    model = model_for(request.getfixturevalue(backbone), "cross")
    gen = model.generator
    missing = torch.tensor([TEXT_MISSING, IMAGE_MISSING])
    with torch.no_grad():
        P_t, P_v = gen(missing)
        gen.image.complete.add_(0.5 * torch.randn_like(gen.image.complete))        # perturb P_v^c
        P_t2, P_v2 = gen(missing)
        gen.text.complete.add_(0.5 * torch.randn_like(gen.text.complete))          # perturb P_t^c
        P_t3, P_v3 = gen(missing)
    assert not torch.allclose(P_t[0], P_t2[0])       # P_t^miss = f_missing(P_v^c) follows P_v^c ...
    assert torch.equal(P_v[1], P_v2[1])              # ... and P_v^miss does not depend on it
    assert not torch.allclose(P_v2[1], P_v3[1])      # P_v^miss = f_missing(P_t^c) follows P_t^c ...
    assert torch.equal(P_t2[0], P_t3[0])             # ... and P_t^miss does not depend on it
    assert P_t.shape[1:] == gen.text.complete.shape and P_v.shape[1:] == gen.image.complete.shape


@pytest.mark.parametrize("backbone", ["tiny_clip", "tiny_vilt"])
def test_each_sample_gets_the_prompts_of_its_case(backbone, request):
    gen = model_for(request.getfixturevalue(backbone), "head").generator
    codes = torch.tensor(MIXED)
    with torch.no_grad():
        P_t, P_v = gen(codes)
        for b, code in enumerate(MIXED):                                           # brute force, per sample
            P_v_c, P_t_c = gen.image.complete, gen.text.complete
            want_t = (torch.stack([f(P_v_c[i]) for i, f in enumerate(gen.text.f_missing)])
                      if code == TEXT_MISSING else P_t_c)
            want_v = (torch.stack([f(P_t_c[i]) for i, f in enumerate(gen.image.f_missing)])
                      if code == IMAGE_MISSING else P_v_c)
            assert torch.allclose(P_t[b], want_t, atol=1e-6) and torch.allclose(P_v[b], want_v, atol=1e-6)


@pytest.mark.parametrize("backbone,fusion", [("tiny_clip", "head"), ("tiny_vilt", "cross")])
def test_single_stages_give_no_gradient_to_the_frozen_modality(backbone, fusion, request):
    bb = request.getfixturevalue(backbone)
    model = model_for(bb, fusion).train()
    batch = toy_batch(bb, MIXED)
    for text, image in ((True, False), (False, True), (True, True)):
        muap.set_stage(model, text=text, image=image)
        model.zero_grad(set_to_none=True)
        task_loss(model(batch)["logits"], batch["label"], "multiclass").backward()
        for group, trained in (("text", text), ("image", image)):
            for name, p in getattr(model.generator, group).named_parameters():
                if trained:
                    assert p.grad is not None and p.grad.abs().sum() > 0, (text, image, group, name)
                else:
                    assert p.grad is None, (text, image, group, name)
        assert all(p.grad is not None for p in model.head.parameters())
        assert all(p.grad is None for p in model.bb.parameters())


class Few:
    """The first n samples of a split, with its ids (what `teacher_table` reads)."""

    def __init__(self, ds, n):
        self.ds, self.ids = ds, ds.ids[:n]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ds[i]


def table_run(bb, n=12):
    """The parts of common.Run that `teacher_table` uses: one process on CPU, a toy training split of n samples."""
    ds = Few(load_split("toy", None, "train", missing_type="both", rate=0.7, seed=0), n)
    args = types.SimpleNamespace(dataset="toy", micro_batch=5, num_workers=0, precision="bf16", seed=0)
    return types.SimpleNamespace(train_set=ds, args=args, rank=0, world=1, device=torch.device("cpu"),
                                 collate=Collate(bb, 40))


@pytest.mark.parametrize("backbone", ["tiny_clip", "tiny_vilt"])
def test_teacher_table_equals_the_frozen_teachers_forwards(backbone, request):
    """The table computed once equals each teacher's own eval forward on any later batch, in any order (on ViLT
    up to float rounding: HF ViLT draws the patch order at random, and attention does not see the order)."""
    bb = request.getfixturevalue(backbone)
    model = model_for(bb, "head")
    teacher_t = muap.snapshot(model)
    with torch.no_grad():
        model.generator.text.complete.add_(0.5 * torch.randn_like(model.generator.text.complete))
        model.head[-1].bias.add_(0.3)                          # the student moves on; the copies do not
    teacher_v = muap.snapshot(model)
    run = table_run(bb)
    table = muap.teacher_table(run, teacher_t, teacher_v)
    rows = [7, 2, 11, 0]
    batch = run.collate([run.train_set[k] for k in rows])
    torch.manual_seed(123)
    y_t, y_v = table(model.train(), batch, None, None)
    with torch.no_grad():
        want_t, want_v = teacher_t(batch)["logits"], teacher_v(batch)["logits"]
    assert torch.allclose(y_t, want_t, atol=1e-5) and torch.allclose(y_v, want_v, atol=1e-5)
    assert not torch.allclose(y_t, y_v, atol=1e-3)
    assert y_t.dtype == torch.float32 and not y_t.requires_grad


def test_teacher_table_is_fp32_when_the_teachers_run_under_autocast(tiny_clip, monkeypatch):
    monkeypatch.setattr(muap, "autocast", lambda run: torch.autocast("cpu", dtype=torch.bfloat16))
    model = model_for(tiny_clip, "head")
    teacher = muap.snapshot(model)
    run = table_run(tiny_clip, n=4)
    table = muap.teacher_table(run, teacher, teacher)
    with torch.no_grad():
        want = teacher(run.collate([run.train_set[k] for k in range(4)]))["logits"]
    assert table.logits_t.dtype == torch.float32
    assert torch.allclose(table.logits_t, want, atol=0.05)      # bf16 rounding of the teacher's forward


def test_teacher_table_runs_the_teachers_without_backbone_dropout(tiny_vilt):
    """The header: the table is computed in eval mode. With the shared ViLT's dropout at 0.5 and both teachers left
    in train mode (as the student's model.train() leaves the backbone they share), the table equals the teachers'
    eval forwards, and a train-mode forward would not."""
    model = model_for(tiny_vilt, "head")
    teacher_t = muap.snapshot(model)
    with torch.no_grad():
        model.head[-1].bias.add_(0.3)
    teacher_v = muap.snapshot(model)
    run = table_run(tiny_vilt, n=6)
    batch = run.collate([run.train_set[k] for k in range(6)])
    dropout = tiny_vilt.dropout
    tiny_vilt.set_dropout(0.5)
    try:
        teacher_t.train()
        teacher_v.train()
        table = muap.teacher_table(run, teacher_t, teacher_v)
        with torch.no_grad():
            noisy = teacher_v.train()(batch)["logits"]
            want_t, want_v = teacher_t.eval()(batch)["logits"], teacher_v.eval()(batch)["logits"]
    finally:
        tiny_vilt.set_dropout(dropout)
    assert torch.allclose(table.logits_t, want_t, atol=1e-5) and torch.allclose(table.logits_v, want_v, atol=1e-5)
    assert not torch.allclose(noisy, want_v, atol=1e-3)


def test_teacher_table_refuses_repeated_sample_ids(tiny_clip):
    """The table is keyed by sample id: a training split with an id twice is refused before any forward."""
    run = table_run(tiny_clip, n=4)
    run.train_set.ids = [run.train_set.ids[0], run.train_set.ids[1], run.train_set.ids[0], run.train_set.ids[2]]
    teacher = muap.snapshot(model_for(tiny_clip, "head"))
    with pytest.raises(DataError, match="repeated sample ids"):
        muap.teacher_table(run, teacher, teacher)


def test_kl_is_fp32_under_autocast():
    """The alignment loss of bf16 student logits under autocast is the fp32 value of the same numbers."""
    g = torch.Generator().manual_seed(1)
    y, y_t, y_v = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    y16 = y.bfloat16()
    labels = torch.randint(0, 5, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = muap.alignment_loss({"logits": y16, "logits_t": y_t, "logits_v": y_v}, labels, "multiclass", 0.5, 1.5)
    want = (float(task_loss(y16.float(), labels, "multiclass")) + 0.5 * brute_kl(y_t, y16.float(), "multiclass")
            + 1.5 * brute_kl(y_v, y16.float(), "multiclass"))
    assert loss.dtype == torch.float32 and abs(float(loss) - want) < 1e-5


@pytest.mark.parametrize("backbone,fusion", [("tiny_vilt", "head"), ("tiny_clip", "cross")])
def test_live_teachers_insert_only_one_modalitys_prompts(backbone, fusion, request):
    """--teachers live: y_t depends on the text prompts only (P_t^c, and P_v^c only through P_t^miss of text-missing
    samples), y_v on the image prompts only; both detached."""
    bb = request.getfixturevalue(backbone)
    model = model_for(bb, fusion).train()
    model.teachers = muap.live_teachers
    batch = toy_batch(bb, MIXED)
    codes = torch.tensor(MIXED)

    def outputs():
        torch.manual_seed(0)
        return model(batch)
    base = outputs()
    assert not base["logits_t"].requires_grad and not base["logits_v"].requires_grad
    assert not torch.allclose(base["logits_t"], base["logits"], atol=1e-4)
    with torch.no_grad():
        model.generator.image.complete.add_(0.5 * torch.randn_like(model.generator.image.complete))  # perturb P_v^c
    moved = outputs()
    changed = {k: ~torch.isclose(moved[k], base[k], atol=1e-6).all(-1) for k in ("logits", "logits_t", "logits_v")}
    assert torch.equal(changed["logits_t"], codes == TEXT_MISSING)            # only through P_t^miss = f_t(P_v^c)
    assert torch.equal(changed["logits_v"], codes != IMAGE_MISSING)           # every sample that inserts P_v^c
    assert torch.equal(changed["logits"], codes != IMAGE_MISSING)             # complete samples: y moves, y_t not


def test_text_step_gradient_reaches_P_t_c_through_f_v(tiny_vilt):
    """Parameter-level freezing: in the text-step, the image-missing samples' P_v^miss = f_v(P_t^c) passes its
    gradient to P_t^c (chain rule through the frozen f_v), besides P_t^c's direct path."""
    model = model_for(tiny_vilt, "cross").train()
    muap.set_stage(model, text=True, image=False)
    batch = toy_batch(tiny_vilt, [IMAGE_MISSING, IMAGE_MISSING, COMPLETE])
    P_t_c = model.generator.text.complete

    def loss(P_t, P_v):
        torch.manual_seed(0)
        return task_loss(model.logits(batch, P_t, P_v), batch["label"], "multiclass")
    P_t, P_v = model.generator(batch["missing"])
    (g_full,) = torch.autograd.grad(loss(P_t, P_v), P_t_c)
    P_t, P_v = model.generator(batch["missing"])
    P_v_leaf = P_v.detach().requires_grad_(True)
    g_direct, dL_dP_v = torch.autograd.grad(loss(P_t, P_v_leaf), (P_t_c, P_v_leaf))
    (g_via_f_v,) = torch.autograd.grad(P_v, P_t_c, grad_outputs=dL_dP_v)
    assert g_via_f_v.abs().sum() > 0
    assert torch.allclose(g_full, g_direct + g_via_f_v, atol=1e-6)


def brute_kl(p_logits, q_logits, task):
    """KL(p || q) averaged over samples (and over classes for Bernoulli), one number at a time."""
    total, count = 0.0, 0
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist()):
        if task == "multilabel":
            for a, b in zip(p_row, q_row):
                p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
                total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
                count += 1
        else:
            zp, zq = sum(math.exp(a) for a in p_row), sum(math.exp(b) for b in q_row)
            total += sum(math.exp(a) / zp * math.log((math.exp(a) / zp) / (math.exp(b) / zq))
                         for a, b in zip(p_row, q_row))
            count += 1
    return total / count


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_alignment_loss_matches_brute_force(task):
    g = torch.Generator().manual_seed(0)
    C = 2 if task == "binary" else 5
    y, y_t, y_v = (torch.randn(7, C, generator=g) * 2 for _ in range(3))
    labels = (torch.rand(7, C, generator=g) > 0.5).float() if task == "multilabel" else torch.randint(0, C, (7,))
    assert abs(float(muap.kl(y_t, y, task)) - brute_kl(y_t, y, task)) < 1e-5
    assert abs(float(muap.kl(y, y, task))) < 1e-6
    loss = muap.alignment_loss({"logits": y, "logits_t": y_t, "logits_v": y_v}, labels, task, 0.3, 2.0)
    want = float(task_loss(y, labels, task)) + 0.3 * brute_kl(y_t, y, task) + 2.0 * brute_kl(y_v, y, task)
    assert abs(float(loss) - want) < 1e-5


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
@pytest.mark.parametrize("lambda_t,lambda_v", [(0.0, 1.5), (0.7, 0.0), (0.3, 2.0)])
def test_alignment_loss_value_and_gradient_written_out(task, lambda_t, lambda_v):
    """L = L_task + lambda_t KL(y_t || y) + lambda_v KL(y_v || y) (Sec. 3.6), a lambda of 0 dropping only its own term:
    the value against brute_kl, and dL/dy against the derivative written out. Softmax tasks (CE and KL of softmaxes,
    batch means): (q - onehot + lambda_t (q - p_t) + lambda_v (q - p_v)) / B, q = softmax(y). Multi-label (BCE and
    Bernoulli KL, means over B x C): (s - labels + lambda_t (s - s_t) + lambda_v (s - s_v)) / (B C), s = sigmoid."""
    g = torch.Generator().manual_seed(3)
    B, C = 6, 2 if task == "binary" else 5
    y_t, y_v, y0 = (torch.randn(B, C, generator=g) * 2 for _ in range(3))
    labels = (torch.rand(B, C, generator=g) > 0.5).float() if task == "multilabel" else torch.randint(0, C, (B,),
                                                                                                          generator=g)
    y = y0.clone().requires_grad_(True)
    loss = muap.alignment_loss({"logits": y, "logits_t": y_t, "logits_v": y_v}, labels, task, lambda_t, lambda_v)
    loss.backward()
    want = float(task_loss(y0, labels, task)) + lambda_t * brute_kl(y_t, y0, task) + lambda_v * brute_kl(y_v, y0, task)
    assert abs(float(loss.detach()) - want) < 1e-5
    if task == "multilabel":
        s, target, n = y0.sigmoid(), labels, B * C
        p_t, p_v = y_t.sigmoid(), y_v.sigmoid()
    else:
        s, target, n = y0.softmax(-1), F.one_hot(labels, C).float(), B
        p_t, p_v = y_t.softmax(-1), y_v.softmax(-1)
    grad = (s - target + lambda_t * (s - p_t) + lambda_v * (s - p_v)) / n
    assert torch.allclose(y.grad, grad, atol=1e-6)


def test_one_lambda_0_keeps_the_other_teacher(tmp_path, food101_root, monkeypatch):
    """--lambda-v 0: the alignment stage still sets up its teachers and trains on L_task + 0.5 KL(y_t || y), y_t
    rebuilt from OUT/teacher-text-step.safetensors, the KL by brute force."""
    seen = {}
    spy_alignment(monkeypatch, tmp_path, seen)
    results = cli(muap.parser(), muap.main, ["--dataset", "food101", "--data-root", food101_root, "--backbone",
                                             "tiny-clip", "--fusion", "cross", "--stage-epochs", "1", "1", "1",
                                             "--lambda-t", "0.5", "--lambda-v", "0", "--out", str(tmp_path)] + FAST)
    check_outputs(tmp_path, results, 12)
    check = seen["alignment"]
    assert isinstance(check["teachers"], muap.TeacherTable) and check["kl_t"] > 1e-4
    assert abs(check["loss"] - (check["task"] + 0.5 * check["kl_t"])) < 1e-5
    assert torch.allclose(check["used"][0], check["oracle"][0], atol=1e-5)


@pytest.mark.parametrize("fusion,combine", [("head", "add"), ("head", "concat"), ("cross", "add")])
def test_vilt_token_layout_and_mask(fusion, combine, tiny_vilt):
    """At the input of prompted layer i the newest prompts sit where the fusion says, the text and image
    tokens behind the accumulated prompts, with the text padding still masked; unprompted layers add nothing."""
    P, depth = 3, 2
    model = model_for(tiny_vilt, fusion, length=P, depth=depth, combine=combine).eval()
    batch = toy_batch(tiny_vilt, MIXED)
    L_t = batch["input_ids"].shape[1]
    with torch.no_grad():
        P_t, P_v = model.generator(batch["missing"])
        torch.manual_seed(0)                                   # HF ViLT draws its image patches in a random order
        x0, mask0 = tiny_vilt.embed(batch)
    seen, last = [], []
    real_block = tiny_vilt.block

    def spy_block(i, x, bias):
        seen.append((x.clone(), bias.clone()))
        last[:] = [real_block(i, x, bias)]
        return last[0]

    tiny_vilt.block = spy_block
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            pooled = model.forward_vilt(batch, P_t, P_v)
    finally:
        del tiny_vilt.block
    assert len(seen) == tiny_vilt.num_layers
    per_layer = 2 * P if combine == "concat" else P            # tokens in front of the text per prompted layer
    if fusion == "cross":
        per_layer = P
    cls = depth * per_layer                                    # the text [CLS] behind all prompts in front of it
    with torch.no_grad():
        assert torch.allclose(pooled, model.pooler(tiny_vilt.final_norm(last[0])[:, cls:cls + 1]))
    for i, (x, bias) in enumerate(seen):
        n = min(i + 1, depth) * P                              # prompt tokens of each modality so far
        n_all = n if combine == "add" and fusion == "head" else 2 * n
        assert x.shape[1] == x0.shape[1] + n_all
        visible = bias[:, 0, 0] == 0
        j = min(i, depth - 1)                                  # the newest prompts in front
        if fusion == "cross":                                  # [P_t^i, ..., text, P_v^i, ..., image]
            new = [(x[:, :P], P_t[:, j]), (x[:, n + L_t:n + L_t + P], P_v[:, j])]
        elif combine == "concat":                              # [P_t^i, P_v^i, ..., text, image]
            new = [(x[:, :P], P_t[:, j]), (x[:, P:2 * P], P_v[:, j])]
        else:                                                  # [P_t^i + P_v^i, ..., text, image]
            new = [(x[:, :P], P_t[:, j] + P_v[:, j])]
        text_at, image_at = n_all - n if fusion == "cross" else n_all, n_all + L_t
        if i < depth:
            assert all(torch.allclose(got, want) for got, want in new)
        assert torch.equal(visible[:, text_at:text_at + L_t], mask0[:, :L_t].bool())
        assert torch.equal(visible[:, image_at:], mask0[:, L_t:].bool())
        assert visible.sum() == mask0.sum() + n_all * len(MIXED)
        if i == 0:                                             # before any block ran, the tokens are the embedding's
            assert torch.allclose(x[:, text_at:text_at + L_t], x0[:, :L_t])
            assert torch.allclose(x[:, image_at:], x0[:, L_t:])
    assert (batch["text_mask"] == 0).any()                     # the batch does have text padding to mask


@pytest.mark.parametrize("backbone", ["tiny_clip", "tiny_vilt"])
@pytest.mark.parametrize("fusion,length,depth", [("head", 0, 6), ("cross", 0, 6), ("head", 3, 0), ("cross", 3, 0)])
def test_zero_length_or_depth_prompts_reproduce_the_backbone(backbone, fusion, length, depth, request):
    """With P = 0 or N = 0 the prompted forward is the backbone's own prompt-free forward (which
    tests/test_backbones.py checks against open_clip and HF ViltModel): pooled positions and masks are right."""
    bb = request.getfixturevalue(backbone)
    model = model_for(bb, fusion, length=length, depth=depth).eval()
    batch = toy_batch(bb, MIXED)
    with torch.no_grad():
        P_t, P_v = model.generator(batch["missing"])
        if bb.kind == "vilt":
            got, want = model.forward_vilt(batch, P_t, P_v), model.pooler(bb.encode(batch)[0][:, :1])
        else:
            got, want = model.forward_clip(batch, P_t, P_v), torch.cat(bb.encode(batch), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)


def test_vilt_head_concat_is_cross_fusion_and_the_default_add_is_not(tiny_vilt, tiny_clip):
    """ViLT's self-attention is permutation-equivariant and the prompts carry no position embedding, so
    concatenated head-fusion ([P_t, P_v] at the start) equals cross-fusion once the text [CLS] is pooled at its new
    position, and the run says so; the default, P_t + P_v, computes another function."""
    batch = toy_batch(tiny_vilt, MIXED)
    settings = (("add", "head", "add"), ("concat", "head", "concat"), ("cross", "cross", "add"))
    models = {name: model_for(tiny_vilt, fusion, combine=combine).eval() for name, fusion, combine in settings}
    with torch.no_grad():
        logits = {name: m(batch)["logits"] for name, m in models.items()}        # same seed: the same parameters
    assert torch.allclose(logits["concat"], logits["cross"], atol=1e-5)
    assert not torch.allclose(logits["add"], logits["cross"], atol=1e-3)
    args = muap.parser().parse_args([])
    assert muap.equivalences(args, tiny_vilt, [5, 5, 10]) == []                  # the default warns of nothing
    args.head_combine = "concat"
    assert "is --fusion cross" in muap.equivalences(args, tiny_vilt, [5, 5, 10])[0]
    assert muap.equivalences(args, tiny_clip, [5, 5, 10]) == []


def test_clip_fusions_differ(tiny_clip):
    batch = toy_batch(tiny_clip, MIXED)
    head, cross = model_for(tiny_clip, "head").eval(), model_for(tiny_clip, "cross").eval()
    cross.load_state_dict(head.state_dict(), strict=False)                      # cross has no to_other maps
    with torch.no_grad():
        assert not torch.allclose(head(batch)["logits"], cross(batch)["logits"], atol=1e-4)


@pytest.mark.parametrize("backbone,fusion", [("tiny_vilt", "cross"), ("tiny_clip", "head")])
def test_a_sample_alone_equals_the_sample_in_a_mixed_batch(backbone, fusion, request):
    """Routing by index and the masks of the padded text: no sample's output depends on its batch."""
    bb = request.getfixturevalue(backbone)
    model = model_for(bb, fusion).eval()
    ds = load_split("toy", None, "train", missing_type="both", rate=0.7, seed=0)
    collate = Collate(bb, 40)
    rows = [ds[k] for k in range(8)]
    with torch.no_grad():
        together = model(collate(rows))["logits"]
        alone = torch.cat([model(collate([r]))["logits"] for r in rows])
    assert len({r["missing"] for r in rows}) == 3
    assert torch.allclose(together, alone, atol=1e-5)


def test_prompt_depth_is_clamped_and_defaults(tiny_vilt):
    assert model_for(tiny_vilt, "head", depth=6).depth == tiny_vilt.num_layers
    args = muap.parser().parse_args([])
    assert (args.fusion, args.head_combine, args.prompt_length, args.prompt_depth) == ("head", "add", 16, 6)
    assert (args.lambda_t, args.lambda_v, args.teachers, args.rounds) == (1.0, 1.0, "snapshot", 1)
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs) == (1e-2, 2e-2, 256, None)
    # MAP's vilt/config.py @ 9aa5381, task_finetune_{food101,mmimdb,hatememes}: warmup_steps 0.1, decay_power 1 (linear,
    # to end_lr 0), drop_rate 0.1, val_check_interval 0.2 / 0.2 / 0.11
    assert (args.schedule, args.warmup, args.backbone_dropout) == ("linear", 0.1, 0.1)
    assert args.val_interval == {"food101": 0.2, "mmimdb": 0.2, "hatememes": 0.11}


# ---------------------------------------------------------------------------------------------------------
# Both forwards against a brute force over samples and layers on the backbones' own modules (HF ViltLayer,
# open_clip's resblocks), with the prompts of Sec. 3.4 written out
# ---------------------------------------------------------------------------------------------------------
def gelu(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def f_missing_by_hand(mlp, p):
    """The header's f_missing, written out: Linear -> exact GELU -> Linear, token-wise."""
    first, last = mlp[0], mlp[-1]
    return gelu(p @ first.weight.T + first.bias) @ last.weight.T + last.bias


def paper_prompts(gen, code):
    """One sample's (P_t, P_v), each (N, P, D_m), by Sec. 3.4: a present modality takes its complete-type prompt, an
    absent one the missing-type prompt f_missing generates, layer by layer, from the other modality's complete one."""
    P_t_c, P_v_c = gen.text.complete, gen.image.complete
    layers = range(P_t_c.shape[0])
    P_t = torch.stack([f_missing_by_hand(gen.text.f_missing[i], P_v_c[i]) for i in layers]) if code == TEXT_MISSING \
        else P_t_c
    P_v = torch.stack([f_missing_by_hand(gen.image.f_missing[i], P_t_c[i]) for i in layers]) if code == IMAGE_MISSING \
        else P_v_c
    return P_t, P_v


def left_out(P_t, P_v, keep):
    """keep "both", "text" (P_v left out, as for y_t of --teachers live) or "image" (P_t left out)."""
    return (P_t if keep in ("both", "text") else None), (P_v if keep in ("both", "image") else None)


def head_tokens(combine, *terms):
    """Head-fusion tokens of one layer from the terms present: their sum (add) or their concatenation."""
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if combine == "add" else torch.cat(terms)


def vilt_by_hand(model, x0, visible, L_t, P_t, P_v):
    """One ViLT sample through HF's own ViltLayer modules, its padding dropped instead of masked. Segments
    [head prompts, text prompts, text, image prompts, image]: at each prompted layer head-fusion puts the layer's
    prompts at the sequence start, cross-fusion each modality's prompt before that modality's tokens, in front of
    the earlier layers' prompts; the pooled token is the text [CLS], the first text token."""
    bb = model.bb
    D = x0.shape[-1]
    seg = {"head": x0.new_zeros(0, D), "text_p": x0.new_zeros(0, D), "text": x0[:L_t][visible[:L_t]],
           "image_p": x0.new_zeros(0, D), "image": x0[L_t:][visible[L_t:]]}
    for i, layer in enumerate(bb.vilt.encoder.layer):
        if i < model.depth:
            p_t, p_v = (None if P is None else P[i] for P in (P_t, P_v))
            if model.fusion == "head":
                seg["head"] = torch.cat([head_tokens(model.combine, p_t, p_v), seg["head"]])
            else:
                for name, p in (("text_p", p_t), ("image_p", p_v)):
                    if p is not None:
                        seg[name] = torch.cat([p, seg[name]])
        sizes = [len(v) for v in seg.values()]
        out = layer(torch.cat(list(seg.values()))[None])[0][0]
        seg = dict(zip(seg, out.split(sizes)))
    cls = seg["text"][:1]
    return model.head(model.pooler(bb.vilt.layernorm(cls)[None]))[0]


@pytest.mark.parametrize("fusion,combine", [("head", "add"), ("head", "concat"), ("cross", "add")])
def test_vilt_forward_equals_a_brute_force_on_hf_vilt_layers(fusion, combine, tiny_vilt):
    """model.logits on a mixed batch (text padding, images of different sizes: padded patches, all three missing
    cases), with both prompts and with either left
    out (--teachers live), equals vilt_by_hand per sample: the routing and f_missing of Sec. 3.4 written out, the
    prompt placement of Sec. 3.5, HF's ViltLayer / layernorm as the blocks. Prompts in 3 of the 4 layers."""
    model = model_for(tiny_vilt, fusion, length=2, depth=3, combine=combine).eval()
    batch = mixed_size_batch(tiny_vilt)
    L_t = batch["input_ids"].shape[1]
    assert (batch["text_mask"] == 0).any() and model.depth < tiny_vilt.num_layers
    with torch.no_grad():
        torch.manual_seed(0)                                   # HF ViLT draws its image patches in a random order
        x0, mask0 = tiny_vilt.embed(batch)
        got = {}
        for keep in ("both", "text", "image"):
            torch.manual_seed(0)
            got[keep] = model.logits(batch, *left_out(*model.generator(batch["missing"]), keep))
            for b, code in enumerate(MIXED):
                want = vilt_by_hand(model, x0[b], mask0[b].bool(), L_t,
                                    *left_out(*paper_prompts(model.generator, code), keep))
                assert torch.allclose(got[keep][b], want, atol=1e-5), (keep, b, code)
    assert not torch.allclose(got["text"], got["both"], atol=1e-4)
    assert not torch.allclose(got["image"], got["both"], atol=1e-4)


def clip_by_hand(model, image, ids, P_t, P_v):
    """One CLIP sample through open_clip's own modules. Per prompted layer, each tower gets its prompt in front of
    its sequence, earlier prompts kept: cross-fusion P_t (text tower) and P_v (image tower); head-fusion (header)
    P_t + to_other_v(P_v) and to_other_t(P_t) + P_v (or concatenated). Pooled: the image [CLS] and the text EOT
    token behind all the prompts, through ln_post / ln_final and the projections; features [image, text] as DCP
    (clip_missing_aware_prompt_module.py @ 3519534: torch.cat([image_features, text_features], -1))."""
    m, gen = model.bb.model, model.generator

    def linear(lin, p):
        return None if p is None else p @ lin.weight.T + lin.bias

    x = m.visual._embeds(image[None])                           # conv patches, class token, positions, ln_pre
    t = m.token_embedding(ids[None]) + m.positional_embedding
    n_v = n_t = 0
    for i in range(model.bb.num_layers):
        if i < model.depth:
            p_t, p_v = (None if P is None else P[i] for P in (P_t, P_v))
            if model.fusion == "head":
                to_text, to_image = head_tokens(model.combine, p_t, linear(gen.image.to_other, p_v)), \
                    head_tokens(model.combine, linear(gen.text.to_other, p_t), p_v)
            else:
                to_text, to_image = p_t, p_v
            if to_image is not None:
                x, n_v = torch.cat([to_image[None], x], 1), n_v + len(to_image)
            if to_text is not None:
                t, n_t = torch.cat([to_text[None], t], 1), n_t + len(to_text)
        L = t.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)
        x, t = m.visual.transformer.resblocks[i](x), m.transformer.resblocks[i](t, attn_mask=causal)
    image_feature = m.visual.ln_post(x[0, n_v]) @ m.visual.proj
    text_feature = m.ln_final(t[0, n_t + int(ids.argmax())]) @ m.text_projection
    return model.head(torch.cat([image_feature, text_feature]))


@pytest.mark.parametrize("fusion,combine", [("head", "add"), ("head", "concat"), ("cross", "add")])
def test_clip_forward_equals_a_brute_force_on_open_clip_modules(fusion, combine, tiny_clip):
    """As the ViLT test, on both CLIP towers: model.logits per sample = clip_by_hand with the prompts of Sec. 3.4
    written out, with both prompts and with either left out. Prompts in 3 of the 4 layers of each tower."""
    model = model_for(tiny_clip, fusion, length=2, depth=3, combine=combine).eval()
    batch = mixed_size_batch(tiny_clip)
    with torch.no_grad():
        got = {}
        for keep in ("both", "text", "image"):
            got[keep] = model.logits(batch, *left_out(*model.generator(batch["missing"]), keep))
            for b, code in enumerate(MIXED):
                want = clip_by_hand(model, batch["image"][b], batch["text"][b],
                                    *left_out(*paper_prompts(model.generator, code), keep))
                assert torch.allclose(got[keep][b], want, atol=1e-5), (keep, b, code)
    assert not torch.allclose(got["text"], got["both"], atol=1e-4)
    assert not torch.allclose(got["image"], got["both"], atol=1e-4)


def test_prompt_generator_shapes_and_init_as_the_header_states(tiny_clip):
    """The header's ASSUMPTIONs, on CLIP where D_t = 48 and D_v = 64 differ: P_m^c (N, P, D_m) drawn N(0, 0.02);
    f_missing of m per layer Linear(D_other, D_m / 16) -> GELU -> Linear(D_m / 16, D_m), weights N(0, 1/fan_in),
    biases 0; so at initialisation P^miss is not one vector repeated: its spread across the tokens of a layer is
    comparable to P^c's (measured 0.40-0.50 of it here and at ViLT-B's width 768; PyTorch's default init: 0.15-0.18,
    at width 768 0.0033 against 0.020)."""
    gen = model_for(tiny_clip, "head", length=16, depth=4).generator
    for prompt, other, D, D_other in ((gen.text, gen.image, 48, 64), (gen.image, gen.text, 64, 48)):
        P_c = prompt.complete.detach()
        assert P_c.shape == (4, 16, D)
        assert abs(float(P_c.std()) - 0.02) < 0.002 and abs(float(P_c.mean())) < 0.002   # 3072+ draws
        assert len(prompt.f_missing) == 4
        for f in prompt.f_missing:
            assert f[0].weight.shape == (D // 16, D_other) and f[-1].weight.shape == (D, D // 16)
            for lin in (f[0], f[-1]):
                assert (lin.bias == 0).all() and abs(float(lin.weight.detach().std()) * lin.in_features ** 0.5 - 1) < 0.35
        with torch.no_grad():
            P_miss = prompt.missing_type(other.complete)                   # (N, P, D) from the other P^c
        across_tokens = float(P_miss.std(1).mean()) / float(P_c.std(1).mean())
        assert across_tokens > 0.3, across_tokens



# ---------------------------------------------------------------------------------------------------------
# Use from your own code (the header's lines), teachers' mode, the teacher files of another configuration
# ---------------------------------------------------------------------------------------------------------
def documented_lines():
    """The indented code lines of muap.py's "Use from your own code" paragraph, verbatim."""
    doc = muap.__doc__
    block = doc[doc.index("Use from your own code"):doc.index("Sections, in reading order")]
    lines = [line[4:] for line in block.splitlines() if line.startswith("    ")]
    assert len(lines) >= 8 and lines[0].startswith("model = MuAP(")
    return lines


@pytest.mark.parametrize("backbone", ["tiny_clip", "tiny_vilt"])
def test_the_documented_lines_run_and_give_the_alignment_loss(backbone, request):
    """The header's lines run as written (each line executed in turn; "training" between the stages is a random
    move of the trainable parameters). model.teachers = snapshot_teachers(...) then gives the frozen teachers'
    evaluation-mode logits (ViLT's backbone dropout at 0.5 stays out of them and stays on for the student), and the
    loss equals task + KL(y_t || y) + KL(y_v || y) by brute force (CLIP, deterministic)."""
    bb = request.getfixturevalue(backbone)
    batch = mixed_size_batch(bb)
    scope = {"bb": bb, "num_outputs": 4, "batch": batch, "task": "multiclass", **{
        name: getattr(muap, name) for name in ("MuAP", "set_stage", "snapshot", "snapshot_teachers", "alignment_loss")}}
    dropout = getattr(bb, "dropout", 0.0)
    if bb.kind == "vilt":
        bb.set_dropout(0.5)
    try:
        torch.manual_seed(0)
        for line in documented_lines():
            if line.startswith(("teacher_t = ", "teacher_v = ")):          # what the stage before trained
                with torch.no_grad():
                    for p in scope["model"].parameters():
                        if p.requires_grad:
                            p.add_(0.3 * torch.randn_like(p))
            exec(line, scope)
        model, teacher_t, teacher_v = scope["model"], scope["teacher_t"], scope["teacher_v"]
        assert torch.isfinite(scope["loss"]) and model.training
        torch.manual_seed(1)
        y_t, y_v = model.teachers(model, batch, None, None)
        assert getattr(bb, "dropout_active", False) == (bb.kind == "vilt")     # the student's dropout stays on
        with torch.no_grad():
            torch.manual_seed(1)
            want_t, want_v = teacher_t.eval()(batch)["logits"], teacher_v.eval()(batch)["logits"]
            assert torch.allclose(y_t, want_t, atol=1e-5) and torch.allclose(y_v, want_v, atol=1e-5)
            assert not torch.allclose(want_t, want_v, atol=1e-3)
            if bb.kind == "clip":
                y = model.eval()(batch)["logits"]
                want = (float(task_loss(y, batch["label"], "multiclass")) + brute_kl(want_t, y, "multiclass")
                        + brute_kl(want_v, y, "multiclass"))
                assert abs(float(scope["loss"]) - want) < 1e-5
    finally:
        if bb.kind == "vilt":
            bb.set_dropout(dropout)


def test_live_teachers_run_without_backbone_dropout(tiny_vilt):
    """--teachers live inside a training forward with ViLT's dropout at 0.5: y_t, y_v equal the evaluation-mode
    forwards with only the text / only the image prompts (the header: a target without dropout); the student's own
    logits are noisy, and its dropout is on again after the teachers ran."""
    model = model_for(tiny_vilt, "head").train()
    model.teachers = muap.live_teachers
    batch = mixed_size_batch(tiny_vilt)
    tiny_vilt.set_dropout(0.5)
    try:
        model.train()
        torch.manual_seed(0)
        out = model(batch)
        assert tiny_vilt.dropout_active
        model.eval()
        with torch.no_grad():
            P_t, P_v = model.generator(batch["missing"])
            want_t, want_v, clean = model.logits(batch, P_t, None), model.logits(batch, None, P_v), model(batch)["logits"]
    finally:
        tiny_vilt.set_dropout(0.0)
    assert torch.allclose(out["logits_t"], want_t, atol=1e-5) and torch.allclose(out["logits_v"], want_v, atol=1e-5)
    assert not torch.allclose(out["logits"], clean, atol=1e-3)


def test_resume_refuses_a_teacher_file_of_another_configuration(tmp_path, tiny_clip):
    """A teacher-<stage>.safetensors left in --out by a run with other flags (here --lambda-t) is not loaded on
    --resume: DataError naming the file and the differing flag; the same configuration's file is loaded as saved."""
    def run_with(*flags):
        args = common.finalize_args(muap.parser().parse_args(["--backbone", "tiny-clip", "--out", str(tmp_path),
                                                              *flags]))
        muap.stage_epochs(args)
        return types.SimpleNamespace(args=args, main=True, bb=tiny_clip)
    earlier, model = run_with("--lambda-t", "0.5"), model_for(tiny_clip, "head", seed=1)
    muap.stage_teacher(earlier, model, "text-step")                             # written by the earlier run
    path = tmp_path / "teacher-text-step.safetensors"
    saved = common.read_checkpoint(str(path))[0]
    now = run_with("--resume")
    fresh = model_for(tiny_clip, "head", seed=2)
    with pytest.raises(DataError, match=r"teacher-text-step\.safetensors was written by a different configuration "
                                        r"\(differs in: lambda_t\)"):
        muap.stage_teacher(now, fresh, "text-step")
    assert not same(common.method_state(fresh), saved)
    again = run_with("--lambda-t", "0.5", "--resume")
    teacher = muap.stage_teacher(again, fresh, "text-step")
    assert same(common.method_state(teacher), saved) and same(common.method_state(fresh), saved)


# ---------------------------------------------------------------------------------------------------------
# Training mode: the forward `fit` runs
# ---------------------------------------------------------------------------------------------------------
def logits_and_grads(model, forward, seed=1):
    """logits of forward() (the torch RNG seeded first: ViLT's patch draw, dropout) and the gradient of a fixed
    random linear function of them with respect to every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    logits = forward()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    return logits, torch.autograd.grad((weights * logits).sum(), params, allow_unused=True)


def assert_same(a, b):
    assert torch.allclose(a[0], b[0], atol=1e-5), (a[0] - b[0]).abs().max()
    for g, g_ref in zip(a[1], b[1]):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert (g - g_ref).abs().max() <= 1e-4 * g_ref.abs().max() + 1e-9


@pytest.mark.parametrize("backbone,fusion", [("tiny_clip", "head"), ("tiny_vilt", "head"), ("tiny_vilt", "cross")])
def test_training_mode_equals_eval_mode_without_dropout(backbone, fusion, request):
    """With no dropout, the training-mode forward (teachers unset, as in the single stages) equals the evaluation
    forward on images of different sizes: no routing, prompt or head differs between the modes."""
    bb = request.getfixturevalue(backbone)
    model = model_for(bb, fusion, length=2, depth=3)
    batch = mixed_size_batch(bb)
    train = logits_and_grads(model.train(), lambda: model(batch)["logits"])
    assert_same(train, logits_and_grads(model.eval(), lambda: model(batch)["logits"]))


def head_fusion_on_common_blocks(model, batch):
    """ViLT head-fusion (add) over the batch on common's block (the dropout sites of MAP's ViLT), from Sec. 3.4-3.5:
    per sample the prompts of its case (`paper_prompts`), at each prompted layer P_t + P_v put at the sequence
    start, in front of the earlier ones, as keys seen by all; the pooled token the text [CLS] behind them."""
    bb, gen, n = model.bb, model.generator, model.length
    prompts = [paper_prompts(gen, code) for code in batch["missing"].tolist()]
    P_t, P_v = torch.stack([p[0] for p in prompts]), torch.stack([p[1] for p in prompts])   # (B, N, P, D)
    x, mask = bb.embed(batch)
    for i in range(bb.num_layers):
        if i < model.depth:
            x = torch.cat([P_t[:, i] + P_v[:, i], x], 1)
            mask = torch.cat([torch.ones(len(x), n, dtype=mask.dtype), mask], 1)
        x = bb.block(i, x, (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min)
    cls = model.depth * n
    return model.head(model.pooler(bb.final_norm(x)[:, cls:cls + 1]))


def test_vilt_training_with_backbone_dropout_equals_a_reference_with_the_same_masks(tiny_vilt):
    """--backbone-dropout 0.3, training mode, images of different sizes: the head-fusion forward and its gradients
    equal `head_fusion_on_common_blocks` started from the same torch seed (the same patch draw and dropout
    masks); another seed gives other logits (the dropout is on)."""
    model = model_for(tiny_vilt, "head", length=2, depth=3)
    batch = mixed_size_batch(tiny_vilt)
    tiny_vilt.set_dropout(0.3)
    try:
        model.train()
        got = logits_and_grads(model, lambda: model(batch)["logits"])
        assert_same(got, logits_and_grads(model, lambda: head_fusion_on_common_blocks(model, batch)))
        other = logits_and_grads(model, lambda: model(batch)["logits"], seed=5)[0]
    finally:
        tiny_vilt.set_dropout(0.0)
    assert (got[0] - other).abs().max() > 1e-3

MUTATIONS = [
    {"file": "muap.py", "why": "f_missing at PyTorch's default init (P^miss starts nearly one repeated vector)",
     "old": "    for m in (mlp[0], mlp[2]):\n        nn.init.normal_(m.weight, std=m.in_features ** -0.5)\n"
            "        nn.init.zeros_(m.bias)\n",
     "new": "",
     "tests": ["tests/test_muap.py::test_prompt_generator_shapes_and_init_as_the_header_states"]},
    {"file": "muap.py", "why": "the teacher file's stored configuration not checked on --resume",
     "old": 'if meta.get("config") != current:', "new": "if False:",
     "tests": ["tests/test_muap.py::test_resume_refuses_a_teacher_file_of_another_configuration"]},
    {"file": "muap.py", "why": "live teachers run with the student's backbone dropout on",
     "old": "    with torch.no_grad(), backbone_dropout_off(model.bb):\n        return model.logits(",
     "new": "    with torch.no_grad():\n        return model.logits(",
     "tests": ["tests/test_muap.py::test_live_teachers_run_without_backbone_dropout"]},
    {"file": "muap.py", "why": "snapshot_teachers run the frozen teachers with the student's backbone dropout on",
     "old": "        with torch.no_grad(), backbone_dropout_off(model.bb):\n            return teacher_t(",
     "new": "        with torch.no_grad():\n            return teacher_t(",
     "tests": ["tests/test_muap.py::test_the_documented_lines_run_and_give_the_alignment_loss"]},
    {"file": "muap.py", "why": "backbone_dropout_off leaves the student's dropout off after a teacher ran",
     "old": "        bb.train(active)", "new": "        bb.train(False)",
     "tests": ["tests/test_muap.py::test_the_documented_lines_run_and_give_the_alignment_loss",
               "tests/test_muap.py::test_live_teachers_run_without_backbone_dropout"]},
    {"file": "muap.py", "why": "snapshot_teachers: y_t and y_v swapped",
     "old": 'return teacher_t(batch)["logits"].float(), teacher_v(batch)["logits"].float()',
     "new": 'return teacher_v(batch)["logits"].float(), teacher_t(batch)["logits"].float()',
     "tests": ["tests/test_muap.py::test_the_documented_lines_run_and_give_the_alignment_loss"]},
    {"file": "muap.py", "why": "training mode only: every sample routed to the complete-type prompts",
     "old": "P_t = torch.stack([P_t_c, P_t_miss, P_t_c])[missing]",
     "new": "P_t = torch.stack([P_t_c, P_t_miss, P_t_c])[missing * (not self.training)]",
     "tests": ["tests/test_muap.py::test_training_mode_equals_eval_mode_without_dropout"]},
    {"file": "muap.py", "why": "CLIP: the text tower's prompts through dropout while training only",
     "old": "t, _ = prepend(None if T is None else T[:, i], t)",
     "new": "t, _ = prepend(None if T is None else F.dropout(T[:, i], 0.1, self.training), t)",
     "tests": ["tests/test_muap.py::test_training_mode_equals_eval_mode_without_dropout"]},
    {"file": "muap.py", "why": "ViLT: the prompts passed through the backbone dropout while training",
     "old": "                    x, mask = prepend(p, x, mask)",
     "new": "                    x, mask = prepend(self.bb.drop(p), x, mask)",
     "tests": ["tests/test_muap.py::test_vilt_training_with_backbone_dropout_equals_a_reference_with_the_same_masks"]},
    {"file": "muap.py", "why": "teachers swapped: y_t from the image-step, y_v from the text-step",
     "old": "else teacher_table(run, teacher_t, teacher_v)",
     "new": "else teacher_table(run, teacher_v, teacher_t)"},
    {"file": "muap.py", "why": "alignment stage trained with the task loss only (KL never applied)",
     "old": "fit(run, model, align_loss, epochs=e_align",
     "new": "fit(run, model, single_stage_loss, epochs=e_align"},
    {"file": "muap.py", "why": "--lambda-t / --lambda-v ignored",
     "old": "run.task, args.lambda_t, args.lambda_v)",
     "new": "run.task, 1.0, 1.0)"},
    {"file": "muap.py", "why": "P_t^c gets no gradient through f_v (P_t_c.detach() inside f_v)",
     "old": "self.image.missing_type(P_t_c)",
     "new": "self.image.missing_type(P_t_c.detach())"},
    {"file": "muap.py", "why": "a teacher shares the student's head (not a deep copy)",
     "old": "memo={id(model.bb): model.bb}",
     "new": "memo={id(model.bb): model.bb, id(model.head): model.head}"},
    {"file": "muap.py", "why": "the text-step teacher is the state before the text-step, not its best-validation state",
     "old": "fit(run, model, single_stage_loss, epochs=e_text, stage=f\"text-step{tag}\")\n"
            "        teacher_t = stage_teacher(run, model, f\"text-step{tag}\")",
     "new": "teacher_t = stage_teacher(run, model, f\"text-step{tag}\")\n"
            "        fit(run, model, single_stage_loss, epochs=e_text, stage=f\"text-step{tag}\")"},
    {"file": "muap.py", "why": "head-fusion always concatenates (= cross-fusion on ViLT)",
     "old": "return p_t + p_v if self.combine == \"add\" else torch.cat([p_t, p_v], dim=-2)",
     "new": "return torch.cat([p_t, p_v], dim=-2)"},
    {"file": "muap.py", "why": "head-fusion pools the wrong token when it inserts 2P tokens per layer",
     "old": "cls, img = cls + p.shape[1], img + p.shape[1]",
     "new": "cls, img = cls + self.length, img + self.length"},
    {"file": "muap.py", "why": "the ViLT head == cross warning also for add",
     "old": "elif bb.kind == \"vilt\" and args.fusion == \"head\" and args.head_combine == \"concat\":",
     "new": "elif bb.kind == \"vilt\" and args.fusion == \"head\":"},
    {"file": "muap.py", "why": "live teachers swapped",
     "old": "return model.logits(batch, P_t, None), model.logits(batch, None, P_v)",
     "new": "return model.logits(batch, None, P_v), model.logits(batch, P_t, None)"},
    {"file": "muap.py", "why": "--teachers live ignored",
     "old": "live_teachers if args.teachers == \"live\" else",
     "new": "live_teachers if False else"},
    {"file": "muap.py", "why": "teacher logits looked up by batch position, not sample id",
     "old": "torch.tensor([self.row[sid] for sid in batch[\"ids\"]]",
     "new": "torch.tensor(list(range(len(batch[\"ids\"])))"},
    {"file": "muap.py", "why": "teacher table kept in the autocast dtype",
     "old": "rows[\"t\"].append(teacher_t(batch)[\"logits\"].float())",
     "new": "rows[\"t\"].append(teacher_t(batch)[\"logits\"])"},
    {"file": "muap.py", "why": "KL computed in the student's (bf16) dtype",
     "old": "teacher_logits, logits = teacher_logits.float(), logits.float()",
     "new": "teacher_logits = teacher_logits.to(logits.dtype)"},
    {"file": "muap.py", "why": "--rounds ignored",
     "old": "for r in range(args.rounds):",
     "new": "for r in range(1):"},
    {"file": "muap.py", "why": "--epochs split 1:1:1 instead of 1:1:2",
     "old": "quarter = max(1, per_round // 4)",
     "new": "quarter = max(1, per_round // 3)"},
    # ----- added: defaults of the recipe, prompt construction, routing, both forwards, loss, teachers, paths -----
    {"file": "muap.py", "why": "no warm-up (MAP's config.py: warmup_steps 0.1)",
     "old": "schedule=\"linear\", warmup=0.1)",
     "new": "schedule=\"linear\", warmup=0.0)"},
    {"file": "muap.py", "why": "cosine decay instead of MAP's linear one (decay_power 1, end_lr 0)",
     "old": "epochs=None, schedule=\"linear\"",
     "new": "epochs=None, schedule=\"cosine\""},
    {"file": "muap.py", "why": "the frozen ViLT trains without MAP's drop_rate 0.1",
     "old": "p.set_defaults(backbone_dropout=0.1,",
     "new": "p.set_defaults(backbone_dropout=0.0,"},
    {"file": "muap.py", "why": "Hateful Memes validated every 0.2 epoch, not MAP's 0.11",
     "old": "\"hatememes\": 0.11}",
     "new": "\"hatememes\": 0.2}"},
    {"file": "muap.py", "why": "complete-type prompts initialised N(0, 0.2) instead of N(0, 0.02)",
     "old": "torch.randn(depth, length, width) * 0.02",
     "new": "torch.randn(depth, length, width) * 0.2"},
    {"file": "muap.py", "why": "f_missing with ReLU instead of GELU",
     "old": "nn.GELU(), nn.Linear(hidden, d_out))",
     "new": "nn.ReLU(), nn.Linear(hidden, d_out))"},
    {"file": "muap.py", "why": "f_missing bottleneck width from the source modality's width, not the target's",
     "old": "hidden = max(1, d_out // 16)",
     "new": "hidden = max(1, d_in // 16)"},
    {"file": "muap.py", "why": "f_missing of layer i fed the other modality's prompt of the mirrored layer",
     "old": "zip(self.f_missing, other_complete)",
     "new": "zip(self.f_missing, other_complete.flip(0))"},
    {"file": "muap.py", "why": "image-missing samples get P_t^miss instead of text-missing ones",
     "old": "torch.stack([P_t_c, P_t_miss, P_t_c])[missing]",
     "new": "torch.stack([P_t_c, P_t_c, P_t_miss])[missing]"},
    {"file": "muap.py", "why": "ViLT cross-fusion moves the pooled [CLS] by P even when no text prompt is inserted",
     "old": "cls += x_t.shape[1] - img",
     "new": "cls += self.length"},
    {"file": "muap.py", "why": "CLIP image tower gets layer 0's prompt at every prompted layer",
     "old": "prepend(None if V is None else V[:, i], x)",
     "new": "prepend(None if V is None else V[:, 0], x)"},
    {"file": "muap.py", "why": "CLIP pools behind one layer's prompts, not behind all accumulated ones",
     "old": "0 if P is None else self.depth * P.shape[2]",
     "new": "0 if P is None else P.shape[2]"},
    {"file": "muap.py", "why": "CLIP pooling offsets of the two towers swapped (wrong when one prompt is left out)",
     "old": "for P in (V, T))",
     "new": "for P in (T, V))"},
    {"file": "muap.py", "why": "CLIP head-fusion: the image tower gets P_v only (the text prompt not mapped in)",
     "old": "V = self.head_prompt(None if P_t is None else gen.text.to_other(P_t), P_v)",
     "new": "V = P_v"},
    {"file": "muap.py", "why": "CLIP features concatenated [text, image] instead of DCP's [image, text]",
     "old": "torch.cat([bb.image_pool(x, n_v), bb.text_pool(t, batch[\"text\"], n_t)], dim=-1)",
     "new": "torch.cat([bb.text_pool(t, batch[\"text\"], n_t), bb.image_pool(x, n_v)], dim=-1)"},
    {"file": "muap.py", "why": "the KL terms are dropped when one of the two lambdas is 0",
     "old": "    if lambda_t or lambda_v:",
     "new": "    if lambda_t and lambda_v:"},
    {"file": "muap.py", "why": "no teachers set up for the alignment stage when one of the two lambdas is 0",
     "old": "e_align and (args.lambda_t or args.lambda_v)",
     "new": "e_align and (args.lambda_t and args.lambda_v)"},
    {"file": "muap.py", "why": "the teacher table computed with the shared backbone in train mode (dropout on)",
     "old": "    teacher_v.eval()\n",
     "new": "    teacher_v.train()\n"},
    {"file": "muap.py", "why": "a training split with repeated sample ids not refused (the table is keyed by id)",
     "old": "if len(set(ds.ids)) != len(ds):",
     "new": "if len(ds.ids) != len(ds):"},
    {"file": "muap.py", "why": "KL(y_t || y) gives the student no gradient (y detached in it)",
     "old": "lambda_t * kl(out[\"logits_t\"], y, task)",
     "new": "lambda_t * kl(out[\"logits_t\"], y.detach(), task)"},
    {"file": "muap.py", "why": "the copied MAP head initialised N(0, 0.01)", "tests": ["tests/test_copies.py"],
     "old": "nn.init.normal_(m.weight, std=0.02)",
     "new": "nn.init.normal_(m.weight, std=0.01)"},
    {"file": "muap.py", "why": "teachers queried in eval mode too (validation samples are not in the table)",
     "old": "if self.training and self.teachers is not None:",
     "new": "if self.teachers is not None:"},
    {"file": "muap.py", "why": "--resume does not read the single-stage snapshots back",
     "old": "if run.args.resume and os.path.isfile(path):",
     "new": "if False:"},
]
