"""SFT and reward model: the losses and masks by hand, pair building, loaders of local files, smoke runs,
normalisation."""
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl, run_script, tiny_config

from common.reward_models import normalize_rewards, score_with_reward_model
from common.task_data import load_preference_task
from common.tasks import DataError, load_task
from reward import bradley_terry_loss, build_policy_pairs
from sft import build_sft_example, collate_sft, response_nll


def test_bradley_terry_loss_by_hand():
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-6)  # 0.3133
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    # the mean over pairs; a wrong order costs more than a right one gains
    loss = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2, abs=1e-6)
    # no overflow
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_sft_labels_mask_prompt_and_padding(tokenizer):
    rows = [{"prompt": "What is 3 + 4? Answer with just the number.", "response": "3 + 4 = 7"},
            {"prompt": "What is 12 times 11? Answer with just the number.", "response": "12 times 11 = 132"}]
    examples = [build_sft_example(tokenizer, row) for row in rows]
    input_ids, attention_mask, labels = collate_sft(examples, tokenizer.pad_token_id)
    assert input_ids.shape == attention_mask.shape == labels.shape
    for i, (row, (prompt, response)) in enumerate(zip(rows, examples)):
        n = len(prompt) + len(response)
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # the chat template, as the policy sees it
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response[:-1]) == row["response"]
        assert (labels[i, :len(prompt)] == -100).all()  # prompt: no loss
        assert labels[i, len(prompt):n].tolist() == response  # response and EOS: kept
        assert (labels[i, n:] == -100).all() and (attention_mask[i, n:] == 0).all()  # right padding: no loss
        assert (input_ids[i, n:] == tokenizer.pad_token_id).all() and attention_mask[i, :n].all()
    assert (labels != -100).sum().item() == sum(len(r) for _, r in examples)


def test_response_nll_matches_the_library_loss(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), tokenizer.pad_token_id)).eval()
    rows = [{"prompt": "What is 1 + 2?", "response": "1 + 2 = 3"},
            {"prompt": "What is 10 - 2? Be brief.", "response": "8"}]
    input_ids, attention_mask, labels = collate_sft([build_sft_example(tokenizer, r) for r in rows],
                                                    tokenizer.pad_token_id)
    with torch.no_grad():
        nll, count = response_nll(model, input_ids, attention_mask, labels)
        # mean over labelled tokens
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert count.item() == (labels != -100).sum().item()
    assert (nll / count).item() == pytest.approx(expected.item(), rel=1e-5)


