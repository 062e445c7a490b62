"""PPO for RLHF (Stiennon et al. 2020; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
arXiv:2403.17031).

    python ppo.py                                     # embedded SmolLM2-135M + arithmetic, CPU or GPU
    accelerate launch --config_file configs/ddp.yaml ppo.py --model_name Qwen/Qwen2.5-1.5B-Instruct --task gsm8k

Sample one response per prompt. Its per-token reward is -kl_coef * (log pi - log ref), with the
score added at its last token; GAE on a learned value model turns rewards into advantages, and
several epochs of clipped policy and value updates are taken on each batch.

Where this file departs from the summarize_from_feedback_details code and why:
1. The score is the reward of the last real token (the EOS where there is one); that code adds it
   one position later, on the padding after the EOS, and learns a value there too.
2. A value model started from the policy (no --reward_model) gets a zero scalar head: a random
   head's values (about +-0.5 per token here) are noise on the scale of a 0/1 verifier score.
3. CPU-sized defaults: 16 prompts per batch, 2 epochs x 2 minibatches, 24 tokens (the paper used
   4 epochs and far larger batches; paper-scale commands go in benchmark/).
"""
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from common.config import BaseArgs, parse_args
from common.generation import (entropy_from_logits, logprobs_from_logits, position_ids_from_mask,
                               response_logits)
from common.models import enable_gradient_checkpointing
from common.reward_models import load_reward_model
from common.run import (finish_run, iteration_metrics, iterations, log_iteration, logprobs_of, rollout,
                        sample_prompts, save_on_failure, setup_run, start_training)
from common.training import kl_per_token, make_optimizer, masked_mean, micro_batches, minibatches, optimizer_step


@dataclass
class PPOHParams:
    kl_coef: float = 0.05
    """weight of the per-token KL estimate to the reference"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token estimate: k1 = log pi/ref, k2 = (log pi/ref)^2 / 2, k3 = ref/pi - 1 - log ref/pi (benchmark/README)"""
    kl_in: Literal["reward", "loss"] = "reward"
    """where the estimate goes: subtracted from each token's reward (the authors'), or added to the loss (as GRPO)"""
    missing_eos_penalty: Optional[float] = -1.0
    """score given to a response with no EOS in --response_length tokens (None: keep its score)"""
    gamma: float = 1.0
    """discount factor of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    cliprange: float = 0.2
    """clip range of the policy's probability ratio"""
    cliprange_value: float = 0.2
    """clip range of the value predictions around their rollout values"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    value_model: Optional[str] = None
    """value model's initial weights (hub id or folder); default: --reward_model if given, else --model_name
    with a zeroed scalar head"""
    ranges: ClassVar[dict] = dict(kl_coef=">= 0", gamma="in [0, 1]", lam="in [0, 1]", cliprange="> 0",
                                  cliprange_value="> 0", vf_coef=">= 0")


@dataclass
class Args(BaseArgs):
    num_iterations: int = 12
    num_epochs: int = 2
    num_minibatches: int = 2
    learning_rate: float = 1e-5
    prompts_per_iteration: int = 16
    micro_batch_size: int = 8
    ppo: PPOHParams = field(default_factory=PPOHParams)


# ALGO LOGIC: per-token rewards with the KL penalty, GAE, masked whitening, clipped policy and value losses
def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, kl_estimator: str = "k1"):
    """r_t = -kl_coef * k_t (k1_t = lp_t - ref_t) on the masked tokens, plus the score on each row's last masked
    token: (B, T)."""
    mask = mask.float()
    rewards = -kl_coef * kl_per_token(logprobs, ref_logprobs, kl_estimator) * mask  # (B, T)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # (B,) index of the last masked token
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def compute_gae(rewards, values, mask, gamma: float, lam: float):
    """GAE over each row's tokens: (B, T) rewards, values, mask -> advantages and returns (B, T).

    Rewards and values outside `mask` count as 0, so the value after a row's last token is 0: the episode ends there.
    """
    mask = mask.float()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def masked_whiten(x, mask, sum_processes=lambda t: t, eps: float = 1e-8):
    """(x - mean) / std over the entries where `mask` is True (std with Bessel's correction), 0 elsewhere: (B, T).
    `sum_processes` sums a statistic over processes: mean and std are then those of the whole batch."""
    mask = mask.float()
    n = sum_processes(mask.sum())
    mean = sum_processes((x * mask).sum()) / n
    var = sum_processes((((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(logprobs, old_logprobs, advantages, cliprange: float):
    """PPO's clipped surrogate per token, max(-A rho, -A clip(rho, 1-eps, 1+eps)): (B, T) -> (B, T)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))


def clipped_value_loss(values, old_values, returns, cliprange_value: float):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) per token: (B, T) -> (B, T)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


