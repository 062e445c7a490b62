"""Numeric and behavioural tests of the shared helpers in common/."""
import json
import math

import pytest
import torch
from conftest import SHARED_DATA

from common.arith import arith_rows
from common.config import exact_div
from common.generation import logprobs_from_logits, truncate_after_eos
from common.resets import build_reset_states, sample_rollin_lengths, splice_reset_responses
from common.rewards import RewardError, extract_answer, score_with_verifier, verify_arith
from common.task_data import split_hh_dialogue, verify_gsm8k
from common.tasks import DataError, encode_prompts, load_task
from common.training import linear_schedule

EOS, PAD = 2, 0


def test_truncate_after_eos_cases():
    responses = torch.tensor([
        [5, 6, EOS, 7, 8],   # EOS in the middle: keep it, pad after
        [EOS, 5, 6, 7, 8],   # first token is EOS: one real token
        [5, 6, 7, 8, 9],     # no EOS: all tokens real
        [5, EOS, EOS, 7, EOS],  # several EOS: cut after the first
    ])
    out, mask, lengths, has_eos = truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[5, 6, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 6, 7, 8, 9], [5, EOS, PAD, PAD, PAD]]
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert lengths.tolist() == [3, 1, 5, 2]
    assert has_eos.tolist() == [True, True, False, True]


def test_generate_samples_the_plain_softmax():
    """Sampling ignores the model's own generation_config (top-k, top-p, repetition penalty)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from common.generation import generate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    model.generation_config = GenerationConfig(do_sample=True, top_k=3, top_p=0.5, repetition_penalty=1.3)
    query = torch.randint(3, 50, (1, 4))
    samples = generate(model, query.repeat(4000, 1), torch.ones(4000, 4, dtype=torch.long), 1, 0.5, 0, 2)
    with torch.no_grad():
        expected = (model(query).logits[0, -1] / 0.5).softmax(-1)
    observed = torch.bincount(samples[:, 0], minlength=50).float() / 4000
    assert (observed - expected).abs().max() < 0.03
    greedy = generate(model, query, torch.ones(1, 4, dtype=torch.long), 1, 0.0, 0, 2)
    assert greedy[0, 0] == expected.argmax()


def test_logprobs_with_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])  # (1, 2, 3)
    tokens = torch.tensor([[0, 2]])
    lp = logprobs_from_logits(logits, tokens, temperature=2.0)
    z0 = math.exp(1.0) + 1 + math.exp(-0.5)
    assert lp[0, 0].item() == pytest.approx(1.0 - math.log(z0), abs=1e-6)
    assert lp[0, 1].item() == pytest.approx(-math.log(3), abs=1e-6)


def test_reset_builder_forces_prefix_and_masks():
    query_ids = torch.tensor([[PAD, 10, 11], [12, 13, 14]])
    query_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    prefix = torch.tensor([[20, 21, 22, EOS], [30, 31, EOS, PAD]])
    h = torch.tensor([2, 0])
    state, state_mask = build_reset_states(query_ids, query_mask, prefix, h, PAD)
    assert state.tolist() == [[PAD, 10, 11, 20, 21], [PAD, PAD, 12, 13, 14]]
    assert state_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    continuation = torch.tensor([[40, 41, 42, 43], [50, 51, 52, 53]])
    responses, forced = splice_reset_responses(prefix, h, continuation, 5, PAD)
    assert responses.tolist() == [[20, 21, 40, 41, 42], [50, 51, 52, 53, PAD]]
    assert forced.int().tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_rollin_lengths_are_uniform_below_length():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5] * 4000 + [1, 0])
    h = sample_rollin_lengths(lengths, 1.0, g)
    assert set(h[:4000].tolist()) == {1, 2, 3, 4}  # Uniform{1..len-1}
    assert h[4000:].tolist() == [0, 0]  # nothing to force
    counts = torch.bincount(h[:4000], minlength=5)[1:].float() / 4000
    # binomial standard deviation of a frequency of 0.25 over 4000 draws: sqrt(0.25 * 0.75 / 4000) = 0.0068; 0.04
    # is 5.8 of them (a fixed seed besides), while an off-by-one in the range moves a count by 0.25 or more
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.04)
    assert sample_rollin_lengths(lengths, 0.0, g).sum().item() == 0
    mixed = sample_rollin_lengths(torch.tensor([5] * 4000), 0.3, g)
    assert 0.25 < (mixed > 0).float().mean().item() < 0.35  # sd sqrt(0.3 * 0.7 / 4000) = 0.0072: 7 of them


def test_a_draw_next_to_one_still_leaves_the_policy_a_token():
    """Seed 1379, iteration 6, row 208 draws u = 0.99999998 (within 2^-25 of 1, which float32 rounds to 1.0):
    h stays at most len - 1 for every length, so the demonstration's last token (its EOS) is never forced."""
    import numpy as np

    u = np.random.default_rng([1379, 6, 208]).random(2)[0]
    assert u < 1 and np.float32(u) == 1.0  # the case: float32 rounds this draw up to 1
    lengths = torch.tensor([2, 3, 5, 8, 24])
    h = sample_rollin_lengths(lengths, 1.0, (1379, 6, [208] * 5))
    assert h.tolist() == [1, 2, 4, 7, 23]  # floor(u * (len - 1)) + 1 = len - 1: the deepest reset, not past it


