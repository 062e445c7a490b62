"""SFT: supervised fine-tuning on a task's demonstrations, the first step of the RLHF pipeline
(Stiennon et al. 2020; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031).

    python sft.py                                     # embedded SmolLM2-135M on the arith demonstrations, CPU
    python grpo.py --model_name runs/sft__1/model     # then RL from the fine-tuned model (reward.py for a reward model)
    accelerate launch --config_file configs/ddp.yaml sft.py --model_name EleutherAI/pythia-1b-deduped --task tldr \\
        --max_prompt_length 512 --max_response_length 64     # paper scale: benchmark/paper_scale.md

Each example is the prompt as the policy sees it (`format_prompt`: the chat template when the tokenizer has one),
then the dataset's reference response and EOS. The loss is the mean negative log-likelihood of the response tokens
and the EOS over a batch; prompt tokens and padding carry no loss (label -100). Held-out loss, and for verifiable
tasks held-out greedy accuracy, are measured before and after training; the model is saved in
{output_dir}/{exp_name}__{seed}/model.

Where this file departs from the summarize_from_feedback_details SFT and why:
1. Padding, not packing: each sequence is RIGHT-padded to the longest one in its micro-batch, one example per row,
   so no example attends to another and the loss mask is exact. Packing would save the padding's compute on GPUs.
2. The loss covers the response and its EOS only; the prompt is context, as it is in RL.
3. Demonstrations longer than --max_response_length tokens (EOS included) are skipped with a count rather than
   truncated (a truncated one would teach the model to stop without EOS); over-long prompts are refused.
4. CPU-sized defaults: 1 epoch, 16 demonstrations per step (the last partial batch of each epoch dropped), lr 3e-5
   decaying linearly to 0, no warm-up: few steps on a small model want the upper end of the usual 1e-5..5e-5.
"""
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from common.config import TrainArgs, parse_args
from common.errors import DataError, UserError
from common.evaluation import evaluate
from common.models import check_context, load_causal_lm
from common.processes import peak_memory_gb
from common.rewards import score_with_verifier, verifier_for
from common.supervised import (end_job, epoch_batches, finish_job, log_step, plain_model, prepare_training,
                               reduce_mean, report, save_on_failure, setup_job, summarize)
from common.tasks import encode_prompts, format_prompt, load_task
from common.training import micro_batches, optimizer_step


@dataclass
class Args(TrainArgs):
    num_train_rows: Optional[int] = None
    """use the first N training demonstrations (default: all)"""
    num_eval_prompts: int = 250
    """held-out demonstrations for the loss, and prompts for the accuracy"""
    max_response_length: int = 24
    """longest demonstration in tokens, EOS included (longer ones are skipped, with a count); also the
    tokens generated per held-out prompt when measuring accuracy"""
    epochs: int = 1
    """passes over the training demonstrations"""
    batch_size: int = 16
    """demonstrations per optimizer step, over all processes"""
    learning_rate: float = 3e-5
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """learning-rate schedule over the optimizer steps"""
    ranges: ClassVar[dict] = dict(TrainArgs.ranges, num_train_rows=">= 1", max_response_length=">= 1", epochs=">= 1",
                                  batch_size=">= 1")


# ALGO LOGIC: the examples, and the negative log-likelihood of the demonstrations' tokens
def build_sft_example(tokenizer, row):
    """Token ids of one demonstration: (prompt ids as `format_prompt` writes the prompt, response ids + EOS)."""
    prompt = tokenizer(format_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


def collate_sft(examples, pad_token_id: int):
    """Right-pad (prompt, response) id lists into input_ids, attention_mask and labels (B, L): the labels are the ids
    on the response and its EOS, -100 on prompt and padding positions."""
    L = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), L), dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, (prompt, response) in enumerate(examples):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(response, dtype=torch.long)
    return input_ids, attention_mask, labels


def response_nll(model, input_ids, attention_mask, labels):
    """Summed negative log-likelihood of the labelled tokens and their count: (B, L) -> scalars. Only positions from
    the shortest prompt on go through the LM head (`logits_to_keep`): the largest matrix product, on long prompts."""
    start = max(int((labels != -100).int().argmax(dim=1).min()), 1)  # the first labelled position (0 predicts none)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=input_ids.shape[1] - start + 1,
                   use_cache=False).logits  # (B, L - start + 1, V): positions start-1 .. L-1
    targets = labels[:, start:]  # (B, L - start): tokens start .. L-1
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll, (targets != -100).sum()


def keep_fitting(tokenizer, rows, max_response_length: int, what: str):
    """Tokenised demonstrations whose response + EOS fits `max_response_length`; prints the count skipped."""
    examples = [build_sft_example(tokenizer, row) for row in rows]
    kept = [i for i, (_, response) in enumerate(examples) if len(response) <= max_response_length]
    if len(kept) < len(rows):
        first = next(i for i in range(len(rows)) if i not in set(kept))
        print(f"[sft] {what}: skipped {len(rows) - len(kept)} of {len(rows)} demonstration(s) longer than "
              f"--max_response_length {max_response_length} tokens with EOS (first: row {rows[first].get('id')}, "
              f"{len(examples[first][1])} tokens); raise --max_response_length to keep them")
    if not kept:
        raise DataError(f"{what}: every demonstration is longer than "
                        f"--max_response_length {max_response_length} tokens")
    return [rows[i] for i in kept], [examples[i] for i in kept]


