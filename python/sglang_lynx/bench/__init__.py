"""Benchmarks: ``python -m sglang_lynx.bench <subcommand> --help``.

Each subcommand is one module with ``add_parser(subparsers)``, listed in ``__main__``.
"""
