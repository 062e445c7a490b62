"""The benchmark script runs end to end on a tiny model and writes its table."""
import os
import sys

from conftest import run_script


def test_bench_smoke(tiny_model_dir, tmp_path):
    extra = (f"--model_name {tiny_model_dir} --response_length 8 --micro_batch_size 4 --num_train_prompts 32 "
             "--eval_batch_size 8 --grpo.num_generations 2")
    proc = run_script([sys.executable, "benchmark/bench.py", "--scripts", "grpo", "--iterations", "2",
                       "--prompts_per_iteration", "4", "--bound_repeats", "1", "--output_dir", str(tmp_path),
                       f"--extra={extra}"])
    table = (tmp_path / "bench.md").read_text()
    assert "| grpo.py |" in table and "| bound" in table and "iteration / bound" in table
    assert "grpo.py iteration / bound" in proc.stdout
    assert "CPU; 0.00" in table and "fp32, sampler plain" in table  # device, shape, dtype and sampler stated
    assert "iteration / floor" not in table  # no bandwidth or peak known for a CPU


def test_bench_builds_a_random_model_from_a_config_and_reports_the_floor(tiny_model_dir, tmp_path):
    extra = ("--response_length 8 --micro_batch_size 4 --num_train_prompts 32 --eval_batch_size 8 "
             "--grpo.num_generations 2")
    run_script([sys.executable, "benchmark/bench.py", "--scripts", "grpo", "--iterations", "2",
                "--prompts_per_iteration", "4", "--bound_repeats", "1", "--output_dir", str(tmp_path),
                "--config", os.path.join(tiny_model_dir, "config.json"), "--bandwidth_gbs", "20",
                "--peak_tflops", "0.5",
                f"--extra={extra}"])
    built = next((tmp_path / "models").iterdir())
    assert (built / "config.json").exists() and (built / "tokenizer_config.json").exists()
    table = (tmp_path / "bench.md").read_text()
    assert "grpo.py iteration / floor = " in table and "at 20 GB/s" in table and "at 0.5 TFLOP/s" in table


def test_sampler_speed_times_both_samplers(tiny_model_dir):
    proc = run_script([sys.executable, "benchmark/sampler_speed.py", "--model_name", tiny_model_dir,
                       "--response_length", "4", "--repeats", "1"])
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| rollout") or line.startswith("| greedy")]
    assert len(rows) == 2 and all(len(row.split("|")) == 6 for row in rows)  # shape, plain, static, ratio
    assert "first call" in proc.stdout and "\ncpu, " in proc.stdout and "M parameters, fp32" in proc.stdout