@pytest.mark.parametrize("text,answer", [
    ("42", "42"), ("42.", "42"), ("45 is larger.", "45"), ("3 + 4 = 7", "7"), ("The answer is 12.", "12"),
    ("12 - 6 = 6. So 6 is the result", "6"), ("3 + 4 is 7", "7"), ("I don't know", None),
    ("7 times 8 equals 56", "56"), ("1,234", "1234"), ("-3", "-3"), ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_verifiers():
    row = {"id": "r", "prompt": "What is 3 + 4?", "answer": "7"}
    assert verify_arith(row, "3 + 4 = 7") == 1.0
    assert verify_arith(row, "3 + 4 = 8") == 0.0
    assert verify_arith(row, "What is 3 + 4? I think 8") == 0.0  # no credit for echoing the question
    g = {"prompt": "q", "answer": "1200"}
    assert verify_gsm8k(g, "so 1,200 apples\n#### 1,200") == 1.0
    assert verify_gsm8k(g, "#### 1100") == 0.0
    assert verify_gsm8k(g, "The total is 1200.") == 1.0


def test_reward_errors_name_the_row():
    rows = [{"id": "file.jsonl:3", "prompt": "p", "answer": "1"}]
    with pytest.raises(RewardError, match="file.jsonl:3"):
        score_with_verifier(lambda r, t: float("nan"), rows, ["x"])
    with pytest.raises(RewardError, match="file.jsonl:3.*ZeroDivisionError"):
        score_with_verifier(lambda r, t: 1 / 0, rows, ["x"])


def test_arith_task_splits_are_disjoint_and_correct():
    train, test = arith_rows("train", 800), arith_rows("test", 250)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train[:200] + test:
        assert verify_arith(r, r["response"]) == 1.0 and verify_arith(r, r["rejected"]) == 0.0
    with pytest.raises(DataError, match="distinct"):
        arith_rows("test", 100000)


def test_local_files_and_clear_errors(tmp_path):
    good = tmp_path / "gsm.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"question": "How many?", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "", "answer": "#### 1"},  # empty: skipped with a count
    ]))
    rows = load_task("gsm8k", "train", str(good))
    assert len(rows) == 1 and rows[0]["answer"] == "4" and rows[0]["id"] == f"{good}:0"
    missing = tmp_path / "bad.jsonl"
    missing.write_text(json.dumps({"question": "q", "solution": "#### 1"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl.*missing column.*'answer'"):
        load_task("gsm8k", "train", str(missing))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl, line 2"):
        load_task("gsm8k", "train", str(broken))
    with pytest.raises(DataError, match="file not found"):
        load_task("gsm8k", "train", str(tmp_path / "nope.jsonl"))


def test_parquet_and_json_array_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": "SUBREDDIT: r/x\nPOST: hello\nTL;DR:", "completion": " a greeting"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "tldr.parquet")
    (tmp_path / "tldr.json").write_text(json.dumps(records))
    for name in ("tldr.parquet", "tldr.json"):
        rows = load_task("tldr", "train", str(tmp_path / name))
        assert rows[0]["prompt"].endswith("TL;DR:") and rows[0]["response"] == "a greeting"


def test_prompt_longer_than_limit_is_refused(tokenizer):
    rows = [{"id": "t:0", "prompt": "short"}, {"id": "t:1", "prompt": "word " * 400}]
    with pytest.raises(DataError, match="row t:1"):
        encode_prompts(tokenizer, rows, 64, "test")
    ids, mask = encode_prompts(tokenizer, rows[:1], 64, "test")
    assert ids.shape == mask.shape and mask[0, -1] == 1


def test_hh_dialogue_split():
    messages, last = split_hh_dialogue("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How?\n\nAssistant: Like this.")
    assert messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "How?"}]
    assert last == "Like this."


def test_real_data_loaders():
    import os

    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent (only the project's own machines have it)")
    gsm = load_task("gsm8k", "test", os.path.join(SHARED_DATA, "gsm8k_test.jsonl"))
    assert len(gsm) == 1319 and all(verify_gsm8k(r, r["response"]) == 1.0 for r in gsm[:200])
    hh = load_task("hh", "test", os.path.join(SHARED_DATA, "hh_harmless_test.jsonl.gz"))
    assert len(hh) > 2000 and hh[0]["prompt"].endswith("\n\nAssistant:") and hh[0]["chosen"] != hh[0]["rejected"]


def test_exact_div_and_schedule():
    assert exact_div(12, 4, "x") == 3
    with pytest.raises(ValueError, match="not divisible"):
        exact_div(10, 4, "--prompts_per_iteration")
    assert linear_schedule("linear", 4)(2) == 0.5 and linear_schedule("constant", 4)(3) == 1.0


def test_evaluate_reports_the_verifiers_gold_score_beside_a_learned_reward(tiny_model_dir, tokenizer):
    """Under a learned reward, eval/reward is that reward and eval/accuracy the verifier's judgement of the same
    texts."""
    from common.evaluation import evaluate
    from common.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    rows = arith_rows("test", 6)
    ids, mask = encode_prompts(tokenizer, rows, 128, "test")
    seen = []

    def learned(batch, texts):  # a "reward model" that likes long responses; the verifier disagrees
        seen.extend(texts)
        return torch.tensor([float(len(t)) for t in texts])

    def verifier(row, text):  # a gold judge independent of the learned reward: prompts of even length pass
        return float(len(row["prompt"]) % 2 == 0)

    sums, count, scores, _ = evaluate(model, tokenizer, rows, ids, mask, score_fn=learned, response_length=6,
                                      temperature=0.0, batch_size=4, seed=0, verifier=verifier)
    gold = [verifier(r, t) for r, t in zip(rows, seen)]
    assert 0 < sum(gold) < 6, "pick rows where the gold judge is neither all 0 nor all 1"
    assert count == 6 and sums["reward"] == pytest.approx(sum(len(t) for t in seen))
    assert sums["accuracy"] == sum(gold) and torch.equal(scores, torch.tensor([float(len(t)) for t in seen]))
    sums, _, _, _ = evaluate(model, tokenizer, rows, ids, mask, score_fn=learned, response_length=6, temperature=0.0,
                             batch_size=4, seed=0, verifier=None)
    assert "accuracy" not in sums  # no verifier (e.g. hh): no accuracy
