"""The GPU table in one command: the six files' speed, the 1.7B shape's time and memory, and a learning check.

    python benchmark/gpu_report.py                   # make gpu-report: parts 1-4 on one GPU, within 8 minutes
    python benchmark/gpu_report.py --parts 1 3       # some parts only
    python benchmark/gpu_report.py --smoke           # every part on tiny models on CPU, about a minute

The parts, each with its own time cap (--part1_seconds ...: 150 + 150 + 120 s for parts 1, 2, and 3 and 4 side by
side; 7 minutes, plus the set-up: converting the packaged model once, building the random 1.7B one):
1. each algorithm file's seconds per iteration at bench.py's default shape (the file's own defaults, the packaged
   SmolLM2-135M-Instruct), bf16 and fp32 (--mixed_precision bf16 | no), static and plain sampler (--sampler);
2. grpo.py at the 1.7B shape (random weights, memory_model.py's SHAPES) with 16 prompts x 8 samples x 128 tokens,
   micro-batch 32: seconds per iteration split into sampling and the rest, peak memory, plain against static
   sampler, and the iteration over bench.py's floor;
3. the peak memory of that shape with full training, --lora_r 16 and --gradient_checkpointing, beside
   memory_model.py's prediction of each;
4. grpo.py and drpo.py with their defaults on arith, seed 1: held-out accuracy before and after (it runs beside
   part 3, whose measure is memory, not time).
Parts 1 and 2 run one script at a time, so their timings are each run alone on the device.

Every run is the script's own command line (bench.py's script_command, and for part 4 the script's defaults), forked
from a process that has already imported torch and transformers (benchmark/warm.py; --no_warm: plain subprocesses).
Timings are bench.py's: medians of the script's perf metrics over the iterations after the first. A part that
reaches its cap ends the run in progress, keeps what finished and says "cut short at N s"; report.md and
report.json are written again after every run, so a command stopped from outside (the device's limit) leaves what
it had.

Written to --output_dir (default benchmark/results/gpu; runs/gpu_report/smoke with --smoke): report.md (a header
with the device, torch and transformers versions, git commit, date and the exact command; a table per part) and
report.json (the same, raw). The scripts' run folders (their saved models deleted), logs, the random models and
apo.py's stage-1 cache go to --work_dir. Parts 1 and 4 need the packaged model offline (`make install`).
"""
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import torch
import transformers
import tyro
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import bench  # noqa: E402
import memory_model  # noqa: E402
from benchmark import warm  # noqa: E402
from common.models import EMBEDDED_MODEL, load_tokenizer, resolve_model  # noqa: E402

SCRIPTS = ("grpo", "ppo", "ppo_pp", "drpo", "rebel", "apo")
PRECISION = {"bf16": "bf16", "fp32": "no"}  # the report's name -> --mixed_precision
VARIANTS = (("bf16", "static"), ("bf16", "plain"), ("fp32", "plain"), ("fp32", "static"))  # part 1, in run order
# part 2's batch: prompts x samples (GRPO's group) x response tokens, and the micro-batch (--smoke: a small one)
BIG_BATCH = dict(prompts=16, generations=8, response_length=128, micro_batch_size=32)
SMOKE_BATCH = dict(prompts=4, generations=4, response_length=8, micro_batch_size=8)
MEMORY_MODES = (("full", []), ("LoRA r=16", ["--lora_r", "16"]), ("gradient checkpointing",
                                                                  ["--gradient_checkpointing"]))
LEARNING_SCRIPTS = ("grpo", "drpo")
# --smoke's parts 1 and 4: the pocket model (common/pocket.py: 1.2M parameters, a vocabulary of the tasks' words)
SMOKE_FLAGS = ["--model_name", "pocket", "--response_length", "8", "--num_train_prompts", "32"]
TITLES = {1: "Seconds per iteration of the six files", 2: "grpo.py at the large shape: time",
          3: "Peak memory at the large shape: full, LoRA, gradient checkpointing",
          4: "Learning check: grpo.py and drpo.py defaults on arith, seed 1"}


