"""The PPO family keeps its shared pieces as copies on purpose (each file reads whole, and `diff ppo.py drpo.py`
shows only the reset): this test keeps the copies identical, so a fix to one reaches all three."""
import importlib.util
import inspect
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("ppo.py", "ppo_pp.py", "drpo.py")
SHARED = ("per_token_rewards", "compute_gae", "masked_whiten", "clipped_policy_loss", "clipped_value_loss",
          "PolicyAndValue")


def load(name):
    """The file as a module (its `if __name__ == "__main__"` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"copies_{name[:-3]}", os.path.join(ROOT, name))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # inspect finds classes through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SHARED)
def test_the_ppo_familys_shared_functions_are_identical(name):
    sources = {f: inspect.getsource(getattr(load(f), name)) for f in FILES}
    assert sources["ppo_pp.py"] == sources["ppo.py"], f"{name} differs between ppo.py and ppo_pp.py"
    assert sources["drpo.py"] == sources["ppo.py"], f"{name} differs between ppo.py and drpo.py"

