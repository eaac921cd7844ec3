"""What a user sees: --help states every default (per dataset where a recipe resolves it), --print-config, the device
check, the environment header and progress lines in a log that is not a terminal, history.csv / curves.png,
--tensorboard, the robustness plot's labels, quiet weight loading."""
import csv
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import common
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("map", "muap", "memprompt", "syp", "aoept", "promise")


def help_text(method, capsys):
    module = importlib.import_module(method)
    with pytest.raises(SystemExit) as done:
        common.cli(module.parser(), module.main, ["--help"])
    assert done.value.code == 0
    return module, capsys.readouterr().out


def option_blocks(text):
    """{'--flag': its help block} from argparse's help output (each option starts a line with two spaces and --)."""
    blocks, current = {}, None
    for line in text.splitlines():
        found = re.match(r"  (-h, )?(--[\w-]+)", line)
        if found:
            current = found.group(2)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def section(text, title):
    return text.split(f"\n{title}:\n")[1].split("\n\n")[0]


@pytest.mark.parametrize("method", METHODS)
def test_help_states_every_default(method, capsys):
    """Every option says its default (a value, 'none', 'on'/'off' or the help's own words), never Python's None; the
    description is the docstring's whole first paragraph; the method's flags are a group of their own."""
    module, text = help_text(method, capsys)
    blocks = option_blocks(text)
    assert {"--dataset", "--lr", "--epochs", "--seed", "--backbone", "--print-config", "--tensorboard"} <= set(blocks)
    for flag, block in blocks.items():
        if flag == "--help":
            continue
        assert "default" in block.lower(), f"{method}.py --help: {flag} states no default: {block}"
        assert "(default: None)" not in block and "{" not in block.split("default")[-1], block
    assert f"(default: {module.parser().get_default('paper_backbone')})" in blocks["--backbone"]
    first_paragraph = module.__doc__.strip().split("\n\n")[0]
    assert "".join(text.split()).count("".join(first_paragraph.split())) == 1
    own = section(text, f"{method}-specific options")
    assert "--prompt-length" in own and "--lr " not in own and "--dataset" not in own
    assert "--prompt-length" not in section(text, "optimisation")


def test_help_resolves_recipe_defaults_per_dataset(capsys):
    """MemPrompt's learning rate and AOEPT's recipe flags are None in the parser: --help gives the value per dataset."""
    _, text = help_text("memprompt", capsys)
    assert "(default: 0.005 for food101, mmimdb, toy sets; 0.001 for hatememes)" in " ".join(
        option_blocks(text)["--lr"].split())
    _, text = help_text("aoept", capsys)
    blocks = {k: " ".join(v.split()) for k, v in option_blocks(text).items()}
    assert "(default: 256)" in blocks["--clusters"]              # every setting: the official run script's K
    assert "(default: 4)" in blocks["--prompt-depth"]
    _, text = help_text("map", capsys)
    blocks = {k: " ".join(v.split()) for k, v in option_blocks(text).items()}
    assert "(default: 0.2 for food101, mmimdb; 0.11 for hatememes; 1.0 for toy sets)" in blocks["--val-interval"]


def test_print_config_prints_the_resolved_configuration(capsys, tmp_path):
    """After finalize_args and the method's own resolution, as JSON; nothing is loaded or written."""
    import memprompt
    out = tmp_path / "never"
    common.cli(memprompt.parser(), memprompt.main, ["--dataset", "hatememes", "--print-config", "--out", str(out)])
    config = json.loads(capsys.readouterr().out)
    assert (config["lr"], config["prompt_length"], config["backbone"], config["val_interval"]) == (1e-3, 4, "vilt", 0.11)
    assert config["gen_layers"] == config["prompt_depth"] == 6 and config["max_text_len"] == 128
    assert not out.exists()
    import aoept
    common.cli(aoept.parser(), aoept.main, ["--dataset", "hatememes", "--missing", "image", "--print-config"])
    config = json.loads(capsys.readouterr().out)
    assert (config["lr"], config["prompt_length"], config["clusters"]) == (2e-2, 6, 256)


def test_explicit_cuda_without_cuda_is_an_error(monkeypatch, capsys):
    import map as method
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match=r"--device cuda: .*sees no CUDA device.*--device cpu"):
        common.check_device(method.parser().parse_args(["--device", "cuda"]))
    with pytest.raises(SystemExit) as stopped:
        common.cli(method.parser(), method.main, ["--device", "cuda", "--backbone", "tiny-vilt"])
    assert str(stopped.value.code).startswith("error: --device cuda") and "\n" not in str(stopped.value.code)


