"""Lynx configuration: one typed object, validated once.

SGLang's own argument parser takes the ``--lynx-*`` flags (the plugin adds them to it); the
parsed flags become a :class:`LynxConfig`, checked against the SGLang settings it has to work
with, and reach every SGLang process through one environment variable (schedulers are started
with ``spawn``, so nothing set in the parent's memory reaches them). Each process reads it back
with :meth:`LynxConfig.from_env`; a launcher, whose plugin loads before its flags are parsed, reads
them from its command line first (:meth:`LynxConfig.from_argv`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Optional

ENV_VAR = "SGLANG_LYNX_CONFIG"

MODES = ("off", "raw", "int8", "int4", "lynx")
QUANTIZED_MODES = ("int8", "int4", "lynx")
ANCHOR_BITS = range(2, 7)  # 2..6; the Residual gets the other 8 - A bits
MAX_STAGES = 3  # Anchor, middle, last: decode re-drafts once, when the middle stage lands
# Default staging area: this share of the KV pool (rows hold only the KV in flight).
STAGING_SHARE = 0.05
# The only KV pool Lynx is built on (SGLang's MHATokenToKVPool, checked when a worker attaches to it).
PLAIN_POOL = "a plain per-layer K/V pool (one K and one V buffer of float tokens per layer)"


class LynxConfigError(ValueError):
    """A Lynx option has a value that cannot work; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class LynxConfig:
    mode: str = "off"
    anchor_bits: int = 4
    group_size: int = 64
    max_speculative_tokens: int = 64
    bandwidth_mbps: Optional[float] = None  # None: the link is not paced
    staging_mb: Optional[float] = None  # None: STAGING_SHARE of the KV pool
    verify_checksums: bool = True  # prefill writes, decode checks, a checksum of every stream of every row
    timings_file: Optional[str] = None  # per-request transfer timings, JSON lines
    first_token_at_prefill: bool = True  # prefill sends the first token ahead of the KV; decode streams it
    # The Residual's stages, high bits first (summing to 8 - anchor_bits); () is one stage of all of them.
    residual_stages: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise LynxConfigError(f"--lynx-mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.anchor_bits not in ANCHOR_BITS:
            raise LynxConfigError(
                f"--lynx-anchor-bits must be between {ANCHOR_BITS.start} and {ANCHOR_BITS.stop - 1} "
                f"(the Residual carries the other 8 - A bits of each INT8 code); got {self.anchor_bits}"
            )
        stages = tuple(self.residual_stages)
        object.__setattr__(self, "residual_stages", () if stages == (self.residual_bits,) else stages)
        if stages and (len(stages) > MAX_STAGES - 1 or min(stages) < 1 or sum(stages) != self.residual_bits):
            raise LynxConfigError(
                f"--lynx-stages must give the bits of each stage, first the Anchor's, in at most {MAX_STAGES} "
                f"stages of at least one bit that add up to 8 (e.g. 4,4 or 4,2,2); got "
                f"{','.join(map(str, (self.anchor_bits, *stages)))}")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise LynxConfigError(
                f"--lynx-group-size must be a power of two >= 8 (tokens sharing one scale per "
                f"channel; codes are packed 8 at a time); got {self.group_size}"
            )
        if not 0 <= self.max_speculative_tokens <= 1024:
            raise LynxConfigError(
                f"--lynx-max-speculative-tokens must be between 0 and 1024; got {self.max_speculative_tokens}"
            )
        if self.bandwidth_mbps is not None and not (
            math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0
        ):
            raise LynxConfigError(
                f"--lynx-bandwidth-mbps must be a positive number of megabits per second; "
                f"got {self.bandwidth_mbps}"
            )

        if self.staging_mb is not None and not (math.isfinite(self.staging_mb) and self.staging_mb > 0):
            raise LynxConfigError(f"--lynx-staging-mb must be a positive number of MiB; got {self.staging_mb}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def residual_bits(self) -> int:
        return 8 - self.anchor_bits

    @property
    def residual_plan(self) -> tuple[int, ...]:
        """The bits of each stage after the Anchor."""
        return self.residual_stages or (self.residual_bits,)

    @property
    def stages(self) -> str:
        """The whole plan as ``--lynx-stages`` spells it, e.g. ``4,2,2``."""
        return ",".join(map(str, (self.anchor_bits, *self.residual_plan)))

    def staging_nbytes(self, pool_nbytes: int) -> int:
        """The staging area of a worker whose KV pool takes ``pool_nbytes``."""
        if self.staging_mb is not None:
            return int(self.staging_mb * 2**20)
        return int(pool_nbytes * STAGING_SHARE)

    def staging_reserve(self, kv_budget_nbytes: int) -> int:
        """What to set aside for staging from the bytes SGLang is about to size its KV pool with,
        so that the staging area and the pool together fit in that budget."""
        if self.staging_mb is not None:
            return self.staging_nbytes(0)
        return int(kv_budget_nbytes * STAGING_SHARE / (1 + STAGING_SHARE))

    # --- command line -------------------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("Lynx (progressive KV transfer)")
        group.add_argument("--lynx-mode", default="off", choices=MODES,
                           help="How prefill ships KV to decode: off (SGLang's own transfer), raw (pool "
                                "bytes through the Lynx sender), int8, int4 (Anchor only), lynx (Anchor then "
                                "Residual). Prefill and decode must agree.")
        group.add_argument("--lynx", dest="lynx_mode", action="store_const", const="lynx",
                           help="Shorthand for --lynx-mode lynx.")
        group.add_argument("--lynx-anchor-bits", type=int, default=None,
                           help="Most significant bits of each INT8 code sent in the Anchor stream (2..6); "
                                "default 4. The same as --lynx-stages A,8-A.")
        group.add_argument("--lynx-stages", type=stage_plan, default=None,
                           help="Bits of each INT8 code per stream, Anchor first, adding up to 8: 4,4 (the default) "
                                "sends the Anchor then the Residual; 4,2,2 sends the Residual in two stages, and "
                                "decode re-drafts on 6-bit KV when the middle one lands. Prefill and decode must "
                                "agree.")
        group.add_argument("--lynx-group-size", type=int, default=64,
                           help="Elements that share one quantization scale and zero point.")
        group.add_argument("--lynx-max-speculative-tokens", type=int, default=64,
                           help="Tokens decoded on the Anchor before the Residual must have landed.")
        group.add_argument("--lynx-bandwidth-mbps", type=_positive_float, default=None,
                           help="Pace the KV sender to this many megabits per second (experiments); "
                                "default: unpaced.")
        group.add_argument("--lynx-staging-mb", type=_positive_float, default=None,
                           help="Memory for the Lynx rows of requests in flight, per worker, in MiB; "
                                f"default: {STAGING_SHARE * 100:g}%% of the KV pool, set aside before SGLang sizes it. "
                                "A request waits while the rows it needs are taken.")
        group.add_argument("--lynx-verify-checksums", action=argparse.BooleanOptionalAction, default=True,
                           help="Checksum every stream of every KV page (xxh3) on prefill and check it on decode "
                                "before use; a damaged page fails its request. --no-lynx-verify-checksums saves "
                                "the hashing (peak speed).")
        group.add_argument("--lynx-first-token-at-prefill", action=argparse.BooleanOptionalAction, default=True,
                           help="Prefill sends each request's first token to decode ahead of its KV, and decode "
                                "streams it to the client at once: time to first token is prefill's time, whatever "
                                "the link. --no-lynx-first-token-at-prefill: the first token comes with the KV, as "
                                "in SGLang. Prefill and decode must agree.")
        group.add_argument("--lynx-timings-file", default=None,
                           help="Append per-request transfer timings (JSON lines) to this file.")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "LynxConfig":
        anchor_bits, stages = args.lynx_anchor_bits, args.lynx_stages
        if stages is not None and anchor_bits not in (None, stages[0]):
            raise LynxConfigError(f"--lynx-anchor-bits {anchor_bits} contradicts --lynx-stages "
                                  f"{','.join(map(str, stages))}, whose first stage is the Anchor: give one of them")
        return cls(
            mode=args.lynx_mode,
            anchor_bits=stages[0] if stages else (4 if anchor_bits is None else anchor_bits),
            residual_stages=tuple(stages[1:]) if stages else (),
            group_size=args.lynx_group_size,
            max_speculative_tokens=args.lynx_max_speculative_tokens,
            bandwidth_mbps=args.lynx_bandwidth_mbps,
            staging_mb=args.lynx_staging_mb,
            verify_checksums=args.lynx_verify_checksums,
            timings_file=args.lynx_timings_file,
            first_token_at_prefill=args.lynx_first_token_at_prefill,
        )

    @classmethod
    def from_argv(cls, argv: list[str]) -> "LynxConfig":
        """The Lynx flags on a launcher's command line, read before SGLang parses it (the plugin hooks
        for them when it loads, which is earlier). Malformed flags give the default here: SGLang's
        parser reports them."""
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
        cls.add_cli_args(parser)
        try:
            return cls.from_cli_args(parser.parse_known_args(argv)[0])
        except (argparse.ArgumentError, LynxConfigError):
            return cls()

    # --- SGLang's server arguments -----------------------------------------------------------

    def imply(self, args: argparse.Namespace) -> list[str]:
        """Set on SGLang's parsed arguments what this mode implies, where the user kept SGLang's
        default: a KV page holds whole codec blocks; a ``lynx`` decode worker schedules without
        overlap (speculation changes the batch between steps). Returns the notices to print."""
        notices = []
        if self.mode in QUANTIZED_MODES and args.page_size is None:
            args.page_size = self.group_size
        if self.mode == "lynx" and args.disaggregation_mode == "decode" and not args.disable_overlap_schedule:
            args.disable_overlap_schedule = True
            notices.append("--lynx-mode lynx: overlap scheduling is off on the decode worker "
                           "(--disable-overlap-schedule)")
        return notices

    def check_server_args(self, server_args) -> None:
        """Reject SGLang settings this mode cannot work with, before any process starts."""
        if not self.enabled:
            return
        if server_args.disaggregation_mode not in ("prefill", "decode"):
            raise LynxConfigError(
                f"--lynx-mode {self.mode} applies to prefill/decode workers: add "
                f"--disaggregation-mode prefill or --disaggregation-mode decode (or use --lynx-mode off)"
            )
        if server_args.disaggregation_transfer_backend != "mooncake":
            raise LynxConfigError(
                f"--lynx-mode {self.mode} runs on the Mooncake transfer engine: use --disaggregation-"
                f"transfer-backend mooncake (got {server_args.disaggregation_transfer_backend})"
            )
        if self.mode in QUANTIZED_MODES and (server_args.page_size or 1) % self.group_size:
            raise LynxConfigError(
                f"--lynx-mode {self.mode} needs --page-size to be a multiple of --lynx-group-size "
                f"({self.group_size}); got --page-size {server_args.page_size}"
            )
        if server_args.disaggregation_decode_enable_radix_cache:
            raise LynxConfigError(
                f"--lynx-mode {self.mode} cannot be combined with "
                f"--disaggregation-decode-enable-radix-cache: the decode cache would keep quantized KV"
            )
        if server_args.disaggregation_decode_enable_offload_kvcache:
            raise LynxConfigError(
                f"--lynx-mode {self.mode} cannot be combined with --disaggregation-decode-enable-offload-kvcache: "
                f"decode could offload Anchor-precision KV to a cache that prefill later reuses"
            )
        # Tensor parallelism is supported (the ranks agree on every Lynx decision: streams.ranks);
        # these split a worker otherwise, and Lynx has not been built or tested for them.
        ranks = [f"{flag} {size}" for flag, size in (
            ("--pp-size", server_args.pp_size), ("--dp-size", server_args.dp_size),
            ("--attn-dp-size", server_args.attn_dp_size)) if size > 1]
        if server_args.enable_dp_attention:
            ranks.append("--enable-dp-attention")
        if ranks:
            raise LynxConfigError(
                f"{' '.join(ranks)} is not supported by Lynx yet (--lynx-mode {self.mode}): its ranks would not "
                f"agree on when a Residual has landed, which rows are free and when to verify; use --tp-size "
                f"alone to spread a worker over several devices"
            )
        kv_dtype, bf16 = server_args.kv_cache_dtype, ("bf16", "bfloat16")
        if kv_dtype != "auto" and not (kv_dtype in bf16 and server_args.dtype == "bfloat16"):
            holds = (f"bfloat16 K/V beside a --dtype {server_args.dtype} model" if kv_dtype in bf16
                     else f"{kv_dtype} codes")
            raise LynxConfigError(
                f"--lynx-mode {self.mode} cannot be combined with --kv-cache-dtype {kv_dtype}: the KV pool would "
                f"hold {holds}, and Lynx's codec reads K/V as floats of the model's dtype; use --kv-cache-dtype auto"
            )
        pool_flags = [flag for flag, on in (
            ("--enable-unified-memory", server_args.enable_unified_memory),
            ("--enable-page-major-kv-layout", server_args.enable_page_major_kv_layout),
            ("--enable-hisparse", server_args.enable_hisparse)) if on]
        if pool_flags:
            raise LynxConfigError(
                f"--lynx-mode {self.mode} cannot be combined with {' '.join(pool_flags)}: Lynx reads and writes "
                f"{PLAIN_POOL}, and this gives the worker another KV pool"
            )

    # --- transport to child processes ---------------------------------------------------------

    def to_env(self, env: Optional[dict] = None) -> None:
        (os.environ if env is None else env)[ENV_VAR] = json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> "LynxConfig":
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LynxConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise LynxConfigError(f"{ENV_VAR} has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**fields)


def stage_plan(text: str) -> tuple[int, ...]:
    """A progressive plan as ``--lynx-stages`` spells it, e.g. ``4,2,2``: bits per stage, the Anchor's first."""
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bits per stage (e.g. 4,2,2), got {text!r}") from None
    if len(bits) < 2:
        raise argparse.ArgumentTypeError(f"needs the Anchor and at least one more stage (e.g. 4,4); got {text!r}")
    if bits[0] not in ANCHOR_BITS:
        raise argparse.ArgumentTypeError(f"the Anchor (the first stage) carries {ANCHOR_BITS.start} to "
                                         f"{ANCHOR_BITS.stop - 1} bits; got {text!r}")
    try:
        LynxConfig(anchor_bits=bits[0], residual_stages=bits[1:])
    except LynxConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return bits


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
