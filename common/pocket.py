"""The pocket model: `--model_name pocket` is a tiny Llama (about 1.2M parameters, random weights) with a word-level
tokenizer over the embedded tasks' words (arith, chain, lock), built once and cached as an ordinary transformers
folder, so every code path (sampling, LoRA, checkpoints, FSDP) runs on it unchanged and a run takes seconds on a
CPU. Train it with sft.py on a task's demonstrations before RL (a random model opens no lock).

The tokenizer splits on spaces and punctuation and knows each word the embedded tasks use (numbers are words);
anything else reads as <unk>, so other tasks need another model.
"""
import os

from common.arith import arith_rows
from common.chain import chain_rows
from common.lock import LOCK_WORDS
from common.model_cache import CACHE_DIR, build_once
from common.tasks import CHAIN_TASKS

VERSION = 1  # bump when the vocabulary or the shape changes: the cache folder is named after it
SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk


def pocket_words() -> list:
    """Every word of the embedded tasks' prompts, demonstrations and pairs, sorted (the vocabulary past SPECIALS)."""
    split = _pre_tokenizer()
    words = set(LOCK_WORDS) | {str(n) for n in range(1000)}
    rows = arith_rows("train", 876) + arith_rows("test", 275)
    for task in CHAIN_TASKS:
        rows += chain_rows(task, "train", None) + chain_rows(task, "test", None)
    for row in rows:
        for key in ("prompt", "response", "chosen", "rejected"):
            words.update(w for w, _ in split.pre_tokenize_str(row[key]))
    return sorted(words)


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_pocket(path: str) -> None:
    """Write the pocket model (random weights, seed 0) and its tokenizer to `path` with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + pocket_words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece()  # joins words with spaces, none before . , ? !
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left")
    config = LlamaConfig(vocab_size=len(vocab), tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def pocket_model_dir(cache_dir: str = CACHE_DIR) -> str:
    """The cached pocket model's folder under `cache_dir`, built the first time (a few seconds)."""
    out = os.path.join(cache_dir, f"pocket-v{VERSION}")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    print(f"[models] building the pocket model in {out} (once, a few seconds)")
    return build_once(out, build_pocket)
