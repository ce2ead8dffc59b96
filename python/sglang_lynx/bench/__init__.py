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


def parse_choices(text: str, command: str, allowed: Sequence[str] = MODES, what: str = "mode") -> list[str]:
    """A subcommand's comma-separated list (``--modes``: Lynx modes), each in ``allowed``."""
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"bench {command}: unknown {what}(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")
    return chosen
