"""benchmark/compare.py: aggregation over seeds on hand-made metrics files, and a smoke run of the runner."""
import json
import math
import os
import sys

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import compare  # noqa: E402


def _write_run(run_dir, accuracy, kl, seconds, memory, stage1=None):
    """Two iterations of 16 samples, evaluations before (step 0), after iteration 1 and after iteration 2;
    `accuracy` and `kl` are the three evaluations' values, `seconds` the two iterations'."""
    os.makedirs(run_dir)
    rows = []
    for step, acc, k in zip((0, 1, 2), accuracy, kl):
        if step:
            rows.append({"step": step, "episode": 16 * step, "perf/seconds_per_iter": seconds[step - 1],
                         "perf/peak_memory_gb": memory})
        rows.append({"step": step, "eval/reward": acc, "eval/accuracy": acc, "eval/kl": k, "eval/win_rate": 0.5,
                     "eval/pass@1": acc / 2, **({"perf/stage1_seconds": stage1} if stage1 and not step else {})})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_read_run_and_read_a_curve_by_hand(tmp_path):
    _write_run(tmp_path / "a__1", (0.2, 0.4, 0.6), (0.0, 1.0, 2.0), (10.0, 4.0), 5.0, stage1=30.0)
    run = compare.read_run(str(tmp_path / "a__1"))
    assert [p["step"] for p in run["points"]] == [0, 1, 2]
    assert [p["samples"] for p in run["points"]] == [0, 16, 32]
    assert [p["seconds"] for p in run["points"]] == [30.0, 40.0, 44.0]  # stage 1 first, then the iterations'
    assert run["seconds_per_iter"] == 4.0  # the first iteration (warm-up) is left out of the median
    assert run["train_seconds"] == 44.0 and run["peak_memory_gb"] == 5.0
    assert run["points"][-1]["pass@1"] == 0.3
    # the curve at 35 s: halfway between 30 s (0.2) and 40 s (0.4); past the last point, the last value
    assert compare.value_at(run, "seconds", 35.0, "accuracy") == pytest.approx(0.3)
    assert compare.value_at(run, "seconds", 100.0, "accuracy") == pytest.approx(0.6)


def test_paired_confidence_interval_by_hand():
    # differences 0.1, 0.2, 0.3: mean 0.2, sample std 0.1, t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    mean, lo, hi = compare.paired_ci([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.2) and lo == pytest.approx(0.2 - half) and hi == pytest.approx(0.2 + half)
    assert compare.verdict((0.2, lo, hi)) == "no difference shown"  # 0.2 - 0.248 < 0
    assert compare.verdict(compare.paired_ci([0.3, 0.31, 0.32])) == "better"
    assert compare.verdict(compare.paired_ci([-0.3, -0.31, -0.32])) == "worse"
    assert compare.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    m, s = compare.mean_se([0.4])
    assert m == 0.4 and math.isnan(s)  # one seed: no standard error


def test_summarize_pairs_seeds_at_equal_samples_and_equal_seconds(tmp_path):
    # the baseline is slow (20 s per iteration), the other fast (5 s): the common time is the fast one's 10 s
    for seed, base, fast in ((1, (0.2, 0.3, 0.5), (0.2, 0.5, 0.6)), (2, (0.1, 0.2, 0.4), (0.1, 0.4, 0.6))):
        _write_run(tmp_path / f"base__{seed}", base, (0, 1, 2), (20.0, 20.0), 6.0)
        _write_run(tmp_path / f"fast__{seed}", fast, (0, 1, 2), (5.0, 5.0), 5.0)
    runs = {name: {seed: compare.read_run(str(tmp_path / f"{name}__{seed}")) for seed in (1, 2)}
            for name in ("base", "fast")}
    summary = compare.summarize(runs, "base")
    assert summary["common_seconds"] == 10.0
    paired = summary["paired"]["fast"]
    assert paired["samples"][0] == pytest.approx(((0.6 - 0.5) + (0.6 - 0.4)) / 2)  # last evaluations
    # at 10 s the baseline is halfway through its first iteration: 0.2 + 0.5 * 0.1 and 0.1 + 0.5 * 0.1
    assert paired["seconds"][0] == pytest.approx(((0.6 - 0.25) + (0.6 - 0.15)) / 2)
    assert summary["stats"]["fast"]["accuracy"] == pytest.approx((0.6, 0.0))
    table = compare.results_table(summary)
    assert "| fast | 2 |" in table and "accuracy at 10 s" in table


def test_flags_for_keeps_each_files_own_groups():
    flags = ["--model_name", "m", "--grpo.num_generations", "2", "--ppo.reset_prob=0.3", "--track"]
    assert compare.flags_for("grpo", flags) == ["--model_name", "m", "--grpo.num_generations", "2", "--track"]
    assert compare.flags_for("ppo_pp", flags) == ["--model_name", "m", "--ppo.reset_prob=0.3", "--track"]


def test_compare_smoke(tiny_model_dir, tmp_path):
    extra = (f"--model_name {tiny_model_dir} --response_length 12 --micro_batch_size 2 "
             "--eval_batch_size 8 --num_train_prompts 32 --grpo.num_generations 2")
    cmd = [sys.executable, "benchmark/compare.py", "--algorithms", "ppo", "grpo", "--seeds", "1", "2",
           "--samples", "16", "--samples_per_iteration", "8", "--sft_rows", "8", "--num_evals", "1",
           "--num_eval_prompts", "8",
           "--task", "arith", "--output_dir", str(tmp_path), f"--extra={extra}"]
    run_script(cmd)
    table = (tmp_path / "results.md").read_text()
    assert "| GRPO | 2 |" in table and "| PPO | 2 |" in table and "| GRPO | 2 | " in table.split("minus")[1]
    for name in ("accuracy_vs_samples.png", "accuracy_vs_seconds.png", "reward_vs_kl.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    grpo_run = json.load(open(tmp_path / "logs" / "grpo__1.json"))
    assert grpo_run["iterations"] == 2  # 16 samples = 2 iterations of 4 prompts x 2
    assert grpo_run["command"][grpo_run["command"].index("--prompts_per_iteration") + 1] == "4"
    assert str(tmp_path / "sft__1" / "model") in grpo_run["command"]  # every run starts from the one SFT model
    assert (tmp_path / "sft__1" / "model" / "config.json").exists()
    assert len(compare.read_run(str(tmp_path / "ppo__1"))["points"]) == 3  # before, once during, after
    proc = run_script(cmd)  # a second call keeps the finished runs and only aggregates them again
    assert proc.stdout.count("finished before, kept") == 4


def test_max_train_seconds_stops_early(tiny_model_dir, tmp_path):
    run_script([sys.executable, "grpo.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path),
                "--response_length", "8",
                "--micro_batch_size", "4", "--prompts_per_iteration", "2", "--grpo.num_generations", "2",
                "--num_eval_prompts", "4",
                "--num_iterations", "50", "--max_train_seconds", "0.001"])
    rows = [json.loads(line) for line in open(tmp_path / "grpo__1" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "perf/seconds_per_iter" in r] == [1]  # stopped after the first iteration
    assert rows[-1]["step"] == 1 and "eval/reward" in rows[-1]  # and still evaluated
