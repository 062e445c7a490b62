"""Same seed, same run: the set-up work a run happens to do (here the conversion of the packaged model, which the first
run on a machine does and every later one finds cached) draws nothing from the generators that sampling uses."""
import sys

import torch
from safetensors.torch import load_file

from conftest import read_jsonl, run_script

# the packaged SmolLM2-135M (the model the conversion builds), LoRA so that model/ holds only the small adapters
SHORT = ["--num_iterations", "1", "--prompts_per_iteration", "2", "--grpo.num_generations", "2", "--micro_batch_size",
         "4", "--response_length", "6", "--num_eval_prompts", "2", "--eval_batch_size", "2", "--num_train_prompts",
         "8", "--lora_r", "2", "--learning_rate", "1e-3", "--temperature", "1.0"]


def test_a_run_that_converts_the_model_draws_as_one_that_finds_it_cached(tiny_reward_dir, tmp_path):
    cache = tmp_path / "cache"  # empty: the first run converts the packaged GGUF into it, the second finds it there
    runs = []
    for name in ("converts", "cached"):
        proc = run_script([sys.executable, "grpo.py", *SHORT, "--reward_model", tiny_reward_dir,  # graded rewards
                           "--output_dir", str(tmp_path / name)],
                          RESETRL_CACHE=str(cache))
        runs.append(tmp_path / name / "grpo__1")
        assert ("converting the packaged" in proc.stdout) == (name == "converts")
    metrics = [[{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_jsonl(run / "metrics.jsonl")]
               for run in runs]
    assert metrics[0] == metrics[1]  # the same samples, scores, losses and evaluations, to the last bit
    first, second = (load_file(run / "model" / "adapter_model.safetensors") for run in runs)
    assert first.keys() == second.keys() and any("lora_B" in k and first[k].abs().max() > 0 for k in first)
    for k in first:
        assert torch.equal(first[k], second[k]), k
