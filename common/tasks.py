"""Tasks: rows of {"id", "prompt", and where the task has them "answer", "response", "chosen", "rejected"}.

- `arith` (embedded, offline, the default): short arithmetic and comparison questions checked by a
  verifier; demonstrations are correct answers, chosen/rejected pairs a correct and a wrong one.
- `gsm8k`: openai/gsm8k (config "main"), columns `question`, `answer` (worked solution ending "#### n");
  verifier.
- `tldr`: trl-lib/tldr, columns `prompt`, `completion`; needs --reward_model. Its preference pairs
  (reward.py) come from trl-lib/tldr-preference, columns `prompt`, `chosen`, `rejected`.
- `lock3` ... `lock16` (embedded, offline): H dependent steps checked as a whole, exploration's difficulty set by H
  (common/lock.py).
- `hh`: Anthropic/hh-rlhf (data_dir "harmless-base"), columns `chosen`, `rejected` (whole dialogues);
  needs --reward_model.
Every task also reads local .json/.jsonl(.gz)/.parquet files with the hub's columns (`data_files`).
`load_task` gives the rows the policy trains on (and SFT's demonstrations); `load_preference_task`
gives chosen/rejected pairs for a reward model.
"""
import gzip
import hashlib
import json
import os
import random

from common.errors import UserError
from common.lock import LOCK_TASKS, lock_row_from_record, lock_rows

HUB = {  # task -> (dataset id, config or data_dir, {our split: hub split})
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "tldr": ("trl-lib/tldr", None, {"train": "train", "test": "validation"}),
    "hh": ("Anthropic/hh-rlhf", "harmless-base", {"train": "train", "test": "test"}),
}
COLUMNS = {"gsm8k": ("question", "answer"), "tldr": ("prompt", "completion"), "hh": ("chosen", "rejected")}
PREFERENCE_HUB = {  # task -> preference pairs for a reward model, where they are not the task's own rows
    "tldr": ("trl-lib/tldr-preference", None, {"train": "train", "test": "validation"}),
}
PREFERENCE_COLUMNS = {"tldr": ("prompt", "chosen", "rejected")}
CHAIN_TASKS = ("chain2", "chain3", "chain4", "chain5")  # the number is the level: operations per question
VERIFIABLE = ("arith", *CHAIN_TASKS, *LOCK_TASKS, "gsm8k")
GSM8K_INSTRUCTION = "Solve the problem step by step, then write the final number after '####'."


class DataError(UserError):
    """A data file or row the task cannot use; the message names the file, the row and the fix."""


# ---------------------------------------------------------------------------------------------
# The embedded arithmetic task
# ---------------------------------------------------------------------------------------------
def arith_questions():
    """Every question of the embedded task as (prompt, expression, answer): 1,151 in four families."""
    families = [
        [(f"{a} + {b}", a + b) for a in range(20) for b in range(20)],  # small sums
        [(f"{a} + {b}", a + b) for a in range(20, 60) for b in range(1, 10)],  # two-digit plus one-digit
        [(f"{a} - {b}", a - b) for a in range(10, 40) for b in range(1, 10)],  # differences
        [(f"{a} times {b}", a * b) for a in range(2, 13) for b in range(2, 13)],  # times tables
    ]
    return [(f"What is {e}? Answer with just the number.", e, answer) for family in families for e, answer in family]


