import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import pytest

from sglang_lynx.compat import cpu

cpu.activate()  # before any test imports SGLang, as the launcher does

from sglang_lynx.client import complete  # noqa: E402
from sglang_lynx.cluster import ClusterSpec, PDCluster, SingleServer, settled  # noqa: E402
from sglang_lynx.config import LynxConfig  # noqa: E402
from sglang_lynx.models import smollm2  # noqa: E402

MAX_TOKENS = 24
# A quarter of the CPU default pool: no test puts more than ~9,300 tokens in flight (test_e2e_staging's
# sixteen prompts, which prefill holds while they wait for rows), and a worker zeroing a 65,536-token
# fp32 pool takes about 25 s longer to start on this machine.
POOL_ARGS = ["--max-total-tokens", "16384"]
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


# Varied text, completions and chat: the first behind a long preamble, the others short.
PREAMBLE = (
    "The following is a collection of short passages written by students in an evening class on "
    "writing. Each student was given the opening of a text, or a question, and asked to continue it in "
    "plain English, without lists or headings, in the voice of a patient teacher who explains things "
    "clearly to a curious reader. The passages cover history, science, cooking, travel, literature, "
    "programming and everyday life. Some are serious and some are light-hearted, but all of them try "
    "to be accurate, kind and easy to follow. The teacher collected them at the end of the term and "
    "kept the best ones for the next class. Here is one of them.\n\n")
SPECULATION_PROMPTS = [PREAMBLE + "The old lighthouse keeper climbed the stairs every evening, and"] + [
    "In 1858, the city of London suffered through a hot summer known as",
    "Photosynthesis is the process by which green plants",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n",
    "Dear Professor Smith,\n\nI am writing to ask whether",
    "The recipe calls for two cups of flour, one egg and",
    "Once the train left the station, Maria opened the letter and read",
    "The three laws of thermodynamics can be summarised as follows:",
    "Chess is a game of strategy in which each player",
    "To be, or not to be, that is the question:",
    "The stock market fell sharply on Monday after",
    "Volcanoes form when molten rock from deep inside the Earth",
] + [[{"role": "user", "content": question}] for question in (
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Translate 'good morning' into French, Spanish and German.",
    "Describe a cat to someone who has never seen one.",
    "How do I boil an egg?",
    "Summarise the plot of Romeo and Juliet.",
    "Suggest a weekend trip from Paris.",
    "What are prime numbers? Give examples.",
    "Write the opening line of a mystery novel.",
    "Why do we have seasons?",
)]
SPECULATION_MAX_TOKENS = 32
HELD_MBPS = 0.001  # a link that carries next to nothing until it is set back


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(smollm2())


def ask_together(url: str, prompts: list, max_tokens: int) -> list:
    """Every prompt at once, greedy and past EOS (chat prompts streamed): the completions, in order."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: complete(url, p, max_tokens=max_tokens, ignore_eos=True,
                                                stream=isinstance(p, list)), prompts))


def prefill_holds(n: int):
    """A phase for ``PDCluster.wait_until``: prefill holds the KV of ``n`` requests (or more) in its rows."""
    def prefill_holds_the_requests(books) -> bool:
        return books["prefill"]["requests_holding_rows"] >= n
    return prefill_holds_the_requests


_asked: dict[str, list] = {}  # cluster -> its answers to the speculation prompts (ask_all_at_once)


def ask_all_at_once(cluster, count: int = len(SPECULATION_PROMPTS)) -> list:
    """The first ``count`` speculation prompts at once, streaming every other one; (answer, send time) each.
    In lynx mode the link carries nothing until prefill holds the KV of every one of them: each Residual
    then waits behind every Anchor and the Residuals before it, however prefill batched the requests.
    A cluster answers them once a session; the modules comparing with its answers share them."""
    name = str(cluster.spec.log_dir)  # one per cluster
    if len(_asked.get(name, ())) >= count:
        return _asked[name][:count]
    lynx = cluster.spec.lynx.mode == "lynx"

    def ask(i):
        sent = time.time()
        answer = complete(cluster.spec.router_url, SPECULATION_PROMPTS[i], max_tokens=SPECULATION_MAX_TOKENS,
                          stream=i % 2 == 1, ignore_eos=True)  # every request runs past the cap (stops: below)
        return answer, sent

    cluster.wait_settled()  # no row held from before: prefill holds rows for these requests alone
    with ThreadPoolExecutor(count) as pool:
        with cluster.link_at(HELD_MBPS) if lynx else nullcontext():
            asked = [pool.submit(ask, i) for i in range(count)]
            if lynx:
                cluster.wait_until(prefill_holds(len(asked)), workers=["prefill"])
        _asked[name] = [a.result() for a in asked]
    return _asked[name]


def decode_records(timings) -> dict[str, dict]:
    """The decode worker's timing records (``--lynx-timings-file``), by request id."""
    return {r.get("rid"): r for r in map(json.loads, timings.read_text().splitlines()) if r["role"] == "decode"}


