"""Reward model: a Bradley-Terry model of pairwise preferences, the second step of the RLHF pipeline
(Stiennon et al. 2020; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031).

    python reward.py                                  # embedded SmolLM2-135M, arith pairs from its own samples
    python reward.py --model_name runs/sft__1/model   # from the SFT model (its own samples make the pairs)
    python ppo.py --model_name runs/sft__1/model --reward_model runs/reward__1/model
    accelerate launch --config_file configs/ddp.yaml reward.py --model_name runs/sft__1/model --task tldr \\
        --pairs dataset

A causal LM gets a one-output score head (`AutoModelForSequenceClassification`, num_labels=1) and reads the prompt
and a response exactly as common/reward_models.py scores them during RL (`reward_model_texts`); its score is the head's
output at the last token. Training minimises -log sigmoid(r(chosen) - r(rejected)) over chosen/rejected pairs;
held-out preference accuracy (pairs with r(chosen) > r(rejected)) is measured before and after. The model is saved
in {output_dir}/{exp_name}__{seed}/model, which every algorithm file takes as --reward_model.

Pairs (--pairs): `dataset`, the task's own chosen/rejected columns (arith's, HH, TL;DR's trl-lib/tldr-preference),
the only kind for tasks without a verifier; or `policy` (the default for verifiable tasks): N samples per prompt
from the reference policy (--sample_model, default --model_name), judged by the task's verifier. chosen = a correct
sample, or the dataset's response where none is correct; rejected = a wrong sample; a prompt with no wrong sample
gives no pair (counted). The samples are cached (common/reference_samples.py), so a second run reuses them.

Where this file departs from the summarize_from_feedback_details reward model and why:
1. Normalisation (--normalize): the mean and std of the raw reward on the training pairs' responses are stored in
   the saved config (`reward_mean`, `reward_std`) and common/reward_models.py scores (r - mean) / std; Stiennon et al.
   shift the reference summaries to 0 in the head, but Llama-family and GPT-NeoX score heads have no bias.
2. Pairs from the reference policy's own samples judged by a verifier, so the pipeline runs offline on arith.
3. The score is read at the last token of the decoded response (no EOS appended), as common/reward_models.py scores it.
4. CPU-sized defaults: 4 samples per prompt at temperature 0.7 (the RL files' rollouts), 2 epochs, 16 pairs per
   step, lr 2e-5 decaying linearly. TL;DR settings: benchmark/paper_scale.md.
"""
import random
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from common.config import TrainArgs, parse_args
from common.errors import DataError, UserError
from common.models import EMBEDDED_MODEL
from common.processes import peak_memory_gb
from common.reference_samples import policy_samples
from common.reward_models import encode_for_reward_model, load_reward_model, reward_model_texts
from common.rewards import score_with_verifier, verifier_for
from common.supervised import (end_job, epoch_batches, finish_job, log_step, plain_model, prepare_training,
                               reduce_mean, report, save_on_failure, setup_job, summarize, write_jsonl)
from common.task_data import load_preference_task
from common.training import micro_batches, optimizer_step


@dataclass
class Args(TrainArgs):
    model_name: str = EMBEDDED_MODEL
    """initial weights of the reward model: a causal LM (hub id or folder) that gets a fresh one-output score head"""
    sample_model: Optional[str] = None
    """the reference policy whose samples make --pairs policy pairs (default: --model_name): the model RL starts from"""
    pairs: Optional[Literal["policy", "dataset"]] = None
    """policy = the reference policy's samples judged by the task's verifier; dataset = the task's chosen/rejected
    columns (default: policy for verifiable tasks, dataset otherwise)"""
    num_train_prompts: Optional[int] = None
    """use the first N training prompts (--pairs policy) or pairs (--pairs dataset) (default: all)"""
    num_eval_prompts: int = 250
    """held-out prompts (--pairs policy) or pairs (--pairs dataset) for the preference accuracy"""
    max_length: int = 512
    """longest prompt + response in tokens the reward model reads; longer pairs are skipped, with a count"""
    num_samples: int = 4
    """N: responses sampled per prompt (--pairs policy)"""
    temperature: float = 0.7
    """sampling temperature (pure sampling, as in the RL files' rollouts)"""
    response_length: int = 24
    """tokens sampled per response (cut after the first EOS)"""
    sample_batch_size: int = 16
    """prompts per generate call (each gives N sequences)"""
    epochs: int = 2
    """passes over the training pairs"""
    batch_size: int = 16
    """pairs per optimizer step, over all processes"""
    micro_batch_size: int = 8
    """pairs per forward/backward on one process (2x as many sequences; gradient accumulation fills the batch)"""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """learning-rate schedule over the optimizer steps"""
    eval_batch_size: int = 32
    """pairs per evaluation batch"""
    normalize: bool = True
    """store the raw reward's mean and std on the training pairs in the config: RL then scores (r - mean) / std"""
    num_normalize_pairs: int = 1024
    """training pairs (first N) whose chosen and rejected responses give that mean and std"""
    ranges: ClassVar[dict] = dict(
        TrainArgs.ranges, num_train_prompts=">= 1", max_length=">= 2", num_samples=">= 1", temperature="> 0",
        response_length=">= 1", sample_batch_size=">= 1", epochs=">= 1", batch_size=">= 1", num_normalize_pairs=">= 1")


