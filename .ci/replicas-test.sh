#!/usr/bin/env bash
# Four OS processes of the axum gateway example sharing one provider account (issue 17):
# builds the gateway once, then runs examples/replicas_gateways.rs, which starts its own
# redis-server on a free loopback port and the simulator over loopback HTTP, starts four
# gateways per run (without Redis, Redis strict, Redis leased), offers 2x and 10x the
# account's limit round-robin over their ports, prints the table and exits non-zero when a
# run is not what tests/replicas.rs asserts of in-process replicas. About 40 s after the
# build. `--release` builds both in release (the README's figures).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=(); dir=debug
if [[ "${1:-}" == "--release" ]]; then profile=(--release); dir=release; fi

if ! command -v "${REDIS_SERVER:-redis-server}" >/dev/null 2>&1; then
  echo "replicas-test: redis-server not found (apt-get install redis-server, or set REDIS_SERVER)" >&2
  exit 1
fi

echo "==> cargo build --example axum_gateway --example replicas_gateways"
cargo build --quiet "${profile[@]}" -p tower-ai-workspace --example axum_gateway --example replicas_gateways
target="${CARGO_TARGET_DIR:-target}/$dir/examples"

echo "==> replicas_gateways"
# The driver stops its gateways (their stdin closes) and its redis-server when it exits;
# a hang past 5 minutes is a failure, not a stuck CI job.
timeout --kill-after=10 300 "$target/replicas_gateways" "$target/axum_gateway"
