"""A prefill/decode cluster on this machine: two SGLang workers and sglang-router in PD mode.

Used by ``make demo``, the end-to-end tests and the benchmarks, and from the shell:

    python -m sglang_lynx.cluster up [--lynx-mode lynx ...]   # stays up, prints the URLs
    python -m sglang_lynx.cluster down

Each process runs in its own session so that stopping it takes its whole process tree
(SGLang's schedulers and detokenizer) with it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import psutil

from sglang_lynx.config import LynxConfig
from sglang_lynx.models import add_model_argument, resolve

HOST = "127.0.0.1"
DEFAULT_STATE_DIR = Path(".lynx-cluster")


# Ports for the servers come from below the kernel's ephemeral range (which outgoing connections take
# their local ports from, so one could take a chosen port before its server binds it) and above the
# range SGLang picks its own internal ports from (22000-29999).
PORT_RANGE_START = 30000
_handed_out: set[int] = set()
PORT_TAKEN = "error while attempting to bind"  # uvicorn's message
# sglang-router's launcher, less the SGLang import (4 CPU-seconds here) that only the tracing of its
# Python load balancer (--mini-lb, unused: the router is Rust) needs: the import is optional there.
ROUTER_LAUNCHER = [sys.executable, "-c", "import sys; sys.modules['sglang.srt.tracing.trace'] = None; "
                   "from sglang_router.launch_router import main; main()"]


def free_port() -> int:
    """A port no one listens on now, and not handed out before by this process."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768
    candidates = [p for p in range(PORT_RANGE_START, ephemeral_start) if p not in _handed_out]
    for port in random.sample(candidates, min(len(candidates), 64)):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range on this machine
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ClusterSpec:
    model_path: str
    lynx: LynxConfig = dataclasses.field(default_factory=LynxConfig)
    decode_lynx: Optional[LynxConfig] = None  # default: the same as prefill (tests of mismatches)
    router_port: int = dataclasses.field(default_factory=free_port)
    prefill_port: int = dataclasses.field(default_factory=free_port)
    decode_port: int = dataclasses.field(default_factory=free_port)
    bootstrap_port: int = dataclasses.field(default_factory=free_port)
    server_args: list[str] = dataclasses.field(default_factory=list)  # passed to both workers
    decode_server_args: list[str] = dataclasses.field(default_factory=list)  # and to decode workers only
    server_env: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. SGLang's timeouts
    decode_workers: int = 1  # more than one: "decode", "decode-2", ... behind the router
    # Prefill, decode, router and a client share the cores.
    threads_per_worker: int = max(1, (os.cpu_count() or 2) // 2)
    log_dir: Path = DEFAULT_STATE_DIR

    @property
    def router_url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

    @property
    def prefill_url(self) -> str:
        return f"http://{HOST}:{self.prefill_port}"

    @property
    def decode_url(self) -> str:
        return f"http://{HOST}:{self.decode_port}"

    @functools.cached_property
    def decode_urls(self) -> dict[str, str]:
        """Every decode worker's URL, by process name."""
        more = {f"decode-{i}": f"http://{HOST}:{free_port()}" for i in range(2, self.decode_workers + 1)}
        return {"decode": self.decode_url, **more}


class ClusterError(RuntimeError):
    pass


class _ProcessGroup:
    """Named child processes, each in its own session; :meth:`stop` always leaves nothing running."""

    def __init__(self, log_dir: Path, threads_per_process: int, env: Optional[dict] = None):
        self.log_dir = log_dir
        self.threads = threads_per_process
        self.env = dict(env or {})
        self.procs: dict[str, subprocess.Popen] = {}
        self.cmds: dict[str, list[str]] = {}

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        # Every process goes at once: nothing a worker holds is meant to outlive its cluster (timing
        # records are written a line at a time as requests end), and SGLang's launchers take 3-5 s
        # to wind down on SIGTERM. Each group holds a worker's scheduler and detokenizer too.
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()

    def spawn(self, name: str, cmd: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env["SGLANG_HOST_IP"] = HOST  # Mooncake and the bootstrap server stay on loopback
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        restarted = name in self.cmds  # its log goes on after its first life
        self.cmds[name] = cmd
        with open(self.log_path(name), "a" if restarted else "w") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )

    def wait_healthy(self, name: str, url: str, deadline: float, answering: bool = False) -> None:
        """Until ``name`` is healthy (or, with ``answering``, answers at all: 503 while it starts)."""
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
            if PORT_TAKEN in self.log_tail(name, lines=5):  # the server stays up without its HTTP port
                raise ClusterError(f"{name} could not bind its port {url}:\n{self.log_tail(name)}")
            status = _http_status(f"{url}/health")
            if status == 200 or (answering and status is not None):
                return
            time.sleep(1)
        raise ClusterError(f"{name} did not become healthy in time:\n{self.log_tail(name)}")

    # --- faults: real ones, to real processes ---------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and its children (a crash: nothing is cleaned up)."""
        proc = self.procs.pop(name)  # gone until restarted
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def pause(self, name: str, process: Optional[str] = None) -> None:
        """SIGSTOP ``name``'s processes (only those whose title contains ``process``, if given)."""
        for pid in self.pids(name, process):
            os.kill(pid, signal.SIGSTOP)

    def resume(self, name: str, process: Optional[str] = None) -> None:
        for pid in self.pids(name, process):
            os.kill(pid, signal.SIGCONT)

    def pids(self, name: str, process: Optional[str] = None) -> list[int]:
        """``name``'s process and its descendants (e.g. SGLang's ``sglang::scheduler``)."""
        root = psutil.Process(self.procs[name].pid)
        family = [root, *root.children(recursive=True)]
        return [p.pid for p in family if process is None or process in " ".join(p.cmdline())]

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def cpu_percent(self, seconds: float) -> float:
        """How busy every process of the group kept the CPU over the next ``seconds`` (100: one core)."""
        roots = [psutil.Process(proc.pid) for proc in self.procs.values()]
        family = roots + [child for root in roots for child in root.children(recursive=True)]
        for p in family:
            p.cpu_percent(None)
        time.sleep(seconds)
        return sum(p.cpu_percent(None) for p in family if p.is_running())

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _server_cmd(model_path: str, port: int, lynx: LynxConfig, extra: list[str]) -> list[str]:
    # SGLang's own launcher, as its users start servers: the plugin gives it the Lynx flags (and, in the
    # project's environment, the CPU compatibility layer; see compat.cpu.activate_on_sglang_import).
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", model_path, "--host", HOST, "--port", str(port),
        "--lynx-mode", lynx.mode,
        "--lynx-stages", lynx.stages,
        "--lynx-group-size", str(lynx.group_size),
        "--lynx-max-speculative-tokens", str(lynx.max_speculative_tokens),
    ]
    if lynx.bandwidth_mbps is not None:
        cmd += ["--lynx-bandwidth-mbps", str(lynx.bandwidth_mbps)]
    if lynx.staging_mb is not None:
        cmd += ["--lynx-staging-mb", str(lynx.staging_mb)]
    if lynx.timings_file is not None:
        cmd += ["--lynx-timings-file", lynx.timings_file]
    if not lynx.verify_checksums:
        cmd += ["--no-lynx-verify-checksums"]
    if not lynx.first_token_at_prefill:
        cmd += ["--no-lynx-first-token-at-prefill"]
    return cmd + extra


