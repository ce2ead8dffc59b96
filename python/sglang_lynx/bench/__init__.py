"""Benchmarks: ``python -m sglang_lynx.bench <subcommand> --help``.

Each subcommand is one module with ``add_parser(subparsers)``, listed in ``__main__``.
"""

import json
from pathlib import Path
from typing import Optional, Sequence

from sglang_lynx.config import MODES


def write_json(path: Optional[Path], report) -> None:
    """Write a subcommand's report to ``--json PATH``, if given."""
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")


def parse_modes(text: str, command: str, allowed: Sequence[str] = MODES) -> list[str]:
    """A subcommand's ``--modes``: comma-separated Lynx modes, each in ``allowed``."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in allowed]
    if unknown or not modes:
        raise SystemExit(f"bench {command}: unknown mode(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")
    return modes
