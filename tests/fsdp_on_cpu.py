"""Run a training script under accelerate's FSDP2 on CPU processes (gloo), which accelerate itself does not offer.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_on_cpu.py grpo.py --model_name ... [flags]

accelerate maps an FSDP config to plain multi-CPU data parallelism when there is no GPU; this launcher
switches the Accelerator's state to FSDP2 (each decoder layer and the root sharded over the processes,
full state dict on save) right after it is built, so the scripts' FSDP path runs here as it does on GPUs.
"""
import runpy
import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

build = Accelerator.__init__


def build_with_fsdp(self, *args, **kwargs):
    build(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT")  # as configs/fsdp.yaml
    self.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP  # both: the state is
    # re-read from PartialState whenever accelerate builds an AcceleratorState again


if __name__ == "__main__":
    Accelerator.__init__ = build_with_fsdp
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
