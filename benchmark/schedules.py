"""Which roll-in schedule? DR-PO and GRPO-with-resets with each schedule against uniform, and against PPO and GRPO,
on the lock task with the pocket model (the setting of benchmark/resets.py, at one horizon).

    python benchmark/schedules.py                  # make schedules: lock8, 10 seeds x 10 variants (about 30 min)
    python benchmark/schedules.py --seeds 2        # a look in a few minutes
    python benchmark/schedules.py --report_only    # aggregate the runs already there again
    python benchmark/schedules.py --task chain3 --seeds 3 --output_dir benchmark/results/schedules_chain3 \
        --variants drpo:uniform drpo:reverse drpo:adaptive drpo:anneal grpo_reset:uniform grpo_reset:reverse \
        grpo_reset:adaptive grpo_reset:anneal     # the packaged 135M model on chain3, benchmark/compare.py's setting

The setting (benchmark/README.md, "Roll-in schedules", has the prediction, written before the runs): the reference
of `make resets` (trained here when benchmark/results/resets/reference is absent), lock8, 2,048 generated training
samples per run, 64 per iteration, each file's default learning rate x 10, 200 held-out prompts evaluated greedily
9 times. Variants: `file` or `file:schedule` (--ppo.rollin_schedule for drpo.py and ppo_pp.py,
--grpo.rollin_schedule for grpo_reset.py). Every variant runs seeds 1..N; differences are paired by seed, with 95%
t intervals: each schedule against the same file's uniform schedule, and each file against the one without resets
(DR-PO against PPO, GRPO-reset against GRPO).

With --task chain3 the setting is benchmark/compare.py's defaults instead (the packaged SmolLM2-135M after sft.py on
32 worked solutions, 80 samples per run, 16 per iteration, 32 held-out prompts, bf16 autocast, each file's own
learning rate); --samples, --samples_per_iteration, --num_evals, --num_eval_prompts and --lr_scale are then unused.

Written to --output_dir (default benchmark/results/schedules): results.md, results.json, schedules_curves.png; the
runs and logs under lock{H}/ (or chain3/).
"""
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmark import compare, resets, warm  # noqa: E402

# each file with resets, and the file without them, whose name is also its flags' group (--ppo.x, --grpo.x)
BASE = {"drpo": "ppo", "ppo_pp": "ppo", "grpo_reset": "grpo"}


@dataclass
class Args:
    task: Literal["lock", "chain3"] = "lock"
    """lock (the pocket model on lock{--horizon}) or chain3 (the packaged 135M model, benchmark/compare.py's setting)"""
    horizon: int = 8
    """the lock's horizon H (lockH): one the reference was trained on (3, 4, 6 or 8)"""
    variants: tuple[str, ...] = ("ppo", "drpo:uniform", "drpo:reverse", "drpo:adaptive", "drpo:anneal", "grpo",
                                 "grpo_reset:uniform", "grpo_reset:reverse", "grpo_reset:adaptive",
                                 "grpo_reset:anneal")
    """`file` or `file:schedule`, each run with --seeds seeds"""
    seeds: int = 10
    """seeds 1..N for every variant"""
    samples: int = 2048
    """generated training samples per run"""
    samples_per_iteration: int = 64
    """generated samples per iteration (prompts x responses per prompt)"""
    num_evals: int = 7
    """evaluations during training besides the ones before and after"""
    num_eval_prompts: int = 200
    """held-out prompts per evaluation (greedy)"""
    lr_scale: float = 10.0
    """each file's default --learning_rate times this (as benchmark/resets.py)"""
    parallel: int = 2
    """runs at a time, each on cpu_count / parallel threads (with one thread each, two runs on 2 cores take about
    0.6 of the time of one after the other)"""
    output_dir: str = ""
    """where everything goes (default benchmark/results/schedules)"""
    report_only: bool = False
    """only aggregate the runs already in --output_dir"""


def split(variant: str) -> tuple[str, str]:
    """'drpo:reverse' -> ('drpo', 'reverse'); 'ppo' -> ('ppo', '')."""
    script, _, schedule = variant.partition(":")
    return script, schedule


def label(variant: str) -> str:
    script, schedule = split(variant)
    return compare.NAMES.get(script, script) + (f" {schedule}" if schedule else "")


def folder_name(variant: str) -> str:
    return variant.replace(":", "-")


def task_name(args: Args) -> str:
    """The task the runs are on, and their folder's name: lock{H} or chain3."""
    return "chain3" if args.task == "chain3" else f"lock{args.horizon}"


