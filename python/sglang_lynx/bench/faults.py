"""Real faults on a real Lynx cluster: nothing lost, nothing wrong shown, nothing leaked.

    python -m sglang_lynx.bench faults --json bench-faults.json [--scenarios NAME,...] [--requests 4]

One cluster: a prefill worker and two decode workers (``lynx`` mode, paced link) behind sglang-router.
First every prompt is answered once with no fault (greedy: verified output, equal to ``int8``'s; on a
fast link, which the answers do not depend on). Then, per scenario, several requests are sent at once
(streaming and not), the fault strikes while they are in the phase the scenario names, and every
request must end within the scenario's bound either with its correct output or with an HTTP error
whose message names the cause. Whatever text a client received, also before an error, must be a prefix
of the correct output: no client sees a speculated token that verification would have rejected.
Afterwards every surviving worker is back at its starting count of free KV tokens and Lynx rows, and
the cluster answers once more. Faults are real: processes are killed (SIGKILL) or paused (SIGSTOP),
clients close their connections, bytes are flipped in prefill's memory.

SGLang's own timeouts set the bounds, so the cluster runs with shorter ones than SGLang's defaults
(``SERVER_ENV``); an operator sets the same variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import requests
from tqdm import tqdm

from sglang_lynx.bench import parse_choices, write_json
from sglang_lynx.client import RequestFailed, complete
from sglang_lynx.cluster import ClusterSpec, PDCluster, settled
from sglang_lynx.config import LynxConfig
from sglang_lynx.data import text_windows
from sglang_lynx.models import add_model_argument, resolve

WAITING_TIMEOUT_S = 20  # decode gives up on KV (Anchor or Residual) that does not come
SERVER_ENV = {
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(WAITING_TIMEOUT_S),
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "30",  # prefill gives up on a decode worker that never asks
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "2",  # decode notices a dead prefill in a few seconds
}
STALL_MARGIN_S = 3  # a stalled link stays down this long past the timeout: decode sees it within a poll
PROMPT_LENGTHS = (512, 768, 1024, 640)
MAX_TOKENS = 32
SETTLE_S = 90  # time for the surviving workers to give back every page and row
CHECK_LINK_MBPS = 1000  # the link for requests outside the faults: the correct answers, the one after


def fault_cluster_spec(model_path: str, log_dir: Path, bandwidth_mbps: float = 20) -> ClusterSpec:
    # Speculation stops at 16 tokens so that a request reaches its cap while its Residual travels.
    lynx = LynxConfig(mode="lynx", bandwidth_mbps=bandwidth_mbps, max_speculative_tokens=16, staging_mb=64)
    return ClusterSpec(model_path=model_path, lynx=lynx, decode_workers=2, server_env=SERVER_ENV,
                       server_args=["--max-total-tokens", "16384"], log_dir=log_dir)


# --- what a client saw ------------------------------------------------------------------------


class Disconnect(Exception):
    """The client closes its connection (raised from inside the read loop)."""


@dataclasses.dataclass
class Ending:
    prompt: int
    stream: bool
    outcome: str  # "ok", "error" (an HTTP error or an error event) or "disconnected" (by the client)
    text: str  # everything the client received
    seconds: float
    status: Optional[int] = None
    message: str = ""
    correct: bool = False  # ok: the right output; otherwise: a right prefix, and an error that says why


@dataclasses.dataclass
class Request:
    prompt: int
    stream: bool = False
    cut: Optional[str] = None  # the client disconnects: "before-first-token", "after-first-token", "after-verification"


def send(url: str, prompts: list[str], expected: list[str], req: Request, ttft_s: float, bound_s: float) -> Ending:
    received: list[str] = []
    wanted = {"after-first-token": 1, "after-verification": 2}.get(req.cut)  # pieces before leaving

    def on_text(piece: str) -> None:
        received.append(piece)
        if wanted is not None and len(received) >= wanted:
            raise Disconnect

    timeout: float | tuple = bound_s
    if req.cut == "before-first-token":
        timeout = (5, 0.3 * ttft_s)
    elif req.cut and not req.stream:  # one answer at the end: leave after about that many tokens' time
        timeout = (5, ttft_s * (1.2 if req.cut == "after-first-token" else 2.0))
    start = time.monotonic()
    ending = Ending(req.prompt, req.stream, "ok", "", 0.0)
    try:
        done = complete(url, prompts[req.prompt], max_tokens=MAX_TOKENS, stream=req.stream, timeout=timeout,
                        on_text=on_text)
        ending.text = done.text
    except Disconnect:
        ending.outcome, ending.text = "disconnected", "".join(received)
    except requests.exceptions.Timeout:
        ending.outcome = "disconnected" if req.cut else "error"
        ending.text, ending.message = "".join(received), "" if req.cut else f"no answer within {timeout} s"
    except RequestFailed as e:
        ending.outcome, ending.status, ending.message, ending.text = "error", e.status, str(e), "".join(e.chunks)
    except requests.exceptions.RequestException as e:  # the router itself went away
        ending.outcome, ending.message, ending.text = "error", f"connection: {e}", "".join(received)
    ending.seconds = time.monotonic() - start
    right = expected[req.prompt]
    if ending.outcome == "ok":
        ending.correct = ending.text == right
    else:
        ending.correct = right.startswith(ending.text) and (ending.outcome == "disconnected" or bool(ending.message))
    return ending


# --- the phases a fault strikes in ---------------------------------------------------------------


def anchors_streaming(state: dict) -> bool:
    decodes = [s for n, s in state.items() if n != "prefill" and s]
    return bool(state.get("prefill") and state["prefill"]["rows_in_use"]) and not any(s["speculating"] for s in decodes)


def residuals_streaming(state: dict) -> bool:
    """A request decodes on its Anchor while prefill still sends Residuals."""
    prefill = state.get("prefill")
    return bool(prefill and prefill["residuals_in_flight"]) and any(
        s and s["speculating"] for n, s in state.items() if n != "prefill")


def at_cap(state: dict) -> bool:
    """A request has speculated all it may and waits for its Residual."""
    return any(s and s["paused"] for n, s in state.items() if n != "prefill")


# --- scenarios ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    name: str
    fault: str
    expect: str  # what must happen to the requests in flight
    bound_s: float  # every request ends within this
    requests: Callable[[int], list[Request]]
    strike: Callable[[PDCluster], None] = lambda pd: None  # runs while the requests are in flight
    recover: Callable[[PDCluster], None] = lambda pd: None
    error_pattern: str = ""  # errors must match this (the cause named)
    must_fail: bool = False  # the damage must be seen (a request fails), not answered around


@dataclasses.dataclass
class Context:
    model_path: str
    ttft_s: float = 0.0  # of the last prompt alone, measured with no fault


def mixed(n: int) -> list[Request]:
    return [Request(i % len(PROMPT_LENGTHS), stream=i % 2 == 0) for i in range(n)]


def kill_prefill_when(phase: Callable[[dict], bool]):
    def strike(pd: PDCluster) -> None:
        pd.wait_until(phase)
        pd.kill("prefill")
    return strike


def kill_prefill_at_cap(pd: PDCluster) -> None:
    """Once a request speculates, prefill's sender stops (SIGSTOP), so the request reaches its cap with
    its Residual still due, whatever the pace of decode and link; then prefill is killed."""
    pd.wait_until(residuals_streaming)
    pd.pause("prefill", "sglang::scheduler")
    pd.wait_until(at_cap, workers=[name for name in pd.urls if name != "prefill"])
    pd.kill("prefill")


def restart_prefill(pd: PDCluster) -> None:
    pd.restart("prefill")


def kill_decode(pd: PDCluster) -> None:
    pd.wait_until(anchors_streaming)
    pd.kill("decode-2")


def stall_link(pd: PDCluster) -> None:
    """Prefill's scheduler (the sender) stops, its bootstrap server answers on: to decode, a link
    that carries nothing, for longer than decode waits for KV."""
    pd.wait_until(anchors_streaming)
    pd.pause("prefill", "sglang::scheduler")
    time.sleep(WAITING_TIMEOUT_S + STALL_MARGIN_S)
    pd.resume("prefill", "sglang::scheduler")


def corrupt(stream: str):
    """Flip a byte of a row in prefill's staging area after it was encoded and checksummed, before the
    paced link has sent it: the bytes decode receives are not the ones prefill summed."""
    def strike(pd: PDCluster) -> None:
        log = pd.log_path("prefill").read_text(errors="replace")
        layout = re.findall(r"staging: (\d+) rows x (\d+) B.*Residual from byte (\d+); rows at 0x([0-9a-f]+)", log)
        num_rows, row_nbytes, residual_at, base = (int(x, 16 if i == 3 else 10) for i, x in enumerate(layout[-1]))
        offset = residual_at - 4096 if stream == "Anchor" else residual_at + 4096
        pid, = pd.pids("prefill", "sglang::scheduler")
        deadline = time.monotonic() + 120
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            while time.monotonic() < deadline:
                for row in range(num_rows):
                    mem.seek(base + row * row_nbytes)
                    if mem.read(4) == b"LYNX":  # encoded: its streams wait for the link
                        mem.seek(base + row * row_nbytes + offset)
                        byte = mem.read(1)
                        mem.seek(base + row * row_nbytes + offset)
                        mem.write(bytes([byte[0] ^ 0xFF]))
                        return
                time.sleep(0.01)
        raise RuntimeError("no row was encoded in time")
    return strike


def disconnects(n: int) -> list[Request]:
    cuts = ("before-first-token", "after-first-token", "after-verification")
    return [Request(i % len(PROMPT_LENGTHS), stream=(i // len(cuts)) % 2 == 0, cut=cuts[i % len(cuts)])
            for i in range(max(n, 2 * len(cuts)))] + [Request(0, stream=True)]  # and one that stays


def corrupted(n: int) -> list[Request]:
    return [Request(0, stream=True)]  # one request: the first row encoded is its own


LOST_PREFILL = r"(?i)prefill|connection|unavailable|another rank|aborted"
SCENARIOS = [
    Scenario("client-disconnects", "clients close their connections: before the first token, while the request "
             "speculates (after the first token), after verification; streaming and not",
             "the others answer correctly; the workers free everything", 120, disconnects),
    Scenario("corrupt-anchor", "bytes of a row's Anchor flipped after prefill checksummed them",
             "the request fails with a checksum error, never a different answer", 60, corrupted, corrupt("Anchor"),
             error_pattern="checksum", must_fail=True),
    Scenario("corrupt-residual", "bytes of a row's Residual flipped after prefill checksummed them",
             "the request fails with a checksum error after its first token, speculated tokens unseen", 60,
             corrupted, corrupt("Residual"), error_pattern="checksum", must_fail=True),
    Scenario("link-stall", f"prefill's sender paused (SIGSTOP) for {WAITING_TIMEOUT_S + STALL_MARGIN_S} s while "
             "Anchors stream, longer than decode waits for KV, then resumed",
             "requests in flight fail with a timeout (or answer); the cluster serves again", WAITING_TIMEOUT_S + 90,
             mixed, stall_link, error_pattern=r"(?i)time|within|arrive"),
    Scenario("prefill-killed-anchor", "prefill SIGKILLed while Anchors stream", "each request answers correctly or fails "
             "naming the lost prefill; the restarted prefill serves", 60, mixed, kill_prefill_when(anchors_streaming),
             recover=restart_prefill, error_pattern=LOST_PREFILL),
    Scenario("prefill-killed-residual", "prefill SIGKILLed as the first Anchor lands, Residuals streaming",
             "each request answers correctly or fails naming the lost prefill (one speculating after its first "
             "token)", 60, mixed, kill_prefill_when(residuals_streaming), recover=restart_prefill,
             error_pattern=LOST_PREFILL),
    Scenario("prefill-killed-speculating", "prefill SIGKILLed while decode speculates at its cap, waiting for "
             "Residuals", "as above", 60, mixed,
             kill_prefill_at_cap, recover=restart_prefill,
             error_pattern=LOST_PREFILL),
    # Last: the killed decode worker stays down.
    Scenario("decode-killed", "one of two decode workers SIGKILLed while prefill sends to both",
             "its requests fail; the other decode's answer correctly; prefill frees every page and row of the "
             "dead decode's requests and serves on with the other", 90, lambda n: mixed(max(n, 4)), kill_decode,
             error_pattern=r"(?i)decode|connection|unavailable"),
]


def run_scenario(pd: PDCluster, scenario: Scenario, ctx: Context, prompts: list[str], expected: list[str],
                 num_requests: int) -> dict:
    started = time.monotonic()
    # A quiet cluster: rows still held by an earlier request (a Residual on its way) would take a fault
    # meant for this scenario's requests.
    before, _ = pd.wait_settled(SETTLE_S)
    reqs = scenario.requests(num_requests)
    with ThreadPoolExecutor(len(reqs)) as pool:
        pending = [pool.submit(send, pd.spec.router_url, prompts, expected, r, ctx.ttft_s, scenario.bound_s)
                   for r in reqs]
        time.sleep(0.2)
        fault_error = None
        try:
            scenario.strike(pd)
        except Exception as e:  # noqa: BLE001 - reported as the scenario's failure
            fault_error = f"{type(e).__name__}: {e}"
        endings = [f.result() for f in pending]
    scenario.recover(pd)
    after, settle_s = pd.wait_settled(SETTLE_S)
    with pd.link_at(CHECK_LINK_MBPS):  # the cluster serves on
        served = send(pd.spec.router_url, prompts, expected, Request(1), ctx.ttft_s, 300)
    errors_named = all(re.search(scenario.error_pattern, e.message) for e in endings if e.outcome == "error")
    checks = {
        "ended_in_bound": all(e.seconds <= scenario.bound_s for e in endings),
        "outputs_correct": all(e.correct for e in endings),
        "errors_name_the_cause": errors_named,
        "freed": settled(after),
        "serves_after": served.outcome == "ok" and served.correct,
        "fault_struck": fault_error is None,
    }
    if scenario.must_fail:
        checks["damage_detected"] = any(e.outcome == "error" for e in endings)
    return {
        "scenario": scenario.name, "fault": scenario.fault, "expect": scenario.expect, "bound_s": scenario.bound_s,
        "passed": all(checks.values()), "checks": checks, "fault_error": fault_error,
        "requests": len(endings), "ok": sum(e.outcome == "ok" for e in endings),
        "errors": sum(e.outcome == "error" for e in endings),
        # streamed text, then the error: the first token at prefill time comes before any KV can fail
        "errors_after_text": sum(e.outcome == "error" and bool(e.text) for e in endings),
        "disconnected": sum(e.outcome == "disconnected" for e in endings),
        "longest_s": round(max(e.seconds for e in endings), 1), "settle_s": round(settle_s, 1),
        "scenario_s": round(time.monotonic() - started, 1),  # recovery and the request after it included
        "books_before": before, "books_after": after,
        "endings": [dataclasses.asdict(e) | {"text": e.text[:80]} for e in endings],
    }


def run_suite(pd: PDCluster, ctx: Context, names: list[str], num_requests: int, progress=None) -> list[dict]:
    prompts = text_windows(ctx.model_path, list(PROMPT_LENGTHS))
    # At once, as the scenarios send them, on a fast link: the answers do not depend on it.
    with ThreadPoolExecutor(len(prompts)) as pool, pd.link_at(CHECK_LINK_MBPS):
        expected = [c.text for c in pool.map(lambda p: complete(pd.spec.router_url, p, max_tokens=MAX_TOKENS),
                                             prompts)]
    ctx.ttft_s = complete(pd.spec.router_url, prompts[-1], max_tokens=1, stream=True).ttft_s
    results = []
    for scenario in SCENARIOS:
        if scenario.name not in names:
            continue
        if progress is not None:
            progress.set_description(scenario.name)
        results.append(run_scenario(pd, scenario, ctx, prompts, expected, num_requests))
        if progress is not None:
            progress.update()
    return results


# --- command line -----------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("faults", help="real faults on a lynx cluster: outcomes, bounds, leaks",
                              description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS),
                   help=f"comma-separated, from: {', '.join(s.name for s in SCENARIOS)}")
    p.add_argument("--requests", type=int, default=4, help="requests in flight per scenario")
    p.add_argument("--bandwidth-mbps", type=float, default=20.0, help="emulated KV link rate")
    add_model_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    names = parse_choices(args.scenarios, "faults", [s.name for s in SCENARIOS], what="scenario")
    model_path = resolve(args.model_path)
    with tempfile.TemporaryDirectory(prefix="lynx-faults-") as tmp:
        spec = fault_cluster_spec(model_path, Path(tmp), args.bandwidth_mbps)
        print("starting prefill, two decode workers and the router ...", flush=True)
        with PDCluster(spec) as pd, tqdm(total=len(names), unit="scenario") as progress:
            results = run_suite(pd, Context(model_path), names, args.requests, progress)
    print(f"\n{'scenario':<28} {'passed':<7} {'ok':>3} {'err':>4} {'disc':>5} {'longest s':>10} {'bound s':>8} "
          f"{'settle s':>9} {'scenario s':>11}  failed checks")
    for r in results:
        failed = [k for k, v in r["checks"].items() if not v]
        print(f"{r['scenario']:<28} {str(r['passed']):<7} {r['ok']:>3} {r['errors']:>4} {r['disconnected']:>5} "
              f"{r['longest_s']:>10} {r['bound_s']:>8} {r['settle_s']:>9} {r['scenario_s']:>11}  {', '.join(failed) or '-'}")
    write_json(args.json, {"scenarios": results, "server_env": SERVER_ENV, "bandwidth_mbps": args.bandwidth_mbps})
    if not all(r["passed"] for r in results):
        sys.exit("bench faults: some scenarios failed")
    return results
