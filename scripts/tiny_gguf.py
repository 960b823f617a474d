"""Write a tiny random-weight llama GGUF model for tests (loads in milliseconds, no download)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

SPACE = "\u2581"  # SentencePiece's visible space marker
LOGIT_GAP = 64.0  # guaranteed logit margin of every NORMAL token over the zeroed rows

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Multi-character pieces: common English words (with the space marker) and subwords.
_WORDS = """
the to of and in is it be an on at as or we he by no yes you for not are was can this that with
have from model token hello world test server llama metric
"""
_SUBWORDS = "he in er an on re at en th ing ed es or st ll ion ou is ar le al ent ly"
WORD_PIECES: tuple[str, ...] = (
    *(SPACE + c for c in "tasmbowicdfhp"),
    *(SPACE + w for w in _WORDS.split()),
    *_SUBWORDS.split(),
)


def build_vocab() -> tuple[list[str], list[int], list[float]]:
    """Return the token pieces, token types and scores of the SentencePiece-style vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [TokenType.CONTROL] * 2
    normal = [SPACE] + [chr(c) for c in range(0x21, 0x7F)] + list(WORD_PIECES)
    tokens += normal
    types += [TokenType.NORMAL] * len(normal)
    # SentencePiece merges the highest-scoring candidate first: prefer longer pieces.
    scores = [0.0] * (len(tokens) - len(normal))
    scores += [float(len(p)) - i / len(normal) for i, p in enumerate(normal)]
    assert len(set(tokens)) == len(tokens), "duplicate vocabulary piece"
    return tokens, [int(t) for t in types], scores


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Draw float32 N(0, std^2) weights."""
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _op(m: np.ndarray) -> float:
    """Upper bound (+1%) of the spectral norm of a matrix."""
    m64 = m.astype(np.float64)
    gram = m64 @ m64.T if m.shape[0] <= m.shape[1] else m64.T @ m64
    # Largest eigenvalue of the smaller Gram matrix: much cheaper than a full SVD.
    return 1.01 * float(np.sqrt(np.linalg.eigvalsh(gram)[-1]))


def write_tiny_gguf(
    path: str | Path,
    *,
    layers: int = 2,
    width: int = 64,
    heads: int = 4,
    ff: int = 128,
    ctx: int = 256,
    seed: int = 0,
) -> Path:
    """Write a deterministic random-weight llama GGUF (F32, ChatML template) to path."""
    if width % heads or width < 2:
        raise ValueError(f"width {width} must be >= 2 and divisible by heads {heads}")
    path = Path(path)
    tokens, types, scores = build_vocab()
    n_vocab = len(tokens)
    normal_rows = np.array([t == TokenType.NORMAL for t in types])
    rng = np.random.default_rng(seed)
    sqrt_w = float(np.sqrt(width))

    # Residual channel 0 is a constant "bias channel": every embedding sets it to 1 and no layer
    # writes to it (row 0 of attn_output/ffn_down is zero). Only NORMAL rows of output.weight
    # read it, with a weight big enough that every NORMAL logit is provably >= LOGIT_GAP above
    # the exactly-zero logits of the zeroed control/unknown/byte rows (see the bound below).
    embd = _normal(rng, (n_vocab, width), 1.0 / sqrt_w)
    embd[:, 0] = 1.0
    blocks: list[dict[str, np.ndarray]] = []
    for _ in range(layers):
        # Output projections are scaled so each sublayer adds only ~0.5 to the residual norm.
        blk = {
            "attn_q": _normal(rng, (width, width), 1.0 / sqrt_w),
            "attn_k": _normal(rng, (width, width), 1.0 / sqrt_w),
            "attn_v": _normal(rng, (width, width), 1.0 / sqrt_w),
            "attn_output": _normal(rng, (width, width), 0.5 / width),
            "ffn_gate": _normal(rng, (ff, width), 1.0 / sqrt_w),
            "ffn_up": _normal(rng, (ff, width), 1.0 / sqrt_w),
            "ffn_down": _normal(rng, (width, ff), 0.8 / np.sqrt(width * ff)),
        }
        blk["attn_output"][0] = 0.0
        blk["ffn_down"][0] = 0.0
        blocks.append(blk)
    out = _normal(rng, (n_vocab, width), 1.5 / sqrt_w)  # spread of NORMAL logits
    out[:, 0] = 0.0

    # Upper bound of |residual without channel 0|: RMS-normed sublayer inputs have norm
    # <= sqrt(width); attention mixes V rows convexly per head; |silu(g)| <= |g| elementwise.
    resid = float(np.linalg.norm(embd[:, 1:], axis=1).max())
    for blk in blocks:
        v_max = _op(blk["attn_v"]) * sqrt_w
        resid += _op(blk["attn_output"]) * np.sqrt(heads) * v_max
        g_inf = float(np.linalg.norm(blk["ffn_gate"], axis=1).max()) * sqrt_w
        resid += _op(blk["ffn_down"]) * g_inf * _op(blk["ffn_up"]) * sqrt_w
    # After the final RMS norm (weights 1): h0 >= h0_min and |h without channel 0| <= sqrt(width).
    h0_min = 1.0 / np.sqrt((1.0 + resid**2) / width + 1e-5)
    noise_max = float(np.linalg.norm(out[:, 1:], axis=1).max()) * sqrt_w
    # Rounded up so ulp-level differences of SVD/BLAS between machines cannot change the file.
    out[:, 0] = np.float32(64 * math.ceil((noise_max + LOGIT_GAP) / h0_min / 64 + 1e-6))
    out[~normal_rows] = 0.0

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(ctx)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    ones = np.ones(width, dtype=np.float32)
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", out)
    for i, blk in enumerate(blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", blk[name])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for name in ("ffn_gate", "ffn_up", "ffn_down"):
            writer.add_tensor(f"blk.{i}.{name}.weight", blk[name])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and write the model."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_gguf(
        args.out,
        layers=args.layers,
        width=args.width,
        heads=args.heads,
        ff=args.ff,
        ctx=args.ctx,
        seed=args.seed,
    )
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
