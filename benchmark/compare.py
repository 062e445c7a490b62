"""The algorithm files side by side: same task, model, seeds and sample budget; paired differences with confidence
intervals, at equal generated samples and at equal training seconds; learning curves and the reward-KL frontier.

    python benchmark/compare.py                      # the resets question: PPO, PPO++, DR-PO on chain3, 5 seeds
    python benchmark/compare.py --algorithms grpo rebel apo       # the other three beside them, same folder
    python benchmark/compare.py --algorithms ppo ppo_pp drpo grpo rebel apo --report_only     # all six in one table
    python benchmark/compare.py --task arith --sft_rows 0 --samples 128 --extra="--response_length 24"
    python benchmark/compare.py --extra="--model_name Qwen/Qwen2.5-0.5B-Instruct --task gsm8k" \\
        --launcher="accelerate launch --config_file configs/ddp.yaml"    # on GPUs
    python benchmark/compare.py --report_only        # aggregate the runs already there again

The default answers the resets question on the hard task: chain3 (chosen from benchmark/calibrate_chain.py's
table before any RL run), every run starting from one `sft.py` model trained on 32 worked solutions (the
papers start from SFT; from the base model nothing is ever right from the prompt), 80 samples of 16 per
iteration, bf16 autocast; 85 minutes measured on 2 CPU cores.

Every (seed, algorithm) run is its own process (`{output_dir}/{algorithm}__{seed}`, log in
`{output_dir}/logs/`), run one after another, seeds in the outer loop, so a stopped comparison has
whole seeds; a finished run is not run again (pass --rerun). Every algorithm generates the same
number of training samples (responses scored in training; A*-PO's stage-1 reference samples are
extra, and their seconds are charged to it) and evaluates the same held-out prompts before
training, `--num_evals` times during it and after it: the learning curves.

Paired by seed: a seed fixes the model, the held-out prompts and the first training draws for every
algorithm, so each algorithm is compared with `--baseline` through its per-seed differences, with a
95% t confidence interval over the seeds. Two readings of the same runs:
- equal samples: the last evaluation of each run (all saw the same number of samples);
- equal seconds: each run's curve read (linear interpolation) at S, the training seconds of the
  fastest algorithm (its mean over seeds, A*-PO's stage 1 included): what each reaches in S seconds.

Written to the output folder: results.md, results.json, and the plots accuracy_vs_samples.png,
accuracy_vs_seconds.png, reward_vs_kl.png (mean over seeds, band = +-1 SE).
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ALGORITHMS = ("ppo", "ppo_pp", "drpo", "grpo", "rebel", "apo")
NAMES = {"ppo": "PPO", "ppo_pp": "PPO++", "drpo": "DR-PO", "rebel": "REBEL", "apo": "A*-PO", "grpo": "GRPO",
         "grpo_reset": "GRPO-reset"}
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086]  # Student t quantiles (97.5%) for 1..20 degrees of freedom


@dataclass
class Args:
    algorithms: tuple[str, ...] = ("ppo", "ppo_pp", "drpo")
    """algorithm files to compare (without .py); the default answers the resets question in 85 minutes on 2
    CPU cores; `--algorithms grpo rebel apo` with the same flags adds the other three to the same folder
    (64 minutes more; six files in one run would not fit 90 minutes)"""
    baseline: str = "ppo"
    """the algorithm every other one is compared with, seed by seed"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """seeds; every algorithm runs once per seed"""
    task: str = "chain3"
    """the task (--task of the algorithm files)"""
    sft_rows: int = 32
    """start every run from `sft.py` on the first N training demonstrations of --task (one SFT run, shared by
    every algorithm and seed, in {output_dir}/sft__1, kept: delete it after changing this); 0: the model itself"""
    samples: int = 80
    """generated training samples per run (rounded to whole iterations)"""
    samples_per_iteration: int = 16
    """generated samples per iteration for every file (its prompts per iteration = this / its responses per
    prompt), so all take the same iterations and evaluate at the same points; 0: each file's own"""
    num_evals: int = 5
    """evaluations during training, evenly spaced, besides the ones before and after (the curves' points)"""
    num_eval_prompts: int = 32
    """held-out prompts per evaluation"""
    extra: str = "--response_length 48 --eval_samples 1 --mixed_precision bf16"
    """flags for the algorithm files (use the = form: --extra="..."); a group's flags (--grpo.x, --ppo.x,
    --rebel.x, --apo.x) reach only the files that have that group. bf16 autocast on CPU: 1.5x faster than fp32
    on a CPU with AVX512-BF16 or AMX (drop it elsewhere)"""
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
    """`flags` without the group flags the file does not have (--grpo.x reaches grpo.py only, --ppo.x the PPO
    family, --ppo.reset_prob only the files with resets)."""
    import dataclasses

    groups = {f.name: f for f in dataclasses.fields(__import__(name).Args)}
    out, keep = [], True
    for token in flags:
        if token.startswith("--"):
            flag = token[2:].split("=")[0]
            group, _, key = flag.partition(".")
            keep = not key or (group in groups and key in {
                f.name for f in dataclasses.fields(groups[group].default_factory())})
        if keep:
            out.append(token)
    return out


