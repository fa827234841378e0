"""Paired evaluation of arms: ``sinkguard eval`` (sinkguard's tasks) and ``sinkguard lm-eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sinkguard.cli.options import ModelOption, comma_list, console, distinct_arms, int_list
from sinkguard.errors import SinkguardError


def eval_command(
    server: Annotated[Optional[str], typer.Option("--server", help="Base URL of a sinkguard server (vLLM OpenAI API).")] = None,
    served_model: Annotated[Optional[str], typer.Option("--served-model", help="The server's model name (arms are <name>:<arm>).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="server (a sinkguard vLLM server) or transformers (in-process, no server; needs --profile and --policies).")] = "server",
    profile: Annotated[Optional[Path], typer.Option("--profile", help="transformers engine: the model's sink profile.")] = None,
    policies: Annotated[Optional[Path], typer.Option("--policies", help="transformers engine: the policy file the arms come from.")] = None,
    arms: Annotated[str, typer.Option("--arms", help="Comma-separated arms (policies); the first is the control.")] = "none",
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: perplexity, mmlu, retrieval, generation.")] = "perplexity,mmlu,retrieval",
    model: ModelOption = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="VLLM_API_KEY", help="The server's API key.")] = None,
    mmlu_items: Annotated[int, typer.Option("--mmlu-items", min=1, help="MMLU items drawn with --seed.")] = 50,
    mmlu_file: Annotated[Optional[Path], typer.Option("--mmlu-file", help="Multiple-choice JSONL of MMLU's shape instead of MMLU.")] = None,
    retrieval_lengths: Annotated[str, typer.Option("--retrieval-lengths", help="Context lengths (tokens), comma-separated.")] = "512,1024",
    retrieval_items: Annotated[int, typer.Option("--retrieval-items", min=1, help="Items per length and kind.")] = 4,
    generation: Annotated[Optional[Path], typer.Option("--generation", help="Generation JSONL (prompt, answer, match).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight per arm.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed for item sampling and statistics.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for run.json and comparison.json.")] = Path("runs/eval"),
    sink_stats: Annotated[bool, typer.Option("--sink-stats/--no-sink-stats", help="Read every request's sink record back from the server (one GET per request) for sink statistics per arm.")] = True,
) -> None:
    """The same items through several arms of one server (or of an in-process transformers model),
    compared paired with the first arm."""

    from sinkguard.evaluation import build_tasks
    from sinkguard.evaluation.client import ArmClient
    from sinkguard.evaluation.runner import evaluate
    from sinkguard.sources.models import resolve_model

    arm_list = distinct_arms(arms)
    lengths = int_list(retrieval_lengths, "--retrieval-lengths")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model).path)
    chosen = build_tasks(comma_list(tasks, "--tasks"), tokenizer, seed=seed,
                         mmlu_items=mmlu_items, retrieval_lengths=lengths, retrieval_per_length=retrieval_items,
                         generation_file=generation, multiple_choice_file=mmlu_file)
    if engine == "server":
        if not server or not served_model:
            raise SinkguardError("--engine server needs --server URL and --served-model NAME")
        clients = {arm: ArmClient(server, served_model, arm, api_key) for arm in arm_list}
    elif engine == "transformers":
        clients = _local_clients(model, arm_list, profile, policies)
    else:
        raise SinkguardError(f"--engine: 'server' or 'transformers', not {engine!r}")
    config = {"engine": engine, "server": server, "served_model": served_model, "model": model,
              "arms": arm_list, "tasks": [t.name for t in chosen],
              "seed": seed, "concurrency": concurrency, "mmlu_items": mmlu_items, "retrieval_lengths": lengths}
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    run = evaluate(clients, chosen, encode, arm_list[0], concurrency, config, sink_stats=sink_stats)
    _save_and_print(run, out, seed)


def _save_and_print(run, out: Path, seed: int) -> None:
    from sinkguard.evaluation.outputs import save_evaluation
    from sinkguard.evaluation.summary import print_comparison

    comparison, paths = save_evaluation(run, out, seed)
    print_comparison(comparison, console)
    console.print(f"wrote {paths['run']}, {paths['comparison']} and {paths['markdown']}")
    console.print(f"report: {paths['report']}")


def _local_clients(model: str | None, arms: list[str], profile: Path | None, policies: Path | None) -> dict:
    from sinkguard.core.profile import SinkProfile
    from sinkguard.engines.hf.runner import HFSinkModel
    from sinkguard.evaluation.local import local_clients
    from sinkguard.interventions.policy import PolicySet, load_policies

    if profile is None:
        raise SinkguardError("--engine transformers needs --profile (the model's sink profile)")
    if policies is None and arms != ["none"]:
        raise SinkguardError("--engine transformers needs --policies (the policy file the arms come from)")
    policy_set = load_policies(policies) if policies is not None else PolicySet()
    return local_clients(HFSinkModel.load(model), arms, policy_set, SinkProfile.load(profile))


def lm_eval_command(
    served_model: Annotated[str, typer.Option("--served-model", help="The server's model name (arms are <name>:<arm>).")],
    server: Annotated[Optional[str], typer.Option("--server", help="Base URL of a sinkguard server (vLLM OpenAI API).")] = None,
    arms: Annotated[str, typer.Option("--arms", help="Comma-separated arms (policies); the first is the control.")] = "none",
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval task names (built-in or under --include-path).")] = "sinkguard_mc,sinkguard_ppl",
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs (default: sinkguard's local tasks).")] = None,
    model: ModelOption = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar=["VLLM_API_KEY", "OPENAI_API_KEY"], help="The server's API key.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight per arm (lm-eval's num_concurrent).")] = 4,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="First N documents of each task.")] = None,
    from_output: Annotated[Optional[Path], typer.Option("--from-output", help="Read an `lm_eval --output_path DIR --log_samples` folder (one run per arm) instead of running lm-eval.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the statistics.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for run.json and comparison.json.")] = Path("runs/lm-eval"),
) -> None:
    """lm-eval tasks once per arm (arms as model names), compared paired with the first arm."""

    from sinkguard.evaluation.lm_eval_interop import (
        LOCAL_TASKS,
        arm_model_name,
        evaluate_with_lm_eval,
        read_output_folder,
        to_eval_run,
    )
    from sinkguard.sources.models import resolve_model

    arm_list = distinct_arms(arms)
    task_list = comma_list(tasks, "--tasks")
    if (server is None) == (from_output is None):
        raise SinkguardError("give exactly one of --server (run lm-eval) and --from-output (read its saved samples)")
    if include_path is not None and not include_path.is_dir():
        raise SinkguardError(f"--include-path: not a folder: {include_path}")
    from transformers import AutoTokenizer

    model_path = resolve_model(model).path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    config = {"server": server, "served_model": served_model, "arms": arm_list, "tasks": task_list, "seed": seed,
              "concurrency": concurrency, "limit": limit, "source": "lm-eval"}
    if from_output is not None:
        outputs = {arm: read_output_folder(from_output, arm_model_name(served_model, arm)) for arm in arm_list}
        run = to_eval_run(outputs, arm_list[0], encode, config)
    else:
        run = evaluate_with_lm_eval(server, served_model, arm_list, task_list, model_path, encode,
                                    include_path or LOCAL_TASKS, api_key, concurrency, limit, config)
    _save_and_print(run, out, seed)
