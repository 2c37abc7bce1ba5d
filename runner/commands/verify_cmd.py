"""``qlora verify URI``: re-check a published adapter against its manifest."""

from __future__ import annotations

import argparse
import json

from runner.errors import ExitCode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``verify`` to the CLI."""
    p = sub.add_parser(
        "verify",
        help="re-check a published adapter: manifest, every file's size and sha256",
        description="Verify a published adapter. URI is the output root (latest.json is "
        "followed), a run prefix (<output>/runs/<run-id>) or a manifest.json URI.\n\n"
        "exit codes: 0 verified | 4 missing or mismatching manifest or file | "
        "5 storage unreachable or denied | 2 invalid URI\n\n"
        "example: qlora verify s3://adapters/support-bot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", metavar="URI", help="s3://bucket/prefix or file://path")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    from runner.publish import verify_published
    from runner.settings import load_settings

    report = verify_published(args.uri, load_settings())
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "run_id": report.run_id,
                    "run_uri": report.run_uri,
                    "manifest_uri": report.manifest_uri,
                    "manifest_sha256": report.manifest_sha256,
                    "files": [vars(f) for f in report.files],
                    "total_bytes": report.total_bytes,
                    "via_latest": report.via_latest,
                    "extra": list(report.extra),
                },
                indent=2,
            )
        )
        return int(ExitCode.OK)
    via = " (via latest.json)" if report.via_latest else ""
    print(f"verified {report.run_uri}{via}")
    print(f"  run:      {report.run_id}")
    print(f"  manifest: {report.manifest_uri} (sha256 {report.manifest_sha256[:16]}…)")
    print(f"  files:    {len(report.files)}, {_size(report.total_bytes)}, sha256 and size match")
    for f in report.files:
        print(f"    {f.path}  {_size(f.size)}  {f.sha256[:16]}…")
    for uri in report.extra:
        print(f"  note: {uri} is not listed in the manifest (ignored)")
    return int(ExitCode.OK)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
