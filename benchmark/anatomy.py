"""How much of each algorithm file is its algorithm, and how far apart the files are.

    python benchmark/anatomy.py

Every non-blank line of an algorithm file is put in one of four kinds:
- docs: the header docstring (the paper, commands, departures);
- imports;
- plumbing: the `Args` overrides of the shared flags, the calls into `common/` that set up the run,
  start training, close an iteration (step 7) and finish it, and the loop's `with`/`for` lines;
- algorithm: the method's hyper-parameters and their checks, its loss/advantage functions and
  model classes, the models and optimizer it builds, and steps 1 to 6 of its loop (sampling,
  resets, generation, scoring, rewards and advantages, the update).
Also printed: `diff a.py b.py` changed-line counts for the pairs a reader compares, and each entry point's import
closure: the modules of common/ every run of it loads, directly or through each other, with their lines and non-blank
lines (what to copy with it), and apart from them the modules imported inside a function, only when an option asks
for them (LoRA, FSDP, a reward model, the pocket model, another task...: copy those for the options you use).
"""
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["ppo.py", "ppo_pp.py", "drpo.py", "grpo.py", "grpo_reset.py", "rebel.py", "apo.py"]
ENTRY_POINTS = FILES + ["sft.py", "reward.py"]
PAIRS = [("ppo.py", "ppo_pp.py"), ("ppo.py", "drpo.py"), ("grpo.py", "rebel.py"), ("rebel.py", "apo.py"),
         ("ppo.py", "grpo.py")]
PLUMBING_CALLS = re.compile(r"tyro\.cli|parse_args\(|setup_run\(|start_training\(|finish_run\(|save_on_failure\(|"
                            r"for iteration in iterations\(|accelerator, device, tokenizer = ")


def classify(path):
    """Kinds of the non-blank lines of one file: {"docs": n, "imports": n, "plumbing": n, "algorithm": n}."""
    lines = open(path).read().splitlines()
    kinds = []
    section, in_doc, open_parens, in_main, step = "top", False, 0, False, None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if i == 0 and stripped.startswith('"""'):
            in_doc = not (stripped.endswith('"""') and len(stripped) > 3)
            kinds.append("docs")
            continue
        if in_doc:
            kinds.append("docs")
            in_doc = not stripped.endswith('"""')
            continue
        if not stripped:
            kinds.append(None)
            continue
        if open_parens > 0:  # a continuation of the previous statement keeps its kind
            kinds.append(kinds[-1] if kinds[-1] else "plumbing")
            open_parens += line.count("(") + line.count("[") - line.count(")") - line.count("]")
            continue
        open_parens = line.count("(") + line.count("[") - line.count(")") - line.count("]")
        if not line.startswith((" ", "\t", ")", "]")):
            in_main = line.startswith("if __name__")
            decorated = lines[i + 1] if line.startswith("@") else line
            section = ("imports" if line.startswith(("import ", "from ")) else
                       "args" if decorated.startswith("class Args") else "top")
        if section == "imports":
            kinds.append("imports")
        elif section == "args":
            kinds.append("plumbing")
        elif not in_main:
            kinds.append("algorithm")
        else:
            match = re.match(r"\s*# (\d)\.", line)
            step = int(match.group(1)) if match else step
            if step is None:  # before the loop: models and optimizer are the algorithm, the calls into common/ are not
                kinds.append("plumbing" if PLUMBING_CALLS.search(line) or stripped.startswith("if __name__") else
                             "algorithm")
            elif step <= 6 and not PLUMBING_CALLS.search(line):
                kinds.append("algorithm")
            else:
                kinds.append("plumbing")
    counts = {k: kinds.count(k) for k in ("docs", "imports", "plumbing", "algorithm")}
    counts["lines"] = len(lines)
    return counts


def common_imports(path):
    """The common/ modules a file imports (`from common.x import ...`, `from common import x`, `import common.x`):
    (those imported when the file loads or its main block runs, those imported inside a function or an `if`: only
    when a call or a condition, an option, asks for them)."""
    found = {"load": set(), "call": set()}

    def visit(node, inside_function):  # inside a function or an `if` other than the main guard
        for child in ast.iter_child_nodes(node):
            when = "call" if inside_function else "load"
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "common":
                if child.module == "common":
                    found[when].update(f"common.{alias.name}" for alias in child.names)
                else:
                    found[when].add(child.module)
            elif isinstance(child, ast.Import):
                found[when].update(alias.name for alias in child.names if alias.name.startswith("common."))
            visit(child, inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                  or isinstance(child, ast.If) and "__main__" not in ast.unparse(child.test))

    visit(ast.parse(open(path).read()), False)
    return found["load"], found["call"] - found["load"]


def module_path(module):
    return os.path.join(ROOT, *module.split(".")) + ".py"


def import_closure(path):
    """The common/ modules running `path` loads, transitively through the imports made when a module loads, and
    those its functions import only when called (an option that asks for them: LoRA, FSDP, a reward model...), with
    the modules those load in turn: ({module: lines}, {module: lines})."""
    def reachable(start, on_call: bool):
        found, todo = set(), sorted(start)
        while todo:
            module = todo.pop()
            if module not in found:
                found.add(module)
                load, call = common_imports(module_path(module))
                todo += sorted((load | call if on_call else load) - found)
        return found

    load, call = common_imports(path)
    always = reachable(load, on_call=False)
    on_call = reachable(load | call, on_call=True) - always
    return ({m: line_counts(module_path(m)) for m in always}, {m: line_counts(module_path(m)) for m in on_call})


def line_counts(path):
    """(lines, non-blank lines) of a file."""
    lines = open(path).read().splitlines()
    return len(lines), sum(1 for line in lines if line.strip())


def changed_lines(a, b):
    out = subprocess.run(["diff", os.path.join(ROOT, a), os.path.join(ROOT, b)], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line[:1] in "<>")


if __name__ == "__main__":
    print("| file | lines | non-blank | docs | imports | plumbing | algorithm | algorithm share |")
    print("|---|---|---|---|---|---|---|---|")
    for name in FILES:
        c = classify(os.path.join(ROOT, name))
        non_blank = c["docs"] + c["imports"] + c["plumbing"] + c["algorithm"]
        print(f"| {name} | {c['lines']} | {non_blank} | {c['docs']} | {c['imports']} | {c['plumbing']} | "
              f"{c['algorithm']} | {c['algorithm'] / non_blank:.0%} |")
    print()
    print("| entry point | lines | common/ modules every run loads | their lines | non-blank | "
          "imported only when an option asks | their lines |")
    print("|---|---|---|---|---|---|---|")
    for name in ENTRY_POINTS:
        always, on_call = import_closure(os.path.join(ROOT, name))
        names = lambda modules: ", ".join(sorted(m.split(".")[1] for m in modules))  # noqa: E731
        print(f"| {name} | {line_counts(os.path.join(ROOT, name))[0]} | {names(always)} | "
              f"{sum(v[0] for v in always.values())} | {sum(v[1] for v in always.values())} | {names(on_call)} | "
              f"{sum(v[0] for v in on_call.values())} |")
    print()
    for a, b in PAIRS:
        print(f"diff {a} {b}: {changed_lines(a, b)} changed lines")
