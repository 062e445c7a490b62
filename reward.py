"""Reward model: a Bradley-Terry model of pairwise preferences, the second step of the RLHF pipeline
(Stiennon et al. 2020; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031).

    python reward.py                                  # embedded SmolLM2-135M, arith pairs from its own samples
    python reward.py --num_train_prompts 400          # the same on 400 training prompts (benchmark/README.md)
    python reward.py --model_name runs/sft__1/model   # from the SFT model (its own samples make the pairs)
    python ppo.py --model_name runs/sft__1/model --reward_model runs/reward__1/model
    accelerate launch --config_file configs/ddp.yaml reward.py --model_name runs/sft__1/model --task tldr \\
        --pairs dataset

A causal LM gets a one-output score head (`AutoModelForSequenceClassification`, num_labels=1) and
reads the prompt and a response exactly as common/rewards.py scores them during RL
(`reward_model_texts`: the prompt as `format_prompt` writes it, then the decoded response); its
score is the head's output at the last token. Training minimises -log sigmoid(r(chosen) - r(rejected))
over chosen/rejected pairs. Held-out preference accuracy (the fraction of held-out pairs with
r(chosen) > r(rejected)) is measured before and after training; the model and its tokenizer are
saved in {output_dir}/{exp_name}__{seed}/model, which every algorithm file takes as --reward_model.

Pairs (--pairs):
- `dataset`: the task's own chosen/rejected columns (arith's built-in pairs, HH, TL;DR's
  trl-lib/tldr-preference); the only kind for tasks without a verifier.
- `policy` (the default for verifiable tasks, arith and gsm8k): N samples per prompt from the reference
  policy (--sample_model, default --model_name: the model RL starts from), judged by the task's
  verifier. chosen = a correct sample, or the dataset's reference response where no sample is
  correct; rejected = a wrong sample; a prompt with no wrong sample gives no pair (counted). The
  samples are cached in {output_dir}/preference_pairs/<hash>.jsonl, keyed by what they depend on
  (model, task, split, prompts, N, temperature, response length, seed), so a second run reuses them.

Normalisation (--normalize, on by default): after training, the mean and std of the raw reward on
the chosen and rejected responses of the training pairs are stored in the saved config
(`reward_mean`, `reward_std`); common/rewards.py's scoring then returns (r - mean) / std.

Where this file departs from the summarize_from_feedback_details reward model and why:
1. Normalisation: Stiennon et al. shift the reward so that the dataset's reference summaries score
   0 on average; here the shift and a scale come from the training pairs' responses (both chosen
   and rejected, i.e. mostly reference-policy samples under --pairs policy), and they live in the
   config rather than in the head: Llama-family and GPT-NeoX score heads have no bias to fold them into.
2. Pairs from the reference policy's own samples judged by a verifier (--pairs policy), so the
   whole pipeline runs offline on arith; the papers used human comparisons.
3. The score is read at the last token of the decoded response text (no EOS appended), because that
   is what common/rewards.py scores during RL; a response cut at --response_length looks the same as one
   that ended with EOS (the PPO family penalises a missing EOS separately).
4. CPU-sized defaults: 4 samples per prompt at temperature 0.7 (the RL files' rollout temperature,
   so the pairs look like what the reward model will score), 2 epochs over the pairs, 16 pairs per step, lr 2e-5
   decaying linearly. The embedded model rarely answers right at that temperature: in about two thirds
   of its arith pairs no sample was correct and the dataset's answer is the chosen response (more
   --num_samples give more pairs of two policy samples, at the cost of sampling time). The
   authors' settings for TL;DR are in benchmark/paper_scale.md.
"""
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from common.cache import cache_path, load_cached, model_fingerprint, prompts_digest, write_cached
from common.config import TrainArgs, parse_args
from common.errors import DataError, UserError
from common.generation import generate, truncate_after_eos
from common.models import (EMBEDDED_MODEL, add_lora, enable_gradient_checkpointing, load_causal_lm, load_reward_model,
                           load_tokenizer, merge_lora)
from common.processes import peak_memory_gb
from common.rewards import VERIFIERS, encode_for_reward_model, reward_model_texts, score_with_verifier
from common.supervised import (end_run, epoch_batches, finish, reduce_mean, report, save_on_failure, setup_supervised,
                               start_tracking)
