import pytest

from sglang_lynx.compat import cpu

cpu.activate()  # before any test imports SGLang, as the launcher does

from sglang_lynx.client import complete  # noqa: E402
from sglang_lynx.cluster import SingleServer  # noqa: E402
from sglang_lynx.models import smollm2  # noqa: E402

MAX_TOKENS = 24
# Half the CPU default pool: no test puts a full-context prompt in flight, and a worker zeroing a
# 65,536-token fp32 pool takes about 25 s longer to start on this machine.
POOL_ARGS = ["--max-total-tokens", "32768"]
PROMPTS = {
    "capital": "The capital of France is",
    "story": "Once upon a time, in a small village by the sea,",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "long": "The history of the city of Rome spans two and a half thousand years. " * 30 + "\nIn short,",
    "chat-planets": [{"role": "user", "content": "Name the planets of the solar system."}],
    "chat-followup": [
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "12 times 7 is 84."},
        {"role": "user", "content": "And divided by 4?"},
    ],
}


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(smollm2())


@pytest.fixture(scope="session")
def reference(model_path, tmp_path_factory):
    """Greedy answers of one ordinary SGLang server (stopped before any PD pair starts: memory)."""
    with SingleServer(model_path, log_dir=tmp_path_factory.mktemp("single"), server_args=POOL_ARGS) as server:
        return {name: complete(server.url, prompt, max_tokens=MAX_TOKENS).text
                for name, prompt in PROMPTS.items()}
