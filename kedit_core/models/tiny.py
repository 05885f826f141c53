"""Tiny random models, built from configs with a fixed seed, for fast unit tests of
mechanics (never for judging edit quality). They share a byte-level tokenizer built in
code, so they need no files and no network."""

from __future__ import annotations

import torch

BYTE_VOCAB = 257  # 256 byte symbols + end-of-text


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(alphabet)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=BYTE_VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=256, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_layer=4, n_embd=64, n_head=4, n_positions=256, rotary_dim=8, **common)
    if family == "gptneox":
        return tf.GPTNeoXConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=256, **common)
    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, **common)
    if family == "mistral":
        return tf.MistralConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=256, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=256, sliding_window=32, **common)
    raise KeyError(family)


TINY_FAMILIES = ("gpt2", "gptj", "gptneox", "llama", "mistral", "qwen2", "gemma3")


def build_tiny(family: str, seed: int = 0):
    """(model, tokenizer) of a tiny random `family` model; the same seed gives the same bits."""
    from transformers import AutoModelForCausalLM

    config = _config(family)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    model.config.architectures = [type(model).__name__]
    model.eval()
    return model, byte_tokenizer()
