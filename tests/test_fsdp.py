"""Sharded training (FSDP2) on CPU processes: the lock-step sampler; GRPO and the PPO family under accelerate's FSDP
against DDP.

accelerate offers FSDP on GPUs only; tests/fsdp_on_cpu.py switches its state to FSDP2 on gloo so that the
scripts' sharded path runs here. `python tests/test_fsdp.py` (under torch.distributed.run) is the sampler's
two-process worker.
"""
import glob
import os
import sys

import pytest
import torch

from conftest import ROOT, read_jsonl, run_script

TINY = ["--prompts_per_iteration", "4", "--response_length", "8",
        "--num_eval_prompts", "8", "--eval_batch_size", "8", "--num_train_prompts", "32", "--learning_rate", "1e-2"]


def sampler_worker(model_dir: str) -> None:
    """Each of two processes samples its own prompts with the sharded model and with an unsharded copy; they agree.

    Process 0's rows end early (its EOS is a token they produce at once) and it asks for fewer tokens than
    process 1, whose rows never end: without lock-step the two would issue different numbers of forward
    passes and hang. Process 0's rows are a group (one prompt twice), process 1's are distinct, so the
    log-prob passes would also differ without it.
    """
    from torch.distributed.fsdp import fully_shard

    from common.generation import batched_logprobs, generate, is_sharded
    from common.models import load_causal_lm

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    plain = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    sharded = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert is_sharded(sharded) and not is_sharded(plain)
    torch.manual_seed(rank)
    queries = torch.randint(5, 1000, (1 if rank == 0 else 3, 6))
    queries = queries.repeat(2, 1) if rank == 0 else queries  # (2 or 3, 6)
    mask = torch.ones_like(queries)
    length = 6 if rank == 0 else 10
    first = generate(plain, queries, mask, length, 0.0, 0, -1)  # greedy, no EOS
    eos = int(first[0, 1]) if rank == 0 else -1  # process 0's rows end at their second token
    expected, expected_logprobs = generate(plain, queries, mask, length, 0.0, 0, eos, return_logprobs=True)
    got, got_logprobs = generate(sharded, queries, mask, length, 0.0, 0, eos, return_logprobs=True)
    assert got.shape == (len(queries), length)
    assert torch.equal(got, expected), (rank, got, expected)
    # sharded or plain: the same float32 operations on the same (gathered) weights; log-probs of ~ln(49152) = 11
    # differ by a few roundings of 7e-7 at most. A log-prob of another row or position differs by ~1
    assert torch.allclose(got_logprobs, expected_logprobs, atol=1e-5)
    sampled = generate(sharded, queries, mask, length, 1.0, 0, eos)  # sampled: ends without a hang, cut after EOS
    after_eos = (sampled == eos).int().cumsum(1) - (sampled == eos).int() > 0
    assert (sampled[after_eos] == 0).all()
    query_responses = torch.cat([queries, expected], dim=1)
    attention = torch.cat([mask, torch.ones_like(expected)], dim=1)
    want = batched_logprobs(plain, query_responses, attention, length, 1.0, 4)
    assert torch.allclose(batched_logprobs(sharded, query_responses, attention, length, 1.0, 4), want, atol=1e-5)
    torch.distributed.destroy_process_group()
    print(f"rank {rank}: lock-step sampling agrees")


def test_the_sampler_runs_in_lock_step_on_sharded_weights(tiny_model_dir):
    out = run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                      os.path.join(ROOT, "tests", "test_fsdp.py"), tiny_model_dir], timeout=300)
    assert out.stdout.count("lock-step sampling agrees") == 2


def _launch(script, out_dir, model_dir, *extra, fsdp=True, port=29543):
    launcher = [os.path.join(ROOT, "tests", "fsdp_on_cpu.py")] if fsdp else []
    return run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(port), *launcher, script, "--model_name", model_dir, "--output_dir", str(out_dir), *extra],
                      timeout=400)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(glob.glob(os.path.join(folder, "*.safetensors"))[0])


