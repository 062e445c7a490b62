"""Evaluation on the held-out split: reward, accuracy, KL to the reference, win rate, length, EOS rate;
and the scores of several samples per prompt."""
import torch
from tqdm.auto import tqdm

from common.generation import batched_logprobs, generate, truncate_after_eos
from common.rewards import score_with_verifier


@torch.no_grad()
def evaluate(model, tokenizer, rows, query_ids, query_mask, *, score_fn, response_length: int, temperature: float,
             batch_size: int, seed: int, ref_model=None, ref_scores=None, verifier=None):
    """Generate on held-out `rows` (this process's share) and measure them.

    temperature 0 decodes greedily. KL is the mean over prompts of the summed log-ratio
    log pi(y|x) - log ref(y|x) of the evaluated responses (log-probs at `temperature`, or 1 when
    greedy); an unbiased estimate of KL(pi || ref) when sampling. `ref_scores` (B,) are the
    reference policy's scores on the same prompts (from the evaluation before training), for the
    win rate. `verifier` (the task's, when it has one) gives the accuracy: the gold score, apart from
    the reward `score_fn` gives, so a run on a learned reward model shows whether the gold score
    follows the learned one. Sampling uses its own seed, so evaluation leaves the training RNG untouched.
    Returns metrics (sums and counts, to be reduced over processes), scores (B,) and samples.
    """
    sums = {"reward": 0.0, "accuracy": 0.0, "kl": 0.0, "win_rate": 0.0, "response_length": 0.0, "eos_rate": 0.0}
    all_scores, samples = [], []
    with torch.random.fork_rng(devices=[query_ids.device] if query_ids.is_cuda else []):
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            q, qm, batch = query_ids[i:i + batch_size], query_mask[i:i + batch_size], rows[i:i + batch_size]
            responses = generate(model, q, qm, response_length, temperature, tokenizer.pad_token_id,
                                 tokenizer.eos_token_id)
            responses, mask, lengths, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id,
                                                                   tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = score_fn(batch, texts)  # (b,)
            all_scores.append(scores)
            if ref_model is not None:
                query_responses = torch.cat([q, responses], dim=1)
                attention = torch.cat([qm, mask.long()], dim=1)
                lp = batched_logprobs(model, query_responses, attention, response_length, temperature, batch_size)
                ref_lp = batched_logprobs(ref_model, query_responses, attention, response_length, temperature,
                                          batch_size)
                sums["kl"] += ((lp - ref_lp) * mask).sum().item()
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
    drop = [k for k, on in (("kl", ref_model is not None), ("win_rate", ref_scores is not None),
                            ("accuracy", verifier is not None)) if not on]
    sums = {k: v for k, v in sums.items() if k not in drop}
    return sums, len(rows), torch.cat(all_scores) if all_scores else torch.zeros(0), samples


@torch.no_grad()
def sample_scores(model, tokenizer, rows, query_ids, query_mask, *, score_fn, num_samples: int, response_length: int,
                  temperature: float, batch_size: int, progress: str = ""):
    """Scores of `num_samples` sampled responses per prompt: (P, L) prompts -> (P, num_samples), on CPU.

    About `batch_size` sequences are generated at a time; `progress` names a progress bar (none when empty).
    """
    prompts_per_batch = max(1, batch_size // num_samples)
    out = []
    for i in tqdm(range(0, len(rows), prompts_per_batch), desc=progress, disable=not progress):
        q, qm = query_ids[i:i + prompts_per_batch], query_mask[i:i + prompts_per_batch]
        keep = qm.any(dim=0)  # drop columns that are padding in every row
        q, qm = q[:, keep].repeat_interleave(num_samples, dim=0), qm[:, keep].repeat_interleave(num_samples, dim=0)
        responses = generate(model, q, qm, response_length, temperature, tokenizer.pad_token_id,
                             tokenizer.eos_token_id)
        responses = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        batch_rows = [row for row in rows[i:i + prompts_per_batch] for _ in range(num_samples)]
        out.append(score_fn(batch_rows, texts).view(-1, num_samples).cpu())
    return torch.cat(out) if out else torch.zeros(0, num_samples)
