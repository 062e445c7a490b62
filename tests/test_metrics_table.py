"""Every metric key the nine entry points and common/ can log has one row in benchmark/README.md's "Metrics" table,
and every row there is still logged by some file.

The keys are read statically from the source (no model runs): string literals of the form family/name for the known
families; every constant key of a dict literal that holds a family/name key or a `**metrics` splat (so `lr`,
`episode`, `epoch`, `step`); constant keys put into or read from a dict named *metrics or *stats; the keys of the
`sums` dicts that evaluations turn into `eval/{k}`; and the dynamic families `pass@{k}` (the row `eval/pass@k`) and
`pairs/{split}_{k}` (k: the keys of the `counts` dicts). Any other f-string of a known family is a key as written,
e.g. `policy/<name>`, so it has no row until someone writes one.
"""
import ast
import functools
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "benchmark", "README.md")
ENTRY_POINTS = ("ppo", "ppo_pp", "drpo", "grpo", "grpo_reset", "rebel", "apo", "sft", "reward")
FAMILIES = ("eval", "val", "objective", "loss", "policy", "perf", "dist", "reset", "pairs", "train", "reward")
FAMILY_KEY = re.compile(rf"^(?:{'|'.join(FAMILIES)})/[\w@.]+$")
FAMILY_PATTERN = re.compile(rf"^(?:{'|'.join(FAMILIES)})/")  # an f-string of a known family
ANY_KEY = re.compile(r"^[a-z][a-z0-9_]*/[\w@.<>]+$")  # family/name, any family: a dict key like this is a metric
METRIC_DICT = re.compile(r"(metrics|stats)$|^(after|before)$")  # the names the files give their metric dicts
SPLITS = ("train", "test")  # the splits reward.py counts its pairs in


def read_sources() -> dict:
    """{path relative to the root: source} of common/*.py and the nine entry points."""
    paths = sorted(glob.glob(os.path.join(ROOT, "common", "*.py"))) + [os.path.join(ROOT, f"{name}.py")
                                                                        for name in ENTRY_POINTS]
    sources = {}
    for path in paths:
        with open(path) as f:
            sources[os.path.relpath(path, ROOT)] = f.read()
    return sources


def table_rows(readme: str) -> list:
    """The rows of the "## Metrics" section's table: (keys named in backticks in the first cell, cells)."""
    if "\n## Metrics\n" not in readme:
        return []
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])] if line.startswith("|") else []
        if len(cells) < 2 or cells[0] == "key" or set(cells[0]) <= set("-: "):
            continue  # not a row, the header or the separator
        rows.append((re.findall(r"`([^`]+)`", cells[0]), cells))
    return rows


@functools.lru_cache(maxsize=None)
def parse(source: str):
    """The syntax tree of a source (cached: the tests read each file several times)."""
    return ast.parse(source)


def render(node) -> str:
    """An f-string with each replacement field written as <expression>: f"eval/{k}" -> "eval/<k>"."""
    return "".join(v.value if isinstance(v, ast.Constant) else f"<{ast.unparse(v.value)}>" for v in node.values)


