"""The project's mutation check (not run by CI): does the suite notice when a method's wiring is broken?

A mutation is one small, exact text replacement in one source file that changes what a method computes (a
swapped routing, a dropped loss term, the wrong pooled token), with a one-line reason. Mutations live next to
the tests meant to catch them: each tests/test_*.py may define a top-level literal

    MUTATIONS = [
        {"file": "syp.py", "old": "exact text", "new": "replacement", "why": "one line", "tests": ["tests/test_syp.py"]},
        ...
    ]

("tests" is optional and defaults to the defining test file). For each mutation the runner copies the working
tree into a scratch folder, applies the replacement there (never in place), runs those tests with -x and prints

    killed    a test failed                  survived  every test passed: the suite cannot see this break
    stale     `old` is not in the file exactly once (the code moved on: update the mutation)
    error     pytest could not run (a mutation must change results, not crash the import)

then the kill rate per source file. Rules for adding one: it must be able to change results (not dead code,
not a pure refactoring) and must not merely crash; the goal is every mutation killed.

    python tests/mutations.py                   # all
    python tests/mutations.py --file syp.py     # only mutations of syp.py
    python tests/mutations.py --match "FNCL"    # only mutations whose reason contains the text
    python tests/mutations.py --list            # print them, run nothing
"""
import argparse
import ast
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect():
    """Every MUTATIONS literal in tests/test_*.py, read with ast (nothing is imported)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        tree = ast.parse(open(path).read(), path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MUTATIONS" for t in node.targets):
                for m in ast.literal_eval(node.value):
                    missing = {"file", "old", "new", "why"} - set(m)
                    if missing:
                        raise SystemExit(f"{path}: a mutation lacks {sorted(missing)}: {m}")
                    m = dict(m, source=os.path.relpath(path, ROOT))
                    m.setdefault("tests", [m["source"]])
                    found.append(m)
    return found


def tree_files():
    """Tracked and untracked-but-not-ignored files of the working tree."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and os.path.isfile(os.path.join(ROOT, f))]


def run_one(m, files, timeout):
    text = open(os.path.join(ROOT, m["file"])).read()
    if text.count(m["old"]) != 1:
        return "stale", f"found {text.count(m['old'])} times"
    with tempfile.TemporaryDirectory(prefix="mutant-") as scratch:
        for f in files:
            os.makedirs(os.path.dirname(os.path.join(scratch, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(scratch, f))
        with open(os.path.join(scratch, m["file"]), "w") as f:
            f.write(text.replace(m["old"], m["new"]))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m["tests"]]
        try:
            p = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed", "timeout"
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    if p.returncode == 0:
        return "survived", tail[0]
    if p.returncode == 1:
        return "killed", tail[0]
    return "error", tail[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=None, help="only mutations of this source file (e.g. syp.py)")
    ap.add_argument("--match", default=None, help="only mutations whose reason contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations, run nothing")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    args = ap.parse_args(argv)
    mutations = [m for m in collect() if args.file in (None, m["file"]) and (args.match or "") in m["why"]]
    if args.list:
        for m in mutations:
            print(f"{m['file']:14s} {m['why']}  [{', '.join(m['tests'])}]")
        return 0
    files, tally = tree_files(), {}
    for k, m in enumerate(mutations, 1):
        t0 = time.time()
        status, detail = run_one(m, files, args.timeout)
        tally.setdefault(m["file"], []).append(status)
        print(f"[{k}/{len(mutations)}] {status:8s} {m['file']:14s} {m['why']}  ({time.time() - t0:.0f}s; {detail})",
              flush=True)
    print("\nfile            killed  survived  stale  error  kill rate")
    for f, s in sorted(tally.items()):
        live = len(s) - s.count("stale")
        rate = f"{s.count('killed') / live:.0%}" if live else "-"
        print(f"{f:14s} {s.count('killed'):7d} {s.count('survived'):9d} {s.count('stale'):6d} {s.count('error'):6d}  {rate}")
    return 0 if all(s == "killed" for ss in tally.values() for s in ss) else 1


if __name__ == "__main__":
    sys.exit(main())
