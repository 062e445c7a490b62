"""Do resets help, and how does the help grow with the horizon? The six files on the lock task with the pocket model.

    python benchmark/resets.py              # make resets: 4 horizons, PPO/PPO++/DR-PO x 10 seeds, GRPO/REBEL/A*-PO
                                            # x 5 seeds at 2 horizons (about an hour on 2 CPU cores)
    python benchmark/resets.py --quick      # make resets-quick: horizons 4 and 8, PPO/PPO++/DR-PO x 3 seeds (minutes)
    python benchmark/resets.py --report_only                      # aggregate the runs already there again

The setting, fixed before any RL run (benchmark/README.md, "Resets on the lock task", has the prediction):
1. The reference: the pocket model (`--model_name pocket`) trained with `sft.py` on demonstrations of every horizon
   written by a teacher that does not know `--hidden_fraction` of the 100 addition facts and guesses a digit for
   them (common/lock.py, `guessing_teacher`). It knows the rule elsewhere, so its per-step accuracy p is about the
   same at every step and every horizon, and the right digit stays among its samples. (sft.py on a few hundred
   correct demonstrations learns the rule perfectly, and stopping it early lands on a knife edge: measured in
   benchmark/README.md.)
2. The calibration: p, and the reference's success from the prompt and from resets at depths 0, H/4, H/2, 3H/4
   beside p^(H-h) (benchmark/calibrate_lock.py).
3. The runs: every algorithm file from that reference on lockH, the same number of generated training samples
   (`--samples`, `--samples_per_iteration` each iteration), held-out greedy success on the same prompts at evenly
   spaced points, each file's default learning rate times `--lr_scale` (chosen from a PPO-only pilot on lock4).
   Launched through benchmark/compare.py's flags (one process per run, forked warm: benchmark/warm.py).
4. The report: per horizon and algorithm, the final held-out success and the samples it took to reach `--target`
   (censored at the budget when never reached), paired by seed with PPO (95% t intervals); the figure of
   success against samples per horizon and of samples-to-target against H.

Written to `--output_dir` (default benchmark/results/resets, or resets_quick): calibration.md, results.md,
results.json, resets_curves.png, resets_scaling.png; the runs and logs under lock{H}/ and reference/.
"""
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmark import compare  # noqa: E402

GROUP = ("grpo", "rebel", "apo")


@dataclass
class Args:
    quick: bool = False
    """the quick version: --horizons 4 8, --seeds 3, no GRPO/REBEL/A*-PO, into benchmark/results/resets_quick"""
    horizons: tuple[int, ...] = (3, 4, 6, 8)
    """lock horizons H (tasks lockH; each a length the reference was trained on)"""
    algorithms: tuple[str, ...] = ("ppo", "ppo_pp", "drpo")
    """the files run at every horizon with --seeds seeds"""
    seeds: int = 10
    """seeds 1..N for --algorithms"""
    others: tuple[str, ...] = GROUP
    """the files run beside them at --other_horizons with --other_seeds seeds"""
    other_seeds: int = 5
    """seeds 1..N for --others"""
    other_horizons: tuple[int, ...] = (4, 8)
    """horizons for --others"""
    samples: int = 2048
    """generated training samples per run"""
    samples_per_iteration: int = 64
    """generated samples per iteration (prompts x responses per prompt) for every file"""
    num_evals: int = 7
    """evaluations during training besides the ones before and after (every samples / (num_evals + 1))"""
    num_eval_prompts: int = 200
    """held-out prompts per evaluation (greedy)"""
    target: float = 0.5
    """the held-out success whose sample cost is reported"""
    lr_scale: float = 10.0
    """each file's default --learning_rate times this (the defaults are for the 135M model)"""
    hidden_fraction: float = 0.3
    """share of the 100 addition facts the reference's teacher does not know"""
    reference_rows: int = 2000
    """teacher demonstrations per horizon for the reference (at most 4000; lock3 has 747)"""
    reference_epochs: int = 12
    """sft.py epochs over them (batch 64, lr 1e-3)"""
    output_dir: str = ""
    """where everything goes (default benchmark/results/resets, or resets_quick with --quick)"""
    rerun: bool = False
    """run again the runs that already finished"""
    report_only: bool = False
    """only aggregate the runs already in --output_dir"""
    calibrate_only: bool = False
    """only train the reference and write its calibration (no RL runs)"""


def settle(args: Args) -> Args:
    """--quick's settings, and the default folder."""
    if args.quick:
        args = replace(args, horizons=(4, 8), seeds=3, others=())
    return replace(args, output_dir=args.output_dir or os.path.join(
        ROOT, "benchmark", "results", "resets_quick" if args.quick else "resets"))


