"""SGLang's server with Lynx options.

    python -m sglang_lynx.launch_server --lynx-mode lynx [every sglang.launch_server argument]

The ``--lynx-*`` flags are parsed here into one validated :class:`LynxConfig`; everything else
goes to SGLang's own parser and server entry point unchanged.
"""

# On a CPU the compat layer must be in place before SGLang is imported. multiprocessing's
# "spawn" re-imports this module as __mp_main__ in every child (schedulers, detokenizer)
# before unpickling the child's target, so this line covers those processes too.
from sglang_lynx.compat import cpu

cpu.activate()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from sglang_lynx.config import LynxConfig, LynxConfigError  # noqa: E402

PROG = "python -m sglang_lynx.launch_server"


def parse_args(argv: list[str]) -> tuple[LynxConfig, list[str]]:
    """Split argv into the Lynx config and the arguments meant for SGLang."""
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    LynxConfig.add_cli_args(parser)
    known, rest = parser.parse_known_args(argv)
    try:
        return LynxConfig.from_cli_args(known), rest
    except LynxConfigError as e:
        parser.error(str(e))


def print_help() -> None:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    LynxConfig.add_cli_args(parser)
    ServerArgs.add_cli_args(parser)
    parser.print_help()


QUANTIZED_MODES = ("int8", "int4", "lynx")


def lynx_server_args(config: LynxConfig, argv: list[str]) -> list[str]:
    """SGLang flags a Lynx mode implies unless given: a KV page holds whole codec blocks; a ``lynx``
    decode worker schedules without overlap (speculation changes the batch between steps)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = list(argv)
    if config.mode in QUANTIZED_MODES and "--page-size" not in given:
        out += ["--page-size", str(config.group_size)]
    if (config.mode == "lynx" and _flag_value(argv, "--disaggregation-mode") == "decode"
            and "--disable-overlap-schedule" not in given):
        print(f"{PROG}: --lynx-mode lynx: overlap scheduling is off on the decode worker "
              f"(--disable-overlap-schedule)", file=sys.stderr)
        out.append("--disable-overlap-schedule")
    return out


def _flag_value(argv: list[str], flag: str):
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def check_compatible(config: LynxConfig, server_args) -> None:
    """Reject SGLang settings a Lynx mode cannot work with, before any process starts."""
    if not config.enabled:
        return
    if server_args.disaggregation_mode not in ("prefill", "decode"):
        raise LynxConfigError(
            f"--lynx-mode {config.mode} applies to prefill/decode workers: add "
            f"--disaggregation-mode prefill or --disaggregation-mode decode (or use --lynx-mode off)"
        )
    if server_args.disaggregation_transfer_backend != "mooncake":
        raise LynxConfigError(
            f"--lynx-mode {config.mode} runs on the Mooncake transfer engine: use "
            f"--disaggregation-transfer-backend mooncake (got {server_args.disaggregation_transfer_backend})"
        )
    if config.mode in QUANTIZED_MODES and (server_args.page_size or 1) % config.group_size:
        raise LynxConfigError(
            f"--lynx-mode {config.mode} needs --page-size to be a multiple of --lynx-group-size "
            f"({config.group_size}); got --page-size {server_args.page_size}"
        )
    if server_args.disaggregation_decode_enable_radix_cache:
        raise LynxConfigError(
            f"--lynx-mode {config.mode} cannot be combined with "
            f"--disaggregation-decode-enable-radix-cache: the decode cache would keep quantized KV"
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    config, sglang_argv = parse_args(argv)
    config.to_env()  # inherited by every process SGLang starts

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(cpu.default_server_args(lynx_server_args(config, sglang_argv)))
    try:
        check_compatible(config, server_args)
    except LynxConfigError as e:
        sys.exit(f"{PROG}: error: {e}")
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