# (script, its flags): GRPO; DR-PO (value model, resets to demonstrations); PPO++ under LoRA (roll-ins sampled by the
# sharded frozen reference, and the value model's own adapters)
GRPO = ["--num_iterations", "2", "--grpo.num_generations", "2", "--micro_batch_size", "4"]
# one iteration: a process whose rows reset deeper samples fewer tokens under DDP but as many as the others under
# FSDP's lock-step, so the random streams, and the second iteration's samples, part (measured: equal with no resets)
PPO = ["--num_iterations", "1", "--num_minibatches", "1", "--micro_batch_size", "2"]
LORA = ["--lora_r", "4"]
CASES = [("grpo.py", GRPO), ("grpo.py", [*GRPO, *LORA, "--grpo.kl_coef", "0.1"]), ("drpo.py", PPO),
         ("ppo_pp.py", [*PPO, *LORA])]


@pytest.mark.parametrize("script,flags", CASES, ids=["grpo", "grpo-lora", "drpo", "ppo_pp-lora"])
def test_training_under_fsdp_ends_where_ddp_does(tiny_model_dir, tiny_reward_dir, tmp_path, script, flags):
    """Same seeds, same samples (the tiny model never samples EOS in 8 tokens, so lock-step changes nothing here):
    FSDP's sharded update and the DDP one give the same weights, evaluations and logs; the saved model loads."""
    from transformers import AutoModelForCausalLM

    extra = [*TINY, *flags, "--reward_model", tiny_reward_dir]
    _launch(script, tmp_path / "fsdp", tiny_model_dir, *extra, "--save_every", "1")  # sharded checkpoints too
    _launch(script, tmp_path / "ddp", tiny_model_dir, *extra, fsdp=False, port=29545)
    fsdp, ddp = (tmp_path / name / f"{script[:-3]}__1" for name in ("fsdp", "ddp"))
    a, b = _weights(fsdp / "model"), _weights(ddp / "model")
    init = _weights(tiny_model_dir)
    assert a.keys() == b.keys()
    # what training moved: the weights from their start (LoRA: the B matrices from zero; the A matrices start at a
    # random draw the test does not see, so they count in the difference only)
    start = {k: init[k] if k in init else torch.zeros_like(b[k]) for k in b if "lora_A" not in k}
    moved = torch.cat([(b[k] - start[k]).flatten() for k in start]).norm()
    difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    # FSDP and DDP do the same float32 arithmetic in another order (gradients reduced shard by shard, the clipping
    # norm summed over shards): a gradient entry of ~10^3 terms moves by at most n u = 10^3 x 2^-24 = 6e-5 of its
    # terms' magnitudes. AdamW's step divides each entry by its own running RMS, so it keeps that relative size, except
    # for an entry whose terms cancel to within rounding of 0, whose step can flip sign: at most 2 sqrt(t) lr at step
    # t (|m|/sqrt(v) <= sqrt(t) there). Training moves ~10^5 entries by ~lr each, sqrt(10^5) ~ 300 lr in norm, so 3e-2
    # of it allows ~10 such flipped entries over the two steps; a sharding mistake that changes the update's
    # direction (a shard updated from its own process's gradient alone, a shard saved in another's place) moves it
    # by O(1) of its norm.
    assert moved > 0, "training did not move the weights"
    print(f"{script}: FSDP vs DDP: {difference / moved:.2e} of the weight change")
    assert difference / moved < 3e-2, f"FSDP ends {difference / moved:.2e} of the weight change away from DDP"
    rows_a, rows_b = read_jsonl(fsdp / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    for key in ("eval/reward", "eval/kl", "loss/policy", "loss/value", "dist/param_checksum_spread"):
        got = [r[key] for r in rows_a if key in r]
        want = [r[key] for r in rows_b if key in r]
        # the same prompts and samples under weights within the bound above; eval/kl, about quadratic in a small
        # update, moves by about twice the weights' 3e-2: 1e-1 relative (1e-6 for values at 0). Evaluating other
        # prompts, or weights that differ between processes, moves these by O(1)
        assert got == pytest.approx(want, rel=1e-1, abs=1e-6), key
    assert rows_a[-1]["dist/param_checksum_spread"] == 0.0
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():  # loads with from_pretrained (LoRA: the base with the adapters)
        AutoModelForCausalLM.from_pretrained(str(fsdp / "model"))(ids)


def test_the_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert any("fsdp" in c for c in configs)
    for path in configs:
        config = load_config_from_file(path)
        if "fsdp" in os.path.basename(path):
            assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sampler_worker(sys.argv[1])
