"""Generation backends behind one interface: Hugging Face `transformers` and vLLM.

`GenerationBackend.generate(prompts, sampling, seed=..., add_special_tokens=...)` returns one
`Completion` per prompt (one sample each; the runner repeats a prompt for k samples).

- `TransformersBackend`: `model.generate` on CPU or GPU, left-padded batches, sampling with
  exactly the requested temperature / top-p (top-k, typical-p, min-p and the repetition
  penalty are switched off explicitly, since `generate` otherwise fills them from the
  model's `generation_config.json`), seeded with `torch.manual_seed(seed)` per call.
- `VLLMBackend`: vLLM's offline `LLM.generate` (GPU only), imported on construction; the
  prompts are tokenized here, as for `transformers`, so both backends see the same ids.

Both stop at the tokenizer's end-of-sequence token and, when the vocabulary has them, at
`<|im_end|>` and `<|endoftext|>` (the Qwen2.5-Math harness's stop tokens), and at the
template's stop strings.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from dft_megatron.eval.prompts import truncate_at_stop

logger = logging.getLogger(__name__)

EXTRA_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class SamplingConfig:
    """The DFT paper's sampling: temperature 1.0, top-p 1.0, up to 4096 new tokens."""

    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    max_new_tokens: int = 4096
    stop: tuple[str, ...] = ()
    """Stop strings (excluded from the completion)."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    """`stop` (end-of-sequence token or stop string) or `length` (hit max_new_tokens)."""
    num_tokens: int
    """Generated tokens, the stop token included."""


def stop_token_ids(tokenizer, generation_eos: int | Sequence[int] | None = None) -> list[int]:
    """End-of-sequence ids: the model's generation config, the tokenizer's, Qwen's chat ends."""
    ids: list[int] = []
    if isinstance(generation_eos, int):
        ids.append(generation_eos)
    elif generation_eos is not None:
        ids.extend(generation_eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in EXTRA_STOP_TOKENS if t in vocab)
    out = list(dict.fromkeys(ids))
    if not out:
        raise ValueError(
            "the tokenizer has no eos_token and the model's generation config no eos_token_id: "
            "generation could not stop before max_new_tokens; set eos_token in the tokenizer"
        )
    return out


