"""Check and load the policy, its reference and their tokenizer; save the result. Reward and value models are
common/reward_models.py's, LoRA common/lora.py's, FSDP common/fsdp.py's (each imported only when a run uses it)."""
import json
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common.errors import UserError
from common.model_sources import EMBEDDED_MODEL, resolve_model  # noqa: F401 (EMBEDDED_MODEL: the default's name)
from common.processes import frozen_dtype
from common.tasks import VERIFIABLE


def check_model(name: str, flag: str, trust_remote_code: bool = False, score_head: bool = False):
    """The config of model `name` (a folder, or a hub id that loads here) given by `flag`, else a UserError saying
    why; `score_head`: it must be a sequence classifier (a reward model)."""
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"{flag} {name}: no such folder; pass a folder written by save_pretrained, or a hub id")
    base = adapter_base(name)
    if base is not None:  # a LoRA run's model/: its adapters load on this base model
        return check_model(base, f"{flag} {name}: its base model", trust_remote_code, score_head)
    try:
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{flag} {name}: not a model folder, and it does not load from the Hugging Face hub here "
                        f"({reason}). Pass a folder with config.json, or a hub id with network access "
                        "(HF_HUB_OFFLINE=1 allows only models already in the cache)") from e
    architectures = getattr(config, "architectures", None) or []
    if score_head and architectures and not any("SequenceClassification" in a for a in architectures):
        raise UserError(f"{flag} {name} is a {architectures[0]}, not a sequence-classification reward model: its "
                        "score head would be random. Train one with reward.py, or pass a model with a trained head")
    return config


def check_models(args, same_vocabulary: tuple = ()):
    """Refuse, before any weights load, a model that cannot be used, a context too long, a model in `same_vocabulary`
    (PPO's value model) with other token ids than the policy's. Returns the policy's tokenizer."""
    if args.reward_model is None and args.task not in VERIFIABLE:
        raise UserError(f"task {args.task} has no verifier: pass --reward_model (a sequence-classification model)")
    check_context(check_model(args.model_name, "--model_name", args.trust_remote_code), args.max_prompt_length,
                  args.response_length, "--response_length")
    if args.reward_model is not None:
        check_model(args.reward_model, "--reward_model", args.trust_remote_code, score_head=True)
    tokenizer = load_tokenizer(args.model_name, args.trust_remote_code)
    for name in same_vocabulary:
        check_model(name, "the value model", args.trust_remote_code)
        other = load_tokenizer(name, args.trust_remote_code).get_vocab()
        if any(other.get(token) != i for token, i in tokenizer.get_vocab().items()):
            raise UserError(f"{name} reads another vocabulary than the policy {args.model_name}; pass a model "
                            "that shares the policy's tokenizer")
    return tokenizer


def check_context(config, max_prompt_length: int, response_length: int, flag: str) -> None:
    """Refuse prompts and responses longer together than the model's context."""
    context = max_prompt_length + response_length
    if context > getattr(config, "max_position_embeddings", context):
        raise UserError(f"--max_prompt_length + {flag} = {context} exceeds the model's context "
                        f"({config.max_position_embeddings} tokens); lower one of them")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding and a pad token distinct from EOS where the vocabulary allows."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), padding_side="left",
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>", tokenizer.unk_token):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:  # safe too: masks come from the first EOS and attention masks, never from the pad id
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere: RL on language models compares log-probs across passes."""
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def adapter_base(name: str):
    """The base model of a folder of LoRA adapters (a LoRA run's model/), or None for anything else."""
    folder = os.path.expanduser(name)
    adapter = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(adapter) or os.path.isfile(os.path.join(folder, "config.json")):
        return None
    with open(adapter) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter} names no base model (base_model_name_or_path); add it, or merge the adapters")
    return base


def load_causal_lm(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """Causal LM on `device` in `dtype`, dropout off; a folder of LoRA adapters as its base with them merged in."""
    base = adapter_base(name)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base or name), dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    if base is not None:
        from common.lora import merge_adapters

        model = merge_adapters(model, name)
    return no_dropout(model).to(device)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass instead of storing them; train mode (dropout is 0) applies it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings (LoRA) still let gradients reach the layers
    model.train()


def save_model(model: nn.Module, tokenizer, out_dir: str, state_dict=None) -> None:
    """Write model (a LoRA model: its adapters) and tokenizer for `from_pretrained(out_dir)`; `state_dict`: the full
    weights gathered from a sharded (FSDP) model."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(out_dir)


def load_frozen_policy(args, accelerator, lora_policy=None):
    """A frozen copy of --model_name (bf16 where supported, sharded under FSDP); under --lora_r `lora_policy` with its
    adapters disabled."""
    if lora_policy is not None:
        from common.lora import AdaptersOff

        return AdaptersOff(lora_policy)
    model = load_causal_lm(args.model_name, accelerator.device, frozen_dtype(accelerator), args.trust_remote_code)
    return shard_frozen(accelerator, model).eval()


def shard_frozen(accelerator, model: nn.Module) -> nn.Module:
    """Under FSDP, a frozen model sharded like the policy (common/fsdp.py); otherwise the model as it is."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    from common.fsdp import shard

    return shard(accelerator, model)
