"""PPO++: PPO with resets to reference-policy states (Chang et al. 2023, "Learning to Generate Better Than Your Teacher", arXiv:2306.11816).

    python ppo_pp.py                                  # embedded SmolLM2-135M + arithmetic, 2 CPU cores, ~9 min
    accelerate launch --config_file configs/ddp.yaml ppo_pp.py --model_name Qwen/Qwen2.5-1.5B-Instruct --task gsm8k

With probability beta (`--ppo.reset_prob`) a sample starts from a reset: the reference policy samples
a response, its first h ~ Uniform{1..len-1} tokens are forced, and the policy writes the rest; the
forced roll-in carries no loss. Otherwise this is ppo.py, and beta = 0 reproduces it:
Sample one response per prompt. Its per-token reward is -kl_coef * (log pi - log ref), with the
score added at its last token; GAE on a learned value model turns rewards into advantages, and
several epochs of clipped policy and value updates are taken on each batch.

Where this file departs from the summarize_from_feedback_details code (and the authors' code) and why:
1. The score is the reward of the last real token (the EOS where there is one); that code adds it
   one position later, on the padding after the EOS, and learns a value there too.
2. A value model started from the policy (no --reward_model) gets a zero scalar head: a random
   head's values (about +-0.5 per token here) are noise on the scale of a 0/1 verifier score.
3. CPU-sized defaults: 16 prompts per batch, 2 epochs x 2 minibatches, 24 tokens (the paper used
   4 epochs and far larger batches; paper-scale commands go in benchmark/).
4. Responses are sampled to a fixed length and cut after their first EOS (pure sampling at
   `--temperature`, no top-k/top-p), so the log-probs scored are those of the sampling distribution.
5. Roll-in tokens are left out of the KL penalty, the whitening and both losses (the authors' DR-PO code
   masks the policy loss only): the policy did not choose them. The score stays on the last token, always
   the policy's, since h <= len-1 leaves it at least one token.
"""
import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from torch import nn
from tqdm.auto import tqdm

from common.evaluation import evaluate
from common.generation import (batched_logprobs, entropy_from_logits, generate, logprobs_from_logits,
                               position_ids_from_mask, response_logits, truncate_after_eos)
from common.models import EMBEDDED_MODEL, default_dtype, load_causal_lm, load_reward_model, load_tokenizer, save_model
from common.resets import build_reset_states, sample_rollin_lengths, splice_reset_responses
from common.rewards import VERIFIERS, score
from common.tasks import VERIFIABLE, encode_prompts, load_task
from common.tracking import (exact_div, format_samples, init_wandb, linear_schedule, load_checkpoint, log_metrics,
                             param_checksum, peak_memory_gb, save_checkpoint, seed_everything, write_samples)


