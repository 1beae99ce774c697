"""Prompt templates of the DFT paper's evaluation (the Qwen2.5-Math evaluation harness).

- `qwen-boxed` (the paper's prompt for Qwen models, base ones included): a chat rendered with
  the tokenizer's own chat template, system "You are a helpful assistant.", user
  "{problem}\\nPlease reason step by step, and put your final answer within \\boxed{}.",
  then the assistant turn is opened. For a Qwen2.5 tokenizer this is, token for token, the
  harness's hard-coded ChatML string. The system turn is given explicitly, so the result does
  not depend on a template's default system prompt (Qwen2.5-Math-Instruct's default differs).
- `base`: plain text for base models without a chat template, zero-shot, in the harness's
  "Question: ... Answer:" form with the boxed instruction, ending in "Let's think step by
  step."; generation stops at "\\n\\nQuestion:" (the harness's stop string for its
  Question/Answer prompts), where a base model starts a problem of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem becomes the text the model continues."""

    name: str
    user: str
    """The problem's message (chat) or the whole prompt (plain); `{problem}` is replaced."""
    system: str | None = None
    """The chat's system turn; None: a plain-text prompt (no chat template)."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (excluded from it), besides the end-of-sequence tokens."""

    @property
    def uses_chat_template(self) -> bool:
        return self.system is not None

    def render(self, problem: str, tokenizer=None) -> str:
        """The prompt text for `problem`; chat templates need the model's `tokenizer`."""
        user = self.user.replace("{problem}", problem.strip())
        if not self.uses_chat_template:
            return user
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"prompt template {self.name!r} renders through the tokenizer's chat template, "
                "but this tokenizer has none (tokenizer_config.json has no `chat_template`): "
                "pass --prompt-template base for a base model without one"
            )
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "qwen-boxed": PromptTemplate(
        name="qwen-boxed",
        system="You are a helpful assistant.",
        user="{problem}\n" + BOXED_INSTRUCTION,
    ),
    "base": PromptTemplate(
        name="base",
        user="Question: {problem}\n" + BOXED_INSTRUCTION + "\nAnswer: Let's think step by step.",
        stop=("\n\nQuestion:",),
    ),
}


def get_prompt_template(name: str) -> PromptTemplate:
    """The template called `name` (see `PROMPT_TEMPLATES`)."""
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown prompt template {name!r}; choose one of {sorted(PROMPT_TEMPLATES)}"
        ) from None


def truncate_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """`text` up to the first occurrence of any stop string (the stop string excluded)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
