"""The ``sinkguard`` command line: every command registered in one table. Every subcommand has ``--help``.

Errors a user can fix (bad paths, bad prompts, a profile of another model) print one line and
exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sinkguard.cli import ab, evaluate, offline, serve
from sinkguard.cli.options import NumPromptsOption, TokensOption, console
from sinkguard.errors import SinkguardError

app = typer.Typer(
    name="sinkguard",
    help="Find, profile and control attention sinks in LLMs (offline scanner; vLLM plugin).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ab_app = typer.Typer(help="Live A/B experiments of policies inside one server.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the profile, report, figures and server log.")] = Path("runs/demo"),
    num_prompts: NumPromptsOption = 12,
    tokens: TokensOption = 256,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Also serve with vLLM and send requests.")] = True,
) -> None:
    """The main job end to end on the embedded model: scan, calibrate, serve, query, report."""
    from sinkguard.cli.demo import run_demo

    run_demo(out, num_prompts, tokens, console, serve=serve)


app.command("pull-model")(offline.pull_model)
app.command("scan")(offline.scan)
app.command("calibrate")(offline.calibrate)
app.command("validate")(offline.validate)
app.command("select-heads")(offline.select_heads_command)
app.command("profile")(offline.show_profile)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve.serve)
app.command("eval")(evaluate.eval_command)
app.command("lm-eval")(evaluate.lm_eval_command)
ab_app.command("report")(ab.ab_report_command)
app.command("demo")(demo)


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
