"""Tasks as rows {"id", "prompt", and as the task has them "answer", "response", "chosen", "rejected"}, and the
prompts the policy reads. A task's module other than arith's (chain, lock; task_data for the hub and local files) is
imported only when a run names the task."""
from common.arith import arith_rows
from common.errors import DataError

CHAIN_TASKS = ("chain2", "chain3", "chain4", "chain5")  # common/chain.py; the number is the operations per question
LOCK_TASKS = tuple(f"lock{h}" for h in (3, 4, 6, 8, 12, 16))  # common/lock.py; the number is the horizon H
HUB_TASKS = ("gsm8k", "tldr", "hh")  # common/task_data.py
VERIFIABLE = ("arith", *CHAIN_TASKS, *LOCK_TASKS, "gsm8k")


def load_task(task: str, split: str, data_files: str | None = None, num_rows: int | None = None, seed: int = 0):
    """Rows of `task` for `split` ("train" or "test"): the embedded task, local files, or the hub."""
    if task == "arith":
        return arith_rows(split, num_rows or (876 if split == "train" else 275), seed)
    if task in CHAIN_TASKS:
        from common.chain import chain_rows

        return chain_rows(task, split, num_rows, seed)
    if task in LOCK_TASKS and not data_files:
        from common.lock import lock_rows

        return lock_rows(task, split, num_rows, seed)
    if task not in (*LOCK_TASKS, *HUB_TASKS):
        raise DataError(f"unknown task {task!r}; choose one of arith, {', '.join(CHAIN_TASKS)}, "
                        f"{', '.join(LOCK_TASKS)}, {', '.join(HUB_TASKS)}")
    from common.task_data import file_or_hub_rows

    return file_or_hub_rows(task, split, data_files, num_rows)


def format_prompt(tokenizer, row) -> str:
    """The prompt text the policy sees: the chat template when the tokenizer has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return row["prompt"]


def encode_prompts(tokenizer, rows, max_prompt_length: int, what: str):
    """Left-padded prompt ids and mask (N, P) for `rows`; refuses a prompt over `max_prompt_length` tokens."""
    import torch

    texts = [format_prompt(tokenizer, row) for row in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_length]
    if too_long:
        i = too_long[0]
        raise DataError(f"{what}: {len(too_long)} prompt(s) are longer than --max_prompt_length {max_prompt_length} "
                        f"tokens; the first is row {rows[i].get('id')} ({len(ids[i])} tokens). Raise "
                        "--max_prompt_length (prompt plus --response_length must fit the model's context) or remove "
                        "those rows.")
    P = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), P), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, P - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, P - len(x):] = 1
    return input_ids, mask