def test_policy_pairs_from_verified_samples():
    rows = [{"id": f"r{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1), "response": f"{i} + 1 = {i + 1}"}
            for i in range(3)]
    samples = [["0 + 1 = 1", "0 + 1 = 5", "I think 9"],  # right and wrong: a policy pair
               ["1 + 1 = 3", "no idea"],  # nothing right: the dataset's response is chosen
               ["3", "2 + 1 = 3"]]  # nothing wrong: skipped
    from common.rewards import verifier_for

    pairs, counts = build_policy_pairs(rows, samples, verifier_for("arith"), seed=0)
    assert counts == {"prompts": 3, "skipped_no_wrong_sample": 1, "chosen_from_dataset": 1}
    assert [p["id"] for p in pairs] == ["r0", "r1"]
    assert (pairs[0]["chosen"] == "0 + 1 = 1" and pairs[0]["rejected"] in ("0 + 1 = 5", "I think 9")
            and pairs[0]["chosen_source"] == "policy")
    assert (pairs[1]["chosen"] == "1 + 1 = 2" and pairs[1]["rejected"] in samples[1]
            and pairs[1]["chosen_source"] == "dataset")


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_local_loaders_for_sft_and_preference_columns(tmp_path):
    post = "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: hello there\n\nTL;DR:"
    sft_file = _write(tmp_path / "tldr_sft.jsonl", [{"prompt": post, "completion": " a greeting"}])
    rows = load_task("tldr", "train", sft_file)
    assert rows[0]["prompt"] == post and rows[0]["response"] == "a greeting"
    pref_file = _write(tmp_path / "tldr_pref.jsonl", [{"prompt": post, "chosen": " a greeting", "rejected": " a post"}])
    pairs = load_preference_task("tldr", "train", pref_file)
    assert pairs[0]["prompt"] == post and (pairs[0]["chosen"], pairs[0]["rejected"]) == ("a greeting", "a post")
    hh_file = _write(tmp_path / "hh.jsonl",
                     [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How?\n\nAssistant: Like this.",
                       "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How?\n\nAssistant: Go away."}])
    for hh in (load_task("hh", "train", hh_file), load_preference_task("hh", "train", hh_file)):
        assert hh[0]["prompt"].endswith("\n\nHuman: How?\n\nAssistant:") and len(hh[0]["messages"]) == 3
        assert (hh[0]["chosen"], hh[0]["rejected"], hh[0]["response"]) == ("Like this.", "Go away.", "Like this.")
    gsm_file = _write(tmp_path / "gsm.jsonl", [{"question": "How many?", "answer": "2 + 2 = 4\n#### 4"}])
    gsm = load_task("gsm8k", "train", gsm_file)
    assert gsm[0]["response"] == "2 + 2 = 4\n#### 4" and gsm[0]["answer"] == "4"
    with pytest.raises(DataError, match="--pairs policy"):
        load_preference_task("gsm8k", "train", gsm_file)


@pytest.mark.parametrize("task,loader,record,column", [
    ("tldr", load_task, {"prompt": "p", "summary": "s"}, "completion"),
    ("tldr", load_preference_task, {"prompt": "p", "chosen": "a"}, "rejected"),
    ("hh", load_task, {"chosen": "\n\nHuman: a\n\nAssistant: b"}, "rejected"),
    ("gsm8k", load_task, {"question": "q"}, "answer"),
])
def test_missing_column_names_file_and_column(tmp_path, task, loader, record, column):
    path = _write(tmp_path / f"{task}_bad.jsonl", [record])
    with pytest.raises(DataError, match=rf"{task}_bad.jsonl.*missing column.*'{column}'"):
        loader(task, "train", path)


def test_stored_normalisation_is_applied_when_scoring(tiny_reward_dir, tokenizer, tmp_path):
    from common.reward_models import load_reward_model

    rows = [{"id": "a", "prompt": "What is 1 + 1?"}, {"id": "b", "prompt": "What is 2 + 2?"}]
    texts = ["1 + 1 = 2", "2 + 2 = 5"]
    model = load_reward_model(tiny_reward_dir, torch.device("cpu"), torch.float32, tokenizer.pad_token_id)
    raw = score_with_reward_model(model, tokenizer, rows, texts, batch_size=2)  # (2,)
    model.config.reward_mean, model.config.reward_std = 0.25, 2.0
    model.save_pretrained(tmp_path / "rm")
    reloaded = load_reward_model(str(tmp_path / "rm"), torch.device("cpu"), torch.float32, tokenizer.pad_token_id)
    assert (reloaded.config.reward_mean, reloaded.config.reward_std) == (0.25, 2.0)  # the config carries them
    normalised = score_with_reward_model(reloaded, tokenizer, rows, texts, batch_size=1)
    # the same scores through batches of 1 instead of 2 (float32, O(1) scores: ~1e-6 apart), shifted and halved;
    # normalisation missed or applied twice moves them by ~1e-1
    assert normalised.tolist() == pytest.approx(((raw - 0.25) / 2.0).tolist(), abs=1e-4)
    assert normalize_rewards(raw, SimpleNamespace()).tolist() == raw.tolist()  # no stored values: unchanged


TINY_SFT = ["--num_train_rows", "32", "--num_eval_prompts", "8", "--batch_size", "8", "--micro_batch_size", "4",
            "--max_response_length", "12", "--learning_rate", "1e-3", "--eval_batch_size", "8"]
