"""The flags every training script shares, and the batch sizes derived from them."""
import os
import sys
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import tyro

from common.errors import UserError, exit_cleanly_on_user_errors
from common.model_sources import EMBEDDED_MODEL


@dataclass
class TrainArgs:
    """The flags every entry point shares (run, model, data, optimiser); each `Args` subclasses it or BaseArgs."""

    # experiment
    exp_name: str = os.path.basename(sys.argv[0]).removesuffix(".py")
    """name of the run (default: the script's name); its folder is {output_dir}/{exp_name}__{seed}__{time},
    and {output_dir}/{exp_name}__{seed} links to the newest such folder"""
    seed: int = 1
    """random seed (each process adds process_index * 100003)"""
    output_dir: str = "runs"
    """where run folders go: metrics.jsonl, samples or reward.py's pairs, model/, --save_every's checkpoints/"""
    track: bool = False
    """log to Weights & Biases too"""
    wandb_project: str = "resetrl"
    """wandb project name"""

    # models
    model_name: str = EMBEDDED_MODEL
    """the model to train: hub id or local folder (the default falls back to the packaged copy offline), or
    `pocket`: a 1.2M-parameter Llama over the embedded tasks' words, built and cached once (seconds per run on a CPU)"""
    trust_remote_code: bool = False
    """allow models whose code lives in their repository"""
    lora_r: int = 0
    """LoRA rank (0: train every weight): only adapters train, the RL files' reference is the policy without them (no
    second copy); they want a larger --learning_rate than full training (benchmark/README.md)"""
    lora_alpha: float = 32.0
    """LoRA scale: the adapters' update is multiplied by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """the layers that get adapters: all-linear, or comma-separated module names (q_proj,v_proj)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, about a third more compute"""
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """compute precision: auto = `accelerate launch`'s config, else bf16 autocast on a GPU that has it (weights and
    optimizer fp32, frozen models bf16), else no = fp32 everywhere (bf16 works on CPU too, benchmark/README.md)"""

    # task
    task: Literal["arith", "chain2", "chain3", "chain4", "chain5", "lock3", "lock4", "lock6", "lock8", "lock12",
                  "lock16", "gsm8k", "tldr", "hh"] = "arith"
    """embedded: arith (one operation), chainN (N operations worked step by step), lockH (H dependent digits, all or
    nothing; seconds per run with --model_name pocket); gsm8k (verifiable); tldr, hh (RL needs --reward_model)"""
    data_files: Optional[str] = None
    """local .json/.jsonl/.parquet training file(s), comma-separated, with the task's hub columns"""
    eval_data_files: Optional[str] = None
    """local held-out file(s), same columns"""
    num_eval_prompts: int = 100
    """held-out prompts evaluated"""
    max_prompt_length: int = 256
    """longest prompt in tokens; longer prompts are refused before training"""

    # optimiser
    micro_batch_size: int = 16
    """sequences per forward/backward on one process (gradient accumulation fills the minibatch)"""
    learning_rate: float = 2e-5
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "constant"] = "constant"
    """learning-rate schedule over the optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 0
    """evaluate every N iterations or optimizer steps (0: only before and after training)"""
    eval_batch_size: int = 64
    """prompts per evaluation batch"""

    # the ranges parse_args checks (a subclass or a method's flag group declares its own the same way)
    ranges: ClassVar[dict] = dict(
        num_eval_prompts=">= 1", max_prompt_length=">= 1", micro_batch_size=">= 1", learning_rate="> 0",
        weight_decay=">= 0", max_grad_norm="> 0", eval_every=">= 0", eval_batch_size=">= 1", lora_r=">= 0",
        lora_alpha="> 0")

    # derived right after parsing (not flags)
    world_size: tyro.conf.Suppress[int] = 0
    """number of processes"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """sequences (or pairs) per iteration or optimizer step on this process"""
    grad_accum_steps: tyro.conf.Suppress[int] = 0
    """micro-batches per optimizer step"""


@dataclass
class BaseArgs(TrainArgs):
    """The algorithm files' shared flags; each subclasses this, sets its own defaults and adds its method's block."""

    save_every: int = 0
    """write a resumable checkpoint every N iterations (0: never)"""
    resume_from: Optional[str] = None
    """checkpoint folder (written by --save_every) to continue from, in its run's folder; `latest`: the newest
    checkpoint of this --exp_name and --seed in --output_dir (or a new run when there is none)"""
    reward_model: Optional[str] = None
    """sequence-classification reward model (hub id or folder); default: the task's verifier"""
    sampler: Literal["auto", "plain", "static"] = "auto"
    """how responses are sampled: plain = common/generation.py's loop (finished rows leave the batch); static =
    transformers' generate with a static KV cache, in CUDA graphs on a GPU; auto = static on a GPU, plain on CPU"""

    # task and sampling
    num_train_prompts: Optional[int] = None
    """use the first N training prompts (None: all)"""
    response_length: int = 24
    """tokens sampled per response (cut after the first EOS)"""
    temperature: float = 0.7
    """sampling temperature for training rollouts (log-probs use the same)"""
    eval_temperature: float = 0.0
    """sampling temperature for evaluation (0: greedy)"""
    eval_samples: int = 1
    """responses per held-out prompt sampled at --temperature at each evaluation: they give eval/kl (the KL to the
    reference), eval/sample_reward and eval/pass@k for k = 1, 2, 4, ... up to this (0: none of these)"""

    # iterations and batches
    num_iterations: int = 8
    """training iterations (one batch of prompts each)"""
    max_train_seconds: float = 0.0
    """stop after the iteration that passes this many seconds of training (evaluation not counted), then
    evaluate and save as usual (0: no limit). A linear lr schedule still assumes --num_iterations"""
    prompts_per_iteration: int = 8
    """prompts per iteration, over all processes"""
    num_epochs: int = 1
    """passes of optimisation over each iteration's samples (GRPO's mu, PPO's epochs)"""
    num_minibatches: int = 1
    """optimizer steps per pass over the samples (each minibatch holds whole groups where the method has them)"""

    ranges: ClassVar[dict] = dict(
        TrainArgs.ranges, num_train_prompts=">= 1", response_length=">= 1", temperature=">= 0",
        eval_temperature=">= 0", num_iterations=">= 0", max_train_seconds=">= 0", prompts_per_iteration=">= 1",
        num_epochs=">= 1", num_minibatches=">= 1", eval_samples=">= 0", save_every=">= 0")

    # derived right after parsing (not flags)
    local_prompts: tyro.conf.Suppress[int] = 0
    """prompts per iteration on this process"""
    mini_batch_size: tyro.conf.Suppress[int] = 0
    """sequences per optimizer step on this process"""


