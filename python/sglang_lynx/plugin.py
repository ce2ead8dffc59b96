"""Everything Lynx changes in SGLang, registered from one place.

SGLang calls :func:`load` (entry point ``sglang.srt.plugins``) early in every process it
starts: the HTTP server, each scheduler, the detokenizer.
"""

from sglang_lynx.compat import cpu
from sglang_lynx.config import LynxConfig


def load() -> None:
    cpu.activate()
    cpu.patch_sglang()
    LynxConfig.from_env()  # fail early, in every process, on a malformed config
