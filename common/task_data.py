"""Tasks whose rows come from the Hugging Face hub, or from local .json/.jsonl(.gz)/.parquet files with the hub's
columns (`--data_files`), and preference pairs for reward.py. Imported only when a run names one of these tasks (or a
lock task's demonstrations from a file).
- `gsm8k`: openai/gsm8k (config "main"), columns `question`, `answer` (worked solution ending "#### n"); verifier.
- `tldr`: trl-lib/tldr, columns `prompt`, `completion`; needs --reward_model. Its preference pairs come from
  trl-lib/tldr-preference, columns `prompt`, `chosen`, `rejected`.
- `hh`: Anthropic/hh-rlhf (data_dir "harmless-base"), columns `chosen`, `rejected` (whole dialogues); needs
  --reward_model.
"""
import gzip
import json
import os
import re

from common.errors import DataError
from common.rewards import clean_number
from common.tasks import CHAIN_TASKS, LOCK_TASKS, load_task

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
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
GSM8K_INSTRUCTION = "Solve the problem step by step, then write the final number after '####'."


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


def verify_gsm8k(row, response: str) -> float:
    """1.0 when the number after the last '####' (else the last number) equals the answer."""
    if "####" in response:
        found = NUMBER.findall(response.split("####")[-1])
        answer = clean_number(found[0]) if found else None
    else:
        found = NUMBER.findall(response)
        answer = clean_number(found[-1]) if found else None
    return float(answer == clean_number(row["answer"]))


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


def file_or_hub_rows(task: str, split: str, data_files: str | None = None, num_rows: int | None = None):
    """Rows of a hub task (gsm8k, tldr, hh) from local files with its columns or from the hub, or a lock task's rows
    from local files (e.g. a reference's own demonstrations, benchmark/resets.py); the first `num_rows` of them."""
    if task in LOCK_TASKS:
        from common.lock import lock_row_from_record

        rows = [lock_row_from_record(r, f"{path}:{i}") for path in data_files.split(",")
                for i, r in _check_records(read_records(path), path, ("prompt", "response"))]
    elif data_files:
        rows = []
        for path in data_files.split(","):
            rows += _rows_from_records(task, _check_records(read_records(path), path, COLUMNS[task]), path)
    else:
        source = f"{HUB[task][0]}[{HUB[task][2][split]}]"
        rows = _rows_from_records(task, _check_records(_hub_records(task, split), source, COLUMNS[task]), source)
    return rows[:num_rows] if num_rows is not None else rows


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
