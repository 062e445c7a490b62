"""benchmark/resets.py's pieces without a run: the guessing teacher behind its reference, lock rows read from a file,
and the aggregation (samples to a target, censoring, pairing by seed) on hand-made curves."""
import json
import math

import pytest

from benchmark import resets
from common.lock import guessing_teacher, lock_answer, lock_rows
from common.tasks import DataError, load_task


def test_the_guessing_teacher_knows_the_rule_except_on_its_hidden_facts():
    rows = lock_rows("lock8", "train", 500)
    assert [r["response"] for r in guessing_teacher(rows, 0.0)] == [r["answer"] for r in rows]
    written = guessing_teacher(rows, 0.3)
    assert written == guessing_teacher(rows, 0.3)  # the same hidden facts and guesses every time
    steps, right, facts_wrong = 0, 0, set()
    for row, demo in zip(rows, written):
        digits = [int(w) for w in row["prompt"].split()[1:-1]]
        previous = 0
        for d, w in zip(digits, map(int, demo["response"].split())):
            steps += 1
            right += w == (previous + d) % 10
            if w != (previous + d) % 10:
                facts_wrong.add((previous, d))
            previous = w  # the teacher goes on from what it wrote
    # wrong only on hidden facts: at most 30 distinct ones; a guess is right 1 time in 10, so per step about
    # 1 - 0.3 * 0.9 = 0.73 right (4000 steps: binomial sd 0.007, and the hidden facts' share of steps varies)
    assert len(facts_wrong) <= 30
    assert 0.6 < right / steps < 0.85


def test_lock_rows_from_a_file_take_their_answer_from_the_prompt(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"prompt": "open 3 1 4 :", "response": "3 4 9"}) + "\n"
                    + json.dumps({"prompt": "open 5 5 :", "response": "5 0"}) + "\n")
    rows = load_task("lock3", "train", str(path))
    assert [(r["answer"], r["response"]) for r in rows] == [("3 4 8", "3 4 9"), ("5 0", "5 0")]
    assert rows[0]["answer"] == " ".join(map(str, lock_answer([3, 1, 4])))
    path.write_text(json.dumps({"prompt": "open 3 1 4 :", "response": "3 4 8"}) + "\n"
                    + json.dumps({"prompt": "what is 3 + 1?", "response": "4"}) + "\n")
    with pytest.raises(DataError, match=r"demos.jsonl:1: a lock prompt is 'open'"):
        load_task("lock3", "train", str(path))


def curve(*accuracies, step=256):
    return {"points": [{"samples": i * step, "accuracy": a} for i, a in enumerate(accuracies)],
            "seconds_per_iter": 1.0}


def test_samples_to_the_target_interpolate_and_censor_at_the_budget():
    assert resets.samples_to(curve(0.3, 0.4, 0.6)["points"], 0.5) == (384.0, True)  # halfway from 256 to 512
    assert resets.samples_to(curve(0.6, 0.4)["points"], 0.5) == (0.0, True)
    assert resets.samples_to(curve(0.3, 0.4, 0.45)["points"], 0.5) == (512.0, False)
    assert resets.samples_to(curve(0.3, 0.5)["points"], 0.5) == (256.0, True)


def test_the_summary_pairs_seeds_with_ppo_and_counts_censored_runs_at_the_budget():
    runs = {4: {"ppo": {1: curve(0.3, 0.4), 2: curve(0.3, 0.6)},
                "drpo": {1: curve(0.3, 0.6), 2: curve(0.3, 0.7), 3: curve(0.3, 0.9)}}}
    rows = {r["algorithm"]: r for r in resets.summarize(runs, 0.5)}
    assert rows["ppo"]["reached"] == 1 and "final_minus_baseline" not in rows["ppo"]
    drpo = rows["drpo"]
    assert drpo["reached"] == 3 and drpo["seeds"] == [1, 2, 3]
    mean, low, high = drpo["final_minus_baseline"]  # seeds 1 and 2 only: +0.2 and +0.1
    assert mean == pytest.approx(0.15) and low < 0.15 < high
    # seed 1: DR-PO crosses at 2/3 * 256, PPO never (counted at 256); seed 2: DR-PO at 128, PPO at 2/3 * 256
    assert drpo["samples_minus_baseline"][0] == pytest.approx(((512 / 3 - 256) + (128 - 512 / 3)) / 2)
    assert not math.isnan(drpo["final"][1])
    table = resets.results_table(resets.summarize(runs, 0.5), 0.5, 256)
    assert "DR-PO" in table and "> 256 (censored)" not in table.split("DR-PO")[1]


def test_the_schedules_benchmark_on_chain3_runs_compare_pys_setting_with_the_schedule(tmp_path):
    """benchmark/schedules.py --task chain3: each run is benchmark/compare.py's chain3 run of the file from the SFT
    start, with the variant's schedule in the file's own flag group and its own run name."""
    from benchmark import compare, schedules

    args = schedules.Args(task="chain3", output_dir=str(tmp_path))
    cmd = schedules.command(args, "grpo_reset:anneal", 2, "sft_start")
    expected = compare.run_flags("grpo_reset", 2, compare.Args(output_dir=str(tmp_path / "chain3")), "sft_start")[0]
    assert cmd[2:-2] == [f if f != "grpo_reset" else "grpo_reset-anneal" for f in expected]
    assert cmd[-2:] == ["--grpo.rollin_schedule", "anneal"] and cmd[1].endswith("grpo_reset.py")
    assert cmd[cmd.index("--task") + 1] == "chain3" and cmd[cmd.index("--model_name") + 1] == "sft_start"