@dataclass
class Args:
    parts: tuple[Literal[1, 2, 3, 4], ...] = (1, 2, 3, 4)
    """the parts to run: 1 the six files' seconds per iteration, 2 grpo.py's time at the 1.7B shape, 3 its peak
    memory (full, LoRA, checkpointing) against memory_model.py, 4 a learning check"""
    smoke: bool = False
    """every part on CPU-sized models with small shapes and 2 iterations: parts 1 and 4 on the pocket model, parts 2
    and 3 on a random 2-layer Llama (hidden 64) built as the 1.7B one is; about a minute on 2 CPU cores (a test of
    this command, not a measurement)"""
    output_dir: str = ""
    """where report.md and report.json go (default benchmark/results/gpu; with --smoke runs/gpu_report/smoke)"""
    work_dir: str = "runs/gpu_report"
    """the scripts' run folders and logs, the random-weight models and apo.py's stage-1 cache"""
    part1_seconds: float = 150
    """time cap of part 1 (24 runs of the 135M model)"""
    part2_seconds: float = 150
    """time cap of part 2 (building the random 1.7B model, then 2 runs)"""
    part3_seconds: float = 120
    """time cap of part 3 (2 runs more: part 2's plain run is the full-training row)"""
    part4_seconds: float = 120
    """time cap of part 4 (2 runs at once, beside part 3)"""
    iterations: int = 3
    """iterations per run of parts 1-3 (the first warms up and is left out of the medians; --smoke: 2)"""
    scripts: tuple[str, ...] = SCRIPTS
    """part 1's algorithm files"""
    model_size: Literal["0.135B", "1.7B", "7B", "70B"] = "1.7B"
    """parts 2 and 3: the Llama shape of memory_model.py built with random weights"""
    warm: bool = True
    """fork each run from a process that has imported torch and transformers (benchmark/warm.py, a few seconds less
    per run); --no_warm: each run a fresh `python script.py` subprocess"""
    bandwidth_gbs: Optional[float] = None
    """memory bandwidth for part 2's floor, GB/s (default: the GPU's from bench.py's DEVICES)"""
    peak_tflops: Optional[float] = None
    """peak TFLOP/s of the compute dtype for part 2's floor (default: the GPU's from bench.py's DEVICES)"""


def settle(args: Args) -> Args:
    """--smoke's settings, the default folders, the parts in order."""
    if args.smoke:
        args = replace(args, iterations=min(args.iterations, 2))
    default = os.path.join(ROOT, "runs", "gpu_report", "smoke") if args.smoke else os.path.join(
        ROOT, "benchmark", "results", "gpu")
    output_dir = args.output_dir or default
    return replace(args, output_dir=output_dir, parts=tuple(sorted(set(args.parts))),
                   work_dir=os.path.abspath(args.work_dir))