class PolicyAndValue(nn.Module):
    """The trained pair as one module, so one optimizer and one DDP wrapper cover both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    @property
    def _no_split_modules(self):  # FSDP's units: each decoder layer, and the policy, which sampling calls alone
        policy = getattr(self.policy, "get_base_model", lambda: self.policy)()  # LoRA: the model inside peft's
        return [type(policy).__name__, *(policy._no_split_modules or []), *(self.value_model._no_split_modules or [])]

    def forward(self, query_responses, attention_mask, response_length: int):
        """Logits (B, T, V) predicting each response token, and values (B, T) of the states they are chosen in."""
        logits = response_logits(self.policy, query_responses, attention_mask, response_length)
        value_model = getattr(self.value_model, "get_base_model", lambda: self.value_model)()  # unwrap LoRA's
        hidden = value_model.base_model(input_ids=query_responses, attention_mask=attention_mask, use_cache=False,
                                        position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        values = value_model.score(hidden[:, -response_length - 1: -1]).squeeze(-1)  # (B, T)
        return logits, values.float()


if __name__ == "__main__":
    args = parse_args(Args)
    value_source = args.ppo.value_model or args.reward_model or args.model_name  # it reads the policy's token ids
    # the policy, and (where the method needs one) a frozen copy of it as the reference
    run, policy, ref_model = setup_run(args, samples_per_prompt=1, reference=True,
                                       same_vocabulary={value_source} - {args.model_name})
    accelerator, device, tokenizer = run.accelerator, run.device, run.tokenizer

    # ALGO LOGIC: the value model, a sequence-classification model whose scalar head is read at every response position
    value_model = load_reward_model(value_source, device, torch.float32, tokenizer.pad_token_id, args.trust_remote_code)
    if value_source == args.model_name:
        nn.init.zeros_(value_model.score.weight)  # a fresh head: start every value at 0 rather than at random
    if args.lora_r:  # its own adapters on its own frozen copy of the base; the score head trains in full
        from common.lora import add_lora

        value_model = add_lora(value_model, args.lora_r, args.lora_alpha, args.lora_target_modules, ["score"])
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(value_model)
    model = PolicyAndValue(policy, value_model)
    optimizer, scheduler = make_optimizer(model, args)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start_iteration = start_training(run, policy)  # resumes from --resume_from; evaluates the reference policy

    with save_on_failure(run, policy):
        for iteration in iterations(run, start_iteration):
            # 1. sample prompts
            batch, rows, queries, query_mask = sample_prompts(run, iteration)

            # 2. generate, and 3. truncate at EOS
            responses, mask, lengths, has_eos, gen_seconds = rollout(run, policy, queries, query_mask, args.temperature)
            action_mask = mask  # (B, T) tokens the policy chose: rewards, whitening and losses use only these

            # 4. score
            scores = run.score(rows, tokenizer.batch_decode(responses, skip_special_tokens=True)).to(device)  # (B,)
            if args.ppo.missing_eos_penalty is not None:
                scores = torch.where(has_eos, scores, torch.full_like(scores, args.ppo.missing_eos_penalty))

            # 5. rewards and advantages
            query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T): what the models read
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)  # (B, P+T)
            with torch.no_grad(), accelerator.autocast():
                old_logprobs, old_values, entropy = [], [], []
                for chunk in torch.arange(args.local_batch_size, device=device).split(args.micro_batch_size):
                    logits, values = accelerator.unwrap_model(model)(query_responses[chunk], attention_mask[chunk],
                                                                     args.response_length)  # (b, T, V), (b, T)
                    old_logprobs.append(logprobs_from_logits(logits, responses[chunk], args.temperature))
                    old_values.append(values)
                    entropy.append(entropy_from_logits(logits, args.temperature))
                old_logprobs, old_values, entropy = torch.cat(old_logprobs), torch.cat(old_values), torch.cat(entropy)
            ref_logprobs = logprobs_of(run, ref_model, query_responses, attention_mask)  # (B, T)
            # ALGO LOGIC: KL in the reward, score at the last token, GAE, advantages whitened over the chosen tokens
            kl_reward = args.ppo.kl_coef if args.ppo.kl_in == "reward" else 0.0  # else the loss holds the KL term
            rewards = per_token_rewards(scores, old_logprobs, ref_logprobs, action_mask, kl_reward,
                                        args.ppo.kl_estimator)  # (B, T)
            advantages, returns = compute_gae(rewards, old_values, action_mask, args.ppo.gamma, args.ppo.lam)  # (B, T)
            advantages = masked_whiten(advantages, action_mask, lambda t: accelerator.reduce(t, "sum"))  # (B, T)
            kl = ((old_logprobs - ref_logprobs) * action_mask).sum(1)  # (B,) k1 summed over each response

            # 6. update
            stats = {"loss/policy": [], "loss/value": [], "policy/clipfrac": [], "policy/approxkl": [],
                     "val/clipfrac": [], "val/value_error": []}
            for mini in minibatches(args, device):
                num_tokens = accelerator.reduce(action_mask[mini].sum().float(), "mean")  # the mean over processes
                for micro in micro_batches(accelerator, model, mini, args.micro_batch_size):
                    logits, values = model(query_responses[micro], attention_mask[micro], args.response_length)
                    logprobs = logprobs_from_logits(logits, responses[micro], args.temperature)  # (b, T)
                    pg_loss = clipped_policy_loss(logprobs, old_logprobs[micro], advantages[micro],
                                                  args.ppo.cliprange)  # (b, T)
                    if args.ppo.kl_in == "loss":  # the estimate differentiated on the sampled tokens
                        pg_loss = pg_loss + args.ppo.kl_coef * kl_per_token(logprobs, ref_logprobs[micro],
                                                                            args.ppo.kl_estimator)  # (b, T)
                    vf_loss = clipped_value_loss(values, old_values[micro], returns[micro],
                                                 args.ppo.cliprange_value)  # (b, T)
                    m = action_mask[micro]
                    loss = ((pg_loss + args.ppo.vf_coef * vf_loss) * m).sum() / num_tokens  # minibatch token mean
                    accelerator.backward(loss)
                    log_ratio = logprobs.detach() - old_logprobs[micro]  # (b, T)
                    value_change = values.detach() - old_values[micro]  # (b, T)
                    stats["loss/policy"].append((pg_loss * m).sum().item() / num_tokens * args.grad_accum_steps)
                    stats["loss/value"].append(masked_mean(vf_loss, m))
                    stats["policy/clipfrac"].append(masked_mean((log_ratio.exp() - 1).abs() > args.ppo.cliprange, m))
                    stats["policy/approxkl"].append(masked_mean(0.5 * log_ratio ** 2, m))
                    stats["val/clipfrac"].append(masked_mean(value_change.abs() > args.ppo.cliprange_value, m))
                    stats["val/value_error"].append(masked_mean((values.detach() - returns[micro]) ** 2, m))
                optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm)

            # 7. log and evaluate
            stats.update({"objective/kl": kl.mean().item(),
                          "objective/entropy": masked_mean(entropy, action_mask),
                          "objective/non_score_reward": (-args.ppo.kl_coef * kl).mean().item(),
                          "objective/rlhf_reward": (scores - args.ppo.kl_coef * kl).mean().item()})
            metrics = iteration_metrics(run, stats, scores=scores, lengths=lengths, has_eos=has_eos,
                                        scheduler=scheduler, generate_seconds=gen_seconds,
                                        episode=iteration * args.prompts_per_iteration)
            log_iteration(run, metrics, policy, ref_model)  # evaluates every --eval_every, saves every --save_every

    finish_run(run, policy, ref_model, trained=model)  # saves the policy (the value model: in the checkpoints)
