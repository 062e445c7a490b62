"""All the algorithm files side by side: same task, model, seeds and budget; a results table and plots.

    python benchmark/compare.py                                        # all six, seeds 1 2 3, 128 samples each
                                                                       # (~80 min, 2 CPU cores)
    python benchmark/compare.py --algorithms ppo ppo_pp drpo --samples 512
    python benchmark/compare.py --budget seconds --seconds 300         # equal training wall-clock instead
    python benchmark/compare.py --extra="--model_name Qwen/Qwen2.5-0.5B-Instruct --task gsm8k" \
        --launcher="accelerate launch --config_file configs/ddp.yaml"  # on GPUs
    python benchmark/compare.py --report_only                          # re-aggregate the runs already there

Every (seed, algorithm) run is its own process (`{output_dir}/{algorithm}__{seed}`, log in
`{output_dir}/logs/`), run one after another, seeds in the outer loop so that a stopped comparison
has whole seeds; a run that finished is not run again (delete its folder, or pass --rerun). The
budget is per run: `samples` gives every algorithm the same number of generated training samples
(responses scored in training: prompts x samples per prompt x iterations; A*-PO's stage-1 reference
samples are extra and their time is in its wall time), `seconds` the same seconds of training
iterations (`--max_train_seconds`; evaluation not counted). Each run evaluates before training,
`--num_evals` times during it, and after it, on the same held-out prompts.

Written to the output folder: results.md (the table and what it shows), results.json, and
reward_vs_samples.png, reward_vs_seconds.png, reward_vs_kl.png (mean over seeds, band = +-1 SE).
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ALGORITHMS = ("ppo", "ppo_pp", "drpo", "rebel", "apo", "grpo")
NAMES = {"ppo": "PPO", "ppo_pp": "PPO++", "drpo": "DR-PO", "rebel": "REBEL", "apo": "A*-PO", "grpo": "GRPO"}


@dataclass
class Args:
    algorithms: tuple[str, ...] = ALGORITHMS
    """algorithm files to compare (without .py)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds; every algorithm runs once per seed"""
    budget: Literal["samples", "seconds"] = "samples"
    """what is equal across algorithms: generated training samples, or seconds of training"""
    samples: int = 128
    """--budget samples: generated training samples per run (rounded to whole iterations)"""
    seconds: float = 300.0
    """--budget seconds: seconds of training iterations per run"""
    num_evals: int = 1
    """evaluations during training, evenly spaced (besides the ones before and after), for the curves"""
    num_eval_prompts: int = 100
    """held-out prompts per evaluation"""
    extra: str = ""
    """flags for the algorithm files, e.g. --extra="--model_name X --task gsm8k --grpo.kl_coef 0.04" (use the = form);
    a group's flags (--grpo.x, --ppo.x, --rebel.x, --apo.x) reach only the files that have that group"""
    launcher: str = ""
    """command put before each script, e.g. --launcher="accelerate launch --config_file configs/ddp.yaml"
    (default: python)"""
    output_dir: str = "runs/compare"
    """where the runs, logs, table and plots go"""
    rerun: bool = False
    """run again the runs that already finished"""
    report_only: bool = False
    """only aggregate the runs already in --output_dir (no training)"""


def parse_script_args(name: str, flags: list):
    """The algorithm file's Args with `flags` applied, without running it (its main code is guarded)."""
    module = __import__(name)
    return tyro.cli(module.Args, args=flags, use_underscores=True)


def flags_for(name: str, flags: list) -> list:
    """`flags` without those of another file's hyper-parameter group (--grpo.x reaches grpo.py only, --ppo.x the PPO
    family)."""
    import dataclasses

    groups = {f.name for f in dataclasses.fields(__import__(name).Args)}
    out, keep = [], True
    for token in flags:
        if token.startswith("--"):
            group = token[2:].split("=")[0].split(".")[0] if "." in token.split("=")[0] else None
            keep = group is None or group in groups
        if keep:
            out.append(token)
    return out


def samples_per_iteration(name: str, script_args) -> int:
    """Generated training samples per iteration: prompts x responses per prompt."""
    per_prompt = {"grpo": lambda a: a.grpo.num_generations, "rebel": lambda a: 2}.get(name, lambda a: 1)(script_args)
    return script_args.prompts_per_iteration * per_prompt


