#!/usr/bin/env bash
# Set up everything sglang-lynx needs, idempotently: Debian libraries for Mooncake, a .venv with
# torch, sglang 0.5.23 (+ its CPU dependencies), Mooncake, sglang-router and this package, and
# the bundled model. Quick when nothing changed (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
STAMP="$VENV/.lynx-setup"

# --- Debian libraries the Mooncake transfer engine links against ------------------------------
APT_PACKAGES=(libibverbs1 ibverbs-providers libnl-3-200 libnl-route-3-200)
missing=()
for lib in libibverbs.so.1 libnl-3.so.200 libnl-route-3.so.200; do
  ldconfig -p | grep -q "$lib" || missing+=("$lib")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing ${APT_PACKAGES[*]} (for Mooncake)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  else
    echo "setup: Mooncake needs the Debian packages ${APT_PACKAGES[*]} (missing: ${missing[*]})." >&2
    echo "       Install them as root: apt-get install ${APT_PACKAGES[*]}" >&2
    exit 1
  fi
fi

# --- Python environment -----------------------------------------------------------------------
want=$(cat requirements/*.txt requirements/*.in pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  echo "setup: $VENV is up to date"
else
  # Keep a CUDA build of torch where the machine already has one; otherwise the CPU build.
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: using the machine's CUDA torch"
    [[ -d $VENV ]] || "$PYTHON" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
      > "$VENV/constraints.txt"
  else
    [[ -d $VENV ]] || "$PYTHON" -m venv "$VENV"
    find_links=()
    [[ -d /opt/wheels ]] && find_links=(--find-links /opt/wheels)
    "$VENV/bin/pip" install -q "${find_links[@]}" "torch==$TORCH_VERSION"
    cp requirements/constraints.txt "$VENV/constraints.txt"
  fi
  pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
  echo "setup: installing pinned dependencies (first time: a few minutes)"
  "${pip[@]}" -c "$VENV/constraints.txt" -r requirements/cpu.lock.txt
  "${pip[@]}" --no-deps -r requirements/no-deps.txt
  "${pip[@]}" --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi

# --- SGLang's own commands on a CPU -----------------------------------------------------------
# `sglang serve`, `python -m sglang.launch_server`, `python -m sglang.bench_serving`: every process of
# this venv gets the CPU compatibility layer the moment it imports SGLang (a no-op with CUDA).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import sglang_lynx.compat.cpu as lynx_cpu; lynx_cpu.activate_on_sglang_import()" > "$site/sglang_lynx_cpu.pth"

# --- Bundled model (cached after the first conversion) ----------------------------------------
"$VENV/bin/python" -m sglang_lynx.models smollm2 >/dev/null
echo "setup: ready ($VENV, model $("$VENV/bin/python" -c 'from sglang_lynx.models import smollm2; print(smollm2())'))"
