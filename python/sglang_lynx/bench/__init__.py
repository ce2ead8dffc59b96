"""Benchmarks: ``python -m sglang_lynx.bench <subcommand> --help``.

Each subcommand is one module with ``add_parser(subparsers)``, listed in ``__main__``.
"""

import json
from pathlib import Path
from typing import Optional


def write_json(path: Optional[Path], report) -> None:
    """Write a subcommand's report to ``--json PATH``, if given."""
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")
