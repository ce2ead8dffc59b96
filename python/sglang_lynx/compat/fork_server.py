"""Imported by the fork server that starts a CPU worker's scheduler and detokenizer (``compat.cpu``).

A scheduler or detokenizer that fails signals SIGQUIT to its parent process, and SGLang's launcher
answers by taking the whole worker down. Forked by the fork server, their parent is the fork server:
it passes the signal on to the launcher, whose child it is. The processes it forks get SIGQUIT's
default back.
"""

import os
import signal


def _pass_on(signum, frame) -> None:
    os.kill(os.getppid(), signal.SIGQUIT)


signal.signal(signal.SIGQUIT, _pass_on)
os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGQUIT, signal.SIG_DFL))