class PDCluster(_ProcessGroup):
    """Prefill and decode workers (KV over Mooncake) behind sglang-router in PD mode."""

    def __init__(self, spec: ClusterSpec):
        super().__init__(spec.log_dir, spec.threads_per_worker, spec.server_env)
        self.spec = spec

    @property
    def urls(self) -> dict[str, str]:
        """Every worker's URL, by process name."""
        return {"prefill": self.spec.prefill_url, **self.spec.decode_urls}

    def start(self, timeout: float = 600) -> None:
        spec = self.spec
        self.spawn("prefill", self._worker_cmd("prefill"))
        for name in spec.decode_urls:
            self.spawn(name, self._worker_cmd(name))
        # The router starts (in a second) once the workers' HTTP servers answer, as their warm-up
        # runs: it looks for them at once, then 1, 2, 3, 4 and every 5 s later, so that one started
        # beside them admitted them 2-6 s after they were ready.
        deadline = time.monotonic() + timeout
        for name, url in self.urls.items():
            self.wait_healthy(name, url, deadline, answering=True)
        decodes = [arg for url in spec.decode_urls.values() for arg in ("--decode", url)]
        self.spawn("router", [
            *ROUTER_LAUNCHER,
            "--pd-disaggregation",
            "--prefill", spec.prefill_url, str(spec.bootstrap_port),
            *decodes,
            "--decode-policy", "round_robin",  # several decode workers: each gets its share
            "--host", HOST, "--port", str(spec.router_port),
            "--prometheus-port", str(free_port()),  # its default (29000) would clash with a second cluster
            # The defaults (a 5 s timeout) mark a worker busy with a long prefill as dead; a worker's
            # /health answers within SGLANG_HEALTH_CHECK_TIMEOUT (compat.cpu: 300 s).
            "--health-check-interval-secs", "5",
            "--health-check-timeout-secs", "300",
            # So a check fails only when the worker is gone (refused, or 503 while it shuts down or
            # starts): stop routing to it at the first failing check, not after three (the router
            # retries a request on a dead worker until then), and route to it again at the first
            # passing one; look for starting workers after 1 s (default: 30 s), as said above.
            "--health-failure-threshold", "1",
            "--health-success-threshold", "1",
            "--worker-startup-check-interval", "1",
            # With one worker per role an open circuit refuses every request for a minute;
            # a failing request already reports its own error.
            "--disable-circuit-breaker",
        ])
        for name, url in self.urls.items():
            self.wait_healthy(name, url, deadline)
        self.wait_healthy("router", spec.router_url, deadline)
        self._wait_routable(deadline)
        if spec.lynx.enabled:
            # The probe's rows come back after its answer (in lynx mode once its Residual has crossed):
            # a started cluster holds nothing.
            self.wait_settled(timeout=10)

    # --- what the workers hold ------------------------------------------------------------------

    def lynx_state(self, name: str) -> dict:
        """The ``lynx`` section of worker ``name``'s ``/server_info``."""
        info = urllib.request.urlopen(f"{self.urls[name]}/server_info", timeout=30)
        return json.load(info)["internal_states"][0]["lynx"]

    @contextlib.contextmanager
    def link_at(self, mbps: float):
        """The emulated link at ``mbps`` for a while, then back at the cluster's own rate."""
        if self.spec.lynx.bandwidth_mbps is None:
            raise ClusterError("the cluster's link is not paced (no --lynx-bandwidth-mbps): there is no rate "
                               "to come back to")
        self.set_link(mbps)
        try:
            yield
        finally:
            self.set_link(self.spec.lynx.bandwidth_mbps)

    def set_link(self, mbps: float) -> None:
        """The emulated link's rate (prefill's ``lynx_bandwidth_mbps``), at once."""
        body = json.dumps({"server_args": {"lynx_bandwidth_mbps": mbps}}).encode()
        request = urllib.request.Request(f"{self.spec.prefill_url}/set_internal_state", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            updated = json.load(r)  # per data-parallel rank, or one answer
        if not all(updated if isinstance(updated, list) else [updated]):
            raise ClusterError(f"prefill did not take a link of {mbps} Mbit/s (its log says why):\n"
                               f"{self.log_tail('prefill', 5)}")

    def books(self, names: Optional[list[str]] = None) -> dict[str, Optional[dict]]:
        """What each live worker (of ``names``, default all) holds now (None: it does not answer, e.g. paused)."""
        books = {}
        for name in names or self.urls:
            if name not in self.procs:
                continue
            try:
                s = self.lynx_state(name)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, KeyError):
                books[name] = None
                continue
            books[name] = {"rows_in_use": s["rows_in_use"], "kv_tokens_in_use": s["total_kv_tokens"] - s["free_kv_tokens"]}
            for key in ("requests_holding_rows", "residuals_in_flight", "speculating", "paused"):
                if key in s:
                    books[name][key] = s[key]
        return books

    def wait_until(self, phase: Callable[[dict], bool], timeout: float = 120,
                   workers: Optional[list[str]] = None) -> None:
        """Poll the books of the workers (or only ``workers``) until ``phase(books)`` holds."""
        deadline = time.monotonic() + timeout
        while not phase(self.books(workers)):
            if time.monotonic() > deadline:
                raise ClusterError(f"the workers never reached the phase {phase.__name__}")
            time.sleep(0.05)

    def wait_settled(self, timeout: float = 60) -> tuple[dict, float]:
        """Wait until no live worker holds anything; the books then (or at the timeout), and the wait."""
        start = time.monotonic()
        while True:
            books = self.books()
            if settled(books) or time.monotonic() - start > timeout:
                return books, time.monotonic() - start
            time.sleep(0.5)

    def _worker_cmd(self, name: str) -> list[str]:
        spec, role = self.spec, "prefill" if name == "prefill" else "decode"
        port = int(self.urls[name].rsplit(":", 1)[1])
        extra = ["--disaggregation-mode", role, "--disaggregation-transfer-backend", "mooncake"]
        if role == "prefill":
            extra += ["--disaggregation-bootstrap-port", str(spec.bootstrap_port)]
        lynx = spec.lynx if role == "prefill" else spec.decode_lynx or spec.lynx
        extra += spec.server_args + (spec.decode_server_args if role == "decode" else [])
        return _server_cmd(spec.model_path, port, lynx, extra)

    def restart(self, name: str, timeout: float = 600) -> None:
        """Start a killed worker again, as before, and wait until the router routes requests again."""
        if name in self.procs:  # a fault that never struck: the live worker must not outlive its handle
            self.kill(name)
        self.spawn(name, self.cmds[name])
        deadline = time.monotonic() + timeout
        self.wait_healthy(name, self.urls[name], deadline)
        self._wait_routable(deadline)

    def _wait_routable(self, deadline: float) -> None:
        # The router answers /health before its own checks have admitted the workers: it is
        # ready once it forwards a request (503 means it has no worker yet; other errors come
        # from the workers, which a cluster with mismatched settings must be able to show).
        body = json.dumps({"model": "default", "prompt": "Hi", "max_tokens": 1}).encode()
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{self.spec.router_url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120):
                    return
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            for name in self.procs:
                if self.procs[name].poll() is not None:
                    raise ClusterError(f"{name} exited with code {self.procs[name].returncode}:\n"
                                       f"{self.log_tail(name)}")
            time.sleep(1)
        raise ClusterError(f"the router did not route a request in time:\n{self.log_tail('router')}")


