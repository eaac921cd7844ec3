"""`# Copied from FILE.py:NAME` markers: the copy must stay identical to its source (checked like transformers does)."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["map.py", "muap.py", "memprompt.py", "syp.py", "aoept.py", "promise.py"]


def definitions(path):
    source = open(path).read()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def copies():
    found = []
    for name in METHODS:
        path = os.path.join(ROOT, name)
        if not os.path.exists(path):
            continue
        lines = open(path).read().splitlines()
        for k, line in enumerate(lines):
            m = re.match(r"# Copied from (\w+\.py):(\w+)", line.strip())
            if m:
                defined = re.match(r"(?:def|class) (\w+)", lines[k + 1])
                found.append((name, defined.group(1), m.group(1), m.group(2)))
    return found


def test_some_copies_are_marked():
    assert copies(), "no '# Copied from' marker found"


@pytest.mark.parametrize("target,name,source,source_name", copies())
def test_copy_is_identical(target, name, source, source_name):
    copy = definitions(os.path.join(ROOT, target))[name]
    original = definitions(os.path.join(ROOT, source))[source_name]
    assert copy == original.replace(f"def {source_name}(", f"def {name}(")