def launch(cmd: list, log_path: str) -> int:
    """Run `python script.py ...` forked warm (all cores), its output into `log_path`; the exit status."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    env.setdefault("WANDB_MODE", "disabled")
    return compare.run_logged(cmd, log_path, env)


def reference(args: Args) -> str:
    """The SFT reference's folder (trained once, kept): the teacher's demonstrations, then sft.py on them."""
    from common.lock import guessing_teacher, lock_rows

    folder = os.path.join(args.output_dir, "reference")
    model = os.path.join(folder, "reference__1", "model")
    if os.path.exists(os.path.join(model, "config.json")):
        return model
    os.makedirs(folder, exist_ok=True)
    demos = os.path.join(folder, "demonstrations.jsonl")
    rows = [r for h in args.horizons  # lock3 has 747 training prompts: all of them
            for r in guessing_teacher(lock_rows(f"lock{h}", "train", None)[:args.reference_rows], args.hidden_fraction)]
    np.random.default_rng(0).shuffle(rows)
    with open(demos, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    h = max(args.horizons)
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), "--model_name", "pocket", "--task", f"lock{h}",
           "--data_files", demos, "--num_eval_prompts", "200", "--eval_batch_size", "200", "--max_response_length",
           str(h + 1), "--epochs", str(args.reference_epochs), "--batch_size", "64", "--micro_batch_size", "64",
           "--learning_rate", "1e-3", "--output_dir", folder, "--exp_name", "reference"]
    print(f"[resets] the reference: sft.py on {len(rows)} teacher demonstrations ({demos})", flush=True)
    if launch(cmd, os.path.join(folder, "sft.log")) != 0:
        raise SystemExit(f"[resets] sft.py failed; see {os.path.join(folder, 'sft.log')}")
    return model


def calibration(args: Args, model_dir: str) -> str:
    """The calibration table of the reference (benchmark/calibrate_lock.py), written to calibration.md/json."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import calibrate_lock

    path = os.path.join(args.output_dir, "calibration.json")
    if not os.path.exists(path):
        calibrate_lock.main(calibrate_lock.Args(model_name=model_dir, horizons=list(args.horizons),
                                                num_prompts=args.num_eval_prompts, output_json=path))
    with open(path) as f:
        text = calibrate_lock.table(json.load(f))
    with open(os.path.join(args.output_dir, "calibration.md"), "w") as f:
        f.write(text + "\n")
    return text


def compare_args(args: Args, name: str, horizon: int) -> compare.Args:
    """benchmark/compare.py's settings for one file at one horizon (its folder: lock{H}/)."""
    lr = compare.parse_script_args(name, []).learning_rate * args.lr_scale
    return compare.Args(algorithms=(name,), task=f"lock{horizon}", sft_rows=0, samples=args.samples,
                        samples_per_iteration=args.samples_per_iteration, num_evals=args.num_evals,
                        num_eval_prompts=args.num_eval_prompts, output_dir=os.path.join(args.output_dir,
                                                                                          f"lock{horizon}"),
                        extra=f"--response_length {horizon + 2} --micro_batch_size 32 --eval_batch_size 200 "
                              f"--eval_samples 0 --learning_rate {lr:g}", rerun=args.rerun)


def run(args: Args, name: str, seed: int, horizon: int, model_dir: str) -> bool:
    """One run (kept when it finished before); its wall time and exit status go to lock{H}/logs/{name}__{seed}.json."""
    cargs = compare_args(args, name, horizon)
    logs = os.path.join(cargs.output_dir, "logs")
    done_path = os.path.join(logs, f"{name}__{seed}.json")
    if os.path.exists(done_path) and not args.rerun and json.load(open(done_path))["returncode"] == 0:
        return True
    os.makedirs(logs, exist_ok=True)
    flags, iterations = compare.run_flags(name, seed, cargs, model_dir)
    cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), *flags]
    start = time.time()
    code = launch(cmd, os.path.join(logs, f"{name}__{seed}.log"))
    with open(done_path, "w") as f:
        json.dump({"algorithm": name, "seed": seed, "returncode": code, "wall_seconds": time.time() - start,
                   "iterations": iterations, "command": cmd}, f, indent=1)
    print(f"[resets] lock{horizon} {name} seed {seed}: " + ("done" if code == 0 else f"FAILED (exit {code})")
          + f" in {time.time() - start:.0f} s", flush=True)
    return code == 0


def plan(args: Args) -> list:
    """(seed, horizon, file) for every run, seeds outermost, so a stopped run has whole seeds."""
    out = []
    for seed in range(1, max(args.seeds, args.other_seeds if args.others else 0) + 1):
        for horizon in args.horizons:
            out += [(seed, horizon, name) for name in args.algorithms if seed <= args.seeds]
            out += [(seed, horizon, name) for name in args.others
                    if seed <= args.other_seeds and horizon in args.other_horizons]
    return out