@dataclass
class PPOHParams:
    reset_prob: float = 0.5
    """beta: probability that a sample starts from a reset to a reference-policy state (0: plain PPO)"""
    kl_coef: float = 0.05
    """weight of the k1 KL estimate (log pi - log ref) subtracted from every token's reward"""
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
    num_epochs: int = 2
    """passes of optimisation over each batch"""
    num_minibatches: int = 2
    """optimizer steps per pass over the batch"""
    value_model: Optional[str] = None
    """value model's initial weights (hub id or folder); default: --reward_model if given, else --model_name with a zeroed scalar head"""


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run; the output folder is {output_dir}/{exp_name}__{seed}"""
    seed: int = 1
    """random seed (each process adds process_index * 100003)"""
    output_dir: str = "runs"
    """where run folders go: metrics.jsonl, eval_samples.jsonl, model/, checkpoints/"""
    track: bool = False
    """log to Weights & Biases too"""
    wandb_project: str = "resetrl"
    """wandb project name"""
    save_every: int = 0
    """write a resumable checkpoint every N iterations (0: never)"""
    resume_from: Optional[str] = None
    """checkpoint folder (written by --save_every) to continue from"""

    # models
    model_name: str = EMBEDDED_MODEL
    """policy and reference: hub id or local folder (the default falls back to the packaged copy offline)"""
    reward_model: Optional[str] = None
    """sequence-classification reward model (hub id or folder); default: the task's verifier"""
    trust_remote_code: bool = False
    """allow models whose code lives in their repository"""

    # task
    task: str = "arith"
    """arith (embedded, offline), gsm8k, tldr or hh"""
    data_files: Optional[str] = None
    """local .json/.jsonl/.parquet training file(s), comma-separated, with the task's hub columns"""
    eval_data_files: Optional[str] = None
    """local held-out file(s), same columns"""
    num_train_prompts: Optional[int] = None
    """use the first N training prompts (default: all)"""
    num_eval_prompts: int = 250
    """held-out prompts evaluated"""
    max_prompt_length: int = 256
    """longest prompt in tokens; longer prompts are refused before training"""
    response_length: int = 24
    """tokens sampled per response (cut after the first EOS)"""
    temperature: float = 0.7
    """sampling temperature for training rollouts (log-probs use the same)"""
    eval_temperature: float = 0.0
    """sampling temperature for evaluation (0: greedy)"""

    # batches and optimiser
    num_iterations: int = 12
    """training iterations (one batch of prompts each)"""
    max_train_seconds: float = 0.0
    """stop after the iteration that passes this many seconds of training (evaluation not counted), then
    evaluate and save as usual (0: no limit). A linear lr schedule still assumes --num_iterations"""
    prompts_per_iteration: int = 16
    """prompts per iteration, over all processes"""
    micro_batch_size: int = 8
    """sequences per forward/backward on one process (gradient accumulation fills the minibatch)"""
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "constant"] = "constant"
    """learning-rate schedule over the optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 0
    """evaluate every N iterations (0: only before and after training)"""
    eval_batch_size: int = 64
    """prompts per evaluation batch"""

    ppo: PPOHParams = field(default_factory=PPOHParams)

    # derived right after parsing (not flags)
    world_size: tyro.conf.Suppress[int] = 0
    """number of processes"""
    local_prompts: tyro.conf.Suppress[int] = 0
    """prompts per iteration on this process"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """sequences per iteration on this process"""
    mini_batch_size: tyro.conf.Suppress[int] = 0
    """sequences per optimizer step on this process"""
    grad_accum_steps: tyro.conf.Suppress[int] = 0
    """micro-batches per optimizer step"""


# ALGO LOGIC: per-token rewards with the KL penalty, GAE, masked whitening, clipped policy and value losses
def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """r_t = -kl_coef * (lp_t - ref_t) on the masked tokens, plus the score on each row's last masked token: -> (B, T)."""
    mask = mask.float()
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask  # (B, T)
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


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the entries where `mask` is True (std with Bessel's correction), 0 elsewhere: (B, T) -> (B, T)."""
    mask = mask.float()
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
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

    def forward(self, query_responses, attention_mask, response_length: int):
        """Logits (B, T, V) predicting each response token, and values (B, T) of the states they are chosen in."""
        logits = response_logits(self.policy, query_responses, attention_mask, response_length)
        hidden = self.value_model.base_model(input_ids=query_responses, attention_mask=attention_mask,
                                             position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        values = self.value_model.score(hidden[:, -response_length - 1: -1]).squeeze(-1)  # (B, T)
        return logits, values.float()


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True lets torchrun/accelerate use gloo on CPU
    args.world_size = accelerator.num_processes
    args.local_prompts = exact_div(args.prompts_per_iteration, args.world_size, "--prompts_per_iteration over processes")
    args.local_batch_size = args.local_prompts  # one response per prompt
    args.mini_batch_size = exact_div(args.local_batch_size, args.ppo.num_minibatches,
                                     "sequences per process (prompts_per_iteration / processes) over --ppo.num_minibatches")
    args.grad_accum_steps = exact_div(args.mini_batch_size, args.micro_batch_size, "minibatch size over --micro_batch_size")
    seed_everything(args.seed + accelerator.process_index * 100003)
    device = accelerator.device
    run_dir = os.path.join(args.output_dir, f"{args.exp_name}__{args.seed}")
    metrics_path, samples_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "eval_samples.jsonl")
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        if args.resume_from is None:
            for path in (metrics_path, samples_path):
                open(path, "w").close()

    # data: every check on the input happens here, before any training time is spent
    if args.reward_model is None and args.task not in VERIFIABLE:
        raise ValueError(f"task {args.task} has no verifier: pass --reward_model (a sequence-classification model)")
    tokenizer = load_tokenizer(args.model_name, args.trust_remote_code)
    train_rows = load_task(args.task, "train", args.data_files, args.num_train_prompts, args.seed)
    eval_rows = load_task(args.task, "test", args.eval_data_files, args.num_eval_prompts)
    if len(train_rows) < args.prompts_per_iteration:
        raise ValueError(f"{len(train_rows)} training prompts, fewer than --prompts_per_iteration {args.prompts_per_iteration}")
    train_ids, train_mask = encode_prompts(tokenizer, train_rows, args.max_prompt_length, f"task {args.task} train")
    eval_ids, eval_mask = encode_prompts(tokenizer, eval_rows, args.max_prompt_length, f"task {args.task} test")
    my_eval = slice(accelerator.process_index, None, args.world_size)
    eval_rows, eval_ids, eval_mask = eval_rows[my_eval], eval_ids[my_eval].to(device), eval_mask[my_eval].to(device)
    value_source = args.ppo.value_model or args.reward_model or args.model_name
    if value_source != args.model_name:  # the value model reads the policy's token ids
        value_vocab = load_tokenizer(value_source, args.trust_remote_code).get_vocab()
        if any(value_vocab.get(token) != i for token, i in tokenizer.get_vocab().items()):
            raise ValueError(f"{value_source} (the value model's start) has another vocabulary than the policy {args.model_name}; "
                             "pass --ppo.value_model with a model that shares the policy's tokenizer")

    # models: the policy trains in fp32 (mixed precision on GPU via accelerate); frozen models in bf16 where supported
    policy = load_causal_lm(args.model_name, device, torch.float32, args.trust_remote_code)
    context = args.max_prompt_length + args.response_length
    if context > getattr(policy.config, "max_position_embeddings", context):
        raise ValueError(f"--max_prompt_length + --response_length = {context} exceeds the model's context "
                         f"({policy.config.max_position_embeddings} tokens); lower one of them")
    frozen_dtype = default_dtype(device)
    ref_model = load_causal_lm(args.model_name, device, frozen_dtype, args.trust_remote_code).eval()  # k1 is in the reward
    reward_model = reward_tokenizer = None
    if args.reward_model is not None:
        reward_tokenizer = load_tokenizer(args.reward_model, args.trust_remote_code)
        reward_model = load_reward_model(args.reward_model, device, frozen_dtype, reward_tokenizer.pad_token_id, args.trust_remote_code).eval()
    verifier = VERIFIERS.get(args.task)

    def score_fn(rows, texts):
        return score(rows, texts, verifier, reward_model, reward_tokenizer, args.eval_batch_size)

    # ALGO LOGIC: the value model, a sequence-classification model whose scalar head is read at every response position
    value_model = load_reward_model(value_source, device, torch.float32, tokenizer.pad_token_id, args.trust_remote_code)
    if value_source == args.model_name:
        nn.init.zeros_(value_model.score.weight)  # a fresh head: start every value at 0 rather than at random
    model = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-8)
    total_steps = args.num_iterations * args.ppo.num_epochs * args.ppo.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.lr_schedule, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start_iteration = load_checkpoint(accelerator, args.resume_from) if args.resume_from else 0
    wandb_run = init_wandb(args.track and accelerator.is_main_process, args.wandb_project, f"{args.exp_name}__{args.seed}", asdict(args), run_dir)

    def run_evaluation(policy_model, ref_scores, with_kl=True):
        """Evaluate `policy_model` on every process's share of the held-out prompts; reduce and gather."""
        with accelerator.autocast():
            sums, count, scores, samples = evaluate(
                policy_model, ref_model if with_kl else None, tokenizer, eval_rows, eval_ids, eval_mask, score_fn,
                args.response_length, args.eval_temperature, args.eval_batch_size, args.seed,
                ref_scores=ref_scores, verifier=verifier)
        keys = sorted(sums)
        totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device), "sum")
        metrics = {f"eval/{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
        return metrics, scores, gather_object(samples)

    def report(step, metrics, samples):
        if accelerator.is_main_process:
            log_metrics(metrics, step, metrics_path, wandb_run)
            write_samples(samples, samples_path, step, wandb_run)
            tqdm.write(f"[eval @ {step}] " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + "\n" + format_samples(samples))

    # evaluation of the reference policy (the policy before training): its scores give the win rate later
    ref_metrics, ref_scores, ref_samples = run_evaluation(ref_model, None, with_kl=False)  # KL of the reference to itself is 0
    ref_metrics.update({"eval/kl": 0.0, "eval/win_rate": 0.5})
    if start_iteration == 0:
        report(0, ref_metrics, ref_samples)

    iteration, train_seconds = start_iteration, 0.0
    pbar = tqdm(range(start_iteration + 1, args.num_iterations + 1), desc=args.exp_name, disable=not accelerator.is_main_process,
                initial=start_iteration, total=args.num_iterations)
    try:
        for iteration in pbar:
            start_time = time.time()

            # 1. sample prompts: the same global draw on every process (from the seed and iteration), then each takes its share
            batch = np.random.default_rng([args.seed, iteration]).choice(len(train_rows), args.prompts_per_iteration, replace=False)
            batch = batch[accelerator.process_index:: args.world_size]
            rows = [train_rows[i] for i in batch]
            queries, query_mask = train_ids[batch], train_mask[batch]
            keep = query_mask.any(dim=0)  # drop columns that are padding in every row
            queries, query_mask = queries[:, keep].to(device), query_mask[:, keep].to(device)  # (B, P)
            # ALGO LOGIC: resets to the first h tokens of a reference-policy sample (its own generator; beta = 0 skips all this)
            rollin = torch.zeros(len(batch), dtype=torch.long, device=device)  # (B,) roll-in lengths h, 0: start from the prompt
            prefixes, states, state_mask = queries[:, :0], queries, query_mask
            if args.ppo.reset_prob > 0:
                with torch.no_grad(), accelerator.autocast():
                    prefixes = generate(ref_model, queries, query_mask, args.response_length, args.temperature,
                                        tokenizer.pad_token_id, tokenizer.eos_token_id)  # (B, T)
                prefixes, _, prefix_lengths, _ = truncate_after_eos(prefixes, tokenizer.eos_token_id, tokenizer.pad_token_id)
                reset_seed = int(np.random.default_rng([args.seed, iteration, accelerator.process_index]).integers(2 ** 62))
                rollin = sample_rollin_lengths(prefix_lengths, args.ppo.reset_prob, torch.Generator().manual_seed(reset_seed))  # (B,)
                states, state_mask = build_reset_states(queries, query_mask, prefixes, rollin, tokenizer.pad_token_id)  # (B, P+max h)

            # 2. generate: the policy continues each reset state, and the roll-in goes back in front of its continuation
            with torch.no_grad(), accelerator.autocast():
                responses = generate(accelerator.unwrap_model(model).policy, states, state_mask, args.response_length - int(rollin.min()),
                                     args.temperature, tokenizer.pad_token_id, tokenizer.eos_token_id)  # (B, T - min h)
            responses, forced = splice_reset_responses(prefixes, rollin, responses, args.response_length, tokenizer.pad_token_id)  # (B, T)
            generate_time = time.time() - start_time

            # 3. truncate at EOS
            responses, mask, lengths, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
            query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)  # (B, P+T)
            action_mask = mask & ~forced  # (B, T) the tokens the policy chose: rewards, whitening and losses use only these

            # 4. score
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = score_fn(rows, texts).to(device)  # (B,)
            if args.ppo.missing_eos_penalty is not None:
                scores = torch.where(has_eos, scores, torch.full_like(scores, args.ppo.missing_eos_penalty))

            # 5. rewards and advantages
            with torch.no_grad(), accelerator.autocast():
                old_logprobs, old_values, entropy = [], [], []
                for i in range(0, args.local_batch_size, args.micro_batch_size):
                    logits, values = accelerator.unwrap_model(model)(query_responses[i: i + args.micro_batch_size],
                                                                     attention_mask[i: i + args.micro_batch_size], args.response_length)
                    old_logprobs.append(logprobs_from_logits(logits, responses[i: i + args.micro_batch_size], args.temperature))
                    old_values.append(values)
                    entropy.append(entropy_from_logits(logits, args.temperature))
                old_logprobs, old_values, entropy = torch.cat(old_logprobs), torch.cat(old_values), torch.cat(entropy)  # (B, T)
                ref_logprobs = batched_logprobs(ref_model, query_responses, attention_mask, args.response_length,
                                                args.temperature, args.micro_batch_size)  # (B, T)
            # ALGO LOGIC: KL in the reward, score at the last token, GAE, advantages whitened over the batch's chosen tokens
            rewards = per_token_rewards(scores, old_logprobs, ref_logprobs, action_mask, args.ppo.kl_coef)  # (B, T)
            advantages, returns = compute_gae(rewards, old_values, action_mask, args.ppo.gamma, args.ppo.lam)  # (B, T)
            advantages = masked_whiten(advantages, action_mask)  # (B, T)
            kl = ((old_logprobs - ref_logprobs) * action_mask).sum(1)  # (B,) k1 summed over each response

            # 6. update
            stats = {"loss/policy": [], "loss/value": [], "policy/clipfrac": [], "policy/approxkl": [], "val/clipfrac": [],
                     "val/value_error": []}
            for _ in range(args.ppo.num_epochs):
                order = torch.randperm(args.local_batch_size, device=device)
                for start in range(0, args.local_batch_size, args.mini_batch_size):
                    mini = order[start: start + args.mini_batch_size]
                    num_tokens = action_mask[mini].sum().clamp(min=1)
                    for k, micro_start in enumerate(range(0, args.mini_batch_size, args.micro_batch_size)):
                        micro = mini[micro_start: micro_start + args.micro_batch_size]
                        last = k == args.grad_accum_steps - 1
                        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                            logits, values = model(query_responses[micro], attention_mask[micro], args.response_length)  # (b, T, V), (b, T)
                            logprobs = logprobs_from_logits(logits, responses[micro], args.temperature)  # (b, T)
                            pg_loss = clipped_policy_loss(logprobs, old_logprobs[micro], advantages[micro], args.ppo.cliprange)  # (b, T)
                            vf_loss = clipped_value_loss(values, old_values[micro], returns[micro], args.ppo.cliprange_value)  # (b, T)
                            m = action_mask[micro].float()
                            loss = ((pg_loss + args.ppo.vf_coef * vf_loss) * m).sum() / num_tokens  # token mean over the minibatch
                            accelerator.backward(loss)
                        with torch.no_grad():
                            n = m.sum().clamp(min=1).item()
                            log_ratio = logprobs.detach() - old_logprobs[micro]
                            stats["loss/policy"].append((pg_loss.detach() * m).sum().item() / n)
                            stats["loss/value"].append((vf_loss.detach() * m).sum().item() / n)
                            stats["policy/clipfrac"].append((((log_ratio.exp() - 1).abs() > args.ppo.cliprange).float() * m).sum().item() / n)
                            stats["policy/approxkl"].append((0.5 * log_ratio ** 2 * m).sum().item() / n)
                            stats["val/clipfrac"].append((((values.detach() - old_values[micro]).abs() > args.ppo.cliprange_value).float() * m).sum().item() / n)
                            stats["val/value_error"].append((((values.detach() - returns[micro]) ** 2) * m).sum().item() / n)
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()

            # 7. log and evaluate
            local = {k: float(np.mean(v)) for k, v in stats.items() if v}
            local.update({
                "objective/scores": scores.mean().item(), "objective/kl": kl.mean().item(),
                "objective/non_score_reward": (-args.ppo.kl_coef * kl).mean().item(),
                "objective/rlhf_reward": (scores - args.ppo.kl_coef * kl).mean().item(),
                "objective/entropy": ((entropy * action_mask).sum() / action_mask.sum()).item(),
                "val/response_length": lengths.float().mean().item(), "val/rollin_length": forced.sum(1).float().mean().item(),
            })
            keys = sorted(local)
            means = accelerator.reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device), "mean")
            counts = accelerator.reduce(torch.tensor([has_eos.sum().item(), lengths.sum().item()], dtype=torch.float64, device=device), "sum")
            seconds = time.time() - start_time
            metrics = {k: means[i].item() for i, k in enumerate(keys)}
            metrics.update({
                "val/num_eos": counts[0].item(), "lr": scheduler.get_last_lr()[0],
                "episode": iteration * args.prompts_per_iteration, "perf/seconds_per_iter": seconds,
                "perf/generate_seconds": generate_time, "perf/tokens_per_second": counts[1].item() / seconds,
                "perf/peak_memory_gb": peak_memory_gb(device),
            })
            if args.eval_every and iteration % args.eval_every == 0 and iteration != args.num_iterations:
                eval_metrics, _, samples = run_evaluation(accelerator.unwrap_model(model).policy, ref_scores)
                metrics.update(eval_metrics)
                report(iteration, metrics, samples)
            elif accelerator.is_main_process:
                log_metrics(metrics, iteration, metrics_path, wandb_run)
            pbar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}",
                             len=f"{metrics['val/response_length']:.1f}", s_it=f"{seconds:.1f}")
            if args.save_every and iteration % args.save_every == 0:
                save_checkpoint(accelerator, os.path.join(run_dir, "checkpoints", f"iter_{iteration}"), iteration)
            train_seconds += seconds
            if args.max_train_seconds and broadcast(torch.tensor([train_seconds], device=device)).item() >= args.max_train_seconds:
                break  # process 0's clock decides, so every process stops after the same iteration
    except BaseException:
        if accelerator.num_processes == 1:  # keep what was trained; several processes cannot agree on this safely
            save_model(accelerator.unwrap_model(model).policy, tokenizer, os.path.join(run_dir, "model_interrupted"))
            print(f"[{args.exp_name}] stopped early: the current policy is saved in {run_dir}/model_interrupted")
        raise

    # final evaluation and the saved model (the policy; the value model is in the checkpoints)
    final_metrics, _, final_samples = run_evaluation(accelerator.unwrap_model(model).policy, ref_scores)
    checksums = accelerator.gather(torch.tensor([param_checksum(accelerator.unwrap_model(model))], dtype=torch.float64, device=device))
    final_metrics["dist/param_checksum_spread"] = (checksums.max() - checksums.min()).item()
    report(iteration, final_metrics, final_samples)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model).policy, tokenizer, os.path.join(run_dir, "model"))
        summary = "  ".join(f"{k.split('/')[1]} {ref_metrics.get(k, float('nan')):.3f} -> {final_metrics[k]:.3f}"
                            for k in ("eval/reward", "eval/accuracy", "eval/kl") if k in final_metrics)
        print(f"[{args.exp_name}] reference -> trained on {len(eval_rows) * args.world_size} held-out prompts: {summary}\n"
              f"[{args.exp_name}] metrics, samples and the model (from_pretrained) are in {run_dir}")
    if wandb_run is not None:
        wandb_run.finish()
