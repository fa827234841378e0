"""Prompt sources for scans and calibration: JSONL files, plain-text corpora, a built-in set.

The built-in set is cut from English text that every machine of ours has: the licence texts
Debian ships in ``/usr/share/common-licenses`` and CPython's own ``LICENSE.txt``, falling back to
standard-library docstrings. No download, no hub.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkguard.errors import InputError

COMMON_LICENSES = Path("/usr/share/common-licenses")
DEFAULT_LICENSES = ("GPL-3", "Apache-2.0", "LGPL-2.1", "MPL-2.0", "GFDL-1.3", "Artistic", "GPL-2", "BSD")


@dataclass(frozen=True)
class Prompt:
    """One input sequence: text, or token ids already cut from a corpus."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.text is None and self.token_ids is None:
            raise InputError("a prompt needs text or token ids")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "convert it to UTF-8 first") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path} is a directory, expected a file") from exc


def read_jsonl(path: Path | str) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a UTF-8 JSONL file; InputError names the line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return rows


def load_jsonl(path: Path | str) -> list[Prompt]:
    """Prompts from a JSONL file with a non-empty ``text`` string per line (blank lines skipped)."""
    path = Path(path)
    prompts: list[Prompt] = []
    for number, record in read_jsonl(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: each line needs a string field 'text'")
        if not text.strip():
            raise InputError(f"{path}:{number}: empty prompt; remove the line or give it text")
        prompts.append(Prompt(text=text, source=f"{path.name}:{number}"))
    if not prompts:
        raise InputError(f"{path} contains no prompts")
    return prompts


def chunk_corpus(
    texts: Iterable[tuple[str, str]], tokenize: Callable[[str], list[int]], tokens: int, limit: int | None
) -> list[Prompt]:
    """Cut (name, text) documents into prompts of ``tokens`` token ids each."""
    prompts: list[Prompt] = []
    for name, text in texts:
        ids = tokenize(text)
        for start in range(0, len(ids) - tokens + 1, tokens):
            prompts.append(Prompt(token_ids=tuple(ids[start : start + tokens]), source=f"{name}@{start}"))
            if limit is not None and len(prompts) >= limit:
                return prompts
    return prompts


def load_corpus(
    path: Path | str, tokenize: Callable[[str], list[int]], tokens: int, limit: int | None = None
) -> list[Prompt]:
    """Prompts cut from a text file, or from every ``*.txt`` file in a folder."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path} has no .txt files")
    prompts = chunk_corpus(((f.name, _read_utf8(f)) for f in files), tokenize, tokens, limit)
    if not prompts:
        raise InputError(f"{path} holds fewer than {tokens} tokens of text")
    return prompts


def _builtin_documents() -> Iterable[tuple[str, str]]:
    for name in DEFAULT_LICENSES:
        file = COMMON_LICENSES / name
        if file.is_file():
            yield name, file.read_text(encoding="utf-8", errors="replace")
    license_txt = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_txt.is_file():
        yield "python-LICENSE", license_txt.read_text(encoding="utf-8", errors="replace")
    import argparse
    import collections
    import json as json_module
    import logging
    import pathlib
    import subprocess
    import typing

    for module in (argparse, collections, json_module, logging, pathlib, subprocess, typing):
        yield module.__name__, module.__doc__ or ""


HELD_OUT_LICENSES = ("CC0-1.0", "MPL-1.1", "LGPL-3")
HELD_OUT_MODULES = ("textwrap", "difflib", "heapq", "bisect", "contextlib", "functools", "random", "statistics",
                    "decimal", "fractions", "datetime", "calendar", "unittest", "doctest", "inspect", "email.message",
                    "http.server", "urllib.parse", "asyncio.events", "threading", "queue", "shutil", "tempfile",
                    "zipfile", "csv", "string", "re", "os")


def _held_out_documents() -> Iterable[tuple[str, str]]:
    """Text the built-in calibration set never uses: other licences and the docstrings of other
    standard-library modules (module, classes, functions, methods)."""
    import importlib
    import inspect

    for name in HELD_OUT_LICENSES:
        file = COMMON_LICENSES / name
        if file.is_file():
            yield name, file.read_text(encoding="utf-8", errors="replace")
    for module_name in HELD_OUT_MODULES:
        module = importlib.import_module(module_name)
        parts = [inspect.getdoc(module) or ""]
        for member_name, member in sorted(vars(module).items()):
            if member_name.startswith("_") or getattr(member, "__module__", module_name) != module_name:
                continue
            parts.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                parts += [inspect.getdoc(m) or "" for n, m in sorted(vars(member).items()) if not n.startswith("_")]
        yield module_name, "\n\n".join(p for p in parts if p)


def held_out_prompts(tokenize: Callable[[str], list[int]], count: int = 8, tokens: int = 256) -> list[Prompt]:
    """``count`` prompts from documents that :func:`default_prompts` (the calibration set) never
    reads: for measuring a calibrated detector on text it did not see."""
    return _round_robin(_held_out_documents(), tokenize, count, tokens)


def default_prompts(tokenize: Callable[[str], list[int]], count: int = 8, tokens: int = 256) -> list[Prompt]:
    """``count`` prompts of ``tokens`` tokens from the built-in documents.

    Documents are visited round-robin (one chunk from each in turn) so a small set still spans
    several texts.
    """
    return _round_robin(_builtin_documents(), tokenize, count, tokens)


def _round_robin(documents: Iterable[tuple[str, str]], tokenize: Callable[[str], list[int]], count: int,
                 tokens: int) -> list[Prompt]:
    per_doc = [chunk_corpus([doc], tokenize, tokens, None) for doc in documents]
    prompts: list[Prompt] = []
    depth = 0
    while len(prompts) < count and any(depth < len(chunks) for chunks in per_doc):
        for chunks in per_doc:
            if depth < len(chunks) and len(prompts) < count:
                prompts.append(chunks[depth])
        depth += 1
    if not prompts:
        raise InputError("no built-in text found to build default prompts; pass --prompts")
    return prompts
