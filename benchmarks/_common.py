"""What the benchmark scripts share: the model, the texts, a free port."""

from __future__ import annotations

import socket

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = [
    "supervisor",
    "restart",
    "instance",
    "model",
    "embedding",
    "vector",
    "token",
    "batch",
    "queue",
    "trio",
]


def sentences(n: int, offset: int = 0) -> list[str]:
    """Short English-like sentences of 8-12 words, all different."""
    out = []
    for i in range(offset, offset + n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 5)]
        out.append(f"Sentence {i}: " + " ".join(words) + ".")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
