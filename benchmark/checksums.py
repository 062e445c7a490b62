"""Fingerprints of short fixed-seed runs: metrics, samples and weights, to show that a refactor changed no number.

    python benchmark/checksums.py --save before.json     # on the old code
    python benchmark/checksums.py --compare before.json  # on the new code: exit status 1 when anything differs

Runs sft.py from the pocket model on lock3, then from its model grpo.py, drpo.py, apo.py and reward.py (policy pairs,
so its sample cache is exercised; then dataset pairs) for a few steps, with an evaluation in the middle, and hashes
- metrics.jsonl without the keys that measure time or memory (perf/*) or that hold a path;
- eval_samples.jsonl (the held-out prompts and responses), and reward.py's train_pairs.jsonl and eval_pairs.jsonl;
- the saved model's tensors (model/*.safetensors, tensor by tensor: bytes, not the file with its metadata).
A run is deterministic on one machine with one thread; across machines the numbers may differ in the last bits.
Takes about a minute on 2 CPU cores.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHORT = ["--task", "lock3", "--num_eval_prompts", "32", "--eval_batch_size", "32"]
SFT = "{out}/sft__1/model"  # the RL runs and reward.py start from the SFT run's model: it opens some locks, so
RL = ["--model_name", SFT, *SHORT, "--num_iterations", "4", "--eval_every", "2", "--learning_rate", "1e-3",
      "--eval_samples", "2"]  # the rewards vary and the updates are not zero
RUNS = {
    "sft": ["sft.py", "--model_name", "pocket", *SHORT, "--max_response_length", "4", "--epochs", "6",
            "--batch_size", "32", "--micro_batch_size", "16", "--eval_every", "40", "--learning_rate", "1e-3"],
    "grpo": ["grpo.py", *RL, "--prompts_per_iteration", "4", "--micro_batch_size", "8", "--num_minibatches", "2"],
    "drpo": ["drpo.py", *RL, "--prompts_per_iteration", "8", "--micro_batch_size", "4"],
    "apo": ["apo.py", *RL, "--prompts_per_iteration", "8", "--num_train_prompts", "64", "--micro_batch_size", "4"],
    "reward": ["reward.py", "--model_name", SFT, *SHORT, "--num_train_prompts", "96", "--num_samples", "4",
               "--response_length", "6", "--max_length", "24",
               "--batch_size", "16", "--micro_batch_size", "8", "--learning_rate", "1e-3"],
    "reward_dataset": ["reward.py", "--model_name", SFT, *SHORT, "--pairs", "dataset", "--exp_name", "reward_dataset",
                       "--num_train_prompts", "96", "--max_length", "16", "--batch_size", "16",
                       "--micro_batch_size", "8", "--learning_rate", "1e-3"],
}


def jsonl_digest(path: str, drop=lambda key: False) -> str:
    """sha256 of a JSONL file's records with the keys `drop` names removed (key order normalised)."""
    digest = hashlib.sha256()
    with open(path) as f:
        for line in f:
            if line.strip():
                record = {k: v for k, v in json.loads(line).items() if not drop(k)}
                digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def weights_digest(folder: str) -> str:
    """sha256 of every tensor in the folder's safetensors files, by name."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        tensors = load_file(os.path.join(folder, name))
        for key in sorted(tensors):
            digest.update(key.encode())
            digest.update(tensors[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(run_dir: str) -> dict:
    """The digests of one finished run's folder."""
    out = {"metrics": jsonl_digest(os.path.join(run_dir, "metrics.jsonl"), lambda k: k.startswith("perf/")),
           "model": weights_digest(os.path.join(run_dir, "model"))}
    for name in ("eval_samples.jsonl", "train_pairs.jsonl", "eval_pairs.jsonl"):
        if os.path.exists(os.path.join(run_dir, name)):
            out[name.split(".")[0]] = jsonl_digest(os.path.join(run_dir, name))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", help="write the fingerprints to this JSON file")
    parser.add_argument("--compare", help="compare with the fingerprints in this JSON file (exit 1 on a difference)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for name in args.runs.split(","):
            script, *flags = RUNS[name]
            flags = [f.format(out=out) for f in flags]
            proc = subprocess.run([sys.executable, script, *flags, "--output_dir", out], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name}: exit status {proc.returncode}\n{proc.stderr[-3000:]}")
            results[name] = fingerprint(os.path.join(out, f"{flags[flags.index('--exp_name') + 1]}__1"
                                                      if "--exp_name" in flags else f"{script[:-3]}__1"))
            print(f"{name:15s} " + "  ".join(f"{k} {v}" for k, v in results[name].items()), flush=True)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [f"{name}.{k}" for name in results for k in results[name]
                  if before.get(name, {}).get(k) != results[name][k]]
        print("identical to " + args.compare if not differ else "differ: " + ", ".join(differ))
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