from common.tasks import encode_prompts, load_preference_task, load_task
from common.tracking import log_metrics
from common.training import adamw, linear_schedule, micro_batches, optimizer_step


@dataclass
class Args(TrainArgs):
    model_name: str = EMBEDDED_MODEL
    """initial weights of the reward model: a causal LM (hub id or folder) that gets a fresh one-output score head"""
    sample_model: Optional[str] = None
    """the reference policy whose samples make --pairs policy pairs (default: --model_name); pass the model RL will
    start from"""
    pairs: Optional[Literal["policy", "dataset"]] = None
    """where pairs come from: policy = the reference policy's samples judged by the task's verifier;
    dataset = the task's chosen/rejected columns (default: policy for verifiable tasks, dataset otherwise)"""
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
    """store the mean and std of the raw reward on the training pairs' responses in the saved config;
    common/rewards.py then scores (r - mean) / std"""
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
    """Chosen/rejected pairs from policy samples judged by `verifier`: P rows and P lists of texts -> pairs,
    counts.

    chosen = a correct sample (drawn at random), or the row's reference "response" when no sample is
    correct; rejected = a wrong sample (drawn at random); a prompt with no wrong sample gives no pair.
    """
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


@torch.no_grad()
def sample_texts(model, tokenizer, query_ids, query_mask, num_samples: int, response_length: int, temperature: float):
    """`num_samples` responses per (b, P) prompt, cut after EOS and decoded as the RL files decode them -> b lists of
    texts."""
    keep = query_mask.any(dim=0)  # drop columns that are padding in every row
    queries = query_ids[:, keep].repeat_interleave(num_samples, dim=0)  # (b * N, P')
    mask = query_mask[:, keep].repeat_interleave(num_samples, dim=0)  # (b * N, P')
    responses = generate(model, queries, mask, response_length, temperature, tokenizer.pad_token_id,
                         tokenizer.eos_token_id)
    responses, _, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)  # (b * N, T)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [texts[i: i + num_samples] for i in range(0, len(texts), num_samples)]


def preference_accuracy_and_loss(rewards_chosen, rewards_rejected):
    """Sums over pairs of [r_c > r_r], the BT loss and the margin r_c - r_r: (B,), (B,) -> dict of floats."""
    return {"preference_accuracy": (rewards_chosen > rewards_rejected).float().sum().item(),
            "loss": bradley_terry_loss(rewards_chosen, rewards_rejected).item() * len(rewards_chosen),
            "margin": (rewards_chosen - rewards_rejected).sum().item()}


