"""Evaluation on the held-out split: decoded responses (reward, accuracy, win rate, length, EOS rate) and sampled ones
(pass@k, the KL to the reference), each process on its share of the prompts (`evaluate_policy`)."""
import math

import torch
from accelerate.utils import gather_object

from common.generation import generate, sequence_kl, truncate_after_eos
from common.models import load_frozen_policy
from common.rewards import score_with_verifier
from common.tracking import report


@torch.no_grad()
def evaluate(model, tokenizer, rows, query_ids, query_mask, *, score_fn, response_length: int, temperature: float,
             batch_size: int, seed: int, ref_scores=None, verifier=None, sampler: str = "auto"):
    """Decode `rows` (temperature 0: greedy) under a seed of their own: sums over prompts, their number, scores (B,),
    samples. `ref_scores` (B,) give the win rate; `verifier` the accuracy, the gold score beside `score_fn`'s."""
    sums = {"reward": 0.0, "response_length": 0.0, "eos_rate": 0.0, **({"accuracy": 0.0} if verifier else {}),
            **({"win_rate": 0.0} if ref_scores is not None else {})}
    all_scores, samples = [], []
    with torch.random.fork_rng(devices=[query_ids.device] if query_ids.is_cuda else []):
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            q, qm, batch = query_ids[i:i + batch_size], query_mask[i:i + batch_size], rows[i:i + batch_size]
            responses = generate(model, q, qm, response_length, temperature, tokenizer.pad_token_id,
                                 tokenizer.eos_token_id, sampler=sampler)
            responses, mask, lengths, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id,
                                                                   tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = score_fn(batch, texts)  # (b,)
            all_scores.append(scores)
            sums["reward"] += scores.sum().item()
            if verifier is not None:
                sums["accuracy"] += (score_with_verifier(verifier, batch, texts) > 0.5).float().sum().item()
            sums["response_length"] += lengths.float().sum().item()
            sums["eos_rate"] += has_eos.float().sum().item()
            if ref_scores is not None:
                ref = ref_scores[i:i + batch_size]
                sums["win_rate"] += ((scores > ref).float() + 0.5 * (scores == ref).float()).sum().item()
            for row, text, s in zip(batch, texts, scores.tolist()):
                samples.append({"id": row.get("id"), "prompt": row["prompt"], "response": text, "score": s})
    return sums, len(rows), torch.cat(all_scores) if all_scores else torch.zeros(0), samples


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct, k <= n: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate_samples(model, ref_model, tokenizer, rows, query_ids, query_mask, *, score_fn, verifier,
                     num_samples: int, response_length: int, temperature: float, batch_size: int, seed: int,
                     sampler: str = "auto"):
    """`num_samples` responses per prompt at `temperature`: sums over prompts of their mean reward, pass@k (k = 1, 2,
    4, ..., with a verifier) and `sequence_kl` to `ref_model` (when given), and the number of prompts."""
    ks = [k for k in (2 ** j for j in range(num_samples.bit_length())) if k <= num_samples]
    sums = {"sample_reward": 0.0, **({f"pass@{k}": 0.0 for k in ks} if verifier is not None else {}),
            **({"kl": 0.0} if ref_model is not None else {})}
    prompts_per_batch = max(1, batch_size // num_samples)
    with torch.random.fork_rng(devices=[query_ids.device] if query_ids.is_cuda else []):
        torch.manual_seed(seed + 1)
        for i in range(0, len(rows), prompts_per_batch):
            batch = [row for row in rows[i:i + prompts_per_batch] for _ in range(num_samples)]
            q = query_ids[i:i + prompts_per_batch].repeat_interleave(num_samples, dim=0)
            qm = query_mask[i:i + prompts_per_batch].repeat_interleave(num_samples, dim=0)
            responses = generate(model, q, qm, response_length, temperature, tokenizer.pad_token_id,
                                 tokenizer.eos_token_id, sampler=sampler)
            responses, mask, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            sums["sample_reward"] += score_fn(batch, texts).sum().item() / num_samples
            if verifier is not None:
                correct = (score_with_verifier(verifier, batch, texts) > 0.5).view(-1, num_samples).sum(1)  # (b,)
                for k in ks:
                    sums[f"pass@{k}"] += sum(pass_at_k(num_samples, int(c), k) for c in correct)
            if ref_model is not None:
                query_responses, attention = torch.cat([q, responses], dim=1), torch.cat([qm, mask.long()], dim=1)
                sums["kl"] += sequence_kl(model, ref_model, query_responses, attention, response_length, temperature,
                                          batch_size).sum().item() / num_samples
    return sums, len(rows)


def evaluate_policy(run, model, ref_model=None, with_kl: bool = True):
    """`evaluate` at --eval_temperature and `evaluate_samples` (--eval_samples, the KL to `ref_model` or a frozen copy
    loaded for it) on every process: (metrics reduced over processes, this process's scores (M,), all samples)."""
    args, accelerator = run.args, run.accelerator
    if with_kl and args.eval_samples and ref_model is None:
        ref_model = load_frozen_policy(args, accelerator, run.lora_policy)
    model = accelerator.unwrap_model(model)
    with accelerator.autocast():
        sums, count, scores, samples = evaluate(
            model, run.tokenizer, run.eval_rows, run.eval_ids, run.eval_mask, score_fn=run.score,
            response_length=args.response_length, temperature=args.eval_temperature, batch_size=args.eval_batch_size,
            seed=args.seed, ref_scores=run.ref_scores, verifier=run.verifier, sampler=args.sampler)
        if args.eval_samples:
            sums.update(evaluate_samples(
                model, ref_model if with_kl else None, run.tokenizer, run.eval_rows, run.eval_ids, run.eval_mask,
                score_fn=run.score, verifier=run.verifier, num_samples=args.eval_samples,
                response_length=args.response_length, temperature=args.temperature,
                batch_size=args.eval_batch_size, seed=args.seed, sampler=args.sampler)[0])
    keys = sorted(sums)
    totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=run.device),
                                "sum")
    metrics = {f"eval/{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
    return metrics, scores, gather_object(samples)


def report_evaluation(run, step: int, metrics: dict, samples) -> None:
    """Write an evaluation's metrics and samples (main process only)."""
    if run.accelerator.is_main_process:
        report(metrics, samples, step, run.metrics_path, run.samples_path, run.wandb_run)