def name_of(node) -> str:
    """The name a node refers to: x for `x` and for `run.x`; "" for anything else."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def string_keys(node) -> set:
    """Constant string keys (f-strings rendered) of every dict literal inside `node`."""
    keys = set()
    for d in ast.walk(node):
        for k in getattr(d, "keys", ()) if isinstance(d, ast.Dict) else [d.key] if isinstance(d, ast.DictComp) else ():
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                keys.add(k.value)
            elif isinstance(k, ast.JoinedStr):
                keys.add(render(k))
    return keys


def dynamic(key: str, counts: set) -> set:
    """The keys a rendered f-string stands for."""
    if re.fullmatch(r"eval/<[^>]+>", key):
        return set()  # its members are the `sums` keys, collected as eval/<key> where they are written
    if re.fullmatch(r"pass@<[^>]+>", key):
        return {"eval/pass@k"}
    if re.fullmatch(r"pairs/<[^>]+>_<[^>]+>", key):
        return {f"pairs/{split}_{k}" for split in SPLITS for k in counts}
    return {key}


def eval_keys(key: str) -> set:
    """The eval/* keys a key of an evaluation's `sums` becomes: "kl" -> eval/kl, "pass@<k>" -> eval/pass@k."""
    return dynamic(key, set()) if "<" in key else {f"eval/{key}"}


def assigned(node, name: str) -> list:
    """The values an assignment gives `name`: `name = v` and `a, name = u, v` give [v]."""
    out = []
    for target in node.targets:
        if name_of(target) == name:
            out.append(node.value)
        elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            out += [v for t, v in zip(target.elts, node.value.elts) if name_of(t) == name]
    return out


def is_metric_dict(node) -> bool:
    """A dict literal with a family/name key, or one that splats a metrics dict into itself."""
    return any(k is None and METRIC_DICT.search(name_of(v)) or isinstance(k, ast.Constant)
               and isinstance(k.value, str) and ANY_KEY.match(k.value) for k, v in zip(node.keys, node.values))


@functools.lru_cache(maxsize=None)
def source_keys(source: str, counts: frozenset = frozenset()) -> frozenset:
    """The metric keys one file can log (`counts`: the members of the pairs/{split}_{k} family)."""
    keys = set()
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and FAMILY_KEY.match(node.value):
            keys.add(node.value)
        elif isinstance(node, ast.JoinedStr) and (FAMILY_PATTERN.match(render(node)) or
                                                  render(node).startswith("pass@")):
            keys |= dynamic(render(node), counts)
        elif isinstance(node, ast.Dict) and is_metric_dict(node):
            keys |= {k for k in string_keys(node) if not k.startswith("eval/<")}
        elif isinstance(node, ast.Call) and name_of(node.func) == "update" and METRIC_DICT.search(
                name_of(node.func.value)):
            keys |= {k for arg in node.args for k in string_keys(arg)}
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, (ast.Constant, ast.JoinedStr)):
            key = node.slice.value if isinstance(node.slice, ast.Constant) else render(node.slice)
            if isinstance(key, str) and METRIC_DICT.search(name_of(node.value)):
                keys |= dynamic(key, counts)
            elif isinstance(key, str) and name_of(node.value) == "sums":
                keys |= eval_keys(key)
        elif isinstance(node, ast.Assign):
            keys |= {k for value in assigned(node, "sums") for key in string_keys(value) for k in eval_keys(key)}
    return frozenset(keys)


def keys_by_file(sources: dict) -> dict:
    """{file: the metric keys it can log} for {file: source}."""
    counts = set()
    for source in sources.values():
        for node in ast.walk(parse(source)):
            if isinstance(node, ast.Assign):
                counts |= {k for value in assigned(node, "counts") for k in string_keys(value) if "<" not in k}
    return {path: source_keys(source, frozenset(counts)) for path, source in sources.items()}


def problems(sources: dict, table_keys: set) -> list:
    """What the table and the sources disagree on: keys without a row (named with the file), rows nothing logs."""
    logged = keys_by_file(sources)
    out = [f"{path} logs `{key}`, which has no row in benchmark/README.md's Metrics table"
           for path, keys in logged.items() for key in sorted(keys - table_keys)]
    everything = set().union(*logged.values())
    out += [f"the Metrics table's row `{key}` is logged by none of {', '.join(logged)}"
            for key in sorted(table_keys - everything)]
    return out


def read_table_keys() -> set:
    with open(README) as f:
        return {key for keys, _ in table_rows(f.read()) for key in keys}


def test_metrics_table_is_well_formed():
    """One row per key (or key family), each with a key, the files that log it and its meaning; no key twice."""
    with open(README) as f:
        rows = table_rows(f.read())
    assert rows, "benchmark/README.md has no table under '## Metrics'"
    seen = set()
    for keys, cells in rows:
        assert keys and len(cells) == 3 and all(cells), f"row {cells}: want | `key` | logged by | meaning |"
        assert not seen & set(keys), f"{seen & set(keys)} has two rows: one meaning per key"
        seen |= set(keys)


def test_every_logged_key_has_a_row_and_every_row_is_logged():
    """The keys in the nine entry points and common/*.py are exactly the table's."""
    found = problems(read_sources(), read_table_keys())
    assert not found, "\n".join(found)


def test_a_new_key_without_a_row_fails():
    """A key added to a copy of grpo.py (a literal, a bare key, a new family, a dynamic one) is reported by name."""
    sources, table = read_sources(), read_table_keys()
    added = {'stats["policy/made_up"] = 0.0': "policy/made_up",
             'metrics.update({"lr": 0.0, "made_up_bare": 1})': "made_up_bare",
             'stats["grad/made_up"] = 0.0': "grad/made_up",
             'stats[f"objective/{name}"] = 0.0': "objective/<name>"}
    for line, key in added.items():
        copy = {**sources, "grpo.py": sources["grpo.py"] + f"\n{line}\n"}
        assert problems(copy, table) == [f"grpo.py logs `{key}`, which has no row in benchmark/README.md's "
                                         "Metrics table"], line
    without = {k for k in table if k != "val/rollin_length"}  # a row removed: the three reset files name it
    assert sorted(p.split()[0] for p in problems(sources, without)) == ["drpo.py", "grpo_reset.py", "ppo_pp.py"]
