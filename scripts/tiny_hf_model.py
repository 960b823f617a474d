"""Write a tiny random-weight Llama in Hugging Face format, with a word-level tokenizer.

Run with the vLLM venv's python (it needs torch, transformers and tokenizers):

    .venv-vllm/bin/python scripts/tiny_hf_model.py OUTDIR

The weights come from a fixed seed, so the output is the same on every machine. The model is
only good for exercising a server: it answers with random words from the vocabulary below.
Idempotent: a complete OUTDIR (marker file with the current recipe version) is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

RECIPE = "tiny-llama-wordlevel-v3"
MARKER = ".tiny_hf_model_complete"
SEED = 1234
# Room for 1,000-token answers, which keep the tiny model busy for seconds (queue tests).
MAX_CONTEXT = 2048

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# Readable lower-case words (input is lower-cased), so streamed chunks are whole words.
WORD_TEXT = """
system user assistant : . , ? ! ' " ( ) - / = _
you are a an the is was be to of in on at for with by from as it this that these those and or
not no yes can will would should could may might do does did have has had i me my your our we
they he she there here if then so but up out use get go make see know think like just also very
helpful honest short answer question reply hello hi thanks please what why how when where who
which tell say write explain about again capital large language model models server servers
inference request requests response token tokens prompt prompts completion completions chat
stream streamed streaming chunk chunks word words metric metrics prometheus exporter exporters
scrape scrapes scraped label labels counter counters gauge gauges histogram bucket buckets sum
count rate latency throughput queue queued waiting running busy idle slot slots cache memory kv
gpu cpu batch batches engine engines http json api endpoint port host health ready ok error
errors timeout time second seconds minute minutes hour fast slow small tiny big useful simple
quick brief briefly first last next new old good bad high low more less many few some all every
each one two three four five six seven eight nine ten zero number numbers value values total
average peak paris france london berlin city country world sun moon sky blue red green river
mountain cat dog bird fish tree book story poem song music day night morning today tomorrow
data logs log trace traces dashboard grafana alert alerts service services node
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Return the token-to-id map: special tokens first, then the unique words in order."""
    vocab: dict[str, int] = {}
    for word in SPECIAL_TOKENS + WORD_TEXT.split():
        vocab.setdefault(word, len(vocab))
    return vocab


def is_complete(outdir: Path) -> bool:
    """Tell whether OUTDIR already holds a model written by this recipe."""
    marker = outdir / MARKER
    return marker.is_file() and marker.read_text().strip() == RECIPE


def write_tokenizer(outdir: Path, vocab: dict[str, int]) -> None:
    """Write tokenizer.json, tokenizer_config.json (with chat template), special_tokens_map."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors  # type: ignore[import-not-found,unused-ignore]
    from tokenizers.models import WordLevel  # type: ignore[import-not-found,unused-ignore]

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins words with spaces and tidies spaces before punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(outdir / "tokenizer.json"))

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_CONTEXT,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(vocab[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        **special,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (outdir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_model(outdir: Path, vocab: dict[str, int]) -> None:
    """Write config.json, generation_config.json and model.safetensors (random, seeded)."""
    import torch  # type: ignore[import-not-found,unused-ignore]
    from transformers import LlamaConfig, LlamaForCausalLM  # type: ignore[import-not-found,unused-ignore]
    from transformers.utils import logging as hf_logging  # type: ignore[import-not-found,unused-ignore]

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 32: vLLM's CPU attention needs at least 32
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(outdir), safe_serialization=True)


def build(outdir: Path) -> None:
    """Write the complete model into OUTDIR atomically (temp dir beside it, then rename)."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        vocab = vocabulary()
        write_model(tmp, vocab)
        write_tokenizer(tmp, vocab)
        (tmp / MARKER).write_text(RECIPE + "\n")
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if outdir.exists():
            shutil.rmtree(outdir)
        try:
            os.replace(tmp, outdir)
        except OSError:
            if not is_complete(outdir):  # else a concurrent run has just written it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Build the model into argv[1] unless it is already complete."""
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(argv[1]).resolve()
    if is_complete(outdir):
        print(f"tiny_hf_model: {outdir} is complete")
        return 0
    build(outdir)
    print(f"tiny_hf_model: wrote {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
