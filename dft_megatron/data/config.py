"""What the trainer reads: SFT rows (chat, prompt/response, pre-tokenized, text), Megatron
indexed pre-training data, or synthetic tokens. Each field is one Megatron-LM style flag."""

from __future__ import annotations

from dataclasses import dataclass

DATA_FORMATS = ("auto", "chat", "prompt_response", "tokenized", "text")
TRUNCATION = ("right", "drop")


@dataclass
class DataConfig:
    """Training and validation data."""

    mock_data: bool = False
    """Synthetic tokens, deterministic per global sample index."""

    sft_data: list[str] | None = None
    """SFT data: JSON Lines, JSON, Parquet or Arrow files, or datasets.save_to_disk folders
    (several: space or comma separated, concatenated in order)."""

    valid_data: list[str] | None = None
    """Validation SFT data, same formats (else --valid-fraction of --sft-data)."""

    valid_fraction: float = 0.0
    """Fraction of the --sft-data rows held out for validation (a seeded random subset)."""

    data_path: list[str] | None = None
    """Pre-training data: Megatron indexed dataset prefixes (PREFIX.bin/.idx), optionally
    weighted: "0.7 PREFIX_A 0.3 PREFIX_B"."""

    split: str = "969,30,1"
    """Train,validation,test proportions of --data-path documents."""

    eod_mask_loss: bool = False
    """--data-path: no loss on the token that follows an end-of-document token (the first
    token of the next document)."""

    tokenizer_model: str | None = None
    """Hugging Face tokenizer folder. Default: the tokenizer stored with the --load
    checkpoint (its tokenizer/ folder)."""

    tokenizer_type: str = "HuggingFaceTokenizer"
    """Megatron-LM's --tokenizer-type; Hugging Face tokenizers are the one kind supported."""

    chat_template: str | None = None
    """Jinja chat template file to use instead of the tokenizer's own."""

    data_format: str = "auto"
    """Row format: chat (a messages list), prompt_response (--prompt-key/--response-key),
    tokenized (input_ids, optional loss_mask) or text; auto: detected from the first row's
    keys."""

    messages_key: str = "messages"
    """Key of the chat messages list ([{role, content}, ...])."""

    prompt_key: str = "prompt"
    """Key of the prompt in prompt/response rows (NuminaMath-CoT: problem)."""

    response_key: str = "response"
    """Key of the response in prompt/response rows (NuminaMath-CoT: solution)."""

    system_prompt: str | None = None
    """System message put before each prompt/response row's prompt."""

    text_key: str = "text"
    """Key of the text in text rows (every token is a target)."""

    sample_weight_key: str | None = None
    """Key of a per-row number (a reward, a quality score) that scales the row's token losses."""

    packing: bool = True
    """Pack several samples into each --seq-length sequence (attention and positions never
    cross samples); --no-packing pads each sample to --seq-length instead."""

    truncation: str = "right"
    """Samples longer than --seq-length + 1 tokens: right (cut the end) or drop (skip them);
    counted and reported either way."""

    skip_bad_rows: bool = False
    """Skip malformed JSON rows (counted, with the first locations reported) instead of
    stopping at the first."""

    data_cache_dir: str | None = None
    """Where tokenized data is cached (default ~/.cache/dft_megatron/data)."""

    num_workers: int = 1
    """Processes that tokenize the SFT data (flag --preprocess-workers; Megatron-LM's
    --num-workers is the data loader's)."""

    def validate(self) -> None:
        """Raise ValueError naming the flag if the options contradict each other."""
        sources = [
            name
            for name, on in (
                ("--mock-data", self.mock_data),
                ("--sft-data", self.sft_data),
                ("--data-path", self.data_path),
            )
            if on
        ]
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} exclude each other; give one")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data-format must be one of {DATA_FORMATS}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"--truncation must be one of {TRUNCATION}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.valid_fraction and self.valid_data:
            raise ValueError("--valid-fraction and --valid-data exclude each other; give one")
        if self.num_workers < 1:
            raise ValueError(f"--preprocess-workers must be >= 1, got {self.num_workers}")


def split_paths(values: list[str] | None) -> list[str]:
    """Flag values given space- or comma-separated -> one path per entry."""
    return [p for v in values or [] for p in v.split(",") if p]
