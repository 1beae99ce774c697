"""A tiny random-init Qwen2 model and a byte-level BPE tokenizer with a ChatML template.

Built on the spot (no hub): the tokenizer is the library's byte-level BPE trained on a few
strings; the model is `Qwen2ForCausalLM` from a config (hidden
32, 2 layers). Its weights are drawn with a large init range (0.5), so that greedy decoding
has clear winners and does not flip on float rounding between batched and single runs.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "What is one plus two? Please reason step by step, and put your final answer within.",
    "Question: How many sides does a triangle have? Answer: Let's think step by step.",
    "You are a helpful assistant. The sum of the numbers is seven, so the result follows.",
    "Compute the value of x when two times x equals ten. Then x equals five.",
]


def build_tokenizer():
    from dft_megatron.data.tokenizer import train_chat_tokenizer

    tok = train_chat_tokenizer(TRAINING_TEXT, vocab_size=320)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()