class GenerationBackend(ABC):
    """Turns prompts into one sampled completion each."""

    tokenizer = None
    """The model's Hugging Face tokenizer (the runner renders chat templates with it)."""
    model_id: str = ""
    """What produced the completions (a path); part of the cache's fingerprint."""
    default_batch_size: int = 8
    """Prompts per `generate` call when the caller does not choose."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig,
        *,
        seed: int,
        add_special_tokens: bool,
    ) -> list[Completion]:
        """One completion per prompt. `add_special_tokens=False` for chat-rendered prompts
        (the template already holds BOS and the role markers)."""


class TransformersBackend(GenerationBackend):
    """`model.generate` from Hugging Face `transformers`, batched with left padding."""

    default_batch_size = 8

    def __init__(self, model, tokenizer, *, model_id: str = ""):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or "model"
        tokenizer.padding_side = "left"  # new tokens follow every prompt directly
        self.pad_token_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        if self.pad_token_id is None:
            self.pad_token_id = self.stop_ids[0]
            tokenizer.pad_token_id = self.pad_token_id
        self.device = next(model.parameters()).device
        self._warned_context = False

    @classmethod
    def from_pretrained(
        cls, path: str, *, device: str | None = None, dtype: str | None = None
    ) -> TransformersBackend:
        """Load a Hugging Face model directory; GPU and bf16 when CUDA is there, else CPU fp32."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else None
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
        return cls(model, tokenizer, model_id=str(path))

    def _generation_config(self, sampling: SamplingConfig):
        from transformers import GenerationConfig

        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_token_id,
            stop_strings=list(sampling.stop) or None,
        )
        if sampling.temperature > 0:
            # All set, so that generate() does not fill them from the model's
            # generation_config.json (Qwen2.5-Math-Instruct's sets top_k=20, top_p=0.8).
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                typical_p=1.0,
                min_p=0.0,
            )
        else:
            kwargs.update(do_sample=False)
        return GenerationConfig(**kwargs)

    def generate(self, prompts, sampling, *, seed, add_special_tokens):
        torch = self.torch
        enc = self.tokenizer(
            list(prompts),
            return_tensors="pt",
            padding=True,
            add_special_tokens=add_special_tokens,
        ).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos and prompt_len + sampling.max_new_tokens > max_pos and not self._warned_context:
            logger.warning(
                "prompt (%d tokens) + max_new_tokens (%d) exceeds the model's "
                "max_position_embeddings (%d): long completions run past its trained context",
                prompt_len,
                sampling.max_new_tokens,
                max_pos,
            )
            self._warned_context = True
        torch.manual_seed(seed)
        extra = {"tokenizer": self.tokenizer} if sampling.stop else {}
        with torch.inference_mode():
            out = self.model.generate(
                **enc, generation_config=self._generation_config(sampling), **extra
            )
        new_tokens = out[:, prompt_len:].tolist()
        stop_ids = set(self.stop_ids)
        completions = []
        for row in new_tokens:
            end = next((i for i, t in enumerate(row) if t in stop_ids), None)
            tokens = row if end is None else row[:end]
            if end is None:
                # A row ended by a stop string is padded to the longest row: drop the padding.
                while tokens and tokens[-1] == self.pad_token_id:
                    tokens = tokens[:-1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = truncate_at_stop(text, sampling.stop)
            stopped = end is not None or len(cut) < len(text)
            n = len(tokens) + (end is not None)
            completions.append(Completion(cut, "stop" if stopped else "length", n))
        return completions


class VLLMBackend(GenerationBackend):
    """vLLM's offline engine (GPU only); imported when constructed."""

    default_batch_size = 1024

    def __init__(
        self,
        path: str,
        *,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
    ):
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                f"--backend vllm: vLLM cannot be imported ({e}). Install it on a GPU machine "
                "(`pip install vllm`, matching your CUDA and torch), or use "
                "--backend transformers"
            ) from e
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        if not torch.cuda.is_available():
            raise ValueError("--backend vllm needs a CUDA GPU; use --backend transformers")
        self.vllm = vllm
        self.model_id = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json
            generation_eos = None
        self.stop_ids = stop_token_ids(self.tokenizer, generation_eos)
        self.llm = vllm.LLM(
            model=str(path),
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )

    def generate(self, prompts, sampling, *, seed, add_special_tokens):
        # `seed` is not used per request: the engine was seeded once (per-request seeds slow
        # vLLM's sampler); reruns of the same pending set reproduce.
        del seed
        params = self.vllm.SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=1.0,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=self.stop_ids,
        )
        token_prompts = [
            {"prompt_token_ids": self.tokenizer(p, add_special_tokens=add_special_tokens).input_ids}
            for p in prompts
        ]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        completions = []
        for out in outputs:
            o = out.outputs[0]
            reason = "length" if o.finish_reason == "length" else "stop"
            completions.append(Completion(o.text, reason, len(o.token_ids)))
        return completions


def vllm_available() -> bool:
    """True when vLLM imports and a CUDA GPU is visible (what `--backend auto` checks)."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_backend(
    backend: str,
    model_path: str,
    *,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
) -> GenerationBackend:
    """`auto` (vLLM when importable and CUDA is there, else transformers), `vllm`,
    `transformers`."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
        logger.info("--backend auto: using %s", backend)
    if backend == "vllm":
        return VLLMBackend(
            model_path, tensor_parallel_size=tensor_parallel_size, seed=seed, dtype=dtype or "auto"
        )
    if backend == "transformers":
        if tensor_parallel_size != 1:
            raise ValueError(
                "--tensor-parallel-size applies to --backend vllm only; the transformers "
                "backend runs the model on one device"
            )
        return TransformersBackend.from_pretrained(model_path, dtype=dtype)
    raise ValueError(f"unknown backend {backend!r}; choose auto, vllm or transformers")