def run_flags(name: str, seed: int, args: Args) -> tuple[list, int]:
    """The flags of one run and its number of iterations under the budget."""
    flags = flags_for(name, shlex.split(args.extra))
    common = ["--seed", str(seed), "--exp_name", name, "--output_dir", args.output_dir,
              "--num_eval_prompts", str(args.num_eval_prompts)]
    if args.budget == "seconds":
        return flags + common + ["--num_iterations", "100000", "--max_train_seconds", str(args.seconds)], 0
    iterations = max(1, round(args.samples / samples_per_iteration(name, parse_script_args(name, flags))))
    eval_every = iterations // (args.num_evals + 1) if args.num_evals > 0 else 0
    return flags + common + ["--num_iterations", str(iterations), "--eval_every", str(eval_every)], iterations


def run_one(name: str, seed: int, args: Args) -> dict:
    """Run one algorithm file for one seed; its wall time and exit code go to compare.json in its folder."""
    run_dir = os.path.join(args.output_dir, f"{name}__{seed}")
    done_path = os.path.join(run_dir, "compare.json")
    if os.path.exists(done_path) and not args.rerun:
        with open(done_path) as f:
            done = json.load(f)
        if done["returncode"] == 0:
            print(f"[compare] {name} seed {seed}: finished before, kept ({done_path})", flush=True)
            return done
    flags, iterations = run_flags(name, seed, args)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = launcher + [os.path.join(ROOT, f"{name}.py")] + flags
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    log_path = os.path.join(args.output_dir, "logs", f"{name}__{seed}.log")
    print(f"[compare] {name} seed {seed}: {' '.join(shlex.quote(c) for c in cmd[1:])}\n"
          f"          log: {log_path}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        returncode = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    done = {"algorithm": name, "seed": seed, "returncode": returncode, "wall_seconds": time.time() - start,
            "iterations": iterations, "command": cmd}
    os.makedirs(run_dir, exist_ok=True)
    with open(done_path, "w") as f:
        json.dump(done, f, indent=1)
    status = ("done" if returncode == 0 else
              f"FAILED (exit {returncode}); the last lines of {log_path}:\n"
              + "".join(open(log_path).readlines()[-15:]))
    print(f"[compare] {name} seed {seed}: {status} in {done['wall_seconds']:.0f} s", flush=True)
    return done