def responses_per_prompt(name: str, script_args) -> int:
    """Generated training samples per prompt: GRPO's group, REBEL's pair, one for the others."""
    group = lambda a: a.grpo.num_generations  # noqa: E731
    return {"grpo": group, "grpo_reset": group, "rebel": lambda a: 2}.get(name, lambda a: 1)(script_args)


def run_logged(cmd: list, log_path: str, env: dict | None = None) -> int:
    """Run `cmd` from the project root with `env` (default: this process's), its output into `log_path`; the exit
    status. `python script.py ...` is forked from a process that has already imported torch and transformers
    (benchmark/warm.py: a few seconds less a run); another launcher (--launcher) runs as a subprocess."""
    from benchmark import warm

    env = dict(os.environ) if env is None else env
    if warm.can_run(cmd):
        done = warm.Started(cmd, ROOT, env).wait()
        with open(log_path, "w") as f:
            f.write(done.stdout + done.stderr)
        return done.returncode
    with open(log_path, "w") as log:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def sft_model(args: Args) -> str:
    """The folder of the SFT start every run shares (empty without --sft_rows): `sft.py` on the first
    --sft_rows training demonstrations, run once (kept when it is there)."""
    if args.sft_rows <= 0:
        return ""
    path = os.path.join(args.output_dir, "sft__1", "model")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    script = parse_script_args("ppo", flags_for("ppo", ["--task", args.task, *shlex.split(args.extra)]))
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), "--task", args.task, "--model_name", script.model_name,
           "--num_train_rows", str(args.sft_rows), "--max_response_length", str(script.response_length),
           "--batch_size", str(min(16, args.sft_rows)), "--micro_batch_size", str(min(16, args.sft_rows)),
           "--num_eval_prompts", str(args.num_eval_prompts), "--output_dir", args.output_dir, "--exp_name", "sft"]
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    log_path = os.path.join(args.output_dir, "logs", "sft.log")
    print(f"[compare] the SFT start: {' '.join(shlex.quote(c) for c in cmd[1:])}\n          log: {log_path}",
          flush=True)
    if run_logged(cmd, log_path) != 0:
        raise SystemExit(f"[compare] sft.py failed; the last lines of {log_path}:\n"
                         + "".join(open(log_path).readlines()[-15:]))
    return path