if __name__ == "__main__":
    args = parse_args(Args)
    job = setup_job(args)
    accelerator, device, tokenizer = job.accelerator, job.device, job.tokenizer

    # 1. data: every check on the input happens here, before any training time is spent
    train_rows = load_task(args.task, "train", args.data_files, args.num_train_rows, args.seed)
    eval_rows = load_task(args.task, "test", args.eval_data_files, args.num_eval_prompts)
    encode_prompts(tokenizer, train_rows, args.max_prompt_length, f"task {args.task} train")  # refuses long prompts
    train_rows, train_examples = keep_fitting(tokenizer, train_rows, args.max_response_length,
                                              f"task {args.task} train")
    eval_rows, eval_examples = keep_fitting(tokenizer, eval_rows, args.max_response_length, f"task {args.task} test")
    if len(train_examples) < args.batch_size:
        raise UserError(f"{len(train_examples)} training demonstrations, fewer than --batch_size {args.batch_size}")
    verifier, num_eval = verifier_for(args.task), len(eval_rows)
    mine = slice(accelerator.process_index, None, args.world_size)  # this process's share
    eval_rows, eval_examples = eval_rows[mine], eval_examples[mine]
    eval_ids, eval_mask = encode_prompts(tokenizer, eval_rows, args.max_prompt_length, f"task {args.task} test")

    # 2. model and optimiser: fp32 weights (mixed precision on GPU via accelerate)
    model = load_causal_lm(args.model_name, device, torch.float32, args.trust_remote_code)
    check_context(model.config, args.max_prompt_length, args.max_response_length, "--max_response_length")
    total_steps = args.epochs * (len(train_examples) // args.batch_size)
    model, optimizer, scheduler = prepare_training(job, model, total_steps)

    def run_evaluation(ref_scores=None):
        """Held-out loss on every process's share of the demonstrations, and greedy accuracy on verifiable tasks:
        (metrics, this process's scores, all samples)."""
        net, sums, tokens, samples, scores = accelerator.unwrap_model(model), {"loss": 0.0}, 0, [], None
        net.eval()
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, len(eval_examples), args.eval_batch_size):
                batch = collate_sft(eval_examples[i:i + args.eval_batch_size], tokenizer.pad_token_id)
                nll, count = response_nll(net, *(t.to(device) for t in batch))
                sums["loss"], tokens = sums["loss"] + nll.item(), tokens + count.item()
            if verifier is not None:  # reward, accuracy, response_length, eos_rate (and win_rate): sums over prompts
                gen_sums, _, scores, samples = evaluate(
                    net, tokenizer, eval_rows, eval_ids.to(device), eval_mask.to(device),
                    score_fn=lambda rows, texts: score_with_verifier(verifier, rows, texts),
                    response_length=args.max_response_length, temperature=0.0, batch_size=args.eval_batch_size,
                    seed=args.seed, ref_scores=ref_scores, verifier=verifier)
                sums.update(gen_sums)
        net.train()
        keys = sorted(sums)
        totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [tokens, len(eval_rows)],
                                                 dtype=torch.float64, device=device), "sum")
        return ({f"eval/{k}": (totals[i] / (totals[-2] if k == "loss" else totals[-1])).item()
                 for i, k in enumerate(keys)}, scores, gather_object(samples))

    # 3. evaluation before training: the model as loaded
    before, ref_scores, samples = run_evaluation()
    report(job, 0, before, samples)

    # 4. training: each process takes its share of every batch
    model.train()
    with save_on_failure(job, model, tokenizer):
        for step, epoch, mine in epoch_batches(job, len(train_examples)):
            start_time = time.time()
            batch = [train_examples[i] for i in mine]
            # ALGO LOGIC: the loss normaliser is the batch's response tokens, averaged over processes (DDP averages
            # the gradients, so the whole batch's token mean results whatever the number of processes)
            num_tokens = accelerator.reduce(torch.tensor(float(sum(len(r) for _, r in batch)), device=device),
                                            "mean").item()
            loss_sum, trained_tokens = 0.0, 0
            for micro in micro_batches(accelerator, model, torch.arange(len(batch)), args.micro_batch_size):
                input_ids, attention_mask, labels = collate_sft([batch[i] for i in micro.tolist()],
                                                                tokenizer.pad_token_id)  # (b, L) each
                nll, _ = response_nll(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
                accelerator.backward(nll / num_tokens)
                loss_sum, trained_tokens = loss_sum + nll.item(), trained_tokens + int(attention_mask.sum())
            optimizer_step(accelerator, model, optimizer, scheduler, args.max_grad_norm)

            # 5. log, and evaluate every --eval_every steps
            seconds = time.time() - start_time
            log_step(job, step, {**reduce_mean(job, {"loss/sft": loss_sum / num_tokens}),
                                 "lr": scheduler.get_last_lr()[0], "episode": step * args.batch_size, "epoch": epoch,
                                 "perf/seconds_per_iter": seconds,
                                 "perf/train_tokens_per_second": trained_tokens * args.world_size / seconds,
                                 "perf/peak_memory_gb": peak_memory_gb(device)},
                     lambda: run_evaluation(ref_scores)[::2], shown={"loss": "loss/sft"})  # (metrics, samples)

    # 6. final evaluation and the saved model
    after, _, samples = run_evaluation(ref_scores)
    finish_job(job, plain_model(job, model), tokenizer, after, total_steps, samples)
    summarize(job, before, after, f"{num_eval} held-out demonstrations", "pass it as --model_name")
    end_job(job)