def expected_lrs(args, total):
    """The lr of each optimiser step, from the run's own schedule on a stand-in parameter."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    schedule, lrs = common.make_schedule(opt, total, args), []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


def test_toy_run_off_a_terminal_logs_progress_history_and_curves(tmp_path, capsys):
    """pytest's stderr is not a terminal (as under SLURM or nohup): the log has the device / versions header, a
    progress line per step (8 steps an epoch: every max(1, 8 // 10) = 1 step) with the lr of that step (the run's
    schedule), and the run folder history.csv with one row per check and curves.png."""
    import map as method
    assert not sys.stderr.isatty()
    out = tmp_path / "run"
    argv = ["--backbone", "tiny-vilt", "--epochs", "2", "--batch-size", "64", "--micro-batch", "64", "--out", str(out)]
    common.cli(method.parser(), method.main, argv)
    log = capsys.readouterr().out.splitlines()
    assert log[0].startswith("device: cpu (") and "precision fp32" in log[0]
    assert f"torch {torch.__version__}" in log[1] and "open_clip" in log[1] and "transformers" in log[1]
    assert log[2].startswith("config: ") and json.loads(log[2][8:])["backbone"] == "tiny-vilt"
    lrs = expected_lrs(method.parser().parse_args(argv), 16)
    for epoch in (1, 2):
        found = [(int(m.group(1)), m.group(2)) for line in log for m in [re.match(
            rf"\[train\] epoch {epoch}/2 step (\d)/8  loss \d+\.\d{{4}}  lr (\d\.\d\de[-+]\d\d)  \d+\.\d samples/s  "
            rf"epoch ETA \d+m\d\ds$", line)] if m]
        assert [s for s, _ in found] == list(range(1, 8)), (epoch, log)   # step 8 is the check: fit's own line
        assert [lr for _, lr in found] == [f"{lrs[8 * (epoch - 1) + s - 1]:.2e}" for s, _ in found]
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["epoch"], r["step"], r["x"]) for r in rows] == [("train", "1", "8", "1.0"),
                                                                       ("train", "2", "8", "2.0")]
    assert "lr" in rows[0]
    results = json.load(open(out / "results.json"))
    assert [float(r["val_accuracy"]) for r in rows] == [c["val"]["accuracy"] for h in results["history"]
                                                        for c in h["checks"]]
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").stat().st_size > 1000


def test_history_lr_is_the_schedules(tmp_path):
    """history.csv's lr of a check is the lr of the optimiser step the check follows (the run's own schedule)."""
    import map as method
    out = tmp_path / "run"
    argv = ["--backbone", "tiny-vilt", "--epochs", "2", "--batch-size", "64", "--micro-batch", "64", "--out", str(out)]
    common.cli(method.parser(), method.main, argv)
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = expected_lrs(method.parser().parse_args(argv), 16)
    assert [float(r["lr"]) for r in rows] == pytest.approx([lrs[7], lrs[15]])


def test_results_json_records_the_environment(tmp_path):
    import map as method
    out = tmp_path / "run"
    common.cli(method.parser(), method.main, ["--backbone", "tiny-vilt", "--epochs", "1", "--out", str(out)])
    env = json.load(open(out / "results.json"))["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__


def test_environment_info_names_versions_and_commit():
    import open_clip
    import transformers
    args = common.build_parser("map", "x", "vilt").parse_args(["--device", "cpu"])
    env = common.environment_info(args)
    assert (env["device"], env["precision"], env["torch"]) == ("cpu", "fp32", torch.__version__)
    assert (env["open_clip"], env["transformers"]) == (open_clip.__version__, transformers.__version__)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert env["commit"] == head.stdout.strip()


def test_history_rows_continue_the_axis_over_stages():
    """MuAP's stages follow each other on the curves' x axis (fractional epochs), and the CSV keeps every check."""
    check = lambda step, loss: {"step": step, "train_loss": loss, "lr": 0.1, "val": {"accuracy": loss}}
    history = [{"stage": "text-step", "epoch": 0, "checks": [check(2, 1.0), check(4, 0.9)]},
               {"stage": "text-step", "epoch": 1, "checks": [check(4, 0.8)]},
               {"stage": "alignment", "epoch": 0, "checks": [check(4, 0.7)]}]
    rows = common.history_rows(history, "accuracy")
    assert [(r["stage"], r["epoch"], r["x"]) for r in rows] == [("text-step", 1, 0.5), ("text-step", 1, 1.0),
                                                                ("text-step", 2, 2.0), ("alignment", 1, 3.0)]


def test_curves_without_matplotlib_keep_the_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib raises ImportError
    history = [{"stage": "train", "epoch": 0, "checks": [{"step": 1, "train_loss": 1.0, "lr": 0.1,
                                                          "val": {"accuracy": 0.5}}]}]
    common.write_history(history, "accuracy", str(tmp_path))
    assert (tmp_path / "history.csv").exists() and not (tmp_path / "curves.png").exists()
    assert capsys.readouterr().out.strip().count("\n") == 0


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import map as method
    out = tmp_path / "run"
    results = common.cli(method.parser(), method.main, ["--backbone", "tiny-vilt", "--epochs", "2", "--tensorboard",
                                                        "--out", str(out)])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    val = [e.value for e in events.Scalars("train/val_accuracy")]
    assert val == pytest.approx([c["val"]["accuracy"] for h in results["history"] for c in h["checks"]])
    assert {"train/train_loss", "train/lr"} <= set(events.Tags()["scalars"])


def test_tensorboard_absent_fails_up_front_in_one_line(tmp_path, monkeypatch):
    import map as method
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        common.cli(method.parser(), method.main, ["--backbone", "tiny-vilt", "--tensorboard", "--out", str(out)])
    message = str(stopped.value.code)
    assert "pip install tensorboard" in message and "\n" not in message and not out.exists()


def test_robustness_plot_title_and_legend(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"missing": t, "rate": r, "accuracy": 0.5} for t in ("text", "image", "both") for r in (0.0, 0.5)]
    args = common.build_parser("syp", "x", "clip").parse_args(["--backbone", "tiny-clip", "--missing", "text"])
    common.plot_grid(rows, "accuracy", str(tmp_path / "robustness.png"), title=common.grid_title(args))
    ax = figures[0].axes[0]
    assert ax.get_title() == "syp on toy, tiny-clip; trained with text missing 0.7"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text missing", "image missing",
                                                                    "mixed (text or image)"]


def test_weights_not_cached_fail_quietly_in_one_message(capfd):
    """HF_HUB_OFFLINE=1 (tests/conftest.py): the local cache only, no hub retry warnings, no library log lines."""
    with pytest.raises(common.WeightsError, match="are not cached"):
        common.load_clip("ViT-B-16", "openai")
    with pytest.raises(common.WeightsError, match="are not cached"):
        common.load_vilt("dandelin/vilt-b32-mlm")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_hub_tried_after_the_cache_with_a_note_first(monkeypatch, capsys):
    """Online: the local cache first (offline semantics), then one line, then the hub, its logging quiet."""
    from huggingface_hub import constants
    import logging
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def create():
        calls.append((constants.HF_HUB_OFFLINE, capsys.readouterr().out, logging.root.manager.disable))
        if len(calls) == 1:
            raise OSError("not cached")
        return "model"
    assert common.from_cache_then_hub(create, "ViLT weights 'x'", OSError) == "model"
    assert calls[0] == (True, "", logging.ERROR)
    assert calls[1][0] is False and calls[1][2] == logging.ERROR
    assert calls[1][1].startswith("ViLT weights 'x': not in the local cache") and calls[1][1].count("\n") == 1
    assert "HF_HUB_OFFLINE=1" in calls[1][1] and logging.root.manager.disable == logging.NOTSET


def readme_steps(name):
    """The ```bash block between <!-- NAME:begin ... --> and <!-- NAME:end --> in README.md, as command lines."""
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(rf"<!-- {name}:begin.*?-->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert found, f"README.md has no {name} block"
    return [line for line in found.group(1).splitlines() if line.strip()]


def test_readme_add_your_own_method_recipe_runs(tmp_path):
    """README "Add your own method", run as written in a folder with the repository's files (not a git checkout):
    the copy trains on toy under its new name and `common.py summarize` lists it; the log header has no commit."""
    for f in ("common.py", "data.py", "map.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    outputs = []
    for line in readme_steps("own-method"):
        p = subprocess.run(re.sub(r"^python ", f"{sys.executable} ", line), shell=True, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (line, p.stderr[-2000:])
        outputs.append(p.stdout)
    assert 'build_parser("mymethod"' in (tmp_path / "mymethod.py").read_text()
    assert 'paper_table("mymethod"' in (tmp_path / "mymethod.py").read_text()
    header = outputs[2].splitlines()[:2]
    assert header[0].startswith("device: ") and header[1].startswith("versions: ") and "commit" not in header[1]
    assert "mymethod: toy (" in outputs[2]
    rows = [line.split("|")[1:4] for line in outputs[3].splitlines() if line.startswith("| mymethod ")]
    assert [[c.strip() for c in r] for r in rows] == [["mymethod", "tiny-vilt", "-"]], outputs[3]


MUTATIONS = [
    {"file": "common.py", "old": '        return f"{text} (default: {show_value(action.default, action)})"',
     "new": "        return text", "why": "--help: a flag's default not shown"},
    {"file": "common.py", "old": 'resolved=getattr(self, "_resolved", None))', "new": "resolved=None)",
     "why": "--help: recipe-resolved per-dataset defaults not shown"},
    {"file": "common.py", "old": "    parser.main = main                                  # --help resolves per-dataset "
                                 "defaults through main\n    method_options_group(parser)\n",
     "new": "    parser.main = main\n", "why": "--help: the method's flags not in their own group"},
    {"file": "common.py", "old": '" ".join(doc.strip().split("\\n\\n")[0].split())',
     "new": 'doc.strip().splitlines()[0]', "why": "--help: the description cut at the docstring's first line"},
    {"file": "common.py", "old": "            config = vars(resolved_config(main, finalize_args(copy.deepcopy(args))))",
     "new": "            config = vars(finalize_args(copy.deepcopy(args)))",
     "why": "--print-config without the method's own resolution"},
    {"file": "common.py", "old": 'if str(args.device).startswith("cuda") and not torch.cuda.is_available():',
     "new": 'if False:', "why": "explicit --device cuda without CUDA not refused"},
    {"file": "common.py", "old": "    if terminal:\n        bar.set_postfix", "new": "    if True:\n        bar.set_postfix",
     "why": "progress lines not written when stderr is not a terminal"},
    {"file": "common.py", "old": '    name = f"[{stage}] epoch {epoch + 1}"', "new": '    name = f"[{stage}] epoch {epoch}"',
     "why": "progress says epoch 0 where the check line says epoch 1"},
    {"file": "common.py", "old": "            for line in environment_lines(self.args):\n",
     "new": "            for line in environment_lines(self.args)[2:]:\n",
     "why": "the log header lacks the device and versions lines"},
    {"file": "common.py", "old": "        lr = optimizer.param_groups[0][\"lr\"]\n        optimizer.step()\n        schedule.step()\n",
     "new": "        optimizer.step()\n        schedule.step()\n        lr = optimizer.param_groups[0][\"lr\"]\n",
     "why": "progress lines: the lr shown is the next step's, not the step's"},
    {"file": "common.py", "old": "        write_run_records(results, a)\n", "new": "",
     "why": "no history.csv after a run"},
    {"file": "common.py", "old": '            offset = rows[-1]["x"]', "new": "            offset = 0.0",
     "why": "curves: a later stage restarts the x axis"},
    {"file": "common.py", "old": '"both": "mixed (text or image)"}', "new": '"both": "both missing"}',
     "why": "robustness.png: the mixed legend reads as both modalities missing"},
    {"file": "common.py", "old": "            from torch.utils.tensorboard import SummaryWriter  # noqa: F401\n",
     "new": "            pass\n", "why": "--tensorboard without the package not refused up front"},
    {"file": "common.py", "old": "    logging.disable(logging.ERROR)\n", "new": "",
     "why": "weight loading: hub retry warnings and library log lines not quieted"},
    {"file": "common.py", "old": "    constants.HF_HUB_OFFLINE = offline or local_only\n", "new": "",
     "why": "weight loading: the local cache not tried first"},
    {"file": "README.md", "old": "s/paper_table(\"map\"/paper_table(\"mymethod\"/", "new": "s/paper_table(\"map\"/paper_table(\"map\"/",
     "why": "README add-your-own-method: the recipe renames only one of the two strings"},
]
