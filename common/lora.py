"""LoRA (peft), imported only under --lora_r or for a model folder of adapters: adapters on a model, the reference
policy as the policy with its adapters off (no second copy), and a saved run's adapters merged into its base model."""
import os

import torch
from torch import nn


def add_lora(model: nn.Module, r: int, alpha: float, target_modules: str, modules_to_save=None):
    """Wrap `model` in LoRA adapters of rank `r` (peft): only the adapters (and `modules_to_save`, e.g. a value
    model's score head) train; the base weights stay frozen. Dropout 0, like everything trained here."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=modules_to_save, task_type=None)
    return get_peft_model(model, config)


def add_run_lora(policy: nn.Module, args, device: torch.device) -> nn.Module:
    """--lora_r adapters on the policy, the same on every process (drawn with --seed; FSDP keeps each process's own
    shard of them)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        return add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules)


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


def merge_adapters(model: nn.Module, folder: str) -> nn.Module:
    """`model` (the base a LoRA run trained on) with the adapters saved in `folder` merged into its weights: a plain
    model again, every weight trainable."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, os.path.expanduser(folder)).merge_and_unload()
    return model.requires_grad_(True)  # peft froze the base; merged, it is a plain model again