def chain_args(args: Args):
    """benchmark/compare.py's defaults (chain3, the SFT start, 80 samples), in this task's folder."""
    return compare.Args(output_dir=os.path.join(args.output_dir, task_name(args)))


def command(args: Args, variant: str, seed: int, model_dir: str) -> list:
    """The run's command line: benchmark/resets.py's flags for the file at the horizon (or compare.py's on chain3),
    plus the schedule."""
    script, schedule = split(variant)
    if args.task == "chain3":
        cargs = chain_args(args)
    else:
        rargs = replace(resets.settle(resets.Args()), samples=args.samples, num_evals=args.num_evals,
                        samples_per_iteration=args.samples_per_iteration, num_eval_prompts=args.num_eval_prompts,
                        lr_scale=args.lr_scale)
        cargs = replace(resets.compare_args(rargs, script, args.horizon),
                        output_dir=os.path.join(args.output_dir, task_name(args)))
    flags, _ = compare.run_flags(script, seed, cargs, model_dir)
    flags[flags.index("--exp_name") + 1] = folder_name(variant)
    if schedule:
        flags += [f"--{BASE[script]}.rollin_schedule", schedule]
    return [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags]


def run_all(args: Args, model_dir: str) -> list:
    """Every (variant, seed) not finished before, --parallel at a time, seeds outermost; the failed ones."""
    logs = os.path.join(args.output_dir, task_name(args), "logs")
    os.makedirs(logs, exist_ok=True)
    todo = [(v, s) for s in range(1, args.seeds + 1) for v in args.variants
            if not os.path.exists(os.path.join(logs, f"{folder_name(v)}__{s}.json"))]
    threads = str(max(1, (os.cpu_count() or 1) // args.parallel))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}
    env.setdefault("WANDB_MODE", "disabled")
    failed, start = [], time.time()
    for i in range(0, len(todo), args.parallel):
        chunk = todo[i:i + args.parallel]
        started = [(v, s, time.time(), warm.Started(command(args, v, s, model_dir), ROOT, env)) for v, s in chunk]
        for v, s, t0, proc in started:
            done = proc.wait()
            name = f"{folder_name(v)}__{s}"
            with open(os.path.join(logs, f"{name}.log"), "w") as f:
                f.write(done.stdout + done.stderr)
            if done.returncode == 0:
                with open(os.path.join(logs, f"{name}.json"), "w") as f:
                    json.dump({"variant": v, "seed": s, "returncode": 0, "wall_seconds": time.time() - t0,
                               "command": done.args}, f, indent=1)
            else:
                failed.append(name)
            print(f"[schedules] {label(v)} seed {s}: " + ("done" if done.returncode == 0 else "FAILED")
                  + f" ({i + len(chunk)}/{len(todo)}, {(time.time() - start) / 60:.1f} min)", flush=True)
    return failed


def collect(args: Args) -> dict:
    """{variant: {seed: compare.read_run()}} for the finished runs."""
    folder, out = os.path.join(args.output_dir, task_name(args)), {}
    for v in args.variants:
        for s in range(1, args.seeds + 1):
            run_dir = os.path.join(folder, f"{folder_name(v)}__{s}")
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                r = compare.read_run(run_dir, os.path.join(folder, "logs", f"{folder_name(v)}__{s}.json"))
                if r["points"] and r["iterations"] > 0:
                    out.setdefault(v, {})[s] = r
    return out


def paired(runs: dict, variant: str, other: str):
    """Mean and 95% CI of the per-seed difference in final success, `variant` minus `other` (None if either is
    missing)."""
    a, b = runs.get(variant, {}), runs.get(other, {})
    shared = sorted(set(a) & set(b))
    if variant == other or not shared:
        return None
    return compare.paired_ci([a[s]["points"][-1]["accuracy"] - b[s]["points"][-1]["accuracy"] for s in shared])


def summarize(runs: dict) -> list:
    rows = []
    for v, seeds in runs.items():
        script, schedule = split(v)
        final = [r["points"][-1]["accuracy"] for r in seeds.values()]
        rows.append({"variant": v, "seeds": sorted(seeds),
                     "start": compare.mean_se([r["points"][0]["accuracy"] for r in seeds.values()]),
                     "final": compare.mean_se(final),
                     "minus_uniform": paired(runs, v, f"{script}:uniform") if schedule else None,
                     "minus_no_resets": paired(runs, v, BASE[script]) if script in BASE else None,
                     "seconds_per_iter": compare.mean_se([r["seconds_per_iter"] for r in seeds.values()])})
    return rows


def table(rows: list) -> str:
    ci = lambda d: (compare.fmt_ci(d), compare.verdict(d)) if d else ("-", "-")  # noqa: E731
    lines = ["| variant | seeds | reference success | final success | minus uniform (95% CI) | verdict | "
             "minus the file without resets (95% CI) | verdict | s / iteration |", "|---" * 9 + "|"]
    for r in rows:
        (u, uv), (n, nv) = ci(r["minus_uniform"]), ci(r["minus_no_resets"])
        lines.append(f"| {label(r['variant'])} | {len(r['seeds'])} | {compare.fmt(r['start'])} | "
                     f"{compare.fmt(r['final'])} | {u} | {uv} | {n} | {nv} | {compare.fmt(r['seconds_per_iter'], 2)} |")
    return "\n".join(lines)


def plot(runs: dict, args: Args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [[v for v in args.variants if split(v)[0] in ("ppo", "ppo_pp", "drpo")],
                [v for v in args.variants if split(v)[0] in ("grpo", "grpo_reset")]]
    families = [f for f in families if any(v in runs for v in f)]
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 3.8), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        for i, v in enumerate(family):
            if v not in runs:
                continue
            xs, ys, se = compare.curve(list(runs[v].values()), "samples", "accuracy")
            ax.plot(xs, ys, marker=".", color=f"C{i}", label=f"{label(v)} ({len(runs[v])})")
            ax.fill_between(xs, ys - se, ys + se, alpha=0.15, color=f"C{i}")
        ax.set_xlabel("generated training samples")
        ax.set_title(f"{task_name(args)}, mean +- SE over seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out success (greedy)")
    fig.tight_layout()
    path = os.path.join(args.output_dir, "schedules_curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(args: Args, total_seconds: float | None = None) -> str:
    runs = collect(args)
    if not runs:
        raise SystemExit(f"[schedules] no finished runs in {args.output_dir}")
    rows = summarize(runs)
    if args.task == "chain3":
        c = chain_args(args)
        setting = (f"chain3 from `sft.py` on {c.sft_rows} worked solutions (the packaged SmolLM2-135M, "
                   f"benchmark/compare.py's setting); {c.samples} generated training samples per run, "
                   f"{c.samples_per_iteration} per iteration; each file's default learning rate; "
                   f"{c.num_eval_prompts} held-out prompts, greedy")
    else:
        setting = (f"{task_name(args)}, the reference of `make resets`; {args.samples} generated training samples per "
                   f"run, {args.samples_per_iteration} per iteration; each file's default learning rate x "
                   f"{args.lr_scale:g}; {args.num_eval_prompts} held-out prompts, greedy")
    text = (setting + ". Mean ± standard error over seeds; differences are per seed (paired) with a 95% t interval."
            "\n\n" + table(rows))
    if total_seconds is not None:
        text += f"\n\nWhole run: {total_seconds / 60:.1f} min, {args.parallel} runs at a time."
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows,
                   "runs": {v: {s: r["points"] for s, r in per.items()} for v, per in runs.items()}}, f, indent=1)
    try:
        figure = plot(runs, args)
    except ImportError:
        figure = "(no figure: matplotlib is not installed)"
    print(text + f"\n\n[schedules] written: {os.path.join(args.output_dir, 'results.md')}, results.json, {figure}")
    return text


def main(args: Args) -> None:
    args = replace(args, output_dir=args.output_dir or os.path.join(ROOT, "benchmark", "results", "schedules"))
    unknown = [v for v in args.variants if split(v)[0] not in ("ppo", "grpo", *BASE)
               or (split(v)[1] and split(v)[0] not in BASE)]
    if unknown:
        raise SystemExit(f"[schedules] --variants: {', '.join(unknown)} (a file: ppo, grpo, drpo, ppo_pp, grpo_reset; "
                         "a schedule only after drpo, ppo_pp or grpo_reset)")
    os.makedirs(args.output_dir, exist_ok=True)
    start, failed = time.time(), []
    if not args.report_only:
        model_dir = (compare.sft_model(chain_args(args)) if args.task == "chain3"  # the SFT start, trained once
                     else resets.reference(resets.settle(resets.Args())))  # make resets' reference, trained once
        failed = run_all(args, model_dir)
    report(args, None if args.report_only else time.time() - start)
    if failed:
        raise SystemExit(f"[schedules] failed runs (logs under {args.output_dir}/{task_name(args)}/logs): "
                         + ", ".join(failed))


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
