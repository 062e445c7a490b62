"""benchmark/compare.py: aggregation over seeds on hand-made metrics files, and a smoke run of the runner."""
import json
import math
import os
import sys

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import compare  # noqa: E402


def _write_run(run_dir, reward_before, reward_after, kl, seconds, memory, stage1=None, wall=100.0):
    """Two iterations of 16 samples, evaluations before (step 0) and after (step 2)."""
    os.makedirs(run_dir)
    rows = [{"step": 0, "eval/reward": reward_before, "eval/accuracy": reward_before, "eval/kl": 0.0,
             "eval/win_rate": 0.5,
             **({"perf/stage1_seconds": stage1} if stage1 is not None else {})}]
    for step, s in ((1, seconds[0]), (2, seconds[1])):
        rows.append({"step": step, "episode": 16 * step, "perf/seconds_per_iter": s,
                     "perf/tokens_per_second": 100.0 / s,
                     "perf/peak_memory_gb": memory})
    rows.append({"step": 2, "eval/reward": reward_after, "eval/accuracy": reward_after, "eval/kl": kl,
                 "eval/win_rate": 0.7})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with open(os.path.join(run_dir, "compare.json"), "w") as f:
        json.dump({"returncode": 0, "wall_seconds": wall}, f)


def test_read_run_and_aggregate_by_hand(tmp_path):
    _write_run(tmp_path / "a__1", 0.2, 0.5, 2.0, (10.0, 4.0), 5.0, stage1=30.0, wall=90.0)
    _write_run(tmp_path / "a__2", 0.2, 0.7, 4.0, (10.0, 6.0), 6.0, stage1=30.0, wall=110.0)
    run = compare.read_run(str(tmp_path / "a__1"))
    assert [p["step"] for p in run["points"]] == [0, 2]
    assert [p["samples"] for p in run["points"]] == [0, 32]
    assert [p["seconds"] for p in run["points"]] == [30.0, 44.0]  # stage 1 first, then the iterations' seconds
    assert run["seconds_per_iter"] == 4.0  # the first iteration (warm-up) is left out of the median
    assert run["train_seconds"] == 14.0 and run["peak_memory_gb"] == 5.0 and run["wall_seconds"] == 90.0

    runs = [run, compare.read_run(str(tmp_path / "a__2"))]
    stats = compare.aggregate(runs)
    # mean 0.6, sample std sqrt(0.02) = 0.1414, SE = 0.1414 / sqrt(2) = 0.1
    assert stats["reward"][0] == pytest.approx(0.6) and stats["reward"][1] == pytest.approx(0.1)
    assert stats["kl"][0] == pytest.approx(3.0) and stats["kl"][1] == pytest.approx(1.0)
    assert stats["seconds_per_iter"] == pytest.approx((5.0, 1.0))
    assert stats["wall_seconds"] == pytest.approx((100.0, 10.0))
    assert stats["reference_reward"][0] == pytest.approx(0.2) and stats["seeds"] == 2

    xs, ys, se = compare.curve(runs, "samples", "reward")
    assert list(xs) == [0, 32] and ys == pytest.approx([0.2, 0.6]) and se == pytest.approx([0.0, 0.1])
    assert "0.600 ± 0.100" in compare.results_table({"apo": stats})


def test_mean_se_edge_cases():
    assert compare.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    m, s = compare.mean_se([0.4])
    assert m == 0.4 and math.isnan(s)  # one seed: no standard error
    assert all(math.isnan(x) for x in compare.mean_se([float("nan")]))


def test_findings_follow_the_numbers(tmp_path):
    base = {"seeds": 3, "wall_seconds": (1.0, 0.0), "tokens_per_second": (1.0, 0.0), "stage1_seconds": (0.0, 0.0)}
    ppo = {**base, "reward": (0.40, 0.01), "kl": (4.0, 0.1), "train_seconds": (300.0, 5.0),
           "peak_memory_gb": (6.0, 0.01)}
    drpo = {**base, "reward": (0.60, 0.01), "kl": (4.05, 0.1), "train_seconds": (290.0, 5.0),
            "peak_memory_gb": (6.0, 0.01)}
    text = "\n".join(compare.findings({"ppo": ppo, "drpo": drpo}))
    assert "reward 0.600 ± 0.010 vs 0.400 ± 0.010 (higher)" in text
    assert "KL 4.05 ± 0.10 vs 4.00 ± 0.10 (within noise" in text


def test_flags_for_keeps_each_files_own_groups():
    flags = ["--model_name", "m", "--grpo.num_generations", "2", "--ppo.reset_prob=0.3", "--track"]
    assert compare.flags_for("grpo", flags) == ["--model_name", "m", "--grpo.num_generations", "2", "--track"]
    assert compare.flags_for("ppo_pp", flags) == ["--model_name", "m", "--ppo.reset_prob=0.3", "--track"]


def test_compare_smoke(tiny_model_dir, tmp_path):
    extra = (f"--model_name {tiny_model_dir} --response_length 8 --micro_batch_size 2 --prompts_per_iteration 4 "
             "--eval_batch_size 8 --num_train_prompts 32 --grpo.num_generations 2")
    proc = run_script([sys.executable, "benchmark/compare.py", "--algorithms", "grpo", "ppo", "--seeds", "1",
                       "--samples", "4", "--num_eval_prompts", "8", "--output_dir", str(tmp_path), f"--extra={extra}"])
    table = (tmp_path / "results.md").read_text()
    assert "| GRPO | 1 |" in table and "| PPO | 1 |" in table
    for name in ("reward_vs_samples.png", "reward_vs_seconds.png", "reward_vs_kl.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.load(open(tmp_path / "grpo__1" / "compare.json"))["iterations"] == 1  # 4 samples = 1 iteration of 4 x 2
    # a second call keeps the finished runs and only aggregates them again
    proc = run_script([sys.executable, "benchmark/compare.py", "--algorithms", "grpo", "ppo", "--seeds", "1",
                       "--samples", "4", "--num_eval_prompts", "8", "--output_dir", str(tmp_path), f"--extra={extra}"])
    assert proc.stdout.count("finished before, kept") == 2


def test_max_train_seconds_stops_early(tiny_model_dir, tmp_path):
    run_script([sys.executable, "grpo.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path),
                "--response_length", "8",
                "--micro_batch_size", "4", "--prompts_per_iteration", "2", "--grpo.num_generations", "2",
                "--num_eval_prompts", "4",
                "--num_iterations", "50", "--max_train_seconds", "0.001"])
    rows = [json.loads(line) for line in open(tmp_path / "grpo__1" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "perf/seconds_per_iter" in r] == [1]  # stopped after the first iteration
    assert rows[-1]["step"] == 1 and "eval/reward" in rows[-1]  # and still evaluated