class SingleServer(_ProcessGroup):
    """One ordinary (not disaggregated) SGLang server: the reference PD output must equal."""

    def __init__(self, model_path: str, log_dir: Path = DEFAULT_STATE_DIR, server_args: list[str] = ()):
        super().__init__(log_dir, threads_per_process=os.cpu_count() or 1)
        self.model_path = model_path
        self.port = free_port()
        self.server_args = list(server_args)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 600) -> None:
        self.spawn("single", _server_cmd(self.model_path, self.port, LynxConfig(), self.server_args))
        self.wait_healthy("single", self.url, time.monotonic() + timeout)


def settled(books: dict) -> bool:
    """Every worker in ``books`` answers and holds no KV, no Lynx row, no speculation."""
    return all(b is not None and not any(b.values()) for b in books.values())


def _http_status(url: str) -> Optional[int]:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- `up` / `down` from the shell -----------------------------------------------------------


def _cmd_up(args: argparse.Namespace, server_args: list[str]) -> None:
    state = args.state_dir / "cluster.json"
    if state.exists():
        sys.exit(f"a cluster is already up (state in {state}); run `down` first")
    spec = ClusterSpec(
        model_path=resolve(args.model_path),
        lynx=LynxConfig.from_cli_args(args),
        server_args=server_args,
        log_dir=args.state_dir,
    )
    if args.port:
        spec.router_port = args.port
    cluster = PDCluster(spec)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    state.write_text(json.dumps({name: p.pid for name, p in cluster.procs.items()}))
    print(f"router  {spec.router_url}   (OpenAI API: {spec.router_url}/v1)")
    print(f"prefill {spec.prefill_url}   bootstrap port {spec.bootstrap_port}")
    print(f"decode  {spec.decode_url}")
    print(f"logs    {spec.log_dir}/")


def _cmd_down(args: argparse.Namespace) -> None:
    state = args.state_dir / "cluster.json"
    if not state.exists():
        print("no cluster is up")
        return
    for pid in json.loads(state.read_text()).values():
        _signal_group(pid, signal.SIGTERM)
    time.sleep(3)
    for pid in json.loads(state.read_text()).values():
        _signal_group(pid, signal.SIGKILL)
    state.unlink()
    print("cluster stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_lynx.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    add_model_argument(parser)
    parser.add_argument("--port", type=int, default=None, help="router port (default: a free one)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="logs and process ids")
    LynxConfig.add_cli_args(parser)
    args, server_args = parser.parse_known_args(argv)
    if args.action == "up":
        _cmd_up(args, server_args)
    else:
        _cmd_down(args)


if __name__ == "__main__":
    main()