# aggregation: pure functions of the runs' metrics (tested on hand-made curves)
def samples_to(points: list, target: float) -> tuple[float, bool]:
    """The samples at which the curve first reaches `target` (linear interpolation between evaluations), and whether
    it did; a curve that never does is censored at its last point's samples."""
    for a, b in zip(points, points[1:]):
        if a["accuracy"] >= target:
            return float(a["samples"]), True
        if b["accuracy"] >= target:
            frac = (target - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
            return float(a["samples"] + frac * (b["samples"] - a["samples"])), True
    last = points[-1]
    return float(last["samples"]), last["accuracy"] >= target


def collect(args: Args) -> dict:
    """{horizon: {name: {seed: read_run()}}} for the finished runs."""
    out = {}
    for horizon in args.horizons:
        folder = os.path.join(args.output_dir, f"lock{horizon}")
        for name in (*args.algorithms, *args.others):
            for seed in range(1, max(args.seeds, args.other_seeds) + 1):
                run_dir = os.path.join(folder, f"{name}__{seed}")
                if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                    r = compare.read_run(run_dir, os.path.join(folder, "logs", f"{name}__{seed}.json"))
                    if r["points"] and r["iterations"] > 0:
                        out.setdefault(horizon, {}).setdefault(name, {})[seed] = r
    return out


def summarize(runs: dict, target: float, baseline: str = "ppo") -> list:
    """One row per (horizon, file): start and final success, samples to `target`, differences from `baseline`."""
    rows = []
    for horizon, per_name in sorted(runs.items()):
        base = per_name.get(baseline, {})
        for name, seeds in per_name.items():
            final = {s: r["points"][-1]["accuracy"] for s, r in seeds.items()}
            reach = {s: samples_to(r["points"], target) for s, r in seeds.items()}
            row = {"horizon": horizon, "algorithm": name, "seeds": sorted(seeds),
                   "start": compare.mean_se([r["points"][0]["accuracy"] for r in seeds.values()]),
                   "final": compare.mean_se(list(final.values())),
                   "reached": sum(ok for _, ok in reach.values()),
                   "samples_to_target": float(np.median([n for n, _ in reach.values()])),
                   "seconds_per_iter": compare.mean_se([r["seconds_per_iter"] for r in seeds.values()])}
            shared = sorted(set(seeds) & set(base))
            if name != baseline and shared:
                b_final = {s: base[s]["points"][-1]["accuracy"] for s in shared}
                b_reach = {s: samples_to(base[s]["points"], target)[0] for s in shared}
                row["final_minus_baseline"] = compare.paired_ci([final[s] - b_final[s] for s in shared])
                # censored runs count at the budget: a lower bound on how much longer they would take
                row["samples_minus_baseline"] = compare.paired_ci([reach[s][0] - b_reach[s] for s in shared])
            rows.append(row)
    return rows


def results_table(rows: list, target: float, budget: int) -> str:
    lines = [f"| H | algorithm | seeds | reference success | final success | minus PPO, per seed (95% CI) | verdict | "
             f"runs reaching {target:.0%} | median samples to {target:.0%} | minus PPO (95% CI) | s / iteration |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("final_minus_baseline")
        sdiff = r.get("samples_minus_baseline")
        median = (f"{r['samples_to_target']:.0f}" if r["reached"] * 2 > len(r["seeds"])
                  else f"> {budget} (censored)")
        lines.append(f"| {r['horizon']} | {compare.NAMES.get(r['algorithm'], r['algorithm'])} | {len(r['seeds'])} | "
                     f"{compare.fmt(r['start'])} | {compare.fmt(r['final'])} | "
                     f"{compare.fmt_ci(diff) if diff else '-'} | {compare.verdict(diff) if diff else '-'} | "
                     f"{r['reached']}/{len(r['seeds'])} | {median} | {compare.fmt_ci(sdiff, 0) if sdiff else '-'} | "
                     f"{compare.fmt(r['seconds_per_iter'], 2)} |")
    return "\n".join(lines)


def plot(runs: dict, rows: list, args: Args) -> list:
    """resets_curves.png (held-out success against samples, a panel per horizon, mean +- SE over seeds) and
    resets_scaling.png (against H: the success gained within the budget, and the median samples to the target,
    censored at the budget: open markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*args.algorithms, *args.others]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    horizons = sorted(runs)
    fig, axes = plt.subplots(1, len(horizons), figsize=(3.6 * len(horizons), 3.4), sharey=True, squeeze=False)
    for ax, horizon in zip(axes[0], horizons):
        for name, seeds in runs[horizon].items():
            xs, ys, se = compare.curve(list(seeds.values()), "samples", "accuracy")
            ax.plot(xs, ys, marker=".", color=colors[name], label=f"{compare.NAMES.get(name, name)} ({len(seeds)})")
            ax.fill_between(xs, ys - se, ys + se, alpha=0.2, color=colors[name])
        ax.axhline(args.target, color="gray", lw=0.8, ls=":")
        ax.set_title(f"lock{horizon}")
        ax.set_xlabel("generated training samples")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out success (greedy)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    curves = os.path.join(args.output_dir, "resets_curves.png")
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, (gain_ax, ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in names:
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        hs = [r["horizon"] for r in mine]
        gains = [r["final"][0] - r["start"][0] for r in mine]
        gain_ax.errorbar(hs, gains, yerr=[1.96 * (r["final"][1] if r["final"][1] == r["final"][1] else 0)
                                          for r in mine], marker="o", capsize=3, color=colors[name],
                         label=compare.NAMES.get(name, name))
        ax.plot(hs, [r["samples_to_target"] for r in mine], color=colors[name], label=compare.NAMES.get(name, name))
        for r in mine:
            censored = r["reached"] * 2 <= len(r["seeds"])
            ax.plot(r["horizon"], r["samples_to_target"], "o", color=colors[name],
                    markerfacecolor="white" if censored else colors[name])
    gain_ax.axhline(0, color="gray", lw=0.8)
    gain_ax.set_xlabel("horizon H (dependent steps)")
    gain_ax.set_ylabel(f"held-out success gained in {args.samples} samples")
    gain_ax.set_title("mean over seeds, +-1.96 SE", fontsize=9)
    gain_ax.grid(alpha=0.3)
    gain_ax.legend(fontsize=8)
    ax.axhline(args.samples, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("horizon H (dependent steps)")
    ax.set_ylabel(f"median samples to {args.target:.0%} held-out success")
    ax.set_title("open markers: most seeds never reached it (censored at the budget)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scaling = os.path.join(args.output_dir, "resets_scaling.png")
    fig.savefig(scaling, dpi=120)
    plt.close(fig)
    return [curves, scaling]


def report(args: Args, total_seconds: float | None = None) -> str:
    runs = collect(args)
    if not runs:
        raise SystemExit(f"[resets] no finished runs in {args.output_dir}")
    rows = summarize(runs, args.target)
    text = "\n".join([
        f"Lock horizons {', '.join(map(str, sorted(runs)))}; the reference of calibration.md; {args.samples} generated "
        f"training samples per run, {args.samples_per_iteration} per iteration; each file's default learning rate x "
        f"{args.lr_scale:g}; {args.num_eval_prompts} held-out prompts, greedy, {args.num_evals + 2} evaluations per "
        "run. Mean ± standard error over seeds; differences from PPO are per seed (paired) with a 95% t interval; a "
        f"run that never reaches {args.target:.0%} counts at the budget (so its difference is a lower bound).", "",
        results_table(rows, args.target, args.samples)])
    if total_seconds is not None:
        text += f"\n\nWhole run: {total_seconds / 60:.1f} min."
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows,
                   "runs": {h: {n: {s: r["points"] for s, r in v.items()} for n, v in per.items()}
                            for h, per in runs.items()}}, f, indent=1)
    try:
        written = plot(runs, rows, args)
    except ImportError:
        written = []
        print("[resets] matplotlib is not installed: no figures (pip install matplotlib)")
    print(text + "\n\n[resets] written: " + ", ".join(
        [os.path.join(args.output_dir, "results.md"), "results.json", *map(os.path.basename, written)]))
    return text


def main(args: Args) -> None:
    args = settle(args)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    failed = []
    if not args.report_only:
        model_dir = reference(args)
        calibration(args, model_dir)
        print(f"[resets] the reference's calibration: {os.path.join(args.output_dir, 'calibration.md')}", flush=True)
        if args.calibrate_only:
            return
        todo = plan(args)
        for i, (seed, horizon, name) in enumerate(todo):
            if not run(args, name, seed, horizon, model_dir):
                failed.append(f"lock{horizon} {name} seed {seed}")
            if (i + 1) % 10 == 0:
                elapsed = time.time() - start
                print(f"[resets] {i + 1}/{len(todo)} runs, {elapsed / 60:.1f} min", flush=True)
    report(args, None if args.report_only else time.time() - start)
    if failed:
        raise SystemExit(f"[resets] failed runs (logs under {args.output_dir}/lock*/logs): {', '.join(failed)}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