if __name__ == "__main__":
    args = parse_args(Args)
    pairs_kind = args.pairs or ("policy" if args.task in VERIFIERS else "dataset")
    if pairs_kind == "policy" and args.task not in VERIFIERS:
        raise UserError(f"--pairs policy needs a task with a verifier ({', '.join(VERIFIERS)}); "
                         f"task {args.task} has none: use --pairs dataset")
    if pairs_kind == "policy" and args.num_samples < 2:
        raise UserError("--num_samples must be at least 2 with --pairs policy: "
                         "a pair needs a wrong and (usually) a right sample")
    accelerator, run_dir = setup_supervised(args)
    device = accelerator.device
    tokenizer = load_tokenizer(args.model_name, args.trust_remote_code)

    # 1. pairs: the task's own, or the reference policy's samples judged by the verifier (sampled once, cached)
    pair_counts = {}
    if pairs_kind == "dataset":
        train_pairs = load_preference_task(args.task, "train", args.data_files, args.num_train_prompts, args.seed)
        eval_pairs = load_preference_task(args.task, "test", args.eval_data_files, args.num_eval_prompts)
    else:
        sample_model_name = args.sample_model or args.model_name
        sample_tokenizer, sampler = load_tokenizer(sample_model_name, args.trust_remote_code), None
        for split, num, files in (("train", args.num_train_prompts, args.data_files),
                                  ("test", args.num_eval_prompts, args.eval_data_files)):
            # the RL files' held-out prompts
            rows = load_task(args.task, split, files, num, args.seed if split == "train" else 0)
            # everything the samples depend on
            key = {"model": model_fingerprint(sample_model_name), "task": args.task, "split": split,
                   "data_files": files, "num_prompts": len(rows), "prompts": prompts_digest(rows),
                   "num_samples": args.num_samples, "temperature": args.temperature,
                   "response_length": args.response_length, "seed": args.seed,
                   "sample_batch_size": args.sample_batch_size}
            path = cache_path(os.path.join(args.output_dir, "preference_pairs"), key)
            cached = load_cached(path)
            if cached is not None:
                samples = cached["responses"]
                accelerator.print(f"[reward] {split}: loaded {args.num_samples} cached samples per prompt from {path}")
            else:
                # ALGO LOGIC: the reference policy samples N responses per prompt, as RL's rollouts would
                if sampler is None:
                    sampler = load_causal_lm(sample_model_name, device, torch.float32, args.trust_remote_code).eval()
                ids, mask = encode_prompts(sample_tokenizer, rows, args.max_prompt_length,
                                           f"task {args.task} {split}")  # (P, L)
                starts, mine, start_time = list(range(0, len(rows), args.sample_batch_size)), [], time.time()
                # each process its share of the generate batches
                for b in tqdm(starts[accelerator.process_index:: args.world_size], desc=f"sampling {split}",
                              disable=not accelerator.is_main_process):
                    with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
                          accelerator.autocast()):
                        # per batch
                        torch.manual_seed(int(hashlib.sha256(f"{args.seed}-{split}-{b}".encode()).hexdigest()[:8], 16))
                        mine.append((b, sample_texts(sampler, sample_tokenizer,
                                                     ids[b: b + args.sample_batch_size].to(device),
                                                     mask[b: b + args.sample_batch_size].to(device), args.num_samples,
                                                     args.response_length, args.temperature)))
                # P lists of N, in row order
                samples = [texts for _, batch in sorted(gather_object(mine)) for texts in batch]
                if accelerator.is_main_process:
                    write_cached(path, {"key": key, "seconds": time.time() - start_time,
                                        "ids": [r["id"] for r in rows], "responses": samples})
                    print(f"[reward] {split}: sampled {args.num_samples} responses per prompt "
                          f"in {time.time() - start_time:.0f} s; cached in {path}")
            pairs, counts = build_policy_pairs(rows, samples, VERIFIERS[args.task], args.seed)
            accelerator.print(f"[reward] {split}: {len(pairs)} pairs from {counts['prompts']} prompts; "
                              f"{counts['skipped_no_wrong_sample']} prompts skipped (no wrong sample), "
                              f"{counts['chosen_from_dataset']} with the reference response as chosen "
                              f"(no correct sample)")
            pair_counts.update({f"pairs/{split}_{k}": v for k, v in counts.items()})
            train_pairs, eval_pairs = (pairs, None) if split == "train" else (train_pairs, pairs)
        del sampler  # not needed for training

    # every pair must fit --max_length tokens: count and skip the others
    def fitting(pairs, what):
        lengths = [len(x) for x in tokenizer(reward_model_texts(tokenizer, pairs * 2,
                                                                [p["chosen"] for p in pairs]
                                                                + [p["rejected"] for p in pairs]),
                                             add_special_tokens=False)["input_ids"]] if pairs else []
        kept = [p for i, p in enumerate(pairs) if max(lengths[i], lengths[i + len(pairs)]) <= args.max_length]
        if len(kept) < len(pairs):
            accelerator.print(f"[reward] {what}: skipped {len(pairs) - len(kept)} of {len(pairs)} pairs "
                              f"longer than --max_length {args.max_length} tokens")
        if not kept:
            raise DataError(f"{what}: no pairs left "
                            "(every pair was longer than --max_length, or no prompt had a wrong sample)")
        return kept

    train_pairs, eval_pairs = (fitting(train_pairs, f"task {args.task} train"),
                               fitting(eval_pairs, f"task {args.task} test"))
    if len(train_pairs) < args.batch_size:
        raise UserError(f"{len(train_pairs)} training pairs, fewer than --batch_size {args.batch_size}")
    if accelerator.is_main_process:
        with open(os.path.join(run_dir, "train_pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in train_pairs)
    num_eval = len(eval_pairs)
    my_eval_pairs = eval_pairs[accelerator.process_index:: args.world_size]

    # 2. model: the LM with a one-output head (Llama-family heads have no bias); the pad id marks where each sequence
    # ends
    model = load_reward_model(args.model_name, device, torch.float32, tokenizer.pad_token_id, args.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.lora_r:  # adapters on the LM, the new score head trained in full
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, ["score"])
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    total_steps = args.epochs * (len(train_pairs) // args.batch_size)  # the last partial batch of each epoch dropped
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.lr_schedule, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    wandb_run = start_tracking(args, accelerator, run_dir)

    def pair_rewards(net, pairs):
        """Raw rewards of the chosen and the rejected responses of `pairs`, in one forward: -> (b,), (b,)."""
        texts = reward_model_texts(tokenizer, pairs * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        # (2b, L), left-padded as in scoring
        enc = encode_for_reward_model(tokenizer, texts, args.max_length).to(device)
        rewards = net(**enc).logits[:, 0].float()  # (2b,)
        return rewards[: len(pairs)], rewards[len(pairs):]

    def run_evaluation():
        """Held-out preference accuracy, BT loss and margin on every process's share of the pairs; the rewards of its
        share."""
        net = accelerator.unwrap_model(model)
        sums, scored = {"preference_accuracy": 0.0, "loss": 0.0, "margin": 0.0}, []
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
    report(accelerator, 0, {**before, **pair_counts}, run_dir, wandb_run)

    # 4. training: each process takes its share of every batch
    model.train()
    pbar = tqdm(total=total_steps, desc="reward", disable=not accelerator.is_main_process)
    with save_on_failure(accelerator, model, tokenizer, run_dir, "reward"):
        for step, (epoch, mine) in enumerate(epoch_batches(args, accelerator, len(train_pairs)), start=1):
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

            seconds = time.time() - start_time
            metrics = {**reduce_mean(accelerator, stats), "lr": scheduler.get_last_lr()[0],
                       "episode": step * args.batch_size, "epoch": epoch, "perf/seconds_per_iter": seconds,
                       "perf/peak_memory_gb": peak_memory_gb(device)}
            if accelerator.is_main_process:
                log_metrics(metrics, step, os.path.join(run_dir, "metrics.jsonl"), wandb_run)
            pbar.update(1)
            pbar.set_postfix(loss=f"{metrics['loss/reward']:.3f}", acc=f"{metrics['train/preference_accuracy']:.2f}",
                             s_it=f"{seconds:.1f}")
    pbar.close()
    model.eval()

    # 5. evaluation after training, then the normalisation: mean and std of the raw reward on the training pairs'
    # responses
    after, scored = run_evaluation()
    net = merge_lora(accelerator.unwrap_model(model))  # a plain model from here on (LoRA merged)
    if args.normalize:
        reference = train_pairs[: args.num_normalize_pairs][accelerator.process_index:: args.world_size]
        local = []
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, len(reference), args.eval_batch_size):
                local += [r for rewards in pair_rewards(net, reference[i: i + args.eval_batch_size])
                          for r in rewards.tolist()]
        values = torch.tensor(gather_object(local), dtype=torch.float64)
        mean, std = values.mean().item(), values.std(unbiased=False).item()
        if not std > 1e-6:
            raise UserError(f"the reward is constant ({mean:.4g}) on the {len(values)} training responses: "
                             "nothing to normalise; "
                             "train longer or pass --no_normalize")
        net.config.reward_mean, net.config.reward_std = mean, std
        after.update({"reward/mean": mean, "reward/std": std})
    scored = gather_object(scored)
    finish(accelerator, net, tokenizer, run_dir, after, wandb_run, total_steps)
    if accelerator.is_main_process:
        with open(os.path.join(run_dir, "eval_pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in scored)
        norm = f"; scores are (r - {mean:.3f}) / {std:.3f}" if args.normalize else ""
        print(f"[reward] held-out preference accuracy on {num_eval} pairs: {before['eval/preference_accuracy']:.3f} -> "
              f"{after['eval/preference_accuracy']:.3f}{norm}\n"
              f"[reward] metrics, pairs and the model (pass it as --reward_model) are in {run_dir}")
    end_run(wandb_run, accelerator)
