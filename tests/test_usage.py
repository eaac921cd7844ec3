"""README's "Use a method in your own code", run as written: its example block with each method's lines from the
per-method block, for all six methods on both tiny backbones; and every method file imported from a folder that
holds only it, common.py and data.py (a fresh interpreter that cannot see this repository)."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("map", "muap", "memprompt", "syp", "aoept", "promise")
TINY = {"tiny-clip": 'common.load_clip("tiny-clip", "")', "tiny-vilt": 'common.load_vilt("tiny-vilt")'}


def readme_block(name):
    """The ```python block between <!-- NAME:begin ... --> and <!-- NAME:end --> in README.md."""
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(rf"<!-- {name}:begin.*?-->\s*```python\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert found, f"README.md has no {name} block"
    return found.group(1)


def method_lines():
    """{method: its lines}: the per-method block, cut at its '# <method>.py' headers."""
    chunks = re.split(r"^# (\w+)\.py.*\n", readme_block("usage-methods"), flags=re.M)
    return dict(zip(chunks[1::2], chunks[2::2]))


def example(method, backbone):
    """The README example for one method and tiny backbone: the import names the method, the '# per method' lines
    become the method's lines, the backbone line loads the tiny backbone (and keeps a reference of its weights)."""
    lines, out, placed = readme_block("usage-example").splitlines(keepends=True), [], False
    for line in lines:
        if re.match(r"import \w+ as method\b", line):
            line = f"import {method} as method\n"
        elif line.startswith("bb = common.load_clip()"):
            line = f"bb = {TINY[backbone]}.to(device); reference = bb.state_dict(keep_vars=False)\n"
            line += "reference = {k: v.clone() for k, v in reference.items()}\n"
        elif "# per method" in line:
            if not placed:
                out.append(method_lines()[method])
                placed = True
            continue
        out.append(line)
    assert placed, "the README example has no '# per method' lines"
    return "".join(out)


def test_readme_lists_every_method():
    assert sorted(method_lines()) == sorted(METHODS)


@pytest.mark.parametrize("backbone", sorted(TINY))
@pytest.mark.parametrize("method", METHODS)
def test_readme_example_runs(method, backbone):
    """One optimiser step happened (torch's own optimizer state), on a finite loss, with the backbone untouched."""
    torch.manual_seed(0)
    scope = {"__name__": "readme_example"}
    exec(compile(example(method, backbone), f"README.md usage example ({method}, {backbone})", "exec"), scope)
    model, optimizer, bb = scope["model"], scope["optimizer"], scope["bb"]
    assert torch.isfinite(scope["loss"]) and scope["loss"].requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepped = [p for p in trainable if optimizer.state.get(p, {}).get("step", 0) == 1]
    assert trainable and len(stepped) == len(trainable), "the optimiser step missed some of the method's tensors"
    assert all(p.grad is None for p in trainable)                        # zero_grad ran
    assert not any(p.requires_grad or p.grad is not None for p in bb.parameters())
    assert all(torch.equal(v, scope["reference"][k]) for k, v in bb.state_dict().items())
    assert scope["batch"]["missing"].tolist() == [0, 1, 2]


ALONE = textwrap.dedent("""
    import importlib, os, sys
    for folder, method, code in CASES:
        sys.path.insert(0, folder)
        for name in ("common", "data", method):
            sys.modules.pop(name, None)
        exec(compile(code, folder, "exec"), {"__name__": "readme_example"})
        for name in ("common", "data", method):
            assert os.path.dirname(sys.modules[name].__file__) == folder, (name, sys.modules[name].__file__)
        sys.path.remove(folder)
        print(method, "ok", flush=True)
""")


def test_method_file_works_beside_only_common_and_data(tmp_path):
    """A fresh isolated interpreter (python -I: no current directory, no PYTHONPATH) runs the README example on
    tiny-clip from six folders, each holding only the method file, common.py and data.py."""
    cases = []
    for method in METHODS:
        folder = tmp_path / method
        folder.mkdir()
        for f in (f"{method}.py", "common.py", "data.py"):
            shutil.copy(os.path.join(ROOT, f), folder / f)
        cases.append((str(folder), method, example(method, "tiny-clip")))
    script = f"CASES = {cases!r}\n{ALONE}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [w for m in METHODS for w in (m, "ok")]


MUTATIONS = [
    {"file": "README.md", "old": "loss.backward()\noptimizer.step()\n", "new": "loss.backward()\n",
     "why": "the README example never steps the optimiser"},
    {"file": "README.md", "old": "loss = loss_fn(model(batch), batch)\nloss.backward()",
     "new": "loss = loss_fn(model(batch), batch)\nloss.detach()", "why": "the README example computes no gradient"},
    {"file": "README.md", "old": "optimizer = common.make_optimizer(model, a)",
     "new": "optimizer = torch.optim.AdamW([next(p for p in model.parameters() if p.requires_grad)], lr=a.lr)",
     "why": "the README example optimises one tensor of the method"},
]
