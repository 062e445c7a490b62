"""GRPO with resets: each group starts from one shared state, the prompt plus the first h tokens of its row's
dataset response (GRPO: Shao et al. 2024, arXiv:2402.03300; resets to demonstrations: DR-PO, Chang et al. 2024,
arXiv:2404.08495; the group-shared prefix: R^3, UFT, QuestA, AdaBack, SEELE, common/resets.py).

    python grpo_reset.py --model_name pocket --task lock8                  # seconds on a CPU
    python grpo_reset.py --grpo.rollin_schedule anneal                     # embedded SmolLM2-135M + arithmetic

With probability `--grpo.reset_prob` a group is a reset: h comes from `--grpo.rollin_schedule`, the same h and
prefix for the whole group, so the group baseline compares continuations of one state. The roll-in carries no
loss and no KL, and the ratio is taken on the policy's own tokens only. The default schedule is uniform: no other
did better on the lock task (benchmark/README.md, "Roll-in schedules"). With reset_prob 0 this is grpo.py:

For each prompt, sample a group of G responses, score them (one outcome reward each, broadcast to its
tokens), and push up the log-probs of the responses that beat their group's mean, with PPO's clipped
ratio and a KL penalty in the loss.

Where this file departs from the paper and why:
1. KL coefficient 0 by default (the paper used 0.04): on a CPU-sized budget the policy barely moves
   from the reference, and with 0 no reference model is held in training (evaluation loads one for the KL).
2. Loss aggregation is a flag (`--grpo.loss_type`). The default `grpo` is the paper's (mean over
   tokens of each sequence, then over sequences); it favours short correct and long wrong answers.
   `bnpo` divides the token sum by the token count, `dr_grpo` by (sequences x response_length).
3. One update per batch by default (mu = 1, `--num_epochs`): the ratio is then 1 and the clipping
   inactive, so the old log-probs are the current ones detached, which saves a forward pass.
"""
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from common.config import BaseArgs, parse_args
from common.generation import forward_logprobs
from common.resets import make_schedule, reset_rollout, tokenize_demonstrations
from common.run import (finish_run, iteration_metrics, iterations, log_iteration, logprobs_of,
                        sample_prompts, save_on_failure, setup_run, start_training)
from common.training import kl_per_token, make_optimizer, masked_mean, micro_batches, minibatches, optimizer_step


@dataclass
class GRPOHParams:
    num_generations: int = 8
    """G: responses sampled per prompt (the group: at least 2, advantages compare responses within it)"""
    cliprange: float = 0.2
    """epsilon: clip range of the probability ratio"""
    kl_coef: float = 0.0
    """beta: weight of the KL estimate to the reference (0: no reference model in training)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token estimate: k1 = log pi/ref, k2 = (log pi/ref)^2 / 2, k3 = ref/pi - 1 - log ref/pi (benchmark/README)"""
    kl_in: Literal["reward", "loss"] = "loss"
    """where the estimate goes: added to each token's loss (the paper's), or its sum subtracted from each score"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    """loss aggregation: grpo = mean over sequences of per-sequence token means (the paper's);
    bnpo = token sum / token count; dr_grpo = token sum / (sequences x response_length)"""
    scale_rewards: bool = True
    """divide advantages by the group's standard deviation; False = mean-only (Dr. GRPO)"""
    reset_prob: float = 0.5
    """probability that a group starts from a reset to a prefix of its row's dataset response (0: grpo.py)"""
    rollin_schedule: Literal["uniform", "reverse", "adaptive", "anneal"] = "uniform"
    """how deep resets start: uniform h ~ U{1..len-1}, reverse (from the end back), adaptive (per prompt, towards 50%
    success), anneal (the depth falls to 0 by 60% of the iterations); common/resets.py has each one's paper"""
    ranges: ClassVar[dict] = dict(num_generations=">= 2", cliprange="> 0", kl_coef=">= 0", reset_prob="in [0, 1]")


@dataclass
class Args(BaseArgs):
    grpo: GRPOHParams = field(default_factory=GRPOHParams)


# ALGO LOGIC: group-normalised advantages and the clipped, KL-regularised per-token loss
def group_advantages(scores, group_size: int, scale_rewards: bool, eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std of its group + eps), groups of consecutive rows: (B,) -> (B,);
    the sample std (Bessel's correction). scale_rewards=False keeps the numerator only."""
    grouped = scores.view(-1, group_size)  # (B/G, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def grpo_per_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, cliprange: float, kl_coef: float,
                        kl_estimator: str = "k3"):
    """-min(rho A, clip(rho, 1-eps, 1+eps) A) + beta k: (B, T) log-probs, (B,) advantages -> (B, T)."""
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * adv)
    return loss + kl_coef * kl_per_token(logprobs, ref_logprobs, kl_estimator) if kl_coef > 0 else loss


def aggregate_loss(per_token, mask, loss_type: str, num_sequences: int, num_tokens, response_length: int):
    """Reduce (B, T) per-token losses over the real tokens of a minibatch of N = `num_sequences` sequences, called
    per micro-batch with the minibatch's normalisers (so micro-batches add up to the minibatch loss):
    grpo: sum_i mean_t / N; bnpo: sum / num_tokens; dr_grpo: sum / (N * T)."""
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    return (per_token * mask).sum() / (num_tokens if loss_type == "bnpo" else num_sequences * response_length)


