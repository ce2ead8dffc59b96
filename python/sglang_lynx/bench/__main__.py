"""python -m sglang_lynx.bench <subcommand> [options]"""

from __future__ import annotations

import argparse

from . import acceptance, agreement, codec, faults, landing, load, serving, ttft

SUBCOMMANDS = [codec, landing, ttft, agreement, acceptance, serving, faults, load]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_lynx.bench", description="Lynx benchmarks")
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
