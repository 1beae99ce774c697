from __future__ import annotations

import pytest

from tests.eval.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    return build_model(tiny_tokenizer)