def _is_test_prompt(prompt: str) -> bool:
    """Held-out split by a hash of the prompt text, so train and test never share a question."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 4 == 0


def arith_rows(split: str, num_rows: int, seed: int = 0):
    """`num_rows` distinct questions of the embedded task from `split` ("train": 876 in all, "test": 275), shuffled."""
    questions = [q for q in arith_questions() if _is_test_prompt(q[0]) == (split == "test")]
    if num_rows > len(questions):
        raise DataError(f"the arith task has only {len(questions)} distinct {split} questions; ask for fewer")
    rng = random.Random(f"arith-{split}-{seed}")
    rng.shuffle(questions)
    rows = []
    for prompt, expression, answer in questions[:num_rows]:
        wrong = answer + rng.choice([-2, -1, 1, 2, 10])
        rows.append({
            "id": f"arith-{split}:{len(rows)}",
            "prompt": prompt,
            "answer": str(answer),
            "response": f"{expression} = {answer}",
            "chosen": f"{expression} = {answer}",
            "rejected": f"{expression} = {wrong}",
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The embedded multi-step task: chained additions and subtractions, solved step by step
# ---------------------------------------------------------------------------------------------
CHAIN_INSTRUCTION = "Work it out one step at a time, then give the result as 'Answer: <number>'."


def chain_questions(ops: int, count: int = 6000):
    """`count` distinct questions of `ops` operations, as (expression, worked solution, answer), in a fixed order.

    Operands are 2..30; a subtraction that would go below 0 becomes an addition, so every step's
    result is a whole number from 0 to 180. The worked solution writes one step per sentence:
    "17 + 25 = 42. 42 - 8 = 34. 34 + 13 = 47. Answer: 47".
    """
    rng, seen, out = random.Random(f"chain-{ops}"), set(), []
    while len(out) < count:
        value = rng.randint(2, 30)
        expression, steps = str(value), []
        for _ in range(ops):
            operand = rng.randint(2, 30)
            sign = "+" if rng.random() < 0.5 or value - operand < 0 else "-"
            new = value + operand if sign == "+" else value - operand
            expression += f" {sign} {operand}"
            steps.append(f"{value} {sign} {operand} = {new}.")
            value = new
        if expression not in seen:
            seen.add(expression)
            out.append((expression, " ".join(steps) + f" Answer: {value}", value))
    return out


def chain_rows(task: str, split: str, num_rows: int | None, seed: int = 0):
    """Rows of the chain task `task` ("chain3": 3 operations) from `split`, shuffled by `seed`.

    Train and test are disjoint (a hash of the question decides). Each row has the worked solution as
    its demonstration (`response`, the states DR-PO resets to, SFT's target) and a preference pair:
    the solution (chosen) and the same solution with one step miscalculated and carried through (rejected).
    """
    ops = int(task.removeprefix("chain"))
    questions = [q for q in chain_questions(ops) if _is_test_prompt(q[0]) == (split == "test")]
    num_rows = num_rows or (len(questions) if split == "train" else 300)
    if num_rows > len(questions):
        raise DataError(f"the {task} task has only {len(questions)} distinct {split} questions; ask for fewer")
    rng = random.Random(f"{task}-{split}-{seed}")
    rng.shuffle(questions)
    rows = []
    for expression, solution, answer in questions[:num_rows]:
        rows.append({"id": f"{task}-{split}:{len(rows)}", "prompt": f"What is {expression}? {CHAIN_INSTRUCTION}",
                     "answer": str(answer), "response": solution, "chosen": solution,
                     "rejected": _miscalculated(expression, rng)})
    return rows


def _miscalculated(expression: str, rng: random.Random) -> str:
    """The worked solution of `expression` with one step off by 1, 2 or 10, carried through to a wrong answer."""
    tokens = expression.split()
    value, wrong_step, steps = int(tokens[0]), rng.randrange((len(tokens) - 1) // 2), []
    for k in range(0, len(tokens) - 1, 2):
        sign, operand = tokens[k + 1], int(tokens[k + 2])
        new = value + operand if sign == "+" else value - operand
        if k // 2 == wrong_step:
            new += rng.choice([-10, -2, -1, 1, 2, 10])
        steps.append(f"{value} {sign} {operand} = {new}.")
        value = new
    return " ".join(steps) + f" Answer: {value}"


# ---------------------------------------------------------------------------------------------
# Files and hub datasets
# ---------------------------------------------------------------------------------------------
def read_records(path: str):
    """Rows of a .json, .jsonl (optionally .gz) or .parquet file as dicts, with clear errors."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}); fix the file or convert it to JSON Lines") from e
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); fix or delete that line") from e
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object with named columns, got {type(record).__name__}")
    return records


def _hub_records(task: str, split: str, hub=HUB):
    import datasets

    dataset_id, config, splits = hub[task]
    kwargs = {"data_dir": config} if task == "hh" else {"name": config} if config else {}
    return list(datasets.load_dataset(dataset_id, split=splits[split], **kwargs))


def _check_records(records, source: str, columns):
    """Refuse a source missing a column; skip (and count) rows whose fields are empty."""
    if not records:
        raise DataError(f"{source}: no rows")
    missing = [c for c in columns if c not in records[0]]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; this task needs columns {list(columns)} "
            f"(found {sorted(records[0])}). Rename the columns or pick the matching --task."
        )
    kept, skipped = [], []
    for i, r in enumerate(records):
        if any(not isinstance(r.get(c), str) or not r.get(c).strip() for c in columns):
            skipped.append(i)
        else:
            kept.append((i, r))
    if skipped:
        print(f"[tasks] {source}: skipped {len(skipped)} row(s) with an empty or non-text field "
              f"in {list(columns)} (first: row {skipped[0]})")
    if not kept:
        raise DataError(f"{source}: every row has an empty or non-text field in {list(columns)}")
    return kept


def gsm8k_final_answer(solution: str) -> str:
    """The number after '####' in a GSM8K solution, commas removed."""
    return solution.split("####")[-1].strip().replace(",", "")


def split_hh_dialogue(text: str):
    """HH dialogue -> (chat messages before the last assistant turn, the last assistant turn)."""
    head, sep, last = text.rpartition("\n\nAssistant:")
    if not sep:
        return None, None
    messages = []
    for chunk in head.split("\n\n"):
        for tag, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(tag):
                messages.append({"role": role, "content": chunk[len(tag):].strip()})
                break
        else:
            if messages:  # a paragraph break inside a turn
                messages[-1]["content"] += "\n\n" + chunk
    return messages, last.strip()