if __name__ == "__main__":
    args = parse_args(Args)
    G = args.grpo.num_generations
    # the policy, and (where the method needs one) a frozen copy of it as the reference
    run, policy, ref_model = setup_run(args, samples_per_prompt=G, reference=args.grpo.kl_coef > 0)
    accelerator, device, tokenizer = run.accelerator, run.device, run.tokenizer
    # ALGO LOGIC: every training row's dataset response + EOS (the prefixes resets force), and the roll-in schedule
    demo_ids, demo_lengths = tokenize_demonstrations(tokenizer, run.train_rows, args.response_length)  # (N, T), (N,)
    schedule = make_schedule(args.grpo.rollin_schedule, len(run.train_rows), args.num_iterations,
                             accelerator=accelerator)  # its state goes into the checkpoints
    optimizer, scheduler = make_optimizer(policy, args)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    start_iteration = start_training(run, policy)  # resumes from --resume_from; evaluates the reference policy
    needs_old = args.num_epochs > 1 or args.num_minibatches > 1 or ref_model is not None  # else the ratio is 1

    with save_on_failure(run, policy):
        for iteration in iterations(run, start_iteration):
            # 1. sample prompts
            batch, rows, queries, query_mask = sample_prompts(run, iteration, repeat=G)
            # ALGO LOGIC: roll-in lengths, drawn per training row, so a group's samples (one row) share theirs (0: the
            # group starts from the prompt)
            row_ids = batch.repeat(G)  # (B,) each sample's training row
            prefixes, prefix_lengths = demo_ids[row_ids].to(device), demo_lengths[row_ids].to(device)  # (B, T), (B,)
            rollin = schedule.depths(prefix_lengths, args.grpo.reset_prob, (args.seed, iteration, row_ids), iteration)

            # 2. generate, and 3. truncate at EOS: the policy continues each reset state; the roll-in goes back in front
            responses, seen, lengths, has_eos, forced, gen_seconds = reset_rollout(
                run, policy, queries, query_mask, prefixes, rollin, args.temperature)  # (B, T) each; forced: roll-in
            mask = seen & ~forced  # (B, T) the tokens the policy chose: the only ones with a loss, a ratio and a KL

            # 4. score
            scores = run.score(rows, tokenizer.batch_decode(responses, skip_special_tokens=True)).to(device)  # (B,)
            if args.grpo.reset_prob > 0:  # ALGO LOGIC: the schedule learns from the whole batch's scores
                schedule.update(row_ids, rollin, prefix_lengths, scores, accelerator.gather)

            # 5. rewards and advantages -- ALGO LOGIC: the group baseline replaces a value model
            query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T): what the models read
            attention_mask = torch.cat([query_mask, seen.long()], dim=1)  # (B, P+T): the roll-in is read
            old_logprobs = logprobs_of(run, policy, query_responses, attention_mask) if needs_old else None
            ref_logprobs = logprobs_of(run, ref_model, query_responses, attention_mask)  # (B, T) or None
            kl = (kl_per_token(old_logprobs, ref_logprobs, args.grpo.kl_estimator) * mask).sum(1) if needs_old else 0
            rewards = scores - args.grpo.kl_coef * kl if args.grpo.kl_in == "reward" else scores  # (B,) or KL in loss
            advantages = group_advantages(rewards, G, args.grpo.scale_rewards)  # (B,)

            # 6. update
            stats = {"loss/policy": [], "policy/clipfrac": [], "policy/approxkl": [], "objective/entropy": [],
                     "objective/kl": []}
            for mini in minibatches(args, device, group_size=G):  # groups stay together (they share their prompt)
                num_tokens = accelerator.reduce(mask[mini].sum().float(), "mean")  # the mean over processes
                for micro in micro_batches(accelerator, policy, mini, args.micro_batch_size):
                    logprobs, entropy = forward_logprobs(policy, query_responses[micro], attention_mask[micro],
                                                         args.response_length, args.temperature, with_entropy=True)
                    old = old_logprobs[micro] if old_logprobs is not None else logprobs.detach()  # (b, T)
                    ref = ref_logprobs[micro] if ref_logprobs is not None else None  # (b, T)
                    per_token = grpo_per_token_loss(logprobs, old, ref, advantages[micro], args.grpo.cliprange,
                                                    args.grpo.kl_coef * (args.grpo.kl_in == "loss"),
                                                    args.grpo.kl_estimator)  # (b, T)
                    loss = aggregate_loss(per_token, mask[micro], args.grpo.loss_type, args.mini_batch_size,
                                          num_tokens, args.response_length)
                    accelerator.backward(loss)
                    log_ratio = logprobs.detach() - old  # (b, T)
                    stats["loss/policy"].append(loss.item() * args.grad_accum_steps)
                    stats["policy/clipfrac"].append(masked_mean((log_ratio.exp() - 1).abs() > args.grpo.cliprange,
                                                                mask[micro]))
                    stats["policy/approxkl"].append(masked_mean(0.5 * log_ratio ** 2, mask[micro]))
                    stats["objective/entropy"].append(masked_mean(entropy, mask[micro]))
                    if ref is not None:
                        stats["objective/kl"].append(((logprobs.detach() - ref) * mask[micro]).sum(1).mean().item())
                optimizer_step(accelerator, policy, optimizer, scheduler, args.max_grad_norm)

            # 7. log and evaluate
            stats.update({"val/rollin_length": forced.sum(1).float().mean().item(), **schedule.stats()})
            metrics = iteration_metrics(run, stats, scores=scores, lengths=lengths, has_eos=has_eos,
                                        scheduler=scheduler, generate_seconds=gen_seconds,
                                        episode=iteration * args.prompts_per_iteration * G)
            log_iteration(run, metrics, policy, ref_model)  # evaluates every --eval_every, saves every --save_every

    finish_run(run, policy, ref_model)
