"""Run algorithm files up to their first optimizer step on a fixed batch and save the gradient it would apply:
the harness of test_invariance.py.

    python tests/capture_update.py BATCH_FILE OUT_DIR NAME script.py [flags...] [-- NAME script.py [flags...]]...

The first configuration that finds no BATCH_FILE samples its rollouts, ends each response with an EOS at
a position of its own (or none), and records them there; every later one (in this process or another)
replays them, so all see the same responses, of different lengths, to the same prompts whatever their
micro-batch size or number of processes. Each configuration stops at its first
`optimizer_step`: the main process saves the accumulated, process-averaged gradient (before clipping)
to OUT_DIR/NAME.pt (that of the first and last decoder layers). Nothing in the entry points changes: the
harness replaces `common.run.rollout`, `common.training.optimizer_step` (which sft.py and reward.py share with the
algorithm files) and `common.run.save_on_failure` before each file imports them.
"""
import contextlib
import os
import runpy
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common.run  # noqa: E402
import common.training  # noqa: E402


class Stop(Exception):
    """Raised after the gradient is saved: the configuration is done."""


def main():
    batch_file, out_dir = sys.argv[1], sys.argv[2]
    configs, current = [], []
    for token in sys.argv[3:]:
        if token == "--":
            configs.append(current)
            current = []
        else:
            current.append(token)
    configs.append(current)
    real_rollout = common.run.rollout
    recorded = torch.load(batch_file) if os.path.exists(batch_file) else {}
    record = not recorded

    def rollout(run, model, queries, query_mask, temperature, response_length=None):
        """The recorded responses of these inputs (keyed by each row's real tokens and its copy number), or new ones."""
        keys, seen = [], {}
        for ids, mask in zip(queries.tolist(), query_mask.tolist()):
            row = tuple(i for i, m in zip(ids, mask) if m)  # the real tokens: padding differs with the batch
            copy = seen[row] = seen.get(row, -1) + 1
            keys.append((row, copy))
        tokenizer = run.tokenizer
        if record:
            responses = real_rollout(run, model, queries, query_mask, temperature, response_length)[0].clone()
            # an EOS at a position of the row's own choosing (or none): the responses' lengths differ, so a loss
            # normalised by the wrong token count shows, whether or not the model samples EOS itself
            for i, key in enumerate(keys):
                position = zlib.crc32(repr(key).encode()) % (responses.shape[1] + 3)
                if position < responses.shape[1]:
                    responses[i, position] = tokenizer.eos_token_id
                recorded[key] = responses[i].clone()
            return (*common.run.truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id), 0.0)
        responses = torch.stack([recorded[key] for key in keys]).to(queries.device)
        return (*common.run.truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id), 0.0)

    def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm):
        # the first and last decoder layers of every trained model (all of a 135M model's gradient is 1 GB in
        # float64): a mis-normalised loss scales or skews the whole gradient, so these show it as well
        layers = [n for n, _ in model.named_parameters() if ".layers." in n]
        last = max(int(n.split(".layers.")[1].split(".")[0]) for n in layers) if layers else 0
        keep = (".layers.0.", f".layers.{last}.")
        grads = torch.cat([p.grad.flatten().double() for n, p in model.named_parameters()
                           if p.grad is not None and (not layers or any(k in n for k in keep))])
        if accelerator.is_main_process:
            torch.save(grads.cpu(), os.path.join(out_dir, f"{name}.pt"))
            if record:
                torch.save(recorded, batch_file)
        accelerator.wait_for_everyone()
        raise Stop

    common.run.rollout = rollout
    common.training.optimizer_step = optimizer_step
    common.run.save_on_failure = lambda run, policy: contextlib.nullcontext()
    os.makedirs(out_dir, exist_ok=True)
    for name, script, *flags in configs:
        sys.argv = [script, *flags]
        try:
            runpy.run_path(script, run_name="__main__")
        except Stop:
            record = False
        else:
            raise SystemExit(f"{name}: the script ended before its first optimizer step")


if __name__ == "__main__":
    main()
