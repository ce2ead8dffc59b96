"""SGLang's server, with the CPU compatibility layer in place first.

    python -m sglang_lynx.launch_server --lynx [every sglang.launch_server argument]

With the package installed, SGLang's own launchers (``sglang serve``, ``python -m
sglang.launch_server``) take the ``--lynx*`` flags too: the plugin adds them to SGLang's parser.
This entry point is the one for a CPU anywhere: it activates the compatibility layer before
SGLang is imported (the project's ``.venv`` does that for every process; see ``compat.cpu``).
"""

# multiprocessing's "spawn" re-imports this module as __mp_main__ in every child (schedulers,
# detokenizer) before unpickling the child's target, so this line covers those processes too.
from sglang_lynx.compat import cpu

cpu.activate()

import os  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()  # before parsing: the plugin adds the Lynx flags to SGLang's parser
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
