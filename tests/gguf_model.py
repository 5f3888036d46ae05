"""A tiny llama-architecture GGUF with random weights, for tests that run llama.cpp.

llama.cpp loads it as it would a real model (the same metadata, the same tensor
names and shapes), only 2 layers of width 64 and a ~300-token vocabulary: it is
written in a few milliseconds and answers at hundreds of tokens a second on a CPU.
Its answers are noise, which is all a test of the plumbing around it needs, with
two guarantees built into the weights (see `make_tiny_gguf`): it only ever says
whole pieces of text (no byte token, which could be half a UTF-8 character), and it
never says its end-of-text token, so every answer runs to `max_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

WIDTH = 64  # the embedding (hidden) size
LAYERS = 2
HEADS = 2
FEED_FORWARD = 128
CONTEXT = 8192  # room for a long answer: what a test that kills mid-answer needs
UNKNOWN_ID, BOS_ID, EOS_ID = 0, 1, 2
# Whole pieces after the 256 byte tokens: a SentencePiece vocabulary must have
# "▁" (its space) and the byte tokens, which spell whatever the pieces do not.
PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁the", "▁a", "▁is", "▁hi", "er", "in", "on"]


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """The tokens, their scores (SentencePiece merges the higher first) and their types."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += PIECES
    types += [gguf.TokenType.NORMAL] * len(PIECES)
    scores = [0.0] * (3 + 256) + [-float(rank) for rank in range(len(PIECES))]
    return tokens, scores, [int(kind) for kind in types]


def make_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the model to `path`; the same seed writes the same bytes."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()

    def weights(*shape: int) -> np.ndarray:
        # Rows of ggml's tensors are numpy's last axis: (out, in) for a matrix.
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    # Dimension 0 of the residual stream is a constant 1: every embedding has it
    # and no layer writes to it (their output rows 0 are zero). The output row of
    # every token that is not a whole piece weighs it at -1000, so after the final
    # norm such a token is always hundreds of logits down: never sampled. A byte token
    # could be half a character (llama-cpp-python's stream then holds text back and
    # slows down), and the end-of-text token would end answers at random.
    embeddings = weights(len(tokens), WIDTH)
    embeddings[:, 0] = 1.0
    output = weights(len(tokens), WIDTH)
    output[:, 0] = [0.0 if kind == gguf.TokenType.NORMAL else -1000.0 for kind in types]

    def into_residual(*shape: int) -> np.ndarray:
        matrix = weights(*shape)
        matrix[0, :] = 0.0
        return matrix

    ones = np.ones(WIDTH, dtype=np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-random-llama-{seed}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNKNOWN_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", output)
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(f"{block}.{name}.weight", weights(WIDTH, WIDTH))
        writer.add_tensor(f"{block}.attn_output.weight", into_residual(WIDTH, WIDTH))
        writer.add_tensor(f"{block}.ffn_norm.weight", ones)
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(FEED_FORWARD, WIDTH))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(FEED_FORWARD, WIDTH))
        writer.add_tensor(f"{block}.ffn_down.weight", into_residual(WIDTH, FEED_FORWARD))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