def assert_streamed_only_once_verified(asked: list, timings) -> None:
    """Of ``asked`` ((answer, send time) each), the streamed answers showed nothing after their first token
    (exact, from prefill) before their request's verification (``residual_applied``)."""
    decoded = decode_records(timings)
    streamed = [(answer, sent) for answer, sent in asked if len(answer.chunks) > 1]
    assert streamed
    for answer, sent in streamed:
        verified_at = decoded[answer.id]["residual_applied"]
        assert all(sent + t >= verified_at for t in answer.chunk_times[1:]), "a token streamed before verification"


def single_server_answers(model_path: str, log_dir) -> dict[str, str]:
    with SingleServer(model_path, log_dir=log_dir, server_args=POOL_ARGS) as server:
        return {name: complete(server.url, prompt, max_tokens=MAX_TOKENS).text
                for name, prompt in PROMPTS.items()}


@pytest.fixture(scope="session", autouse=True)
def reference_in_background(request, model_path, tmp_path_factory):
    """The server of ``reference`` starts, answers and stops while the unit tests run (they run first):
    a server's start is mostly one thread importing, which leaves the other core to them."""
    if not any("reference" in item.fixturenames for item in request.session.items):
        yield None
        return
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(single_server_answers, model_path, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="session")
def reference(reference_in_background) -> dict[str, str]:
    """Greedy answers of one ordinary SGLang server, asked one at a time (stopped before a PD cluster
    starts: memory)."""
    return reference_in_background.result()


# The Lynx PD clusters that test modules share, by name. A module asks for some of them with
# ``pytest.mark.parametrize("lynx_pd", [...], indirect=True)`` (default: all); pytest runs the tests of
# one cluster together, so each starts once, and stops before the next starts (memory).
# lynx: a link slow enough that a 150-token prompt alone on it decodes 16 tokens on the Anchor before its
# Residual (~6 KB a token here) lands; 16-token pages, so that a short prompt ships little. int8, its
# reference, has the same codec settings; its output does not depend on the link. Both stage rows for
# two 1024-token prompts at once (128 rows of 16 tokens): test_e2e_staging fills them.
LINK_MBPS = 4
GROUP = 16
CAP = 24  # speculated tokens before the Residual must land (default 64: lower, to see the cap hold)
STAGING_MB = 27
LYNX_CLUSTERS = {  # int8 answers first: lynx is compared with it
    "raw": LynxConfig(mode="raw", bandwidth_mbps=200),  # fp32 pages: 7x the bytes of int4, paced all the same
    "int8": LynxConfig(mode="int8", bandwidth_mbps=400, group_size=GROUP, staging_mb=STAGING_MB),
    "lynx": LynxConfig(mode="lynx", bandwidth_mbps=LINK_MBPS, group_size=GROUP, max_speculative_tokens=CAP,
                       staging_mb=STAGING_MB),
    # SGLang's order for the first token (with the KV) in one mode: the option's other side, served.
    "int4": LynxConfig(mode="int4", bandwidth_mbps=16, first_token_at_prefill=False),
    # lynx with its Residual in two stages: test_e2e_stages alone asks for it.
    "stages": LynxConfig(mode="lynx", bandwidth_mbps=LINK_MBPS, group_size=GROUP, max_speculative_tokens=CAP,
                         staging_mb=STAGING_MB, residual_stages=(2, 2)),
}
SHARED = ["raw", "int8", "lynx", "int4"]  # the clusters a module gets unless it names others
LYNX_SERVER_ARGS = {"lynx": ["--enable-metrics"], "stages": ["--enable-metrics"]}


@pytest.fixture(scope="session", params=SHARED)
def lynx_pd(request, model_path, reference, tmp_path_factory):
    """(name, cluster, its timings file) for a cluster of LYNX_CLUSTERS; modules use ``lynx_cluster``."""
    log_dir = tmp_path_factory.mktemp(request.param)
    timings = log_dir / "timings.jsonl"
    lynx = LynxConfig(**{**LYNX_CLUSTERS[request.param].__dict__, "timings_file": str(timings)})
    spec = ClusterSpec(model_path=model_path, lynx=lynx, log_dir=log_dir,
                       server_args=POOL_ARGS + LYNX_SERVER_ARGS.get(request.param, []))
    with PDCluster(spec) as cluster:
        yield request.param, cluster, timings


@pytest.fixture(scope="module")
def lynx_cluster(lynx_pd):
    """A shared cluster as one module finds and leaves it: holding nothing, no KV page, row or request of
    another module's; what a module leaves held fails it, at its end."""
    name, cluster, _ = lynx_pd
    books, _ = cluster.wait_settled(timeout=10)
    assert settled(books), f"the {name} cluster holds something before this module starts: {books}"
    yield lynx_pd
    books, _ = cluster.wait_settled()
    assert settled(books), f"the {name} cluster holds something after this module's tests: {books}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The unit tests first (the server of ``reference`` starts beside them); the tests on shared
    clusters last (pytest has grouped them by cluster): the last cluster then stops at the end of the
    session without another test's cluster starting beside it."""
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is not None, "lynx_pd" in item.fixturenames))
