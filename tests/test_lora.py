"""LoRA (--lora_r): the reference is the policy with its adapters disabled, and what a LoRA run saves reloads."""
import glob
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from conftest import read_jsonl, run_script
from common.generation import forward_logprobs
from common.lora import AdaptersOff, add_lora
from common.models import load_causal_lm


def test_reference_by_disabled_adapters_equals_a_separate_reference(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32), 4, 32.0, "all-linear")
    with torch.no_grad():  # trained-looking adapters: lora_B starts at 0, which would make the test vacuous
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    reference = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    ids = torch.randint(5, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        separate = forward_logprobs(reference, ids, mask, 6, 1.0)
        disabled = forward_logprobs(AdaptersOff(policy), ids, mask, 6, 1.0)
        adapted = forward_logprobs(policy, ids, mask, 6, 1.0)
    # the same float32 operations on the same weights: log-probs of ~ln(49152) = 11 differ by a few roundings of
    # 2^-24 x 11 = 7e-7 at most; 1e-5 allows ~15 of them, while the adapters move them by > 1e-3 (next line)
    assert torch.allclose(disabled, separate, atol=1e-5)
    assert (adapted - separate).abs().max() > 1e-3  # the adapters do change the policy
    assert sum(p.numel() for p in AdaptersOff(policy).parameters()) == 0  # no second copy


def test_a_lora_run_saves_adapters_that_load_and_merge(tiny_model_dir, tiny_reward_dir, tmp_path):
    from peft import PeftModel

    for script in ("grpo.py", "drpo.py"):
        run_script([sys.executable, script, "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir,
                    "--lora_r", "4", "--gradient_checkpointing",
                    "--num_iterations", "1", "--prompts_per_iteration", "4", "--micro_batch_size", "2",
                    "--response_length", "8", "--num_eval_prompts", "4", "--eval_batch_size", "4",
                    "--num_train_prompts", "16", "--output_dir", str(tmp_path), "--learning_rate", "1e-2",
                    *(["--grpo.num_generations", "2"] if script == "grpo.py" else [])])
        out = glob.glob(os.path.join(tmp_path, f"{script[:-3]}__1__*", "model"))[0]
        assert os.path.exists(os.path.join(out, "adapter_config.json"))
        ids = torch.randint(5, 1000, (2, 10))
        loaded = AutoModelForCausalLM.from_pretrained(out)  # transformers loads the base with the adapters
        merged = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32),
                                           out).merge_and_unload()
        base = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            a, b, c = loaded(ids).logits, merged(ids).logits, base(ids).logits
        # W + s B A merged, or x W + s (x A) B: float32 sums in another order. A logit sums 64 products of a 2-layer
        # model's O(1) activations and weights, so reordering moves it by at most ~64 x 2^-24 x 64 = 2.4e-4 of the
        # terms' scale (~1e-2 here) = 2e-6 per layer; 1e-4 holds that with room, and an unmerged or missing
        # adapter moves logits by the training's change (> 1e-4, next line)
        assert torch.allclose(a, b, atol=1e-4)
        assert (a - c).abs().max() > 1e-4  # training moved the adapters


LORA_TINY = ["--lora_r", "4", "--num_iterations", "2", "--prompts_per_iteration", "4", "--grpo.num_generations", "2",
             "--micro_batch_size", "4", "--response_length", "8", "--num_eval_prompts", "8", "--eval_batch_size", "8",
             "--num_train_prompts", "32", "--learning_rate", "1e-2"]


def test_saved_adapters_reload_to_the_same_evaluation(tiny_model_dir, tiny_reward_dir, tmp_path):
    """--model_name a LoRA run's model/ (the base with the adapters merged) evaluates as the run's last evaluation."""
    common = [sys.executable, "grpo.py", "--reward_model", tiny_reward_dir, "--eval_samples", "2"]
    run_script([*common, "--model_name", tiny_model_dir, "--output_dir", str(tmp_path / "run"), *LORA_TINY])
    run_script([*common, "--model_name", str(tmp_path / "run" / "grpo__1" / "model"), "--num_iterations", "0",
                "--num_eval_prompts", "8", "--eval_batch_size", "8", "--response_length", "8",
                "--output_dir", str(tmp_path / "reloaded")])
    trained = read_jsonl(tmp_path / "run" / "grpo__1" / "metrics.jsonl")[-1]
    reloaded = read_jsonl(tmp_path / "reloaded" / "grpo__1" / "metrics.jsonl")[0]
    assert trained["eval/kl"] > 0  # the adapters moved the policy (the reloaded one is its own reference: KL 0)
    for key in ("eval/reward", "eval/sample_reward", "eval/response_length", "eval/eos_rate", "eval/accuracy"):
        # the same responses (checked below) scored by the same reward model: means of 8 or 16 float32 scores of
        # O(1) agree to ~1e-7; 1e-5 leaves room, and one response scored differently moves a mean by ~1e-2
        assert abs(reloaded[key] - trained[key]) < 1e-5, key
    samples = read_jsonl(tmp_path / "run" / "grpo__1" / "eval_samples.jsonl")
    again = read_jsonl(tmp_path / "reloaded" / "grpo__1" / "eval_samples.jsonl")
    assert [s["response"] for s in samples if s["step"] == 2] == [s["response"] for s in again[:8]]


def test_two_processes_train_identical_adapters(tiny_model_dir, tiny_reward_dir, tmp_path):
    run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
                "grpo.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir, "--output_dir",
                str(tmp_path), "--gradient_checkpointing", *LORA_TINY])
    rows = read_jsonl(tmp_path / "grpo__1" / "metrics.jsonl")
    assert rows[-1]["dist/param_checksum_spread"] == 0.0  # every weight, adapters included, equal on both processes
    assert rows[-1]["eval/kl"] > 0  # and the adapters did train


def test_sft_and_reward_with_lora_save_merged_models(tiny_model_dir, tiny_reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_script([sys.executable, "sft.py", "--model_name", tiny_model_dir, "--lora_r", "4", "--gradient_checkpointing",
                "--num_train_rows", "8", "--batch_size", "4", "--micro_batch_size", "2", "--num_eval_prompts", "4",
                "--learning_rate", "1e-2", "--output_dir", str(tmp_path)])
    run_script([sys.executable, "reward.py", "--model_name", tiny_reward_dir, "--lora_r", "4", "--pairs", "dataset",
                "--num_train_prompts", "8", "--batch_size", "4", "--micro_batch_size", "2", "--num_eval_prompts", "4",
                "--learning_rate", "1e-2", "--output_dir", str(tmp_path)])
    sft_dir = glob.glob(os.path.join(tmp_path, "sft__1__*", "model"))[0]
    reward_dir = glob.glob(os.path.join(tmp_path, "reward__1__*", "model"))[0]
    for out in (sft_dir, reward_dir):  # merged: a plain model folder, loadable wherever a model is named
        assert os.path.exists(os.path.join(out, "config.json"))
        assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():
        moved = AutoModelForCausalLM.from_pretrained(sft_dir)(ids).logits
        base = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)(ids).logits
    assert (moved - base).abs().max() > 1e-4
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    assert hasattr(reward.config, "reward_mean")  # the normalisation survives the merge
