"""Tiny, randomly initialised causal LMs and their byte-level tokenizer, built entirely offline.

Covers what tests, CI and the CPU demo need instead of a downloaded checkpoint: a tokenizer whose
ids 0..255 are the 256 bytes (so every string round-trips and every digit is one token) and a small
Llama or Qwen2 model saved as an ordinary Hugging Face directory. It does not cover training or
loading; everything downstream opens the directory with the `Auto*` classes like any other model.

One caveat: transformers 5 always opens a qwen2 directory's tokenizer as `Qwen2Tokenizer`, which
rebuilds the pipeline with an NFC normalizer and GPT-2 regex split. Without merges the split changes
nothing, but NFC means non-NFC text (e.g. "e" + combining accent) does not round-trip exactly there.
The llama directory and `build_tokenizer()` itself round-trip every string byte for byte.

    python -m grpo.tiny runs/tiny --arch qwen2 --hidden 64 --layers 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, EOS, BOS = "<|pad|>", "<|eos|>", "<|bos|>"
"""special tokens, in id order 256, 257, 258"""
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
"""the chat variant's turn markers, ids 259 and 260 (ChatML, as Qwen's Instruct models use)"""
CHATML = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""the chat variant's template: ChatML turns, tools (OpenAI function specs) as a system turn"""

Arch = Literal["llama", "qwen2"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of a ByteLevel pre-tokenizer).

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to 256 + n so that
    no byte becomes whitespace or a control character inside the BPE model.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def build_tokenizer(*, chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: id b is byte b, then pad=256, eos=257, bos=258; with `chat`
    also <|im_start|>=259 and <|im_end|>=260 and the ChatML template (an Instruct model's tokenizer).

    No merges means a token is exactly one UTF-8 byte, which is what a tiny model can learn from
    and what makes reward checks on digits token-exact. No bos is prepended: prompts are encoded
    as written, and the rollout code decides what to add.
    """
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting, so spaces stay separate bytes, not " word" units.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Added in this order so the ids are 256, 257, 258 regardless of how transformers orders them.
    backend.add_special_tokens([PAD, EOS, BOS, *((IM_START, IM_END) if chat else ())])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        # Saved as an explicit null: transformers 5 loads qwen2 directories with Qwen2Tokenizer,
        # which otherwise adds its default unk `<|endoftext|>` as id 259, past the model's vocab.
        unk_token=None,
        clean_up_tokenization_spaces=False,  # " ." must decode as " .", not "."
    )
    specials = [PAD, EOS, BOS, *((IM_START, IM_END) if chat else ())]
    ids = tokenizer.convert_tokens_to_ids(specials)
    if ids != list(range(256, 256 + len(specials))):  # the contract other modules and saved models rely on
        raise RuntimeError(f"special token ids moved: {ids}")
    if chat:
        tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_model(
    out_dir: str | Path,
    *,
    arch: Arch = "llama",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    overwrite: bool = False,
    chat: bool = False,
    vocab_size: int | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """Random-init a float32 Llama/Qwen2 causal LM and save it with its tokenizer to `out_dir`.

    `chat` makes it shaped like an Instruct model: the ChatML tokenizer of `build_tokenizer(chat=True)` and
    a generation config listing two stop tokens, <|im_end|> and <|eos|> (as Qwen2.5-Instruct lists
    <|im_end|> and <|endoftext|>), while the tokenizer's own eos stays <|eos|>.

    The weights depend only on the arguments (the init runs under its own seeded RNG, leaving the
    caller's RNG state alone). `vocab_size` above the tokenizer's pads the embedding (and head) with rows the
    byte tokenizer never emits: a model with a real model's shape and memory (e.g. Qwen2.5-0.5B's 151,936),
    whose extra rows cost what real ones do. An existing model directory (one with config.json) is returned
    untouched unless `overwrite`, so several workers can call this for the same path.
    """
    out = Path(out_dir)
    if (out / "config.json").exists() and not overwrite:
        return out
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv_heads})")

    tokenizer = build_tokenizer(chat=chat)
    common = dict(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden_size,
        # 4x is the classic transformer MLP width; exact SwiGLU ratios do not matter at this size.
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "llama":
        config, model_cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, model_cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"arch: expected 'llama' or 'qwen2', got {arch!r}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = (
        [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id] if chat else tokenizer.eos_token_id)
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grpo.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary rows (default: the tokenizer's)")
    parser.add_argument("--tie", action="store_true", help="tie the head to the input embedding")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model")
    parser.add_argument("--chat", action="store_true", help="an Instruct-shaped model: ChatML template, two stop tokens")
    args = parser.parse_args(argv)
    path = save_tiny_model(
        args.out_dir,
        arch=args.arch,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        seed=args.seed,
        intermediate_size=args.intermediate,
        num_kv_heads=args.kv_heads,
        vocab_size=args.vocab,
        tie_embeddings=args.tie,
        overwrite=args.overwrite,
        chat=args.chat,
    )
    print(path)


if __name__ == "__main__":
    main()