TINY_REWARD = ["--num_train_prompts", "32", "--num_eval_prompts", "8", "--num_samples", "2", "--response_length", "6",
               "--sample_batch_size", "8", "--batch_size", "8", "--micro_batch_size", "4", "--learning_rate", "1e-3"]


def test_sft_smoke(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run_script([sys.executable, "sft.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path), *TINY_SFT])
    run_dir = tmp_path / "sft__1"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss/sft" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 32 rows / 8 per step
    assert all(math.isfinite(r["loss/sft"]) for r in train) and "perf/seconds_per_iter" in train[0]
    for evaluation in (rows[0], rows[-1]):
        assert {"eval/loss", "eval/accuracy", "eval/eos_rate"} <= set(evaluation)
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]  # lr 1e-3 on a random model: the loss drops at once
    assert len(read_jsonl(run_dir / "eval_samples.jsonl")) == 16  # 8 prompts before and after
    AutoModelForCausalLM.from_pretrained(run_dir / "model")


def test_reward_smoke_normalised_and_cached(tiny_model_dir, tokenizer, tmp_path):
    from common.reward_models import load_reward_model

    proc = run_script([sys.executable, "reward.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path),
                       *TINY_REWARD])
    assert "sampled 2 responses per prompt" in proc.stdout
    run_dir = tmp_path / "reward__1"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert "eval/preference_accuracy" in rows[0] and rows[0]["pairs/train_prompts"] == 32
    assert [r["step"] for r in rows if "loss/reward" in r] == list(range(1, 9))  # 2 epochs x 32 pairs / 8
    final = rows[-1]
    for key in ("eval/preference_accuracy", "eval/loss", "eval/margin", "reward/mean", "reward/std"):
        assert math.isfinite(final[key]), key
    model = load_reward_model(str(run_dir / "model"), torch.device("cpu"), torch.float32, tokenizer.pad_token_id)
    assert (model.config.reward_mean == pytest.approx(final["reward/mean"])
            and model.config.pad_token_id == tokenizer.pad_token_id)
    # scored as the RL files score, the training responses have mean 0 and std 1: reward.py trains on the same text
    pairs = read_jsonl(run_dir / "train_pairs.jsonl")
    scores = score_with_reward_model(model, tokenizer, pairs * 2,
                                     [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], batch_size=16)
    # float32 means over 64 scores of O(1) are exact to ~1e-6; 1e-3 is loose for that, tight for a normalisation
    # taken from other responses (a mean off by ~1e-1)
    assert (scores.mean().item() == pytest.approx(0.0, abs=1e-3)
            and scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3))
    # a second run reuses the cached samples
    again = run_script([sys.executable, "reward.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path),
                        *TINY_REWARD, "--exp_name", "again", "--epochs", "1", "--no_normalize"])
    assert again.stdout.count("cached samples per prompt") == 2 and "sampled" not in again.stdout
    assert "reward_mean" not in json.loads((tmp_path / "again__1" / "model" / "config.json").read_text())


def test_reward_from_dataset_pairs(tiny_model_dir, tmp_path):
    post = "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: {}\n\nTL;DR:"
    records = [{"prompt": post.format(f"post {i}"), "chosen": f" summary {i}", "rejected": " " + "words " * i}
               for i in range(16)]
    train, test = _write(tmp_path / "train.jsonl", records), _write(tmp_path / "test.jsonl", records[:4])
    run_script([sys.executable, "reward.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path),
                "--task", "tldr",
                "--data_files", train, "--eval_data_files", test, "--batch_size", "8", "--micro_batch_size", "8",
                "--epochs", "1"])
    final = read_jsonl(tmp_path / "reward__1" / "metrics.jsonl")[-1]
    # dataset pairs: no sampling
    assert "eval/preference_accuracy" in final and not (tmp_path / "preference_pairs").exists()