# aggregation: pure functions of the runs' metrics.jsonl (tested on hand-made files)
def read_run(run_dir: str) -> dict:
    """One run's evaluation curve and speed: eval points (step, samples, training seconds, reward, accuracy, KL,
    win rate) from metrics.jsonl, the median speed over iterations after the first, peak memory, wall time."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = {r["step"]: r for r in rows if "perf/seconds_per_iter" in r}
    stage1 = next((r["perf/stage1_seconds"] for r in rows if "perf/stage1_seconds" in r), 0.0)
    stage1 = 0.0 if stage1 is None or math.isnan(stage1) else stage1
    evals = {}
    for r in rows:
        if "eval/reward" in r:
            evals[r["step"]] = r  # the last evaluation at a step wins
    points = []
    for step in sorted(evals):
        r = evals[step]
        points.append({
            "step": step, "samples": train[step]["episode"] if step in train else 0,
            "seconds": stage1 + sum(t["perf/seconds_per_iter"] for s, t in train.items() if s <= step),
            **{k: r.get(f"eval/{k}", float("nan")) for k in ("reward", "accuracy", "kl", "win_rate")}})
    speed = [train[s] for s in sorted(train)][1:] or list(train.values())  # the first iteration warms up
    out = {"points": points, "iterations": len(train), "stage1_seconds": stage1,
           "train_seconds": sum(t["perf/seconds_per_iter"] for t in train.values()),
           "seconds_per_iter": (float(np.median([t["perf/seconds_per_iter"] for t in speed])) if speed
                                else float("nan")),
           "tokens_per_second": (float(np.median([t["perf/tokens_per_second"] for t in speed])) if speed
                                 else float("nan")),
           "peak_memory_gb": max((t["perf/peak_memory_gb"] for t in train.values()), default=float("nan"))}
    done_path = os.path.join(run_dir, "compare.json")
    out["wall_seconds"] = json.load(open(done_path))["wall_seconds"] if os.path.exists(done_path) else float("nan")
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; SE is nan for fewer than two."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def aggregate(runs: list) -> dict:
    """Mean and SE over seeds (`runs`: read_run outputs of one algorithm) of the final evaluation and the speed."""
    final = {k: mean_se([r["points"][-1][k] for r in runs if r["points"]])
             for k in ("reward", "accuracy", "kl", "win_rate", "samples")}
    final["reference_reward"] = mean_se([r["points"][0]["reward"] for r in runs if r["points"]])
    for k in ("seconds_per_iter", "tokens_per_second", "peak_memory_gb", "wall_seconds", "train_seconds",
              "stage1_seconds", "iterations"):
        final[k] = mean_se([r[k] for r in runs])
    final["seeds"] = len(runs)
    return final


def curve(runs: list, x: str, y: str):
    """Mean x, mean y and SE of y per evaluation index, over the runs (truncated to the shortest run)."""
    n = min(len(r["points"]) for r in runs)
    xs = [float(np.mean([r["points"][i][x] for r in runs])) for i in range(n)]
    ys = [mean_se([r["points"][i][y] for r in runs]) for i in range(n)]
    return np.array(xs), np.array([m for m, _ in ys]), np.array([0.0 if math.isnan(s) else s for _, s in ys])


def fmt(m_se, digits=3) -> str:
    m, s = m_se
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def results_table(stats: dict) -> str:
    """The Markdown table: one row per algorithm."""
    lines = ["| algorithm | seeds | samples | held-out reward | accuracy | KL to ref | win rate vs ref | "
             "s / iteration | "
             "generated tokens / s | peak memory GB | training s (+ stage 1) | wall s per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        lines.append(f"| {NAMES.get(name, name)} | {s['seeds']} | {s['samples'][0]:.0f} | {fmt(s['reward'])} | "
                     f"{fmt(s['accuracy'])} | "
                     f"{fmt(s['kl'], 2)} | {fmt(s['win_rate'])} | {fmt(s['seconds_per_iter'], 1)} | "
                     f"{fmt(s['tokens_per_second'], 1)} | "
                     f"{fmt(s['peak_memory_gb'], 2)} | {fmt(total_seconds(s), 0)} | {fmt(s['wall_seconds'], 0)} |")
    return "\n".join(lines)


def _better(a, b) -> str:
    """'higher', 'lower' or 'within noise': mean difference of a - b against 2 combined standard errors."""
    diff, se = a[0] - b[0], math.sqrt(np.nan_to_num(a[1]) ** 2 + np.nan_to_num(b[1]) ** 2)
    if se == 0 or math.isnan(se):
        return "higher" if diff > 0 else "lower" if diff < 0 else "equal"
    return "higher" if diff > 2 * se else "lower" if diff < -2 * se else "within noise (|diff| < 2 SE)"


def total_seconds(s: dict) -> tuple[float, float]:
    """Training seconds plus A*-PO's stage 1 (mean, SE): the compute a method spends for its samples."""
    se = math.sqrt(s["train_seconds"][1] ** 2 + np.nan_to_num(s["stage1_seconds"][1]) ** 2)  # nan with one seed
    return s["train_seconds"][0] + s["stage1_seconds"][0], se


