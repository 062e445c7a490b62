"""REBEL: REinforcement Learning via Regressing Relative Rewards (Gao et al. 2024, arXiv:2404.16767).

    python rebel.py                                   # embedded SmolLM2-135M + arithmetic, CPU or GPU
    accelerate launch --config_file configs/ddp.yaml rebel.py --model_name Qwen/Qwen2.5-1.5B-Instruct --task gsm8k

For each prompt, sample two responses y, y' from the current policy pi_t, score them, and regress the difference
of their rewards with the difference of the policy's log-ratios to pi_t:
    loss = mean over pairs of ((log pi(y)/pi_t(y) - log pi(y')/pi_t(y')) - eta (R(y) - R(y')))^2
with sequence log-probs (sums over the real tokens) and R = score - kl_coef * sum_t k_t (k1_t = lp_t - ref_t).
No value model, no advantages, no clipping: a few epochs of least squares on each batch.

Where this file departs from the paper and why:
1. KL coefficient 0 by default (the authors used 0.05 on TL;DR): on a CPU-sized budget the policy barely moves
   from the reference, and with 0 no reference model is held in training (evaluation loads one for the KL).
2. eta multiplies the reward difference, as in the authors' code (the paper divides the log-ratio difference by it:
   same minimiser, same step size of pi_{t+1} ~ pi_t exp(eta r)). eta = 2, not 1: with 0/1 rewards a pair with
   one correct answer then asks for 2 nats, about one optimizer step at lr 3e-6.
3. Two epochs in one minibatch (the authors used 4 epochs and several minibatches): the first epoch
   runs before any optimizer step, so its log-probs are pi_t's and no extra forward pass is needed.
4. No fixed score for responses without EOS (the authors' code gives them -1): a verifier scores them.
"""
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from common.config import BaseArgs, parse_args
from common.generation import forward_logprobs
from common.run import (finish_run, iteration_metrics, iterations, log_iteration, logprobs_of, rollout,
                        sample_prompts, save_on_failure, setup_run, start_training)
from common.training import kl_per_token, make_optimizer, masked_mean, micro_batches, minibatches, optimizer_step


@dataclass
class RebelHParams:
    eta: float = 2.0
    """eta: the log-ratio difference is regressed onto eta * (R(y) - R(y')) (the paper's eta; larger = larger steps)"""
    kl_coef: float = 0.0
    """weight of the summed KL estimate sum_t k_t in the reward R (0: no reference model in training)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token estimate: k1 = log pi/ref, k2 = (log pi/ref)^2 / 2, k3 = ref/pi - 1 - log ref/pi (benchmark/README)"""
    ranges: ClassVar[dict] = dict(eta="> 0", kl_coef=">= 0")


@dataclass
class Args(BaseArgs):
    num_iterations: int = 24
    num_epochs: int = 2
    prompts_per_iteration: int = 16
    learning_rate: float = 3e-6
    rebel: RebelHParams = field(default_factory=RebelHParams)


# ALGO LOGIC: least-squares regression of the reward difference of two responses
def rebel_loss(logprobs, old_logprobs, mask, rewards, eta: float):
    """((log pi(y)/pi_t(y) - log pi(y')/pi_t(y')) - eta (R(y) - R(y')))^2 per pair of consecutive rows, log-probs
    summed over the real tokens: (B, T) log-probs of pi and pi_t, (B, T) mask, (B,) rewards -> (B/2,)."""
    log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=1).view(-1, 2)  # (B/2, 2)
    reward = rewards.view(-1, 2)  # (B/2, 2)
    return ((log_ratio[:, 0] - log_ratio[:, 1]) - eta * (reward[:, 0] - reward[:, 1])) ** 2


if __name__ == "__main__":
    args = parse_args(Args)
    G = 2  # REBEL compares two responses per prompt
    # the policy, and (where the method needs one) a frozen copy of it as the reference
    run, policy, ref_model = setup_run(args, samples_per_prompt=G, group_size=G, reference=args.rebel.kl_coef > 0)
    accelerator, device, tokenizer = run.accelerator, run.device, run.tokenizer
    optimizer, scheduler = make_optimizer(policy, args)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    start_iteration = start_training(run, policy)  # resumes from --resume_from; evaluates the reference policy
    needs_old = args.num_minibatches > 1 or ref_model is not None  # else the first epoch computes them

    with save_on_failure(run, policy):
        for iteration in iterations(run, start_iteration):
            # 1. sample prompts
            batch, rows, queries, query_mask = sample_prompts(run, iteration, repeat=G)

            # 2. generate, and 3. truncate at EOS
            responses, mask, lengths, has_eos, gen_seconds = rollout(run, policy, queries, query_mask, args.temperature)

            # 4. score
            scores = run.score(rows, tokenizer.batch_decode(responses, skip_special_tokens=True)).to(device)  # (B,)

            # 5. rewards and advantages -- ALGO LOGIC: R = score - kl_coef * sum_t k_t, regressed as is (no advantages)
            query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T): what the models read
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)  # (B, P+T)
            old_logprobs = logprobs_of(run, policy, query_responses, attention_mask) if needs_old else \
                torch.zeros(responses.shape, device=device)  # (B, T), else filled in by the first epoch
            ref_logprobs = logprobs_of(run, ref_model, query_responses, attention_mask)  # (B, T) or None
            kl = (kl_per_token(old_logprobs, ref_logprobs, args.rebel.kl_estimator) * mask).sum(1)  # (B,)
            rewards = scores - args.rebel.kl_coef * kl  # (B,)

            # 6. update
            stats = {"loss/policy": [], "policy/approxkl": [], "objective/entropy": []}
            for step, mini in enumerate(minibatches(args, device, group_size=G)):  # pairs stay together
                first_pass = step == 0 and not needs_old  # no optimizer step yet: the policy is still pi_t
                for micro in micro_batches(accelerator, policy, mini, args.micro_batch_size):
                    logprobs, entropy = forward_logprobs(policy, query_responses[micro], attention_mask[micro],
                                                         args.response_length, args.temperature, with_entropy=True)
                    if first_pass:
                        old_logprobs[micro] = logprobs.detach()
                    old = old_logprobs[micro]  # (b, T)
                    loss = rebel_loss(logprobs, old, mask[micro], rewards[micro], args.rebel.eta).sum() / (
                        args.mini_batch_size // G)  # mean over the minibatch's pairs
                    accelerator.backward(loss)
                    log_ratio = logprobs.detach() - old  # (b, T)
                    stats["loss/policy"].append(loss.item() * args.grad_accum_steps)
                    stats["policy/approxkl"].append(masked_mean(0.5 * log_ratio ** 2, mask[micro]))
                    stats["objective/entropy"].append(masked_mean(entropy, mask[micro]))
                optimizer_step(accelerator, policy, optimizer, scheduler, args.max_grad_norm)

            # 7. log and evaluate
            stats["objective/rlhf_reward"] = rewards.mean().item()
            if ref_model is not None:  # the summed log-ratio (k1), whatever the reward's estimator
                stats["objective/kl"] = ((old_logprobs - ref_logprobs) * mask).sum(1).mean().item()
            metrics = iteration_metrics(run, stats, scores=scores, lengths=lengths, has_eos=has_eos,
                                        scheduler=scheduler, generate_seconds=gen_seconds,
                                        episode=iteration * args.prompts_per_iteration * G)
            log_iteration(run, metrics, policy, ref_model)  # evaluates every --eval_every, saves every --save_every

    finish_run(run, policy, ref_model)
