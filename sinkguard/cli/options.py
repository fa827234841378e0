"""What the commands share: the console, the model and prompt options, and the parsing of
comma-separated option values (one place, one error message shape)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

from sinkguard.errors import SinkguardError

console = Console(stderr=False)

ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="HF model folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)."),
]
PromptsOption = Annotated[
    Optional[Path], typer.Option("--prompts", "-p", help="JSONL file with a 'text' field per line.")
]
CorpusOption = Annotated[
    Optional[Path], typer.Option("--corpus", help="Text file (or folder of .txt files) cut into prompts of --tokens tokens.")
]
NumPromptsOption = Annotated[int, typer.Option("--num-prompts", "-n", min=1, help="Prompts cut from the corpus / built-in text.")]
TokensOption = Annotated[int, typer.Option("--tokens", "-t", min=8, help="Tokens per prompt cut from a corpus / built-in text.")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="JSON file with scan settings (see ScanConfig).")]

T = TypeVar("T")


def comma_list(value: str, option: str, parse: Callable[[str], T] = str, what: str = "values") -> list[T]:
    """``"a, b,,c"`` -> ``[a, b, c]`` (empty items dropped), each item through ``parse``; a value
    ``parse`` rejects is a SinkguardError naming the option."""
    try:
        return [parse(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError:
        raise SinkguardError(f"{option}: expected comma-separated {what}, got {value!r}") from None


def int_list(value: str, option: str) -> list[int]:
    return comma_list(value, option, int, "integers")


def distinct_arms(value: str, option: str = "--arms") -> list[str]:
    """Arm names, the control first; at least one, none twice."""
    arms = comma_list(value, option)
    if not arms or len(set(arms)) != len(arms):
        raise SinkguardError(f"{option}: give distinct arm names, the control first (got {value!r})")
    return arms


def model_and_prompts(model: str | None, prompts: Path | None, corpus: Path | None, num_prompts: int, tokens: int,
                      held_out: bool = False) -> tuple[Any, list]:
    """Load the model and the prompts; prompt files are validated first, so bad input fails fast.
    Without a file or corpus: the built-in calibration text, or (``held_out``) text it never uses."""
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.sources.prompts import default_prompts, held_out_prompts, load_corpus, load_jsonl

    if prompts is not None and corpus is not None:
        raise SinkguardError("give either --prompts or --corpus, not both")
    if corpus is not None and not corpus.exists():
        raise SinkguardError(f"corpus not found: {corpus}")
    from_file = load_jsonl(prompts) if prompts is not None else None
    hf_model = HFSinkModel.load(model)
    if from_file is not None:
        return hf_model, from_file
    tokenize = lambda text: hf_model.tokenize(text, add_bos=False)  # noqa: E731
    if corpus is not None:
        return hf_model, load_corpus(corpus, tokenize, tokens, limit=num_prompts)
    builtin = held_out_prompts if held_out else default_prompts
    return hf_model, builtin(tokenize, count=num_prompts, tokens=tokens)
