"""The life of a supervised run (sft.py, reward.py) around its loss, as common/run.py is for the algorithm files:
`setup_job` once, `prepare_training` once, `epoch_batches` for the steps, `log_step` after each, `finish_job` at the
end, all inside `save_on_failure`."""
import contextlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from common.config import exact_div
from common.models import enable_gradient_checkpointing, load_tokenizer, save_model
from common.processes import checksum_spread, end_processes, make_accelerator, seed_everything
from common.run_folders import start_run_dir
from common import tracking
from common.tracking import init_wandb, log_metrics
from common.training import adamw, linear_schedule


@dataclass
class Job:
    """What a supervised run's loop needs besides its loss; made by `setup_job`."""

    args: object
    accelerator: object
    tokenizer: object  # --model_name's
    run_dir: str
    wandb_run: object = None
    progress: object = None  # the progress bar of `epoch_batches`

    @property
    def device(self):
        return self.accelerator.device


def setup_job(args) -> Job:
    """Accelerator, per-process batch and gradient accumulation, seeds, --model_name's tokenizer, the run folder,
    tracking."""
    accelerator = make_accelerator(args.mixed_precision)
    args.world_size = accelerator.num_processes
    args.local_batch_size = exact_div(args.batch_size, args.world_size, "--batch_size over processes")
    args.grad_accum_steps = exact_div(args.local_batch_size, args.micro_batch_size,
                                      "batch size per process over --micro_batch_size")
    seed_everything(args.seed + accelerator.process_index * 100003)
    tokenizer = load_tokenizer(args.model_name, args.trust_remote_code)
    run_dir = start_run_dir(accelerator, args.output_dir, args.exp_name, args.seed)
    wandb_run = init_wandb(args.track and accelerator.is_main_process, args.wandb_project,
                           f"{args.exp_name}__{args.seed}", asdict(args), run_dir)
    return Job(args, accelerator, tokenizer, run_dir, wandb_run)


def prepare_training(job: Job, model, total_steps: int, modules_to_save=None):
    """LoRA adapters (--lora_r; `modules_to_save` train in full), gradient checkpointing, AdamW and the --lr_schedule
    over `total_steps`, all prepared by accelerate: (model, optimizer, scheduler)."""
    args = job.args
    if args.lora_r:
        from common.lora import add_lora

        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, modules_to_save)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.lr_schedule, total_steps))
    return job.accelerator.prepare(model, optimizer, scheduler)


def epoch_batches(job: Job, num_examples: int):
    """(step, epoch, this process's share of the batch) for every optimizer step, with a progress bar: the same
    shuffled order on every process (from the seed and the epoch), --batch_size examples a step, the last partial
    batch of each epoch dropped."""
    args, steps_per_epoch = job.args, num_examples // job.args.batch_size
    job.progress = tqdm(total=args.epochs * steps_per_epoch, desc=args.exp_name,
                        disable=not job.accelerator.is_main_process)
    step = 0
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(num_examples)
        for start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            step += 1
            yield step, epoch, order[start: start + args.batch_size][job.accelerator.process_index:: args.world_size]
    job.progress.close()


def reduce_mean(job: Job, values: dict) -> dict:
    """Each float of `values` averaged over processes."""
    keys = sorted(values)
    means = job.accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=job.device),
                                   "mean")
    return {k: means[i].item() for i, k in enumerate(keys)}


def report(job: Job, step: int, metrics: dict, samples=None) -> None:
    """Log an evaluation's metrics (and samples) and print them (main process only)."""
    if job.accelerator.is_main_process:
        tracking.report(metrics, samples, step, os.path.join(job.run_dir, "metrics.jsonl"),
                        os.path.join(job.run_dir, "eval_samples.jsonl"), job.wandb_run)


def log_step(job: Job, step: int, metrics: dict, evaluate, shown: dict) -> None:
    """Log a step's metrics, with an evaluation (`evaluate()` -> (metrics, samples)) every --eval_every steps but the
    last (the final evaluation follows); `shown`: {name: key} on the progress bar."""
    args = job.args
    if args.eval_every and step % args.eval_every == 0 and step != job.progress.total:
        eval_metrics, samples = evaluate()
        report(job, step, {**metrics, **eval_metrics}, samples)
    elif job.accelerator.is_main_process:
        log_metrics(metrics, step, os.path.join(job.run_dir, "metrics.jsonl"), job.wandb_run)
    job.progress.update(1)
    job.progress.set_postfix(**{name: f"{metrics[k]:.3f}" for name, k in shown.items()},
                             s_it=f"{metrics['perf/seconds_per_iter']:.1f}")


@contextlib.contextmanager
def save_on_failure(job: Job, model, tokenizer):
    """On an exception (or Ctrl-C) inside the block, save the model (LoRA merged) to {run_dir}/model_interrupted and
    re-raise; single-process runs only (several processes cannot agree on a save after one of them failed)."""
    try:
        yield
    except BaseException:
        if job.accelerator.num_processes == 1:
            out = os.path.join(job.run_dir, "model_interrupted")
            save_model(plain_model(job, model), tokenizer, out)
            print(f"[{job.args.exp_name}] stopped early: the current model is saved in {out}")
        raise


def plain_model(job: Job, model):
    """The trained model unwrapped from accelerate, its LoRA adapters (--lora_r) merged into the weights: a plain
    transformers model, which from_pretrained loads and every script takes as --model_name."""
    model = job.accelerator.unwrap_model(model)
    return model.merge_and_unload() if job.args.lora_r else model


def finish_job(job: Job, net, tokenizer, metrics: dict, step: int, samples=None) -> None:
    """The check that every process ended with the same weights, the last report, and the saved model (`net`: plain,
    LoRA merged; from_pretrained loads it)."""
    metrics["dist/param_checksum_spread"] = checksum_spread(job.accelerator, net)
    report(job, step, metrics, samples)
    job.accelerator.wait_for_everyone()
    if job.accelerator.is_main_process:
        save_model(net, tokenizer, os.path.join(job.run_dir, "model"))


def summarize(job: Job, before: dict, after: dict, what: str, use: str) -> None:
    """Print the held-out metrics before -> after training and where the run's files are (main process)."""
    if job.accelerator.is_main_process:
        name, keys = job.args.exp_name, ("eval/loss", "eval/accuracy", "eval/preference_accuracy")
        summary = "  ".join(f"{k.split('/')[1]} {before[k]:.3f} -> {after[k]:.3f}" for k in keys if k in after)
        print(f"[{name}] before -> after on {what}: {summary}\n"
              f"[{name}] metrics, samples and the model (from_pretrained; {use}) are in {job.run_dir}")


def write_jsonl(job: Job, name: str, records) -> None:
    """Write `records` to {run_dir}/{name}, one JSON line each (main process)."""
    if job.accelerator.is_main_process:
        with open(os.path.join(job.run_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def end_job(job: Job) -> None:
    """Close tracking and end the processes (the one exit, common/processes.py)."""
    if job.wandb_run is not None:
        job.wandb_run.finish()
    end_processes(job.accelerator)