def header(args: Args, device: torch.device) -> dict:
    """The machine, the versions, the commit, the date and the command."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    commit = git("rev-parse", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    name = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda" else
            f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT),
                                                                     *sys.argv[1:]])}


# ---------------------------------------------------------------------------------------------------- running a script
def start(cmd: list, use_warm: bool, threads: int):
    """Start `python script.py ...` (forked warm, or a subprocess), offline, with `threads` CPU threads (OpenMP
    threads beyond the free cores spin: on 2 busy cores a tiny model's iteration took 14x longer with 2 than 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    if use_warm:
        return warm.Started(cmd, ROOT, env)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill(started) -> None:
    """End a started run now."""
    if isinstance(started, warm.Started):
        for process in started.processes:
            if process.is_alive():
                process.kill()
    elif started.poll() is None:
        started.kill()


def finish(started, deadline: float, log_path: str) -> Optional[int]:
    """Wait for a started run until `deadline` (time.time()), ending it there; its output into `log_path`. The exit
    status, or None when the deadline ended it."""
    timeout = max(0.0, deadline - time.time())
    try:
        if isinstance(started, warm.Started):
            done = started.wait(timeout)
            code, out = done.returncode, done.stdout + done.stderr
        else:
            out = started.communicate(timeout=timeout)[0]
            code = started.returncode
    except subprocess.TimeoutExpired as e:
        if not isinstance(started, warm.Started):
            started.kill()
            e.output = started.communicate()[0]
        code, out = None, (e.output or "") + (e.stderr or "")
    except BaseException:  # Ctrl-C or SIGTERM: no run outlives the command
        kill(started)
        raise
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as f:
        f.write(out)
    return code


def last_error(log_path: str) -> str:
    """The last non-empty line of a run's log (its error), shortened."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return (lines[-1] if lines else "no output")[:200]


def drop_models(folder: str) -> None:
    """Delete the models the runs in `folder` saved (the 1.7B shape's are 7 GB each): the metrics stay."""
    for dirpath, dirnames, _ in os.walk(folder):
        for d in [d for d in dirnames if d in ("model", "model_interrupted")]:
            shutil.rmtree(os.path.join(dirpath, d), ignore_errors=True)
            dirnames.remove(d)


def threads(args: Args, runs_at_once: int) -> int:
    """CPU threads per run: the cores shared by the runs at once (--smoke: 1, a tiny model gains nothing)."""
    return 1 if args.smoke else max(1, (os.cpu_count() or 1) // runs_at_once)


def timed_run(args: Args, label: str, name: str, flags: list, deadline: float, concurrent: bool = False) -> dict:
    """One bench.py measurement of `name`.py with `flags`, ended at `deadline`: a row with bench's timings
    (`concurrent`: part 4's two runs go on beside it, and get their share of the cores)."""
    folder = os.path.join(args.work_dir, "runs", label)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    os.symlink(os.path.join(args.work_dir, "apo_stage1"), os.path.join(folder, "apo_stage1"))  # paid once per shape
    os.makedirs(os.path.join(args.work_dir, "apo_stage1"), exist_ok=True)
    log = os.path.join(args.work_dir, "logs", f"{label}.log")
    print(f"[gpu_report] {label}: {name}.py {' '.join(flags)}", flush=True)
    begin = time.time()
    cmd = bench.script_command(name, flags, args.iterations, folder)
    code = finish(start(cmd, args.warm, threads(args, 3 if concurrent else 1)), deadline, log)
    row = {"label": label, "script": name, "flags": flags, "wall": time.time() - begin, "log": log}
    if code not in (0, None):
        row.update(status="failed", error=f"exit {code}: {last_error(log)}")
    else:
        try:
            row.update(bench.read_timings(name, folder), status="ok" if code == 0 else "cut short")
        except (OSError, ValueError):
            row.update(status="cut short" if code is None else "failed",
                       error="ended at the cap before 2 iterations" if code is None else "no metrics")
    drop_models(folder)
    print(f"[gpu_report] {label}: {row['status']}, " + (f"{row['perf/seconds_per_iter']:.2f} s/it, "
          if "perf/seconds_per_iter" in row else "") + f"{row['wall']:.0f} s", flush=True)
    return row


def read_learning(run_dir: str) -> dict:
    """Held-out accuracy before training and at the final evaluation (None where not reached), the iterations done
    and their seconds, from a run's metrics.jsonl."""
    try:
        rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    except OSError:
        rows = []
    evals = [r for r in rows if "eval/accuracy" in r]
    iters = [r for r in rows if "perf/seconds_per_iter" in r]
    final = [r for r in evals if "dist/param_checksum_spread" in r]  # finish_run's evaluation
    return {"before": evals[0]["eval/accuracy"] if evals and evals[0]["step"] == 0 else None,
            "after": final[-1]["eval/accuracy"] if final else None, "iterations": len(iters),
            "train_seconds": sum(r["perf/seconds_per_iter"] for r in iters)}


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------- the report
class Report:
    """The report's data, written (JSON and markdown) after every change."""

    def __init__(self, args: Args, head: dict):
        self.args, self.data = args, {"header": head, "settings": asdict(args), "parts": {}}
        self.begin = time.time()

    def open_part(self, part: int, cap: float, **info) -> dict:
        p = self.data["parts"][str(part)] = {"part": part, "title": TITLES[part], "cap_s": cap, "status": "running",
                                              "started_s": time.time() - self.begin, "elapsed_s": 0.0, "rows": [],
                                              **info}
        p["_start"] = time.time()
        self.write()
        return p

    def close_part(self, p: dict, cut: bool, at: Optional[float] = None) -> None:
        """Mark a part done, or cut short at its cap (or at `at` seconds, when the command was stopped)."""
        p["elapsed_s"] = time.time() - p["_start"]
        p["status"] = "cut short" if cut else "done"
        if cut:
            p["cut_short_at"] = round(p["cap_s"] if at is None else at)
            p["cut_by"] = f"the part's cap, --part{p['part']}_seconds" if at is None else "the command was stopped"
        self.write()

    def write(self) -> None:
        self.data["wall_s"] = time.time() - self.begin
        for p in self.data["parts"].values():
            if p["status"] == "running":
                p["elapsed_s"] = time.time() - p["_start"]
        os.makedirs(self.args.output_dir, exist_ok=True)
        raw = {**self.data, "parts": {k: {kk: v for kk, v in p.items() if not kk.startswith("_")}
                                      for k, p in self.data["parts"].items()}}
        for name, text in (("report.json", json.dumps(raw, indent=1) + "\n"), ("report.md", markdown(raw))):
            text = text.replace(ROOT + os.sep, "")  # the project's paths relative to it
            tmp = os.path.join(self.args.output_dir, f".{name}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.args.output_dir, name))  # a stopped command never leaves half a file


def cell(row: Optional[dict], key: str = "perf/seconds_per_iter", fmt: str = "{:.2f}") -> str:
    """A measured value, or why there is none."""
    if row is None:
        return "-"
    if row.get(key) is None:
        return row["status"]
    return fmt.format(row[key]) + (" (cut short)" if row["status"] == "cut short" else "")


def status_line(p: dict) -> str:
    if p["status"] == "cut short":
        done = sum(r.get("status") == "ok" for r in p["rows"])
        return f"**Cut short at {p['cut_short_at']} s** ({p['cut_by']}): {done} run(s) finished.\n\n"
    if p["status"] == "running":
        return (f"**In progress at the last write, {p['elapsed_s']:.0f} s in**: if the command has ended, it was "
                "stopped here.\n\n")
    return f"Done in {p['elapsed_s']:.0f} s (cap {p['cap_s']:.0f} s).\n\n"


def markdown(data: dict) -> str:
    h = data["header"]
    out = [f"# GPU report{' (smoke: tiny models, not a measurement)' if data['settings']['smoke'] else ''}\n",
           f"- device: {h['device']}", f"- torch {h['torch']}, transformers {h['transformers']}, Python {h['python']}",
           f"- git commit: {h['commit']}", f"- date: {h['date']}", f"- command: `{h['command']}`",
           f"- wall: {data['wall_s']:.0f} s for parts {' '.join(sorted(data['parts']))}\n"]
    render = {"1": part1_md, "2": part2_md, "3": part3_md, "4": part4_md}
    for key, p in sorted(data["parts"].items()):
        out.append(f"## {key}. {p['title']}\n\n{status_line(p)}{render[key](p)}")
    failed = [r for p in data["parts"].values() for r in p["rows"] if r.get("status") == "failed"]
    if failed:
        out.append("## Failed runs\n\n" + "\n".join(f"- {r['label']}: {r['error']} (log: {r['log']})"
                                                    for r in failed) + "\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- the parts
def part1(args: Args, report: Report, model_flags: list) -> None:
    """Each file at bench.py's default shape, in VARIANTS' order (the default on a GPU first), one run at a time."""
    p = report.open_part(1, args.part1_seconds, scripts=list(args.scripts), iterations=args.iterations,
                         model=model_flags[1] if model_flags else "the packaged SmolLM2-135M-Instruct",
                         flags=model_flags)
    deadline = p["_start"] + args.part1_seconds
    for precision, sampler in VARIANTS:
        for name in args.scripts:
            if time.time() >= deadline:
                return report.close_part(p, cut=True)
            flags = [*model_flags, "--mixed_precision", PRECISION[precision], "--sampler", sampler]
            row = timed_run(args, f"part1_{name}_{precision}_{sampler}", name, flags, deadline)
            p["rows"].append({**row, "precision": precision, "sampler": sampler})
            report.write()
    report.close_part(p, cut=any(r["status"] == "cut short" for r in p["rows"]))


def part1_md(p: dict) -> str:
    rows = {(r["script"], r["precision"], r["sampler"]): r for r in p["rows"]}
    lines = [f"bench.py's default shape: each file's own defaults, {p['model']}, {p['iterations']} iterations "
             "(the median of all but the first), 8 held-out prompts; one run at a time. Seconds per iteration "
             "(of which sampling).\n",
             "| script | bf16, static | bf16, plain | fp32, static | fp32, plain | static speed-up, bf16 "
             "| static speed-up, fp32 |", "|---|---|---|---|---|---|---|"]
    for name in p["scripts"]:
        cells, speedups = [], []
        for precision in ("bf16", "fp32"):
            for sampler in ("static", "plain"):
                r = rows.get((name, precision, sampler))
                sampling = "" if r is None or r.get("perf/generate_seconds") is None else (
                    f" ({r['perf/generate_seconds']:.2f})")
                cells.append(cell(r) + sampling)
            s, pl = rows.get((name, precision, "static")), rows.get((name, precision, "plain"))
            both = s and pl and s.get("perf/seconds_per_iter") and pl.get("perf/seconds_per_iter")
            speedups.append(f"{pl['perf/seconds_per_iter'] / s['perf/seconds_per_iter']:.2f}x" if both else "-")
        lines.append(f"| {name}.py | {' | '.join(cells)} | {' | '.join(speedups)} |")
    stage1 = [r for r in p["rows"] if r.get("stage1") is not None]
    if stage1:
        lines.append(f"\napo.py's stage 1 (paid once per model and settings, cached, not in its seconds per "
                     f"iteration): {stage1[0]['stage1']:.1f} s.")
    return "\n".join(lines) + "\n"


def shape_name(args: Args) -> str:
    """Parts 2 and 3's model: --model_size, or the tiny model with --smoke."""
    return "tiny" if args.smoke else args.model_size


def big_flags(model: str, batch: dict, precision: str, sampler: str) -> list:
    """grpo.py's flags for part 2's and part 3's batch."""
    return ["--model_name", model, "--prompts_per_iteration", str(batch["prompts"]), "--grpo.num_generations",
            str(batch["generations"]), "--response_length", str(batch["response_length"]), "--micro_batch_size",
            str(batch["micro_batch_size"]), "--mixed_precision", PRECISION[precision], "--sampler", sampler]


def model_facts(model: str, batch: dict) -> dict:
    """The parameter count and shape of the model folder `model`, and the tokens part 2's floor counts."""
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    cfg = bench.grpo_defaults(big_flags(model, batch, "fp32", "plain"))
    ids = bench.prompt_batch(cfg, load_tokenizer(model))[0]
    return {"parameters": n_params, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "prompt_width": ids.shape[1], "tokens_trained": ids.shape[0] * (ids.shape[1] + batch["response_length"]),
            "shape": memory_model.shape_of(config)}


def part2(args: Args, report: Report, big_model, batch: dict, precision: str, device, runs: dict) -> None:
    """grpo.py at the large shape, plain then static sampler; the floor from bench.py."""
    p = report.open_part(2, args.part2_seconds, batch=batch, precision=precision, model_size=shape_name(args))
    deadline = p["_start"] + args.part2_seconds
    model = big_model()
    facts = model_facts(model, batch)
    gpu, bandwidth, peak = bench.device_figures(bench.Args(bandwidth_gbs=args.bandwidth_gbs,
                                                           peak_tflops=args.peak_tflops), device, precision == "bf16")
    p.update(facts=facts)
    if bandwidth and peak:
        p["floor_s"], p["floor_how"] = bench.floor_seconds(facts["parameters"], batch["response_length"],
                                                           facts["tokens_trained"], precision == "bf16", bandwidth,
                                                           peak)
    for sampler in ("plain", "static"):
        if time.time() >= deadline:
            return report.close_part(p, cut=True)
        flags = big_flags(model, batch, precision, sampler)
        row = timed_run(args, f"part2_grpo_{shape_name(args)}_{precision}_{sampler}", "grpo", flags, deadline)
        runs[tuple(flags)] = row
        p["rows"].append({**row, "sampler": sampler})
        report.write()
    report.close_part(p, cut=any(r["status"] == "cut short" for r in p["rows"]))


def part2_md(p: dict) -> str:
    b, f = p["batch"], p.get("facts")
    if f is None:
        return "Nothing measured.\n"
    lines = [f"{p['model_size']} shape with random weights: {f['parameters'] / 1e9:.3f}B parameters ({f['layers']} "
             f"layers, hidden {f['hidden']}), {p['precision']}, {b['prompts']} prompts x {b['generations']} samples x "
             f"{b['response_length']} tokens, micro-batch {b['micro_batch_size']}, prompts padded to "
             f"{f['prompt_width']} tokens. " + (f"Floor {p['floor_s']:.3f} s per iteration: {p['floor_how']} "
                                               "(bench.py)." if "floor_s" in p else
                                               "Floor: not reported (no bandwidth or peak known for this device; "
                                               "--bandwidth_gbs, --peak_tflops)."),
             "\n| sampler | seconds per iteration | sampling (s) | update and the rest (s) | peak memory (GB) | "
             "iteration / floor | first iteration s (warm-up, compilation) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        ok = r.get("perf/seconds_per_iter") is not None
        rest = f"{r['perf/seconds_per_iter'] - r['perf/generate_seconds']:.2f}" if ok else "-"
        ratio = f"{r['perf/seconds_per_iter'] / p['floor_s']:.1f}" if ok and "floor_s" in p else "-"
        lines.append(f"| {r['sampler']} | {cell(r)} | {cell(r, 'perf/generate_seconds')} | {rest} | "
                     f"{cell(r, 'perf/peak_memory_gb')} | {ratio} | {cell(r, 'first_seconds_per_iter', '{:.1f}')} | "
                     f"{r['wall']:.0f} |")
    return "\n".join(lines) + "\n"


def part3(args: Args, report: Report, big_model, batch: dict, precision: str, device, runs: dict) -> None:
    """Peak memory of full, LoRA and checkpointed training (plain sampler: nothing to compile) beside the
    predictions; part 2's plain run is the full row when it ran."""
    start_time = time.time()
    overhead = memory_model.OVERHEAD_GB if device.type == "cuda" else memory_model.runtime_gb()
    rows_sampled = batch["prompts"] * batch["generations"]
    base = memory_model.Args(method="grpo", precision="bf16" if precision == "bf16" else "fp32",
                             micro_batch_size=batch["micro_batch_size"], prompt_length=memory_model.prompt_tokens(),
                             response_length=batch["response_length"], generation_rows=rows_sampled,
                             group_size=batch["generations"], accumulation=rows_sampled > batch["micro_batch_size"],
                             overhead_gb=overhead)
    p = report.open_part(3, args.part3_seconds, batch=batch, precision=precision, model_size=shape_name(args),
                         device=device.type, overhead_gb=overhead, prediction_settings=asdict(base))
    p["_start"] = start_time  # the prediction's set-up counts in the cap
    deadline = p["_start"] + args.part3_seconds
    model = big_model()
    shape = memory_model.shape_of(AutoConfig.from_pretrained(model))
    for mode, extra in MEMORY_MODES:
        predicted = memory_model.predict(shape, replace(base, lora_r=16 if "--lora_r" in extra else 0,
                                                        gradient_checkpointing="--gradient_checkpointing" in extra))
        flags = big_flags(model, batch, precision, "plain") + extra
        row = runs.get(tuple(flags))
        if row is None:
            if time.time() >= deadline:
                return report.close_part(p, cut=True)
            row = timed_run(args, f"part3_grpo_{shape_name(args)}_{mode.split()[0].lower()}", "grpo", flags, deadline,
                            concurrent=4 in args.parts)
        else:
            row = {**row, "reused": "part 2's plain run"}
        measured = row.get("run_peak_memory_gb")
        p["rows"].append({**row, "mode": mode, "predicted_gb": predicted["peak"],
                          "error": predicted["peak"] / measured - 1 if measured else None})
        report.write()
    report.close_part(p, cut=any(r["status"] == "cut short" for r in p["rows"]))


def part3_md(p: dict) -> str:
    b = p["batch"]
    measured = ("torch.cuda.max_memory_allocated" if p["device"] == "cuda" else
                "the process's peak resident set (RSS: on CPU this part is a smoke test; glibc's heap keeps freed "
                "memory, so RSS runs above the live tensors; the prediction's overhead is the Python runtime's "
                f"resident memory, {p['overhead_gb']:.2f} GB)")
    lines = [f"grpo.py, {p['model_size']} shape with random weights, {p['precision']}, plain sampler, "
             f"{b['prompts']} prompts x {b['generations']} samples x {b['response_length']} tokens, micro-batch "
             f"{b['micro_batch_size']}. Measured: {measured}, over the whole run (the final evaluation included). "
             "Predicted: memory_model.py with the same settings (longest arith prompt: "
             f"{p['prediction_settings']['prompt_length']} tokens). Error = predicted / measured - 1.\n",
             "| mode | flags | predicted GB | measured GB | error |", "|---|---|---|---|---|"]
    for r in p["rows"]:
        flags = " ".join(r["flags"][r["flags"].index("--sampler") + 2:]) or "(defaults)"
        error = f"{r['error']:+.1%}" if r.get("error") is not None else "-"
        note = f" ({r['reused']})" if r.get("reused") else ""
        lines.append(f"| {r['mode']}{note} | {flags} | {r['predicted_gb']:.2f} | {cell(r, 'run_peak_memory_gb')} | "
                     f"{error} |")
    return "\n".join(lines) + "\n"


def start_part4(args: Args, report: Report, flags: list) -> tuple:
    """Start grpo.py and drpo.py with their defaults (plus `flags`), both at once; finish_part4 collects them."""
    p = report.open_part(4, args.part4_seconds, flags=flags, beside_part3=3 in args.parts)
    started = []
    for name in LEARNING_SCRIPTS:
        folder = os.path.join(args.work_dir, "runs", f"part4_{name}")
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), "--output_dir", folder, "--exp_name", name, *flags]
        print(f"[gpu_report] part4_{name}: {name}.py {' '.join(flags)}", flush=True)
        started.append((name, folder, start(cmd, args.warm, threads(args, 3 if 3 in args.parts else 2))))
    return p, started


def finish_part4(args: Args, report: Report, p: dict, started: list) -> None:
    deadline = p["_start"] + args.part4_seconds
    for name, folder, run in started:
        log = os.path.join(args.work_dir, "logs", f"part4_{name}.log")
        code = finish(run, deadline, log)
        row = {"label": f"part4_{name}", "script": name, "log": log, **read_learning(os.path.join(folder,
                                                                                                f"{name}__1"))}
        row["status"] = {0: "ok", None: "cut short"}.get(code, "failed")
        if row["status"] == "failed":
            row["error"] = f"exit {code}: {last_error(log)}"
        drop_models(folder)
        p["rows"].append(row)
        report.write()
        print(f"[gpu_report] part4_{name}: {row['status']}, accuracy {row['before']} -> {row['after']}", flush=True)
    report.close_part(p, cut=any(r["status"] == "cut short" for r in p["rows"]))


def part4_md(p: dict) -> str:
    lines = [f"Each file's defaults{' plus ' + ' '.join(p['flags']) if p['flags'] else ''}, both at once"
             f"{', beside part 3' if p['beside_part3'] else ''}; greedy held-out accuracy before and after "
             "training (one seed: a regression shows as a large drop, not a few points).\n",
             "| script | accuracy before | accuracy after | iterations | training s |", "|---|---|---|---|---|"]
    for r in p["rows"]:
        acc = ["-" if r[k] is None else f"{r[k]:.1%}" for k in ("before", "after")]
        lines.append(f"| {r['script']}.py | {acc[0]} | {acc[1]}{' (cut short)' if r['status'] == 'cut short' else ''}"
                     f" | {r['iterations']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def smoke_model(args: Args) -> str:
    """A 2-layer Llama (hidden 64) with random weights and the packaged tokenizer, built once by bench.py."""
    from transformers import LlamaConfig

    folder = os.path.join(args.work_dir, "tiny")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True).save_pretrained(folder)
    return bench.random_model(bench.Args(config=os.path.join(folder, "config.json"), output_dir=args.work_dir))


def main(args: Args) -> int:
    args = settle(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged model; a benchmark never downloads (the runs too)
    os.environ.setdefault("WANDB_MODE", "disabled")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` and the device's limit: write, then leave
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(args, header(args, device))
    print(f"[gpu_report] {report.data['header']['device']}; parts {' '.join(map(str, args.parts))}; report in "
          f"{args.output_dir}", flush=True)
    resolve_model(EMBEDDED_MODEL)  # the packaged model converted once (its tokenizer serves the random models too)
    tiny = smoke_model(args) if args.smoke else None
    batch = SMOKE_BATCH if args.smoke else BIG_BATCH
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"  # --mixed_precision auto
    built = {}

    def big_model() -> str:
        if "path" not in built:
            built["path"] = tiny or bench.random_model(bench.Args(model_size=args.model_size,
                                                                  output_dir=args.work_dir))
        return built["path"]
    runs = {}  # part 2's runs by flags: part 3 reuses the plain one
    started = []  # part 4's runs
    try:
        if 1 in args.parts:
            part1(args, report, SMOKE_FLAGS if args.smoke else [])
        if 2 in args.parts:
            part2(args, report, big_model, batch, precision, device, runs)
        if 4 in args.parts:  # beside part 3: that part's measure is memory, which runs beside it do not change
            learning = [*SMOKE_FLAGS, "--num_iterations", "2", "--num_eval_prompts", "8"] if args.smoke else []
            p4, started = start_part4(args, report, learning)
        if 3 in args.parts:
            part3(args, report, big_model, batch, precision, device, runs)
        if 4 in args.parts:
            finish_part4(args, report, p4, started)
    except BaseException as e:  # Ctrl-C, SIGTERM or a bug here: no run outlives the command; the report keeps its rows
        for _, _, run in started:
            kill(run)
        for p in report.data["parts"].values():
            if p["status"] == "running":
                report.close_part(p, cut=True, at=time.time() - p["_start"])
        if not isinstance(e, KeyboardInterrupt):
            raise
        print("[gpu_report] stopped: the report keeps what finished", flush=True)
        return 130
    report.write()
    md = os.path.join(args.output_dir, "report.md")
    print(f"\n{open(md).read()}\n[gpu_report] written: {md} and report.json ({report.data['wall_s']:.0f} s)")
    failed = [r for p in report.data["parts"].values() for r in p["rows"] if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, use_underscores=True)))