def _rows_from_records(task: str, kept, source: str):
    rows = []
    for i, r in kept:
        rid = f"{source}:{i}"
        if task == "gsm8k":
            rows.append({"id": rid, "prompt": f"{r['question'].strip()}\n{GSM8K_INSTRUCTION}",
                         "answer": gsm8k_final_answer(r["answer"]), "response": r["answer"].strip()})
        elif task == "tldr":
            rows.append({"id": rid, "prompt": r["prompt"], "response": r["completion"].strip()})
        elif task == "hh":
            messages, chosen = split_hh_dialogue(r["chosen"])
            rejected_messages, rejected = split_hh_dialogue(r["rejected"])
            if not messages or messages != rejected_messages:
                continue  # chosen and rejected must share the dialogue before the last turn
            prompt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
            rows.append({"id": rid, "prompt": prompt + "\n\nAssistant:", "messages": messages,
                         "response": chosen, "chosen": chosen, "rejected": rejected})
    if not rows:
        raise DataError(f"{source}: no usable rows for task {task}")
    return rows


def load_task(task: str, split: str, data_files: str | None = None, num_rows: int | None = None, seed: int = 0):
    """Rows of `task` for `split` ("train" or "test"): the embedded task, local files, or the hub."""
    if task == "arith":
        return arith_rows(split, num_rows or (876 if split == "train" else 275), seed)
    if task in CHAIN_TASKS:
        return chain_rows(task, split, num_rows, seed)
    if task in LOCK_TASKS and data_files:  # e.g. a reference's own demonstrations (benchmark/resets.py)
        rows = [lock_row_from_record(r, f"{path}:{i}") for path in data_files.split(",")
                for i, r in _check_records(read_records(path), path, ("prompt", "response"))]
        return rows[:num_rows] if num_rows is not None else rows
    if task in LOCK_TASKS:
        return lock_rows(task, split, num_rows, seed)
    if task not in HUB:
        raise DataError(f"unknown task {task!r}; choose one of arith, {', '.join(CHAIN_TASKS)}, "
                        f"{', '.join(LOCK_TASKS)}, {', '.join(HUB)}")
    if data_files:
        rows = []
        for path in data_files.split(","):
            rows += _rows_from_records(task, _check_records(read_records(path), path, COLUMNS[task]), path)
    else:
        source = f"{HUB[task][0]}[{HUB[task][2][split]}]"
        rows = _rows_from_records(task, _check_records(_hub_records(task, split), source, COLUMNS[task]), source)
    if num_rows is not None:
        rows = rows[:num_rows]
    return rows


def load_preference_task(task: str, split: str, data_files: str | None = None, num_rows: int | None = None,
                         seed: int = 0):
    """Rows with "prompt", "chosen" and "rejected" (responses only, the prompt apart) for a reward model.

    arith and hh: the task's own rows. tldr: trl-lib/tldr-preference, or local files with its columns
    (`prompt`, `chosen`, `rejected`; responses stripped, as `load_task` strips tldr's completions).
    gsm8k has no pairs in its dataset: build them from policy samples (reward.py --pairs policy).
    """
    if task in ("arith", "hh", *CHAIN_TASKS, *LOCK_TASKS):
        return load_task(task, split, data_files, num_rows, seed)
    if task not in PREFERENCE_HUB:
        raise DataError(f"task {task!r} has no chosen/rejected pairs in its dataset; "
                        f"tasks with pairs: arith, hh, {', '.join(PREFERENCE_HUB)} "
                        "(for a verifiable task use --pairs policy)")
    columns = PREFERENCE_COLUMNS[task]
    if data_files:
        sources = [(path, read_records(path)) for path in data_files.split(",")]
    else:
        sources = [(f"{PREFERENCE_HUB[task][0]}[{PREFERENCE_HUB[task][2][split]}]",
                    _hub_records(task, split, PREFERENCE_HUB))]
    rows = []
    for source, records in sources:
        for i, r in _check_records(records, source, columns):
            chosen, rejected = r["chosen"].strip(), r["rejected"].strip()
            rows.append({"id": f"{source}:{i}", "prompt": r["prompt"], "response": chosen, "chosen": chosen,
                         "rejected": rejected})
    if num_rows is not None:
        rows = rows[:num_rows]
    return rows


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
        raise DataError(
            f"{what}: {len(too_long)} prompt(s) are longer than --max_prompt_length {max_prompt_length} tokens; "
            f"the first is row {rows[i].get('id')} ({len(ids[i])} tokens). Raise --max_prompt_length "
            "(prompt plus --response_length must fit the model's context) or remove those rows."
        )
    P = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), P), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, P - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, P - len(x):] = 1
    return input_ids, mask
