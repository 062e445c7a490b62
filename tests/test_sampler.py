"""The one sampler (common/generation.py) on the packaged SmolLM2-135M: greedy output equals transformers'
`generate`, sampled tokens' log-probs equal the scoring pass's, and a group's shared prompt gives the same
log-probs and gradients as running every row alone."""
import pytest
import torch
import torch.nn.functional as F

from common.generation import forward_logprobs, generate, truncate_after_eos
from common.models import EMBEDDED_MODEL, load_causal_lm
from common.tasks import encode_prompts, load_task


@pytest.fixture(scope="module")
def smollm():
    return load_causal_lm(EMBEDDED_MODEL, torch.device("cpu"), torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """12 held-out arith prompts, each twice in a row (a group of 2), left-padded: (24, P)."""
    rows = load_task("arith", "test", None, 12)
    ids, mask = encode_prompts(tokenizer, rows, 256, "test")
    return ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)


def test_greedy_equals_transformers_generate(smollm, tokenizer, prompts):
    from transformers import GenerationConfig

    ids, mask = prompts
    config = GenerationConfig(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        expected = smollm.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    expected = F.pad(expected, (0, 24 - expected.shape[1]), value=tokenizer.pad_token_id)
    ours = generate(smollm, ids, mask, 24, 0.0, tokenizer.pad_token_id, tokenizer.eos_token_id)
    expected, _, lengths, _ = truncate_after_eos(expected, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ours = truncate_after_eos(ours, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
    assert lengths.min() < lengths.max()  # rows finish at different steps: finished rows left the batch
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_logprobs_equal_the_scoring_pass(smollm, tokenizer, prompts, temperature):
    ids, mask = prompts
    torch.manual_seed(0)
    responses, sampled_lp = generate(smollm, ids, mask, 24, temperature, tokenizer.pad_token_id,
                                     tokenizer.eos_token_id, return_logprobs=True)
    responses, real, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    query_responses = torch.cat([ids, responses], dim=1)
    attention_mask = torch.cat([mask, real.long()], dim=1)
    with torch.no_grad():
        scored = forward_logprobs(smollm, query_responses, attention_mask, 24, temperature)  # groups share prompts
        alone = torch.cat([forward_logprobs(smollm, query_responses[i:i + 1], attention_mask[i:i + 1], 24,
                                            temperature) for i in range(len(ids))])  # every row on its own
    assert (sampled_lp - scored)[real].abs().max() < 2e-4
    assert (alone - scored)[real].abs().max() < 2e-4


def test_a_shared_prompt_gives_the_same_gradients(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    rows = load_task("arith", "train", None, 3)
    ids, mask = encode_prompts(tokenizer, rows, 256, "train")
    ids, mask = ids.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0)  # 3 groups of 3
    torch.manual_seed(0)
    responses = generate(model, ids, mask, 6, 1.0, tokenizer.pad_token_id, tokenizer.eos_token_id)
    responses, real, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    query_responses, attention_mask = torch.cat([ids, responses], 1), torch.cat([mask, real.long()], 1)
    grads = []
    for chunks in ([slice(0, 9)], [slice(i, i + 1) for i in range(9)]):  # shared prompts, then one row at a time
        model.zero_grad()
        for rows_ in chunks:
            lp = forward_logprobs(model, query_responses[rows_], attention_mask[rows_], 6, 1.0)
            (lp * real[rows_]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-5
