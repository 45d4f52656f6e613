"""Real English text that ships with Python: the standard library's docstrings.

Read with :mod:`ast` from the stdlib's source files (nothing is imported or
downloaded), in sorted file order, so every machine with the same Python gets
the same corpus. Tokens are bytes (vocabulary 256): no tokenizer to fetch.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["stdlib_docstrings", "byte_dataset", "batches"]


def _docstrings(tree: ast.AST) -> list[str]:
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                docs.append(doc)
    return docs


@functools.lru_cache(maxsize=1)
def stdlib_docstrings(max_bytes: int = 4_000_000) -> bytes:
    """Docstrings of the standard library, joined by blank lines, at most ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for doc in _docstrings(tree):
            data = doc.encode("utf-8") + b"\n\n"
            out.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(out)
    return b"".join(out)


def byte_dataset(max_bytes: int = 4_000_000, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """(train, validation) uint8 token streams; validation is the last ``val_fraction`` of the text."""
    data = torch.frombuffer(bytearray(stdlib_docstrings(max_bytes)), dtype=torch.uint8)
    split = int(len(data) * (1 - val_fraction))
    return data[:split], data[split:]


def batches(stream: Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random batch of (inputs, next-byte targets), int64, shape (batch, seq)."""
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=generator)
    rows = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]
