"""Make a tiny Llama-style Hugging Face model directory offline, with a BPE tokenizer trained here.

    python -m models.make_tiny_hf                 # writes outputs/tiny-hf-llama (what
                                                  # configs/hf-finetune.yaml names)
    python -m models.make_tiny_hf OUTDIR --vocab-size 1024 --hidden 128 --layers 4 --seed 0

The directory is what a published checkpoint looks like: config.json, model.safetensors,
generation_config.json, tokenizer.json and tokenizer_config.json; plus corpus.jsonl, the shipped
English and Chinese prose as one JSON document per paragraph, for a fine-tuning run to read. The
tokenizer is byte-level BPE (any UTF-8 text, Chinese included, has tokens) trained on that corpus.
Needs the optional extra: pip install 'pstar[hf]'. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DEFAULT_DIR = Path("outputs/tiny-hf-llama")
EOS, BOS, PAD = "</s>", "<s>", "<pad>"


def corpus_paragraphs() -> list[str]:
    """The shipped corpus's paragraphs (blank-line separated), each one document."""
    from pstar_cli.training.data import default_corpus_path

    text = default_corpus_path().read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (tokenizers library) trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def tiny_llama_config(tokenizer, hidden: int, layers: int, heads: int, kv_heads: int, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 7) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_hf(out: str | Path = DEFAULT_DIR, vocab_size: int = 1024, hidden: int = 128, layers: int = 4,
                 heads: int = 4, kv_heads: int = 2, max_positions: int = 512, seed: int = 0,
                 tie_embeddings: bool = False) -> Path:
    """Write the directory (see the module docstring); returns its path."""
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = corpus_paragraphs()
    tokenizer = train_tokenizer(paragraphs, vocab_size)
    config = tiny_llama_config(tokenizer, hidden, layers, heads, kv_heads, max_positions)
    config.tie_word_embeddings = tie_embeddings
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for paragraph in paragraphs:
            f.write(json.dumps({"text": paragraph}, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.make_tiny_hf", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_DIR), help=f"directory to write (default {DEFAULT_DIR})")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = make_tiny_hf(args.out, args.vocab_size, args.hidden, args.layers, seed=args.seed)
    except ImportError:
        raise SystemExit("error: making a Hugging Face model needs the optional extra: pip install 'pstar[hf]'")
    print(f"wrote {out}: tiny Llama-style model, BPE tokenizer, corpus.jsonl")


if __name__ == "__main__":
    main()
