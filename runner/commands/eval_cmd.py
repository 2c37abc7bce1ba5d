"""``qlora eval ADAPTER_URI --data FILE``: score a published adapter against its base model."""

from __future__ import annotations

import argparse
import json
import math

from runner.errors import ExitCode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``eval`` to the CLI."""
    p = sub.add_parser(
        "eval",
        help="evaluate a published adapter against its base model on held-out data",
        description="Verify a published adapter (as qlora verify), load it onto the base model "
        "its manifest names, and score base and adapter on the rows of --data: loss and "
        "perplexity on the answer tokens; accuracy with a 95%% interval where rows list "
        "'choices' (or with --scoring exact-match). The quality gate is the one the run used "
        "(its manifest), else the default: loss improves beyond noise and, where answers "
        "are scored, accuracy improves beyond chance.\n\n"
        "exit codes: 0 gate passed | 4 verification or gate failed | 2 invalid data | "
        "5 storage | 10 training extra missing\n\n"
        "example: qlora eval file://.qlora-store/smollm2-quartz --data held-out.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", metavar="ADAPTER_URI", help="output root, run prefix or manifest")
    p.add_argument("--data", required=True, action="append", metavar="FILE", help="rows to score")
    p.add_argument("--format", help="dataset format (default: the one the adapter trained on)")
    p.add_argument("--chat-template", help="chat template name (default: the tokenizer's)")
    p.add_argument("--scoring", default="auto", choices=("auto", "choices", "exact-match", "loss"))
    p.add_argument("--choices-field", default="choices", help="row field listing the options")
    p.add_argument(
        "--max-rows", type=_positive_int, default=1000, help="score at most this many rows"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_eval)


def _positive_int(text: str) -> int:
    """A whole number >= 1 (argparse turns the ValueError into exit 2 naming the option)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return int(text)


def _eval(args: argparse.Namespace) -> int:
    from runner.eval_adapter import evaluate_published
    from runner.settings import load_settings

    report, identity = evaluate_published(
        args.uri,
        args.data,
        load_settings(),
        dataset_format=args.format,
        chat_template=args.chat_template,
        scoring=args.scoring,
        choices_field=args.choices_field,
        max_rows=args.max_rows,
    )
    code = int(ExitCode.OK if report.gate_passed else ExitCode.VERIFICATION_FAILED)
    if args.json:
        print(json.dumps({**identity, **report.as_dict(), "summary": report.summary()}, indent=2))
        return code
    print(f"adapter {identity['run_uri']} (run {identity['run_id']}, verified)")
    print(f"base    {identity['base_model']}  rows {report.rows}  scoring {report.scoring}")
    print(f"{'':10}{'loss':>10}{'ppl':>10}{'accuracy':>12}{'95% CI':>16}")
    for name, s in (("base", report.base), ("adapter", report.adapter)):
        acc = "-" if s.accuracy is None else f"{100 * s.accuracy:.1f}%"
        ci = (
            "-"
            if s.accuracy_low is None or s.accuracy_high is None
            else f"{100 * s.accuracy_low:.1f}-{100 * s.accuracy_high:.1f}%"
        )
        ppl = f"{s.perplexity:.3g}" if math.isfinite(s.perplexity) else "inf"
        print(f"{name:10}{s.loss:>10.4f}{ppl:>10}{acc:>12}{ci:>16}")
    g = report.loss_gain
    print(f"loss gain  {g.mean:+.4f} nats/token (95% bound {g.low:+.4f} .. {g.high:+.4f})")
    if report.accuracy_gain is not None:
        a = report.accuracy_gain
        print(
            f"accuracy gain {100 * a.mean:+.1f} points (95% bound {100 * a.low:+.1f} .. "
            f"{100 * a.high:+.1f})"
        )
    print("gate      " + ("passed" if report.gate_passed else "FAILED"))
    for line in report.gate_failures:
        print(f"  {line}")
    return code