def parse_args(args_class):
    """The command line as an `args_class` (tyro), each flag checked against its `ranges`; from here on a UserError
    ends the run with one line on stderr and exit status 2."""
    exit_cleanly_on_user_errors()
    args = tyro.cli(args_class, use_underscores=True)
    check_ranges(args)
    return args


def check_ranges(obj, prefix: str = "") -> None:
    """Refuse a flag of `obj` or its nested groups outside its `ranges` (">= x", "> x", "in [a, b]"); None passes."""
    for name, rule in getattr(obj, "ranges", {}).items():
        value = getattr(obj, name)
        if value is None:
            continue
        op, bound = rule.split(" ", 1)
        if op == "in":
            low, high = (float(x) for x in bound.strip("[]").split(","))
            ok = low <= value <= high
        else:
            ok = value >= float(bound) if op == ">=" else value > float(bound)
        if not ok:
            raise UserError(f"--{prefix}{name} must be {rule}, got {value}")
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{field.name}.")


def exact_div(a: int, b: int, what: str) -> int:
    """a / b when b divides a, else a clear error naming the two settings."""
    if b <= 0 or a % b != 0:
        raise UserError(f"{what}: {a} is not divisible by {b}; change the batch settings so it is")
    return a // b


def derive_batch_sizes(args: BaseArgs, world_size: int, samples_per_prompt: int, group_size: int = 1) -> None:
    """Fill the derived fields of `args` (per-process batch, minibatch, gradient accumulation), keeping groups of
    `group_size` consecutive sequences (REBEL's pairs) whole in every minibatch and micro-batch."""
    args.world_size = world_size
    args.local_prompts = exact_div(args.prompts_per_iteration, world_size, "--prompts_per_iteration over processes")
    args.local_batch_size = args.local_prompts * samples_per_prompt
    what = "sequences per process (prompts_per_iteration / processes x samples per prompt) over --num_minibatches"
    if group_size > 1:
        what = "groups per process (prompts_per_iteration / processes) over --num_minibatches"
        exact_div(args.micro_batch_size, group_size, f"--micro_batch_size must hold whole groups of {group_size}")
    args.mini_batch_size = group_size * exact_div(args.local_batch_size // group_size, args.num_minibatches, what)
    args.grad_accum_steps = exact_div(args.mini_batch_size, args.micro_batch_size,
                                      "minibatch size over --micro_batch_size")
