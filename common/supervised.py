"""The life of a supervised run (sft.py, reward.py) around its loss: set-up, the batches of every epoch, reporting,
saving on failure, the finish. The same conventions as common/run.py's for the algorithm files."""
import contextlib
import os
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from common.checkpoints import start_run_dir
from common.config import exact_div
from common.models import merge_lora, save_model
from common.processes import checksum_spread, end_processes, make_accelerator, seed_everything
from common.tracking import format_samples, init_wandb, log_metrics, write_samples


def setup_supervised(args):
    """Accelerator, per-process batch and gradient accumulation, seeds, the run folder: (accelerator, run_dir)."""
    accelerator = make_accelerator(args.mixed_precision)
    args.world_size = accelerator.num_processes
    args.local_batch_size = exact_div(args.batch_size, args.world_size, "--batch_size over processes")
    args.grad_accum_steps = exact_div(args.local_batch_size, args.micro_batch_size,
                                      "batch size per process over --micro_batch_size")
    seed_everything(args.seed + accelerator.process_index * 100003)
    return accelerator, start_run_dir(accelerator, args.output_dir, args.exp_name, args.seed)


def start_tracking(args, accelerator, run_dir):
    """The wandb run (--track, main process) or None."""
    return init_wandb(args.track and accelerator.is_main_process, args.wandb_project, f"{args.exp_name}__{args.seed}",
                      asdict(args), run_dir)


def epoch_batches(args, accelerator, num_examples: int):
    """(epoch, this process's share of the batch) for every optimizer step: the same shuffled order on every process
    (from the seed and the epoch), --batch_size examples a step, the last partial batch of each epoch dropped."""
    steps_per_epoch = num_examples // args.batch_size
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(num_examples)
        for start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            yield epoch, order[start: start + args.batch_size][accelerator.process_index:: args.world_size]


def report(accelerator, step: int, metrics: dict, run_dir: str, wandb_run, samples=None) -> None:
    """Log an evaluation's metrics (and samples) and print them (main process only)."""
    if accelerator.is_main_process:
        log_metrics(metrics, step, os.path.join(run_dir, "metrics.jsonl"), wandb_run)
        if samples is not None:
            write_samples(samples, os.path.join(run_dir, "eval_samples.jsonl"), step, wandb_run)
        tqdm.write(f"[eval @ {step}] " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                   + ("\n" + format_samples(samples) if samples else ""))


@contextlib.contextmanager
def save_on_failure(accelerator, model, tokenizer, run_dir: str, name: str):
    """On an exception (or Ctrl-C) inside the block, save the model (LoRA merged) to {run_dir}/model_interrupted and
    re-raise; single-process runs only (several processes cannot agree on a save after one of them failed)."""
    try:
        yield
    except BaseException:
        if accelerator.num_processes == 1:
            out = os.path.join(run_dir, "model_interrupted")
            save_model(merge_lora(accelerator.unwrap_model(model)), tokenizer, out)
            print(f"[{name}] stopped early: the current model is saved in {out}")
        raise


def finish(accelerator, net, tokenizer, run_dir: str, metrics: dict, wandb_run, step: int, samples=None) -> None:
    """The check that every process ended with the same weights, the last report, the saved model (`net`: plain,
    LoRA merged; from_pretrained loads it) and the end of the processes."""
    metrics["dist/param_checksum_spread"] = checksum_spread(accelerator, net)
    report(accelerator, step, metrics, run_dir, wandb_run, samples)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(net, tokenizer, os.path.join(run_dir, "model"))


def end_run(wandb_run, accelerator) -> None:
    """Close tracking and end the processes."""
    if wandb_run is not None:
        wandb_run.finish()
    end_processes(accelerator)


def reduce_mean(accelerator, values: dict) -> dict:
    """Each float of `values` averaged over processes."""
    keys = sorted(values)
    means = accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device),
                               "mean")
    return {k: means[i].item() for i, k in enumerate(keys)}