def findings(stats: dict) -> list:
    """What the table shows next to the papers' claims, computed from the numbers (no hand-written verdicts)."""
    out = []
    if "ppo" in stats:
        ppo = stats["ppo"]
        for name in ("ppo_pp", "drpo"):
            if name in stats:
                s = stats[name]
                out.append(f"- Claim: {NAMES[name]} beats PPO in held-out reward at equal or lower KL. Here: reward "
                           f"{fmt(s['reward'])} vs {fmt(ppo['reward'])} ({_better(s['reward'], ppo['reward'])}), KL "
                           f"{fmt(s['kl'], 2)} vs {fmt(ppo['kl'], 2)} ({_better(s['kl'], ppo['kl'])}).")
    for cheap in ("rebel", "apo"):
        if cheap not in stats:
            continue
        s = stats[cheap]
        for other in ("ppo", "grpo"):
            if other in stats:
                o = stats[other]
                cost = total_seconds(s)
                out.append(f"- Claim: {NAMES[cheap]} is cheaper than {NAMES[other]}. Here, for the same samples: "
                           f"training "
                           f"{fmt(cost, 0)} s vs {fmt(total_seconds(o), 0)} s ({_better(cost, total_seconds(o))})"
                           + (f" (of which stage 1: {s['stage1_seconds'][0]:.0f} s)"
                              if s['stage1_seconds'][0] > 0 else "")
                           + f", peak memory {fmt(s['peak_memory_gb'], 2)} vs {fmt(o['peak_memory_gb'], 2)} GB "
                           f"({_better(s['peak_memory_gb'], o['peak_memory_gb'])}).")
    return out


def plot(per_algorithm: dict, output_dir: str) -> list:
    """reward vs samples, vs training seconds, and vs KL; mean over seeds with a +-1 SE band. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x, label, fname in (("samples", "generated training samples", "reward_vs_samples.png"),
                            ("seconds", "training seconds (A*-PO: with stage 1)", "reward_vs_seconds.png"),
                            ("kl", "KL to the reference (nats, held-out)", "reward_vs_kl.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, runs in per_algorithm.items():
            xs, ys, se = curve(runs, x, "reward")
            ax.plot(xs, ys, marker="o", label=NAMES.get(name, name))
            ax.fill_between(xs, ys - se, ys + se, alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out reward")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(output_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def report(args: Args, total_seconds: float | None = None) -> str:
    per_algorithm = {}
    for name in args.algorithms:
        runs = [read_run(os.path.join(args.output_dir, f"{name}__{seed}")) for seed in args.seeds
                if os.path.exists(os.path.join(args.output_dir, f"{name}__{seed}", "metrics.jsonl"))]
        runs = [r for r in runs if r["points"] and r["iterations"] > 0]
        if runs:
            per_algorithm[name] = runs
    if not per_algorithm:
        raise SystemExit(f"[compare] no finished runs in {args.output_dir}")
    stats = {name: aggregate(runs) for name, runs in per_algorithm.items()}
    budget = f"{args.samples} generated samples" if args.budget == "samples" else f"{args.seconds:.0f} s of training"
    text = "\n".join([
        f"Budget per run: {budget}; seeds {', '.join(map(str, args.seeds))}; {args.num_eval_prompts} held-out prompts; "
        f"extra flags: `{args.extra or '(none)'}`. Mean ± standard error over seeds; reference (before training) "
        f"reward {fmt(next(iter(stats.values()))['reference_reward'])}.", "",
        results_table(stats), "",
        "What this run shows, beside the papers' claims (a difference counts when it exceeds 2 standard errors):",
        *findings(stats)])
    if total_seconds is not None:
        text += f"\n\nWhole comparison: {total_seconds / 60:.1f} min."
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "stats": stats, "runs": per_algorithm}, f, indent=1)
    try:
        written = plot(per_algorithm, args.output_dir)
    except ImportError:
        written = []
        print("[compare] matplotlib is not installed: no plots (pip install matplotlib)")
    print(text + "\n\n[compare] written: " + ", ".join([os.path.join(args.output_dir, "results.md"), "results.json",
                                                        *map(os.path.basename, written)]))
    return text


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    unknown = [a for a in args.algorithms if not os.path.exists(os.path.join(ROOT, f"{a}.py"))]
    if unknown:
        raise SystemExit(f"[compare] unknown algorithm(s) {unknown}; choose from {' '.join(ALGORITHMS)}")
    start = time.time()
    failed = []
    if not args.report_only:
        for seed in args.seeds:
            for name in args.algorithms:
                if run_one(name, seed, args)["returncode"] != 0:
                    failed.append(f"{name} seed {seed}")
    report(args, None if args.report_only else time.time() - start)
    if failed:
        raise SystemExit(f"[compare] failed runs (see {args.output_dir}/logs): {', '.join(failed)}")
