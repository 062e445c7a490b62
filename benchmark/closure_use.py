"""How much of what a copied file brings along does a run use? The common/ modules every run of an entry point loads
(its import closure, benchmark/anatomy.py), line by line: the non-blank lines of the functions one run calls, and the
rest (module docstrings, imports, constants, the flag dataclasses, functions that run did not call).

    python benchmark/closure_use.py grpo.py -- --num_iterations 1 --num_eval_prompts 4

The run (the flags after `--`; the file's defaults otherwise; its folder deleted after) goes in a subprocess with a
profiler that records every function of common/ it enters. With the default flags it shows the floor a copy of the
file can reach by moving option-only code into modules of its own: the lines a run without options executes.
"""
import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anatomy import ROOT, import_closure, line_counts  # noqa: E402

CHILD = """
import json, os, runpy, sys
sys.path.insert(0, {root!r})
called = set()

def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_filename.startswith({common!r}):
        called.add((os.path.relpath(frame.f_code.co_filename, {root!r}), frame.f_code.co_firstlineno))

sys.argv = {argv!r}
sys.setprofile(profile)
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    sys.setprofile(None)
    with open({out!r}, "w") as f:
        json.dump(sorted(called), f)
"""


def called_functions(name: str, flags: list) -> set:
    """(path relative to the project, first line) of every common/ function a run of `name` with `flags` entered."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "called.json")
        flags = flags if "--output_dir" in flags else [*flags, "--output_dir", tmp]  # the run's folder goes with it
        code = CHILD.format(root=ROOT, common=os.path.join(ROOT, "common") + os.sep, argv=[name, *flags],
                            script=os.path.join(ROOT, name), out=out)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                             "WANDB_MODE": "disabled"})
        if proc.returncode != 0 or not os.path.exists(out):
            sys.exit(f"the run of {name} failed ({proc.returncode})")
        with open(out) as f:
            return {tuple(x) for x in json.load(f)}


def usage(module_path: str, called: set):
    """(non-blank lines, non-blank lines in the functions `called`, names of the top-level functions not called)."""
    rel = os.path.relpath(module_path, ROOT)
    lines = open(module_path).read().splitlines()
    used, unused = 0, []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])  # a decorated def starts there
            size = sum(1 for line in lines[start - 1:node.end_lineno] if line.strip())
            if (rel, start) in called or (rel, node.lineno) in called:
                used += size
            elif node.col_offset == 0:
                unused.append(node.name)
    return line_counts(module_path)[1], used, unused


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="an entry point, e.g. grpo.py")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the run's flags")
    cli = parser.parse_args()
    called = called_functions(cli.file, [f for f in cli.flags if f != "--"])
    always, _ = import_closure(os.path.join(ROOT, cli.file))
    print("\n| module | non-blank | in functions the run called | rest | top-level functions not called |")
    print("|---|---|---|---|---|")
    totals = [0, 0]
    for module in sorted(always):
        non_blank, used, unused = usage(os.path.join(ROOT, *module.split(".")) + ".py", called)
        totals = [totals[0] + non_blank, totals[1] + used]
        print(f"| {module.split('.')[1]} | {non_blank} | {used} | {non_blank - used} | {', '.join(unused)} |")
    print(f"| all | {totals[0]} | {totals[1]} | {totals[0] - totals[1]} | |")
