"""Shared fixtures: tiny models built from a config with the real SmolLM2 tokenizer, offline."""
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def tiny_config(vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def tokenizer():
    from common.models import EMBEDDED_MODEL, load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama (hidden 64) with the real tokenizer, saved like any local model folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny_policy"))
    LlamaForCausalLM(tiny_config(len(tokenizer), tokenizer.pad_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tokenizer):
    """A tiny sequence-classification reward model with one output."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    config = tiny_config(len(tokenizer), tokenizer.pad_token_id)
    config.num_labels = 1
    path = str(tmp_path_factory.mktemp("tiny_reward"))
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def script_env(**extra):
    """The environment of the scripts the tests run: offline, one thread, the project importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
            **extra}


def start_script(args, cwd=ROOT, cold=False, **extra_env):
    """Start `python script.py ...` or `python -m torch.distributed.run ... script.py ...` (forked from the warm
    server, benchmark/warm.py) or any other command (a subprocess; `cold`: always, as a user would); `.wait(timeout)`
    gives its CompletedProcess."""
    from benchmark import warm

    env = script_env(**extra_env)
    if warm.can_run(args) and not cold:
        return warm.Started(args, cwd, env)
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    class Waiting:
        def wait(self, timeout=None):
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(args, proc.returncode, out, err)
    return Waiting()


def check(proc):
    """`proc` (a CompletedProcess), or fail the test with its output."""
    assert proc.returncode == 0, (f"{' '.join(map(str, proc.args))} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_script(args, timeout=600, cwd=ROOT, cold=False, **extra_env):
    """Run a command from the project root with offline settings; fail the test with its output."""
    return check(start_script(args, cwd, cold, **extra_env).wait(timeout))


def run_together(commands, timeout=600):
    """Run independent commands at once (2 cores); fail with the output of any that fails."""
    started = [start_script(cmd) for cmd in commands]
    return [check(s.wait(timeout)) for s in started]


def read_jsonl(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
