"""The ``qlora`` command line: one verb per subcommand, each delegating to one library call.

Every failure becomes ``path: message`` lines on stderr and a documented exit code
(:class:`runner.errors.ExitCode`); a traceback is shown only with ``-vv``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from runner import __version__
from runner.errors import ExitCode, RunnerError

# Each module exposes register(subparsers); order is the order shown in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "runner.commands.spec_cmds",  # validate, schema
    "runner.commands.plan_cmd",  # plan
    "runner.commands.render_cmd",  # render
    "runner.commands.run_cmd",  # run (the container entrypoint)
    "runner.commands.verify_cmd",  # verify
    "runner.commands.eval_cmd",  # eval
    "runner.commands.kube_cmds",  # submit, status, logs, cancel, operator
)

EPILOG = """exit codes:
  0 ok | 1 internal error | 2 invalid spec or data | 3 does not fit any GPU class
  4 verification failed | 5 storage unreachable or denied | 6 CUDA out of memory
  7 preempted (checkpoint written) | 8 Kubernetes API error | 9 submitted job failed
  10 missing optional dependency | 11 deadline exceeded (SIGTERM at the Job's deadline)
  12 stopped by a signal outside Kubernetes | 13 stuck (a phase over its time budget)
  130 interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="qlora",
        description="Fine-tune LLMs with QLoRA as Kubernetes batch jobs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qlora-runner {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="default: text on a terminal, else json"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return int(ExitCode.INVALID_INPUT)
    from runner.logs import setup_logging

    setup_logging(-1 if args.quiet else args.verbose, args.log_format)
    try:
        return int(args.handler(args))
    except RunnerError as e:
        for line in e.lines():
            print(f"error: {line}" if line == e.message else line, file=sys.stderr)
        if args.verbose > 1:
            logging.getLogger("runner").exception("traceback")
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as e:  # the last line of defence: a bug, reported without a traceback
        print(
            f"error: internal error: {type(e).__name__}: {e} (rerun with -vv for the traceback; "
            "please report it)",
            file=sys.stderr,
        )
        if args.verbose > 1:
            logging.getLogger("runner").exception("traceback")
        return int(ExitCode.INTERNAL)