# ALGO LOGIC: the Bradley-Terry model, P(chosen preferred) = sigmoid(r_chosen - r_rejected)
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """Mean of -log sigmoid(r_chosen - r_rejected): (B,), (B,) -> scalar."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def build_policy_pairs(rows, samples, verifier, seed: int):
    """P rows and P lists of sampled texts -> pairs, counts: chosen = a correct sample (drawn at random), or the row's
    "response" when none is correct; rejected = a wrong sample (at random); no wrong sample, no pair."""
    rng = random.Random(seed)
    pairs, counts = [], {"prompts": len(rows), "skipped_no_wrong_sample": 0, "chosen_from_dataset": 0}
    for row, texts in zip(rows, samples):
        correct = score_with_verifier(verifier, [row] * len(texts), texts) > 0.5  # (N,)
        right = [t for t, c in zip(texts, correct.tolist()) if c]
        wrong = [t for t, c in zip(texts, correct.tolist()) if not c]
        if not wrong:
            counts["skipped_no_wrong_sample"] += 1
            continue
        if right:
            chosen, source = rng.choice(right), "policy"
        else:
            chosen, source = row["response"], "dataset"
            counts["chosen_from_dataset"] += 1
        pair = {k: row[k] for k in ("id", "prompt", "messages", "answer") if k in row}
        pairs.append({**pair, "chosen": chosen, "rejected": rng.choice(wrong), "chosen_source": source})
    return pairs, counts


def preference_accuracy_and_loss(rewards_chosen, rewards_rejected):
    """Sums over pairs of [r_c > r_r], the BT loss and the margin r_c - r_r: (B,), (B,) -> dict of floats."""
    return {"preference_accuracy": (rewards_chosen > rewards_rejected).float().sum().item(),
            "loss": bradley_terry_loss(rewards_chosen, rewards_rejected).item() * len(rewards_chosen),
            "margin": (rewards_chosen - rewards_rejected).sum().item()}


def keep_fitting(tokenizer, pairs, max_length: int, what: str):
    """The pairs whose chosen and rejected texts both fit `max_length` tokens; prints the count skipped."""
    texts = reward_model_texts(tokenizer, pairs * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if pairs else []
    kept = [p for i, p in enumerate(pairs) if max(lengths[i], lengths[i + len(pairs)]) <= max_length]
    if len(kept) < len(pairs):
        print(f"[reward] {what}: skipped {len(pairs) - len(kept)} of {len(pairs)} pairs longer than --max_length "
              f"{max_length} tokens")
    if not kept:
        raise DataError(f"{what}: no pairs left (every pair was longer than --max_length, or no prompt had a wrong "
                        "sample)")
    return kept


if __name__ == "__main__":
    args = parse_args(Args)
    pairs_kind = args.pairs or ("policy" if verifier_for(args.task) else "dataset")
    if pairs_kind == "policy" and verifier_for(args.task) is None:
        raise UserError(f"--pairs policy needs a task with a verifier; task {args.task} has none: use --pairs dataset")
    if pairs_kind == "policy" and args.num_samples < 2:
        raise UserError("--num_samples must be at least 2 with --pairs policy: a pair needs a wrong and a right sample")
    job = setup_job(args)
    accelerator, device, tokenizer = job.accelerator, job.device, job.tokenizer

    # 1. pairs: the task's own, or the reference policy's samples judged by the verifier (sampled once, cached)
    pair_counts, pairs = {}, {}
    if pairs_kind == "dataset":
        pairs["train"] = load_preference_task(args.task, "train", args.data_files, args.num_train_prompts, args.seed)
        pairs["test"] = load_preference_task(args.task, "test", args.eval_data_files, args.num_eval_prompts)
    else:
        for split, (rows, samples) in policy_samples(args, accelerator, args.sample_model or args.model_name).items():
            pairs[split], counts = build_policy_pairs(rows, samples, verifier_for(args.task), args.seed)
            accelerator.print(f"[reward] {split}: {len(pairs[split])} pairs from {counts['prompts']} prompts; "
                              f"{counts['skipped_no_wrong_sample']} prompts skipped (no wrong sample), "
                              f"{counts['chosen_from_dataset']} with the reference response as chosen")
            pair_counts.update({f"pairs/{split}_{k}": v for k, v in counts.items()})
    train_pairs, eval_pairs = (keep_fitting(tokenizer, pairs[split], args.max_length, f"task {args.task} {split}")
                               for split in ("train", "test"))
    if len(train_pairs) < args.batch_size:
        raise UserError(f"{len(train_pairs)} training pairs, fewer than --batch_size {args.batch_size}")
    write_jsonl(job, "train_pairs.jsonl", train_pairs)
    num_eval, my_eval_pairs = len(eval_pairs), eval_pairs[accelerator.process_index:: args.world_size]

    # 2. model: the LM with a one-output head (Llama-family heads have no bias); the pad id marks each sequence's end
    model = load_reward_model(args.model_name, device, torch.float32, tokenizer.pad_token_id, args.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    total_steps = args.epochs * (len(train_pairs) // args.batch_size)  # the last partial batch of each epoch dropped
    model, optimizer, scheduler = prepare_training(job, model, total_steps, ["score"])  # LoRA: the head in full

    def pair_rewards(net, pairs):
        """Raw rewards of the chosen and the rejected responses of `pairs`, in one forward: -> (b,), (b,)."""
        texts = reward_model_texts(tokenizer, pairs * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        enc = encode_for_reward_model(tokenizer, texts, args.max_length).to(device)  # (2b, L), left-padded as in RL
        rewards = net(**enc).logits[:, 0].float()  # (2b,)
        return rewards[: len(pairs)], rewards[len(pairs):]

    def run_evaluation():
        """Held-out preference accuracy, BT loss and margin (metrics), and this process's pairs with their rewards."""
        net, scored = accelerator.unwrap_model(model), []
        sums = {"preference_accuracy": 0.0, "loss": 0.0, "margin": 0.0}
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, len(my_eval_pairs), args.eval_batch_size):
                batch = my_eval_pairs[i: i + args.eval_batch_size]
                chosen, rejected = pair_rewards(net, batch)
                for k, v in preference_accuracy_and_loss(chosen, rejected).items():
                    sums[k] += v
                scored += [{**p, "reward_chosen": c, "reward_rejected": r}
                           for p, c, r in zip(batch, chosen.tolist(), rejected.tolist())]
        keys = sorted(sums)
        totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [len(my_eval_pairs)], dtype=torch.float64,
                                                 device=device), "sum")
        return {f"eval/{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}, scored

    # 3. evaluation before training: a fresh head scores at chance
    before, _ = run_evaluation()
    report(job, 0, {**before, **pair_counts})

    # 4. training: each process takes its share of every batch
    model.train()
    with save_on_failure(job, model, tokenizer):
        for step, epoch, mine in epoch_batches(job, len(train_pairs)):
            start_time = time.time()
            stats = {"loss/reward": 0.0, "train/preference_accuracy": 0.0, "train/margin": 0.0}
            for micro in micro_batches(accelerator, model, torch.as_tensor(mine), args.micro_batch_size):
                chosen, rejected = pair_rewards(model, [train_pairs[i] for i in micro.tolist()])  # (b,), (b,)
                loss = bradley_terry_loss(chosen, rejected)
                accelerator.backward(loss / args.grad_accum_steps)  # the mean over the minibatch's pairs
                stats["loss/reward"] += loss.item() / args.grad_accum_steps
                stats["train/preference_accuracy"] += (chosen > rejected).float().mean().item() / args.grad_accum_steps
                stats["train/margin"] += (chosen - rejected).mean().item() / args.grad_accum_steps
            optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm)

            # 5. log, and evaluate every --eval_every steps
            log_step(job, step, {**reduce_mean(job, stats), "lr": scheduler.get_last_lr()[0],
                                 "episode": step * args.batch_size, "epoch": epoch,
                                 "perf/seconds_per_iter": time.time() - start_time,
                                 "perf/peak_memory_gb": peak_memory_gb(device)},
                     lambda: (run_evaluation()[0], None), {"loss": "loss/reward", "acc": "train/preference_accuracy"})
    model.eval()

    # 6. evaluation after training, then the normalisation: the raw reward's mean and std on the training pairs
    after, scored = run_evaluation()
    net = plain_model(job, model)  # LoRA merged from here on
    if args.normalize:
        reference, local = train_pairs[: args.num_normalize_pairs][accelerator.process_index:: args.world_size], []
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, len(reference), args.eval_batch_size):
                local += [r for rewards in pair_rewards(net, reference[i: i + args.eval_batch_size])
                          for r in rewards.tolist()]
        values = torch.tensor(gather_object(local), dtype=torch.float64)
        mean, std = values.mean().item(), values.std(unbiased=False).item()
        if not std > 1e-6:
            raise UserError(f"the reward is constant ({mean:.4g}) on the {len(values)} training responses: nothing to "
                            "normalise; train longer or pass --no_normalize")
        net.config.reward_mean, net.config.reward_std = mean, std
        after.update({"reward/mean": mean, "reward/std": std})
    scored = gather_object(scored)
    finish_job(job, net, tokenizer, after, total_steps)
    write_jsonl(job, "eval_pairs.jsonl", scored)
    summarize(job, before, after, f"{num_eval} held-out pairs", "pass it as --reward_model")
    end_job(job)
