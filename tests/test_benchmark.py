"""tests/benchmark.py: the GPU check on CPU (tiny backbones: every method x backbone passes, and a NaN loss or a
changed frozen weight fails it), its Food-101 estimate against a brute-force sum, and the presets pinned to the
official configurations they reproduce. Timings are never asserted, only the arithmetic made of them."""
import math

import numpy as np
import pytest
import torch

import common
from data import load_split
from tests import benchmark as bm

# Each official configuration read from the official code (the oracle; the preset must reproduce it):
# MAP vilt/config.py @9aa5381 task_finetune_hatememes: max_text_len 128, image_size 384, prompt_length 16,
# prompt_layers [0..5], input prompts; AOEPT core/model/AOEPT/AOEPT_CLIP_MMIMDB_text.yaml @b312905: L 12,
# prompt_depth 4, seq_len 77, a 128-prototype cluster file; AOEPT_ViLT_MMIMDB_text.yaml: L 8, prompt_depth 6,
# seq_len 77, 256 prototypes. The official measurements: batch 4, 2 threads, 2 warm-ups, median of 5.
OFFICIAL = {
    "map-hatememes": {"method": "map", "backbone": "vilt", "text_len": 128, "image": (384, 384), "task": "binary",
                      "opts": {"prompt_type": "input", "prompt_length": 16, "prompt_depth": 6},
                      "ratios": ("1.34-1.38", "1.31-1.33")},
    "aoept-clip-mmimdb-text": {"method": "aoept", "backbone": "clip", "text_len": 77, "image": (224, 224),
                               "task": "multilabel", "opts": {"prompt_length": 12, "prompt_depth": 4, "clusters": 128,
                                                              "missing": "text"},
                               "ratios": ("1.22-1.23", "1.19-1.22")},
    "aoept-vilt-mmimdb-text": {"method": "aoept", "backbone": "vilt", "text_len": 77, "image": (384, 384),
                               "task": "multilabel", "opts": {"prompt_length": 8, "prompt_depth": 6, "clusters": 256,
                                                              "missing": "text"},
                               "ratios": ("1.12", "1.08-1.11")},
}
CHECK = ["--gpu-check", "--device", "cpu", "--datasets", "food101", "--warmup", "0", "--repeats", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The timed steps are tiny: one thread spares the rest of the machine; the suite's setting comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def check():
    return bm.main(CHECK)


def tiny_check(monkeypatch, break_loss):
    """One check_method on tiny-clip with the method's loss replaced by break_loss(loss, model)."""
    build = bm.build_method

    def broken(*a, **k):
        model, loss_fn, margs = build(*a, **k)
        return model, lambda out, batch: break_loss(loss_fn(out, batch), model), margs
    monkeypatch.setattr(bm, "build_method", broken)
    args = bm.parse_args(CHECK + ["--repeats", "1"])
    bb = bm.build_backbone("clip", 40, "tiny")
    batch = bm.synthetic_batch(bb, 4, 40, torch.device("cpu"))
    return bm.check_method("map", bb, batch, args, torch.device("cpu"), "food101", 101, "multiclass",
                           bm.frozen_state(bb))


def test_a_nan_loss_fails_the_check(monkeypatch):
    row = tiny_check(monkeypatch, lambda loss, model: loss * float("nan"))
    assert not row["finite"] and row["frozen"] and not bm.check_ok(row)


def test_a_step_that_moves_a_frozen_weight_fails_the_check(monkeypatch):
    def poke(loss, model):
        with torch.no_grad():
            model.bb.model.logit_scale += 1e-3                         # in place, as a buggy method could
        return loss
    row = tiny_check(monkeypatch, poke)
    assert row["finite"] and not row["frozen"] and row["changed"] == ["model.logit_scale"]
    assert not bm.check_ok(row)


def test_frozen_changes_names_trainable_or_graded_backbone_tensors():
    bb = bm.build_backbone("vilt", 40, "tiny")
    reference = bm.frozen_state(bb)
    assert bm.frozen_changes(bb, reference) == []
    weight = bb.vilt.pooler.dense.weight
    weight.requires_grad_(True)
    assert bm.frozen_changes(bb, reference) == ["vilt.pooler.dense.weight"]
    weight.requires_grad_(False)
    weight.grad = torch.zeros_like(weight)
    assert bm.frozen_changes(bb, reference) == ["vilt.pooler.dense.weight"]


def test_all_finite_needs_every_element():
    assert bm.all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not bm.all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not bm.all_finite([torch.tensor([float("inf"), 0.0])])


def test_food101_estimate_is_the_sum_of_its_steps():
    """Brute force: walk the epochs of each run and add every step's time."""
    def row(method, train_s, infer_s, bare=0.05):
        return {"dataset": "food101", "method": method, "backbone": "clip", "batch": 32, "train_s": train_s,
                "infer_s": infer_s, "bare_infer_s": bare}
    rows = [row("map", 0.5, 0.2), row("aoept", 0.4, 0.1), row("muap", 0.3, 0.1), row("muap-align", 0.9, 0.1),
            row("map", 9.0, 9.0) | {"dataset": "mmimdb"}]
    sizes = {"train": 1000, "val": 100, "test": 300}
    hours = bm.estimate_hours(rows, epochs=8, sizes=sizes)
    n_train, n_val, n_test = 32, 4, 10                                  # ceil(n / 32)

    def walk(per_epoch_train_s, infer_s):
        total = sum(n_train * per_epoch_train_s(e) + n_val * infer_s for e in range(8))
        return total + n_test * infer_s
    assert set(hours) == {"map/clip", "aoept/clip", "muap/clip"}
    assert hours["map/clip"] * 3600 == pytest.approx(walk(lambda e: 0.5, 0.2))
    assert hours["aoept/clip"] * 3600 == pytest.approx(walk(lambda e: 0.4, 0.1) + n_train * 0.05)   # + bank pass
    assert hours["muap/clip"] * 3600 == pytest.approx(walk(lambda e: 0.3 if e < 4 else 0.9, 0.1))  # 2 + 2, then 4


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_reproduce_the_official_configurations(name):
    want, pre = OFFICIAL[name], bm.PRESETS[name]
    assert (pre["method"], pre["backbone"], pre["text_len"], pre["image"], pre["task"]) == \
        (want["method"], want["backbone"], want["text_len"], want["image"], want["task"])
    assert pre["outputs"] == common.num_outputs(pre["task"], 23 if "mmimdb" in name else 2)
    _, a = bm.method_args(pre["method"], pre["argv"])
    assert {k: getattr(a, k) for k in want["opts"]} == want["opts"]
    assert pre["official"] == want["ratios"]
    args = bm.parse_args(["--preset", name, "--device", "cpu"])
    assert (args.batch_size, args.threads, args.warmup, args.repeats, args.dtype) == (4, 2, 2, 5, "fp32")


def test_preset_run_builds_the_preset_method(capsys):
    """On the tiny backbone (4 layers): MAP's 16 tokens accumulate over its 4 prompted layers; ratios next to the
    official ones in the printed table."""
    res = bm.main(["--preset", "map-hatememes", "--size", "tiny", "--device", "cpu", "--warmup", "0",
                   "--repeats", "1", "--threads", "1"])
    row, = res["presets"]
    assert row["extra_tokens"]["joint"] == [16, 32, 48, 64]
    assert row["official_train_ratio_floor"] == "1.34-1.38" and row["train_ratio_floor"] > 0
    assert "| map-hatememes | ViLT, text 128, 384x384" in capsys.readouterr().out


def test_check_sizes_are_the_real_ones():
    assert bm.check_sizes("food101", "vilt", "real") == (512, (384, 640), 101, "multiclass")
    assert bm.check_sizes("hatememes", "vilt", "real") == (128, (384, 640), 2, "binary")
    assert bm.check_sizes("mmimdb", "vilt", "real") == (1024, (384, 640), 23, "multilabel")
    assert bm.check_sizes("mmimdb", "clip", "real") == (77, None, 23, "multilabel")
    bb = bm.build_backbone("vilt", 40, "tiny")
    batch = bm.synthetic_batch(bb, 3, 40, torch.device("cpu"), (32, 48), 23, "multilabel", "text")
    assert batch["image"].shape == (3, 3, 32, 48) and batch["pixel_mask"].shape == (3, 32, 48)
    assert batch["label"].shape == (3, 23) and batch["label"].dtype == torch.float32
    assert batch["missing"].tolist() == [1, 0, 1] and batch["aug_missing"].tolist() == [1, 0, 1]


def test_gpu_check_on_cpu_passes_every_method_and_backbone(check):
    rows = check["checks"]
    assert check["ok"] and check["size"] == "tiny" and check["dtype"] == "fp32"
    assert {(r["method"], r["backbone"]) for r in rows} == {(m, b) for m in bm.METHODS for b in ("clip", "vilt")}
    for r in rows:
        assert "error" not in r, r
        assert r["finite"] and r["frozen"] and len(r["losses"]) == 1 and all(map(math.isfinite, r["losses"]))
        assert r["train_samples_per_s"] == pytest.approx(r["batch"] / r["train_s"])
        assert r["infer_samples_per_s"] == pytest.approx(r["batch"] / r["infer_s"])
        assert r["train_ratio_floor"] == pytest.approx(r["train_s"] / r["floor_train_s"])
        assert r["infer_ratio_bare"] == pytest.approx(r["infer_s"] / r["bare_infer_s"])
        assert r["syncs_train"] is None and r["trainable_params"] > 0       # no device to sync with on CPU
    assert set(check["food101_hours"]) == {f"{m}/{b}" for m in bm.METHODS if m != "muap-align"
                                           for b in ("clip", "vilt")}
    table = bm.check_markdown(rows, check["food101_hours"])
    assert table.count("| food101 |") == 16 and table.count("| yes |") == 16 and "- aoept/vilt: " in table


REAL = ["--preset", "real-lengths", "--size", "tiny", "--device", "cpu", "--warmup", "1", "--repeats", "2",
        "--threads", "1"]


def test_real_lengths_preset_prints_tokens_and_ratios_per_dataset(capsys):
    """Every dataset x (MAP, AOEPT): the distribution printed, our batches padded to their longest drawn text (a
    missing text is [CLS] [SEP]), the floor's to the official length (512 / 1024 / 128; AOEPT 40 / 77 / 40)."""
    res = bm.main(REAL)
    rows, out = res["real_lengths"], capsys.readouterr().out
    official = {("food101", "map"): 512, ("mmimdb", "map"): 1024, ("hatememes", "map"): 128,
                ("food101", "aoept"): 40, ("mmimdb", "aoept"): 77, ("hatememes", "aoept"): 40}
    assert {(r["dataset"], r["method"]) for r in rows} == set(official)
    for r in rows:
        L = official[r["dataset"], r["method"]]
        assert r["official_text_len"] == L and r["official_text_tokens"] == 4 * L
        assert len(r["drawn"]) == 2 and all(len(row) == 4 for row in r["drawn"])
        assert all(row[1] == 2 and 3 <= min(row[0], row[2], row[3]) and max(row) <= L for row in r["drawn"])
        assert r["our_longest"] == sum(max(row) for row in r["drawn"]) / 2
        assert r["our_text_tokens"] == 4 * r["our_longest"]
        assert r["ratio"] == pytest.approx(r["ours_s"] / r["official_floor_s"])
        assert r["padding_ratio"] == pytest.approx(r["ours_s"] / r["ours_padded_s"])
        assert f"| {r['dataset']} | {r['method']} | {L} | {r['our_longest']:.0f} | " in out
    for dataset, (median, p90) in bm.ASSUMED_LENGTHS.items():
        assert f"{dataset} text lengths: ASSUMED: log-normal tokens, median {median}, p90 {p90}" in out
    assert "ours / official floor" in out


def test_lognormal_lengths_have_the_stated_median_and_p90():
    x = bm.lognormal_lengths(180, 380, 200_000, np.random.default_rng(0), 10_000)
    assert np.median(x) == pytest.approx(180, abs=1) and np.percentile(x, 90) == pytest.approx(380, abs=3)
    assert bm.lognormal_lengths(180, 380, 1000, np.random.default_rng(0), 77).max() == 77


def test_lengths_from_tokenises_the_train_split(food101_root, tmp_path, capsys):
    """--lengths-from: the lengths are the train texts' token counts, by the tokenizer named, one text at a time."""
    tokenizer = common.tiny_vilt_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    ds = load_split("food101", food101_root, "train", missing_type="none", rate=0.0, seed=0)
    want = sorted(len(tokenizer(t)["input_ids"]) for t in ds.texts)
    from transformers import BertTokenizerFast
    got = bm.real_text_lengths("food101", food101_root, BertTokenizerFast.from_pretrained(tmp_path / "tok"), 10 ** 6)
    assert sorted(got.tolist()) == want
    res = bm.main(REAL + ["--datasets", "food101", "--lengths-from", food101_root, "--tokenizer", str(tmp_path / "tok"),
                          "--repeats", "1", "--warmup", "0"])
    assert all(max(row) <= max(want) for r in res["real_lengths"] for row in r["drawn"])
    assert f"food101 text lengths: real: {len(want)} train texts of {food101_root}" in capsys.readouterr().out


def test_methods_take_the_defaults_of_their_backbone():
    """AOEPT's official recipe differs by backbone (aoept.OFFICIAL): Food-101 M 16 on ViLT, 6 on CLIP."""
    for bb, M in ((bm.build_backbone("vilt", 40, "tiny"), 16), (bm.build_backbone("clip", 40, "tiny"), 6)):
        batch = bm.synthetic_batch(bb, 3, 40, torch.device("cpu"))
        _, _, a = bm.build_method("aoept", bb, torch.device("cpu"), batch)
        assert (a.backbone, a.prompt_length) == (bb.kind, M)


def test_gpu_check_bf16_path_runs_on_cpu():
    """The GPU check's bf16 autocast path (CPU autocast, tiny sizes): masks and -inf fills in bf16 (SyP, MemPrompt)
    stay finite and the frozen backbone unchanged; the GPU's only untested parts are device placement and syncs."""
    res = bm.main(CHECK + ["--dtype", "bf16", "--methods", "syp,memprompt"])
    assert res["dtype"] == "bf16" and res["ok"] and len(res["checks"]) == 4
    with bm.precision_of(bm.parse_args(CHECK + ["--dtype", "bf16"]), torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_sdpa_compares_the_same_floor_through_both_layers(capsys):
    """--sdpa on tiny-vilt: bb.block and HF's eager ViltLayer give the same floor logits (the race is fair), the
    speedups are eager / SDPA, and --profile prints one step of each."""
    bb = bm.build_backbone("vilt", 40, "tiny")
    batch = bm.synthetic_batch(bb, 3, 40, torch.device("cpu"))
    floor = bm.Floor(bb, 5)
    with torch.no_grad():
        sdpa = floor(batch)["logits"]
        bb.block = lambda i, x, bias, kv_prefix=None: bb.vilt.encoder.layer[i](x, bias)[0]
        eager = floor(batch)["logits"]
    assert torch.allclose(sdpa, eager, atol=1e-5)
    res = bm.main(["--sdpa", "--size", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--profile", "5"])
    row, out = res["sdpa"], capsys.readouterr().out
    assert row["train_speedup"] == pytest.approx(row["train_eager_s"] / row["train_sdpa_s"])
    assert row["infer_speedup"] == pytest.approx(row["infer_eager_s"] / row["infer_sdpa_s"])
    assert "sdpa: one training step" in out and "eager: one training step" in out and "Self CPU" in out


def test_lengths_from_names_its_dataset():
    args = bm.parse_args(["--preset", "real-lengths", "--lengths-from", "food101=/a", "mmimdb=/b=c"])
    assert args.lengths_from == {"food101": "/a", "mmimdb": "/b=c"}
    assert bm.parse_args(["--preset", "real-lengths", "--datasets", "hatememes", "--lengths-from", "/h"]).lengths_from \
        == {"hatememes": "/h"}
    for bad in (["--lengths-from", "/h"], ["--lengths-from", "imagenet=/h"]):      # three datasets; unknown name
        with pytest.raises(SystemExit):
            bm.parse_args(["--preset", "real-lengths"] + bad)


MUTATIONS = [
    {"file": "tests/benchmark.py", "old": "if not torch.equal(v, reference[k])]", "new": "if not torch.equal(v, v)]",
     "why": "frozen check compares the backbone with itself"},
    {"file": "tests/benchmark.py", "old": "if p.requires_grad or p.grad is not None]", "new": "if p.grad is not None]",
     "why": "a backbone weight left trainable passes the frozen check"},
    {"file": "tests/benchmark.py", "old": "{k: v.detach().clone() for k, v", "new": "{k: v.detach() for k, v",
     "why": "the frozen reference aliases the weights it guards"},
    {"file": "tests/benchmark.py", "old": "bool(torch.isfinite(t).all())", "new": "bool(torch.isfinite(t).any())",
     "why": "one NaN among finite values passes"},
    {"file": "tests/benchmark.py", "old": "\"finite\": all_finite(losses + logits)", "new": "\"finite\": True",
     "why": "losses never checked"},
    {"file": "tests/benchmark.py", "old": "total += epochs * steps[\"val\"] * r[\"infer_s\"] + ",
     "new": "total += steps[\"val\"] * r[\"infer_s\"] + ", "why": "validation counted once, not every epoch"},
    {"file": "tests/benchmark.py", "old": "total += steps[\"train\"] * r[\"bare_infer_s\"]", "new": "total += 0",
     "why": "AOEPT's bank pass left out of its estimate"},
    {"file": "tests/benchmark.py", "old": "2 * quarter * r[\"train_s\"]", "new": "2 * quarter * by[\"muap-align\", kind][\"train_s\"]",
     "why": "MuAP's single-stage epochs timed as alignment steps"},
    {"file": "tests/benchmark.py", "old": "\"train_samples_per_s\": B / t[\"train\"]",
     "new": "\"train_samples_per_s\": B / t[\"infer\"]", "why": "samples/s from the wrong step"},
    {"file": "tests/benchmark.py", "old": "\"train_ratio_floor\": t[\"train\"] / t[\"train_floor\"], \"infer_ratio_bare\"",
     "new": "\"train_ratio_floor\": t[\"train\"] / t[\"infer_bare\"], \"infer_ratio_bare\"",
     "why": "training ratio against the inference floor"},
    {"file": "tests/benchmark.py", "old": "\"method\": \"map\", \"backbone\": \"vilt\", \"text_len\": 128,",
     "new": "\"method\": \"map\", \"backbone\": \"vilt\", \"text_len\": 40,", "why": "MAP preset at the quick text length"},
    {"file": "tests/benchmark.py", "old": "\"--dataset\", \"hatememes\", \"--prompt-type\", \"input\", \"--prompt-length\", \"16\",",
     "new": "\"--dataset\", \"hatememes\", \"--prompt-type\", \"input\", \"--prompt-length\", \"8\",",
     "why": "MAP preset with other prompt sizes"},
    {"file": "tests/benchmark.py", "old": "\"--missing\", \"text\", \"--prompt-length\", \"12\"",
     "new": "\"--missing\", \"text\", \"--prompt-length\", \"16\"", "why": "AOEPT-CLIP preset at the paper's M"},
    {"file": "tests/benchmark.py", "old": "\"vilt_image\": (384, 640)", "new": "\"vilt_image\": (384, 384)",
     "why": "GPU check below ViLT's largest image"},
    {"file": "tests/benchmark.py", "old": "padded = [synthetic_batch(bb, args.batch_size, L_off,",
     "new": "padded = [synthetic_batch(bb, args.batch_size, max(w) + 2,",
     "why": "real-lengths: the official floor padded to our longest, not the official length"},
    {"file": "tests/benchmark.py", "old": "[[0 if codes[k % len(codes)] == TEXT_MISSING else int(n) - 2",
     "new": "[[int(n) - 2 if codes[k % len(codes)] == TEXT_MISSING else int(n) - 2",
     "why": "real-lengths: a missing text counted at a drawn length, not the dummy [CLS] [SEP]"},
    {"file": "tests/benchmark.py", "old": "sigma = math.log(p90 / median) / 1.2815516",
     "new": "sigma = math.log(p90 / median) / 1.6448536", "why": "real-lengths: the p95 quantile used for the stated p90"},
    {"file": "tests/benchmark.py", "old": "ours = [synthetic_batch(bb, args.batch_size, max(w) + 2,",
     "new": "ours = [synthetic_batch(bb, args.batch_size, L_off,", "why": "real-lengths: ours padded to the official length"},
    {"file": "tests/benchmark.py", "old": "return (lambda n, rng, high: np.minimum(rng.choice(lengths, n), high)), described",
     "new": "return (lambda n, rng, high: lognormal_lengths(22, 40, n, rng, high)), described",
     "why": "--lengths-from read but the assumed distribution drawn"},
    {"file": "tests/benchmark.py", "old": "argv = list(argv) + ([] if \"--backbone\" in argv else [\"--backbone\", bb.kind])",
     "new": "argv = list(argv)", "why": "methods built with the CLIP defaults on ViLT (AOEPT's recipe)"},
    {"file": "tests/benchmark.py", "old": "    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)\n\n\ndef benchmark(",
     "new": "    return contextlib.nullcontext\n\n\ndef benchmark(", "why": "--dtype bf16 runs in fp32 (no autocast)"},
]
