#!/usr/bin/env bash
# The official OpenAI Python SDK against the axum gateway example (issues 9, 16, 22): installs the
# `openai` package into a venv, starts `examples/axum_gateway.rs --serve-for-test` (its
# upstream is the simulator, in-process), runs examples/axum_gateway_sdk_test.py against it,
# and stops the gateway.
#
# Environment:
#   SDK_TEST_VENV        venv directory (default $CARGO_TARGET_DIR/sdk-test-venv; reused once it has openai)
#   SDK_TEST_WHEELHOUSE  install from this directory of wheels, offline (pip --no-index)
#   PIP_INDEX_URL etc.   honoured by pip as usual
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${SDK_TEST_VENV:-${CARGO_TARGET_DIR:-target}/sdk-test-venv}"
tmp="$(mktemp -d)"
gateway_pid=""

cleanup() {
  exec 3>&- 2>/dev/null || true          # closing the gateway's stdin stops it
  if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$gateway_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gateway_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> python venv with the openai SDK ($venv)"
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  pip_args=(--quiet --disable-pip-version-check --timeout 60)
  if [[ -n "${SDK_TEST_WHEELHOUSE:-}" ]]; then
    pip_args+=(--no-index --find-links "$SDK_TEST_WHEELHOUSE")
  fi
  if ! timeout 600 "$venv/bin/pip" install "${pip_args[@]}" openai; then
    echo "sdk-test: could not install the openai package (no PyPI access? set SDK_TEST_WHEELHOUSE)" >&2
    exit 1
  fi
fi
"$venv/bin/python" -c 'import openai; print("openai", openai.__version__)'

echo "==> cargo build --example axum_gateway"
cargo build --quiet -p tower-ai-workspace --example axum_gateway
bin="${CARGO_TARGET_DIR:-target}/debug/examples/axum_gateway"

echo "==> start the gateway"
# Its stdin is a FIFO whose write end this script holds on fd 3: however the script ends,
# even by SIGKILL, the gateway sees end-of-file and exits.
mkfifo "$tmp/stdin"
"$bin" --serve-for-test <"$tmp/stdin" >"$tmp/stdout" 2>"$tmp/stderr" &
gateway_pid=$!
exec 3>"$tmp/stdin"

base_url=""
for _ in $(seq 300); do                   # up to 30 s
  base_url="$(head -n1 "$tmp/stdout" 2>/dev/null || true)"
  [[ -n "$base_url" ]] && break
  if ! kill -0 "$gateway_pid" 2>/dev/null; then
    echo "sdk-test: the gateway exited before serving" >&2
    cat "$tmp/stderr" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z "$base_url" ]]; then
  echo "sdk-test: the gateway printed no address within 30 s" >&2
  cat "$tmp/stderr" >&2
  exit 1
fi
echo "gateway at $base_url"

echo "==> python examples/axum_gateway_sdk_test.py"
status=0
timeout 120 "$venv/bin/python" examples/axum_gateway_sdk_test.py "$base_url" 3>&- || status=$?

exec 3>&-                                 # EOF on stdin: the gateway shuts down
for _ in $(seq 100); do kill -0 "$gateway_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$gateway_pid" 2>/dev/null; then
  echo "sdk-test: the gateway did not stop when its stdin closed" >&2
  status=1
fi
if [[ $status -eq 0 ]]; then
  # The stalled stream of the test was cut by StallDetector and logged at warn, with its
  # reason and the upstream's request id.
  if grep -q 'WARN.*stream cut.*request_id=req_.*reason=' "$tmp/stderr"; then
    grep 'stream cut' "$tmp/stderr" | head -n 3
  else
    echo "sdk-test: the cut stream was not logged at warn with its reason and request id" >&2
    status=1
  fi
fi
if [[ $status -ne 0 ]]; then
  echo "sdk-test: FAILED (gateway stderr follows)" >&2
  cat "$tmp/stderr" >&2
fi
exit "$status"