def run_flags(name: str, seed: int, args: Args, start_model: str = "") -> tuple[list, int]:
    """The flags of one run and its number of iterations under the budget (from `start_model` when given)."""
    flags = flags_for(name, ["--task", args.task, *shlex.split(args.extra)])
    flags += ["--model_name", start_model] if start_model else []
    script_args = parse_script_args(name, flags)
    per_prompt = responses_per_prompt(name, script_args)
    if args.samples_per_iteration:
        if args.samples_per_iteration % per_prompt:
            raise SystemExit(f"[compare] --samples_per_iteration {args.samples_per_iteration} is not a multiple of "
                             f"{name}.py's {per_prompt} responses per prompt")
        flags += ["--prompts_per_iteration", str(args.samples_per_iteration // per_prompt)]
        script_args = parse_script_args(name, flags)
    iterations = max(1, round(args.samples / (script_args.prompts_per_iteration * per_prompt)))
    eval_every = max(1, iterations // (args.num_evals + 1)) if args.num_evals > 0 else 0
    return flags + ["--seed", str(seed), "--exp_name", name, "--output_dir", args.output_dir, "--num_eval_prompts",
                    str(args.num_eval_prompts), "--num_iterations", str(iterations), "--eval_every",
                    str(eval_every)], iterations


def run_one(name: str, seed: int, args: Args, start_model: str = "") -> dict:
    """Run one algorithm file for one seed; its wall time and exit code go to logs/{name}__{seed}.json."""
    done_path = os.path.join(args.output_dir, "logs", f"{name}__{seed}.json")
    if os.path.exists(done_path) and not args.rerun:
        with open(done_path) as f:
            done = json.load(f)
        if done["returncode"] == 0:
            print(f"[compare] {name} seed {seed}: finished before, kept ({done_path})", flush=True)
            return done
    flags, iterations = run_flags(name, seed, args, start_model)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = launcher + [os.path.join(ROOT, f"{name}.py")] + flags
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    log_path = os.path.join(args.output_dir, "logs", f"{name}__{seed}.log")
    print(f"[compare] {name} seed {seed}: {' '.join(shlex.quote(c) for c in cmd[1:])}\n"
          f"          log: {log_path}", flush=True)
    start = time.time()
    returncode = run_logged(cmd, log_path)
    done = {"algorithm": name, "seed": seed, "returncode": returncode, "wall_seconds": time.time() - start,
            "iterations": iterations, "command": cmd}
    with open(done_path, "w") as f:
        json.dump(done, f, indent=1)
    status = ("done" if returncode == 0 else
              f"FAILED (exit {returncode}); the last lines of {log_path}:\n"
              + "".join(open(log_path).readlines()[-15:]))
    print(f"[compare] {name} seed {seed}: {status} in {done['wall_seconds']:.0f} s", flush=True)
    return done


# aggregation: pure functions of the runs' metrics.jsonl (tested on hand-made files)
METRICS = ("reward", "accuracy", "kl", "win_rate", "pass@1", "pass@8", "sample_reward")


def read_run(run_dir: str, done_path: str = "") -> dict:
    """One run's evaluation curve and speed: eval points (step, samples, training seconds, the eval metrics) from
    metrics.jsonl, the median speed over iterations after the first, peak memory, wall time."""
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
            **{k: r.get(f"eval/{k}", float("nan")) for k in METRICS}})
    speed = [train[s] for s in sorted(train)][1:] or list(train.values())  # the first iteration warms up
    out = {"points": points, "iterations": len(train), "stage1_seconds": stage1,
           "train_seconds": stage1 + sum(t["perf/seconds_per_iter"] for t in train.values()),
           "seconds_per_iter": (float(np.median([t["perf/seconds_per_iter"] for t in speed])) if speed
                                else float("nan")),
           "peak_memory_gb": max((t["perf/peak_memory_gb"] for t in train.values()), default=float("nan"))}
    out["wall_seconds"] = json.load(open(done_path))["wall_seconds"] if os.path.exists(done_path) else float("nan")
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; SE is nan for fewer than two."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def paired_ci(differences) -> tuple[float, float, float]:
    """Mean of per-seed differences and its 95% t confidence interval (low, high); nan bounds for one seed."""
    d = np.array([x for x in differences if not math.isnan(x)], dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(d) == 1:
        return float(d[0]), float("nan"), float("nan")
    half = T_975[min(len(d) - 2, len(T_975) - 1)] * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def value_at(run: dict, x: str, at: float, y: str) -> float:
    """The run's curve y(x) read at x = `at` by linear interpolation between its evaluations (the last one beyond)."""
    xs = [p[x] for p in run["points"]]
    ys = [p[y] for p in run["points"]]
    return float(np.interp(at, xs, ys))


def curve(runs: list, x: str, y: str):
    """Mean x, mean y and SE of y per evaluation index, over the runs (truncated to the shortest run)."""
    n = min(len(r["points"]) for r in runs)
    xs = [float(np.mean([r["points"][i][x] for r in runs])) for i in range(n)]
    ys = [mean_se([r["points"][i][y] for r in runs]) for i in range(n)]
    return np.array(xs), np.array([m for m, _ in ys]), np.array([0.0 if math.isnan(s) else s for _, s in ys])


def summarize(per_algorithm: dict, baseline: str) -> dict:
    """Per algorithm: final metrics (mean, SE), accuracy at the common seconds S, cost; and the paired differences
    from `baseline` at equal samples and at equal seconds. `per_algorithm` maps a name to {seed: read_run()}."""
    seconds = {name: mean_se([r["train_seconds"] for r in runs.values()])[0] for name, runs in per_algorithm.items()}
    common = min(seconds.values())
    stats = {}
    for name, runs in per_algorithm.items():
        final = {k: mean_se([r["points"][-1][k] for r in runs.values()]) for k in METRICS}
        final.update({"reference": mean_se([r["points"][0]["accuracy"] for r in runs.values()]),
                      "samples": runs[next(iter(runs))]["points"][-1]["samples"], "seeds": sorted(runs),
                      "accuracy_at_S": mean_se([value_at(r, "seconds", common, "accuracy") for r in runs.values()]),
                      **{k: mean_se([r[k] for r in runs.values()]) for k in
                         ("train_seconds", "stage1_seconds", "seconds_per_iter", "peak_memory_gb", "wall_seconds")}})
        stats[name] = final
    paired = {}
    base = per_algorithm.get(baseline, {})
    for name, runs in per_algorithm.items():
        seeds = sorted(set(runs) & set(base))
        if name == baseline or not seeds:
            continue
        paired[name] = {
            "seeds": seeds,
            "samples": paired_ci([runs[s]["points"][-1]["accuracy"] - base[s]["points"][-1]["accuracy"]
                                  for s in seeds]),
            "seconds": paired_ci([value_at(runs[s], "seconds", common, "accuracy")
                                  - value_at(base[s], "seconds", common, "accuracy") for s in seeds]),
            "kl": paired_ci([runs[s]["points"][-1]["kl"] - base[s]["points"][-1]["kl"] for s in seeds])}
    return {"stats": stats, "paired": paired, "common_seconds": common}


def fmt(m_se, digits=3) -> str:
    m, s = m_se
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_ci(ci, digits=3) -> str:
    m, lo, hi = ci
    if math.isnan(m):
        return "-"
    return f"{m:+.{digits}f}" + ("" if math.isnan(lo) else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]")


def verdict(ci) -> str:
    """'better' / 'worse' when the 95% interval excludes 0, else 'no difference shown'."""
    _, lo, hi = ci
    if math.isnan(lo):
        return "one seed: no interval"
    return "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"


def results_table(summary: dict) -> str:
    """The Markdown tables: per algorithm, then the paired differences from the baseline."""
    s_common = summary["common_seconds"]
    lines = ["| algorithm | seeds | samples | held-out accuracy | pass@1 (sampled) | KL to ref | win rate | "
             f"accuracy at {s_common:.0f} s | training s (+ stage 1) | s / iteration | peak memory GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["stats"].items():
        lines.append(f"| {NAMES.get(name, name)} | {len(s['seeds'])} | {s['samples']:.0f} | {fmt(s['accuracy'])} | "
                     f"{fmt(s['pass@1'])} | {fmt(s['kl'], 2)} | {fmt(s['win_rate'])} | {fmt(s['accuracy_at_S'])} | "
                     f"{fmt(s['train_seconds'], 0)} | {fmt(s['seconds_per_iter'], 1)} | "
                     f"{fmt(s['peak_memory_gb'], 2)} |")
    if summary["paired"]:
        lines += ["", "| minus the baseline, per seed | seeds | accuracy, equal samples (95% CI) | verdict | "
                  f"accuracy at {s_common:.0f} s (95% CI) | verdict | KL (95% CI) |", "|---|---|---|---|---|---|---|"]
        for name, p in summary["paired"].items():
            lines.append(f"| {NAMES.get(name, name)} | {len(p['seeds'])} | {fmt_ci(p['samples'])} | "
                         f"{verdict(p['samples'])} | {fmt_ci(p['seconds'])} | {verdict(p['seconds'])} | "
                         f"{fmt_ci(p['kl'], 2)} |")
    return "\n".join(lines)


def plot(per_algorithm: dict, output_dir: str) -> list:
    """Accuracy vs samples and vs training seconds, and reward vs KL; mean over seeds with a +-1 SE band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x, y, xlabel, fname in (
            ("samples", "accuracy", "generated training samples", "accuracy_vs_samples.png"),
            ("seconds", "accuracy", "training seconds (A*-PO: with stage 1)", "accuracy_vs_seconds.png"),
            ("kl", "reward", "KL to the reference (nats, held-out, sampled)", "reward_vs_kl.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, runs in per_algorithm.items():
            xs, ys, se = curve(list(runs.values()), x, y)
            ax.plot(xs, ys, marker="o", label=NAMES.get(name, name))
            ax.fill_between(xs, ys - se, ys + se, alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {y}")
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
        runs = {}
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, f"{name}__{seed}")
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                run = read_run(run_dir, os.path.join(args.output_dir, "logs", f"{name}__{seed}.json"))
                if run["points"] and run["iterations"] > 0:
                    runs[seed] = run
        if runs:
            per_algorithm[name] = runs
    if not per_algorithm:
        raise SystemExit(f"[compare] no finished runs in {args.output_dir}")
    summary = summarize(per_algorithm, args.baseline)
    reference = next(iter(summary["stats"].values()))["reference"]
    text = "\n".join([
        f"Task {args.task}; start: "
        + (f"`sft.py` on {args.sft_rows} demonstrations; " if args.sft_rows > 0 else "the model itself; ")
        + f"{args.samples} generated training samples per run"
        + (f", {args.samples_per_iteration} per iteration" if args.samples_per_iteration else "") + "; seeds "
        f"{', '.join(map(str, args.seeds))}; {args.num_eval_prompts} held-out prompts, {args.num_evals + 2} "
        f"evaluations per run; extra flags: `{args.extra or '(none)'}`. Mean ± standard error over seeds; "
        f"held-out accuracy before training {fmt(reference)}. Differences from {NAMES.get(args.baseline)} are "
        "per seed (paired), with a 95% t interval over seeds; a verdict needs the interval to exclude 0.", "",
        results_table(summary)])
    if total_seconds is not None:
        text += f"\n\nWhole comparison: {total_seconds / 60:.1f} min."
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "runs": per_algorithm}, f, indent=1)
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
        start_model = sft_model(args)
        for seed in args.seeds:
            for name in args.algorithms:
                if run_one(name, seed, args, start_model)["returncode"] != 0:
                    failed.append(f"{name} seed {seed}")
    report(args, None if args.report_only else time.time() - start)
    if failed:
        raise SystemExit(f"[compare] failed runs (see {args.output_dir}/logs): {', '.join(failed)}")
