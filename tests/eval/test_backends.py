"""The transformers backend generating with a tiny random-init Qwen2 model on CPU.

References: the same prompt generated alone (batched left padding must not change greedy
tokens), the same seed (sampling reproduces), and the greedy text itself (a stop string cuts
it at its first occurrence).
"""

from __future__ import annotations

import pytest

from dft_megatron.eval.backends import (
    SamplingConfig,
    TransformersBackend,
    VLLMBackend,
    make_backend,
    stop_token_ids,
)
from dft_megatron.eval.prompts import get_prompt_template

PROBLEMS = ["What is one plus two?", "Compute x when two times x equals ten, then add seven."]


@pytest.fixture
def backend(tiny_model, tiny_tokenizer):
    return TransformersBackend(tiny_model, tiny_tokenizer, model_id="tiny")


def test_prompt_templates_render(tiny_tokenizer):
    chat = get_prompt_template("qwen-boxed").render("  What is 1+2? ", tiny_tokenizer)
    assert chat == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+2?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    base = get_prompt_template("base")
    assert base.render("What is 1+2?") == (
        "Question: What is 1+2?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.\n"
        "Answer: Let's think step by step."
    )
    assert base.stop == ("\n\nQuestion:",)
    tiny_tokenizer_without = type(tiny_tokenizer)(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="--prompt-template base"):
        get_prompt_template("qwen-boxed").render("x", tiny_tokenizer_without)
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_prompt_template("qwen")


def test_stop_token_ids(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    ids = stop_token_ids(tiny_tokenizer, generation_eos=[7])
    assert ids == [7, vocab["<|im_end|>"], vocab["<|endoftext|>"]]


def test_sampling_shapes_and_seeds(backend, tiny_tokenizer):
    template = get_prompt_template("qwen-boxed")
    prompts = [template.render(p, tiny_tokenizer) for p in PROBLEMS]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=12)
    a = backend.generate(prompts, sampling, seed=3, add_special_tokens=False)
    b = backend.generate(prompts, sampling, seed=3, add_special_tokens=False)
    c = backend.generate(prompts, sampling, seed=4, add_special_tokens=False)
    assert len(a) == 2
    assert a == b  # same seed, same samples
    assert [x.text for x in a] != [x.text for x in c]
    for x in a + c:
        assert 1 <= x.num_tokens <= 12
        assert x.finish_reason in ("stop", "length")
        assert (x.finish_reason == "length") == (x.num_tokens == 12 and "<|im_end|>" not in x.text)
    top_p = backend.generate(
        prompts, SamplingConfig(top_p=0.5, max_new_tokens=12), seed=3, add_special_tokens=False
    )
    assert [x.text for x in top_p] != [x.text for x in a]  # nucleus sampling is applied


def test_left_padding_keeps_greedy_tokens(backend):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    short, long = "Question: one plus two", "Question: " + " ".join(["seven"] * 12)
    alone = backend.generate([short], greedy, seed=0, add_special_tokens=True)
    batched = backend.generate([long, short], greedy, seed=0, add_special_tokens=True)
    assert batched[1] == alone[0]


def test_stop_string_cuts_the_completion(backend):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    full = backend.generate(["Question: ten"], greedy, seed=0, add_special_tokens=True)[0]
    assert full.finish_reason == "length"
    # A printable two-character piece after the start (random bytes decode partly to U+FFFD,
    # which no token sequence spells).
    piece = full.text[1:]
    at = 1 + next(
        i
        for i in range(len(piece) - 1)
        if piece[i : i + 2].isascii() and piece[i : i + 2].isprintable()
    )
    stop = full.text[at : at + 2]
    cut = backend.generate(
        ["Question: ten"],
        SamplingConfig(temperature=0.0, max_new_tokens=16, stop=(stop,)),
        seed=0,
        add_special_tokens=True,
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.num_tokens < full.num_tokens


def test_eos_stops_generation(tiny_model, tiny_tokenizer):
    """Make the token that greedy decoding emits first the end-of-sequence token."""
    backend = TransformersBackend(tiny_model, tiny_tokenizer, model_id="tiny")
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    first = backend.generate(["Question: ten"], greedy, seed=0, add_special_tokens=True)[0]
    first_id = tiny_tokenizer(first.text, add_special_tokens=False).input_ids[0]
    backend.stop_ids = [first_id, *backend.stop_ids]
    out = backend.generate(["Question: ten"], greedy, seed=0, add_special_tokens=True)[0]
    assert out == type(out)(text="", finish_reason="stop", num_tokens=1)


def test_vllm_backend_refuses_clearly_without_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match="--backend transformers"):
        VLLMBackend("/nonexistent")
    with pytest.raises(ImportError, match="--backend transformers"):
        make_backend("vllm", "/nonexistent")
    with pytest.raises(ValueError, match="vllm only"):
        make_backend("transformers", "/nonexistent", tensor_parallel_size=2)
