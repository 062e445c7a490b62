"""benchmark/gpu_report.py --smoke runs every part on a tiny model on CPU and writes a row for each; --parts picks
parts, and a part that reaches its cap says where it was cut short."""
import json
import sys

from conftest import run_script


def report(folder):
    return json.loads((folder / "report.json").read_text()), (folder / "report.md").read_text()


def test_smoke_writes_every_part(tmp_path):
    # part 1 with one of the six files: each variant's plumbing is the same for all six, and five more files would
    # add 20 runs to the suite (the six run in parts 1 and 4 of `--smoke` without --scripts); a bandwidth and a peak
    # given, so that part 2 reports bench.py's floor
    proc = run_script([sys.executable, "benchmark/gpu_report.py", "--smoke", "--scripts", "grpo", "--bandwidth_gbs",
                       "20", "--peak_tflops", "0.5", "--output_dir", str(tmp_path),
                       "--work_dir", str(tmp_path / "work")])
    data, md = report(tmp_path)
    assert "written:" in proc.stdout
    assert sorted(data["parts"]) == ["1", "2", "3", "4"] and all(p["status"] == "done" for p in data["parts"].values())
    rows = {k: p["rows"] for k, p in data["parts"].items()}
    assert all(r["status"] == "ok" for part in rows.values() for r in part), [
        (r["label"], r.get("error")) for part in rows.values() for r in part if r["status"] != "ok"]
    # 1: the files x bf16/fp32 x static/plain, each timed
    assert {(r["script"], r["precision"], r["sampler"]) for r in rows["1"]} == {
        ("grpo", p, m) for p in ("bf16", "fp32") for m in ("static", "plain")}
    assert all(r["perf/seconds_per_iter"] > 0 for r in rows["1"])
    # 2: plain and static, sampling and the rest; 3: three modes beside their predictions, full from part 2's run
    assert [r["sampler"] for r in rows["2"]] == ["plain", "static"]
    assert all(0 < r["perf/generate_seconds"] < r["perf/seconds_per_iter"] for r in rows["2"])
    assert [r["mode"] for r in rows["3"]] == ["full", "LoRA r=16", "gradient checkpointing"]
    assert all(r["predicted_gb"] > 0 and r["run_peak_memory_gb"] > 0 for r in rows["3"])
    assert rows["3"][0]["reused"] == "part 2's plain run" and ["--lora_r", "16"] == rows["3"][1]["flags"][-2:]
    # 4: accuracy before and after for grpo.py and drpo.py
    assert [r["script"] for r in rows["4"]] == ["grpo", "drpo"]
    assert all(r["before"] is not None and r["after"] is not None and r["iterations"] == 2 for r in rows["4"])
    # the markdown: the header, then a table row for each part
    for text in ("device: CPU", "torch ", "transformers ", "git commit: ", "date: ",
                 "command: `python benchmark/gpu_report.py --smoke", "| grpo.py |", "| plain |",
                 "| static |", "| LoRA r=16 |", "| gradient checkpointing |", "| drpo.py |"):
        assert text in md, text
    assert [line[:5] for line in md.splitlines() if line.startswith("## ")] == ["## 1.", "## 2.", "## 3.", "## 4."]
    assert data["parts"]["2"]["floor_s"] > 0 and "at 20 GB/s" in md and "at 0.5 TFLOP/s" in md  # bench.py's floor
    assert "peak resident set" in md  # memory is the process's RSS on CPU


def test_parts_are_chosen_and_a_capped_part_says_where_it_stopped(tmp_path):
    run_script([sys.executable, "benchmark/gpu_report.py", "--smoke", "--parts", "1", "--part1_seconds", "0",
                "--output_dir", str(tmp_path), "--work_dir", str(tmp_path / "work")])
    data, md = report(tmp_path)
    assert sorted(data["parts"]) == ["1"]
    assert data["parts"]["1"]["status"] == "cut short" and data["parts"]["1"]["rows"] == []
    assert "**Cut short at 0 s** (the part's cap, --part1_seconds): 0 run(s) finished." in md
    assert "## 2." not in md and "## 3." not in md and "## 4." not in md
