"""The one sampler (common/generation.py), both ways (--sampler plain and static): on the packaged SmolLM2-135M, whose
rows end at different steps, greedy output equals transformers' `generate` and sampled tokens' log-probs equal the
scoring pass's; on the 2-layer test model, prompt bucketing changes no output, the static way applies no sampling
defaults of the model, and a group's shared prompt gives the same log-probs and gradients as running every row
alone."""
import pytest
import torch
import torch.nn.functional as F

from common import static_sampler
from common.generation import forward_logprobs, generate, truncate_after_eos
from common.static_sampler import generate_static
from common.models import EMBEDDED_MODEL, load_causal_lm
from common.tasks import encode_prompts, load_task


@pytest.fixture(scope="module")
def smollm():
    return load_causal_lm(EMBEDDED_MODEL, torch.device("cpu"), torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The 2-layer test model: for the checks of the static sampler's own logic (bucketing, the model's sampling
    defaults), which do not depend on what the model says."""
    return load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """6 held-out arith prompts, each twice in a row (a group of 2), left-padded: (12, P)."""
    rows = load_task("arith", "test", None, 6)
    ids, mask = encode_prompts(tokenizer, rows, 256, "test")
    return ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)


@pytest.fixture(params=["plain", "static"])
def sampler(request):
    """The test runs once with each sampler (--sampler), whatever the device."""
    return request.param


def test_greedy_equals_transformers_generate(smollm, tokenizer, prompts, sampler):
    from transformers import GenerationConfig

    ids, mask = prompts
    config = GenerationConfig(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        expected = smollm.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    expected = F.pad(expected, (0, 24 - expected.shape[1]), value=tokenizer.pad_token_id)
    ours = generate(smollm, ids, mask, 24, 0.0, tokenizer.pad_token_id, tokenizer.eos_token_id, sampler=sampler)
    expected, _, lengths, _ = truncate_after_eos(expected, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ours = truncate_after_eos(ours, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
    assert lengths.min() < lengths.max()  # rows finish at different steps: finished rows left the batch
    assert torch.equal(ours, expected)


def test_sampled_logprobs_equal_the_scoring_pass(smollm, tokenizer, prompts, sampler):
    temperature = 0.7  # not 1: a log-prob taken at the wrong temperature would show
    ids, mask = prompts
    torch.manual_seed(0)
    responses, sampled_lp = generate(smollm, ids, mask, 24, temperature, tokenizer.pad_token_id,
                                     tokenizer.eos_token_id, return_logprobs=True, sampler=sampler)
    responses, real, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    query_responses = torch.cat([ids, responses], dim=1)
    attention_mask = torch.cat([mask, real.long()], dim=1)
    with torch.no_grad():
        scored = forward_logprobs(smollm, query_responses, attention_mask, 24, temperature)  # groups share prompts
        alone = torch.cat([forward_logprobs(smollm, query_responses[i:i + 1], attention_mask[i:i + 1], 24,
                                            temperature) for i in range(len(ids))])  # every row on its own
    # one token at a time with a KV cache, or the whole sequence at once, or one row without padding: the same float32
    # sums in another order through 30 layers. A log-prob is at most ~20 here; each layer's reordering moves the
    # residual stream by ~sqrt(576) x 2^-24 = 1.4e-6 of its scale, ~4e-5 over 30 layers, 20 x 4e-5 = 8e-4 in the
    # worst case and ~1e-5 typically. 2e-4 sits between; a log-prob taken at the wrong position, with the wrong
    # temperature or with a padding token in the context moves it by ~1e-1 or more
    assert (sampled_lp - scored)[real].abs().max() < 2e-4
    assert (alone - scored)[real].abs().max() < 2e-4


def test_prompt_buckets_change_no_output(tiny, tokenizer, prompts, monkeypatch):
    """Static sampler: prompts padded to 64 columns (the bucket) give the tokens that unpadded prompts give
    (bucket 1), greedy and sampled with the same seed; the plain loop's output does not move with extra padding."""
    ids, mask = prompts
    assert ids.shape[1] % static_sampler.PROMPT_BUCKET != 0  # the bucket really pads
    outputs = []
    for bucket in (static_sampler.PROMPT_BUCKET, 1):
        monkeypatch.setattr(static_sampler, "PROMPT_BUCKET", bucket)
        for temperature in (0.0, 1.0):
            torch.manual_seed(0)
            outputs.append(generate_static(tiny, ids, mask, 16, temperature, tokenizer.pad_token_id,
                                           tokenizer.eos_token_id))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
    padded_ids = F.pad(ids, (7, 0), value=tokenizer.pad_token_id)
    padded_mask = F.pad(mask, (7, 0), value=0)
    plain = [generate(tiny, i, m, 16, 0.0, tokenizer.pad_token_id, tokenizer.eos_token_id, sampler="plain")
             for i, m in ((ids, mask), (padded_ids, padded_mask))]
    assert torch.equal(plain[0], plain[1])


def test_static_sampler_ignores_the_models_sampling_defaults(tiny, tokenizer, prompts):
    """A model whose generation_config asks for top-k 1 and a repetition penalty (as some hub models ship) still
    gets pure sampling and plain greedy decoding from the static sampler."""
    ids, mask = prompts
    plain_greedy = generate_static(tiny, ids, mask, 16, 0.0, tokenizer.pad_token_id, tokenizer.eos_token_id)
    saved = tiny.generation_config
    tiny.generation_config = type(saved)(top_k=1, repetition_penalty=3.0, do_sample=True)
    try:
        greedy = generate_static(tiny, ids, mask, 16, 0.0, tokenizer.pad_token_id, tokenizer.eos_token_id)
        torch.manual_seed(0)
        sampled = generate_static(tiny, ids, mask, 16, 1.0, tokenizer.pad_token_id, tokenizer.eos_token_id)
    finally:
        tiny.generation_config = saved
    assert torch.equal(greedy, plain_greedy)  # no repetition penalty
    assert not torch.equal(sampled, greedy)  # top-k 1 would make sampling greedy


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
    # the same rows, batched or one at a time, in a 2-layer float32 model: each gradient entry sums ~10^2 terms in
    # another order, n u = 10^2 x 2^-24 = 6e-6 of the terms' magnitudes at worst, far less in norm (sqrt(n) u ~
    # 6e-7); a prompt counted once instead of per row, or a row's gradient lost, moves it by > 1e-1
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-5
