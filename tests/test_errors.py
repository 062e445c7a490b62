"""Bad inputs end with one clear line on stderr and exit status 2, before any model is loaded where the input allows.

Each case is a test. `python tests/test_errors.py` runs them all and rewrites tests/bad_inputs.md, the table of
every bad input tried and the line it gets.
"""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, start_script  # noqa: E402

TINY = {"--num_iterations": "2", "--prompts_per_iteration": "4", "--micro_batch_size": "2", "--response_length": "8",
        "--num_eval_prompts": "8", "--eval_batch_size": "8", "--num_train_prompts": "32"}  # a case's flags override

# (script, flags, a part of the message); {tiny}, {rm}, {nan_rm} and {data} stand for the tiny policy, the tiny
# reward model, a reward model whose weights are NaN and the folder of the data files written below
CASES = [
    ("grpo.py", ["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),
    ("grpo.py", ["--response_length", "0"], "--response_length must be >= 1, got 0"),
    ("grpo.py", ["--temperature", "-0.5"], "--temperature must be >= 0"),
    ("grpo.py", ["--eval_samples", "-1"], "--eval_samples must be >= 0"),
    ("grpo.py", ["--grpo.num_generations", "1"], "--grpo.num_generations must be >= 2, got 1"),
    ("ppo_pp.py", ["--ppo.reset_prob", "1.5"], "--ppo.reset_prob must be in [0, 1], got 1.5"),
    ("ppo.py", ["--ppo.lam", "1.2"], "--ppo.lam must be in [0, 1]"),
    ("rebel.py", ["--rebel.eta", "0"], "--rebel.eta must be > 0"),
    ("apo.py", ["--apo.beta1", "-1"], "--apo.beta1 must be >= 0"),
    ("sft.py", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("reward.py", ["--task", "tldr", "--pairs", "policy"], "--pairs policy needs a task with a verifier"),
    ("grpo.py", ["--task", "nope"], "nope"),  # tyro: not one of the tasks (it lists them)
    ("grpo.py", ["--model_name", "/nonexistent/model"], "--model_name /nonexistent/model: no such folder"),
    ("grpo.py", ["--model_name", "nobody/no-such-model"], "does not load from the Hugging Face hub"),
    ("grpo.py", ["--reward_model", "{tiny}"], "not a sequence-classification reward model"),
    ("ppo.py", ["--ppo.value_model", "/nonexistent/value"], "the value model /nonexistent/value: no such folder"),
    ("grpo.py", ["--task", "hh", "--data_files", "{data}/hh.jsonl"], "task hh has no verifier: pass --reward_model"),
    ("grpo.py", ["--task", "gsm8k", "--data_files", "{data}/missing.jsonl"], "missing.jsonl: file not found"),
    ("grpo.py", ["--task", "gsm8k", "--data_files", "{data}/broken.jsonl"], "broken.jsonl, line 2: not valid JSON"),
    ("grpo.py", ["--task", "gsm8k", "--data_files", "{data}/no_answer.jsonl"], "missing column(s) ['answer']"),
    ("grpo.py", ["--task", "gsm8k", "--data_files", "{data}/empty.jsonl"], "empty.jsonl: no rows"),
    ("grpo.py", ["--prompts_per_iteration", "3", "--micro_batch_size", "16"], "24 is not divisible by 16"),
    ("grpo.py", ["--max_prompt_length", "8"], "longer than --max_prompt_length 8"),
    ("grpo.py", ["--max_prompt_length", "500", "--response_length", "100"], "exceeds the model's context (512"),
    ("grpo.py", ["--num_train_prompts", "2"], "2 training prompts, fewer than --prompts_per_iteration 4"),
    ("grpo.py", ["--num_eval_prompts", "1000"], "only 275 distinct test questions"),
    ("grpo.py", ["--resume_from", "/nonexistent/checkpoints/iter_2"], "not a complete checkpoint"),
    ("grpo.py", ["--reward_model", "{nan_rm}"], "reward model returned nan on row"),
    ("grpo.py", ["--reward_model", "{rm}", "--learning_rate", "1e30"], "the gradient norm is nan"),
]


@pytest.fixture(scope="module")
def results(tiny_model_dir, tiny_reward_dir, tmp_path_factory):
    """Every case run once (two at a time): {index: (return code, stdout, stderr, output folder)}."""
    return run_cases(tiny_model_dir, tiny_reward_dir, str(tmp_path_factory.mktemp("bad_inputs")))


def run_cases(tiny, rm, work):
    from transformers import AutoModelForSequenceClassification

    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "hh.jsonl"), "w") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes",
                            "rejected": "\n\nHuman: hi\n\nAssistant: no"}) + "\n")
    with open(os.path.join(data, "broken.jsonl"), "w") as f:
        f.write(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with open(os.path.join(data, "no_answer.jsonl"), "w") as f:
        f.write(json.dumps({"question": "q", "solution": "#### 1"}) + "\n")
    open(os.path.join(data, "empty.jsonl"), "w").close()
    nan_rm = os.path.join(work, "nan_reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(rm)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(nan_rm)
    for name in os.listdir(rm):
        if "token" in name or name.endswith(".jinja"):
            with open(os.path.join(rm, name), "rb") as src, open(os.path.join(nan_rm, name), "wb") as dst:
                dst.write(src.read())
    def run(i):
        script, flags, _ = CASES[i]
        out = os.path.join(work, f"case{i}")
        flags = [x.format(tiny=tiny, rm=rm, nan_rm=nan_rm, data=data) for x in flags]
        common = {"--model_name": tiny, "--output_dir": out, **(TINY if script not in ("sft.py", "reward.py") else {})}
        common = [x for k, v in common.items() if k not in flags for x in (k, v)]
        proc = start_script([sys.executable, script, *common, *flags]).wait(600)
        return proc.returncode, proc.stdout, proc.stderr, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(range(len(CASES)), pool.map(run, range(len(CASES)))))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_ends_with_one_clear_line(results, i):
    script, flags, message = CASES[i]
    code, _, stderr, out = results[i]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert message in stderr, stderr[-3000:]
    if lines[-1].startswith(f"{script}: error: "):  # ours (tyro's own parsing errors are a framed block)
        assert message in lines[-1], lines[-1]
    if "learning_rate" not in flags or "1e30" not in flags:
        assert not os.path.exists(os.path.join(out, "grpo__1", "model"))  # nothing trained, nothing saved


def test_a_loss_that_is_not_finite_keeps_the_last_good_weights(results):
    i = next(i for i, c in enumerate(CASES) if "1e30" in c[1])
    code, _, stderr, out = results[i]
    last = stderr.strip().splitlines()[-1]
    assert "iteration 2" in last and "model_interrupted" in last  # iteration 1's update made the weights huge
    assert os.path.exists(os.path.join(out, "grpo__1", "model_interrupted", "model.safetensors"))


if __name__ == "__main__":  # rewrite tests/bad_inputs.md from a fresh run of every case
    import tempfile

    from conftest import tiny_config  # noqa: F401  (the fixtures' models are built the same way)

    work = tempfile.mkdtemp()
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from common.models import EMBEDDED_MODEL, load_tokenizer
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(len(tokenizer), tokenizer.pad_token_id)).save_pretrained(f"{work}/tiny")
    tokenizer.save_pretrained(f"{work}/tiny")
    config = tiny_config(len(tokenizer), tokenizer.pad_token_id)
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(f"{work}/rm")
    tokenizer.save_pretrained(f"{work}/rm")
    found = run_cases(f"{work}/tiny", f"{work}/rm", work)
    rows = ["| # | command (plus the tiny model and batch flags) | exit | the error line on stderr |",
            "|---|---|---|---|"]
    for i, (script, flags, message) in enumerate(CASES):
        code, _, stderr, _ = found[i]
        last = [line for line in stderr.splitlines() if message in line][-1].strip(" │")  # tyro's: a framed block
        shown = " ".join(flags).replace(work, "…")
        rows.append(f"| {i + 1} | `{script} {shown}` | {code} | {last.replace(work, '…').replace('|', '/')} |")
    with open(os.path.join(ROOT, "tests", "bad_inputs.md"), "w") as f:
        f.write("# Bad inputs and the line each gets\n\nWritten by `python tests/test_errors.py`; each row is a test "
                "in tests/test_errors.py. Every one exits with status 2 and no traceback.\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))
