#!/usr/bin/env bash
# The axum gateway example's /metrics and /health (issue 18): starts
# `examples/axum_gateway.rs --serve-for-test` (its upstream is the simulator, in-process),
# sends a scripted mix of calls with curl (answers, a stream, a fallback, a quota error, a
# stalled stream, a client over its concurrency limit), scrapes /metrics, validates it with
# `promtool check metrics` (Debian's `prometheus` package; installed if missing), checks a
# few series by name and value, reads /health, and stops the gateway. METRICS_TEST_KEEP=FILE
# keeps the scrape in FILE.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp="$(mktemp -d)"
gateway_pid=""
held_pids=()

cleanup() {
  for pid in "${held_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  exec 3>&- 2>/dev/null || true          # closing the gateway's stdin stops it
  if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$gateway_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gateway_pid" 2>/dev/null || true
  fi
  [[ -n "${METRICS_TEST_KEEP:-}" ]] && cp "$tmp/metrics" "$METRICS_TEST_KEEP" 2>/dev/null; rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v promtool >/dev/null 2>&1; then
  echo "==> apt-get install prometheus (for promtool)"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version | head -n 1

echo "==> cargo build --example axum_gateway"
cargo build --quiet -p tower-ai-workspace --example axum_gateway
bin="${CARGO_TARGET_DIR:-target}/debug/examples/axum_gateway"

echo "==> start the gateway"
# Its stdin is a FIFO whose write end this script holds on fd 3: however the script ends,
# even by SIGKILL, the gateway sees end-of-file and exits.
mkfifo "$tmp/stdin"
GATEWAY_CLIENT_KEYS="sk-ci-a,sk-ci-b" "$bin" --serve-for-test <"$tmp/stdin" >"$tmp/stdout" 2>"$tmp/stderr" &
gateway_pid=$!
exec 3>"$tmp/stdin"

base_url=""
for _ in $(seq 300); do                   # up to 30 s
  base_url="$(head -n1 "$tmp/stdout" 2>/dev/null || true)"
  [[ -n "$base_url" ]] && break
  if ! kill -0 "$gateway_pid" 2>/dev/null; then
    echo "metrics-test: the gateway exited before serving" >&2
    cat "$tmp/stderr" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z "$base_url" ]]; then
  echo "metrics-test: the gateway printed no address within 30 s" >&2
  exit 1
fi
root="${base_url%/v1}"
echo "gateway at $root"

# chat KEY MODEL [STREAM]: one call; prints the HTTP status.
chat() {
  local stream="${3:-false}"
  curl -sS -o "$tmp/body" -w '%{http_code}' --max-time 60 "$base_url/chat/completions" \
    -H "authorization: Bearer $1" -H 'content-type: application/json' \
    -d "{\"model\":\"$2\",\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}" || true
}
expect() { # expect WHAT WANT GOT
  if [[ "$2" != "$3" ]]; then
    echo "metrics-test: $1: HTTP $3, expected $2" >&2
    cat "$tmp/body" >&2 || true
    exit 1
  fi
}

echo "==> a scripted mix of calls"
for _ in 1 2 3; do expect "gpt-4o" 200 "$(chat sk-ci-a gpt-4o)"; done
expect "gpt-4o stream" 200 "$(chat sk-ci-a gpt-4o true)"
expect "down-model (served by the fallback)" 200 "$(chat sk-ci-a down-model)"
expect "quota-model" 429 "$(chat sk-ci-a quota-model)"
# The stalled stream: a 200 whose body the gateway cuts after 2 s of silence.
chat sk-ci-a stall-model true >/dev/null
# sk-ci-b holds its 4 concurrent places with slow streams; a 5th is refused.
for i in 1 2 3 4; do
  curl -sS -N -o /dev/null --max-time 90 "$base_url/chat/completions" \
    -H 'authorization: Bearer sk-ci-b' -H 'content-type: application/json' \
    -d '{"model":"slow-model","stream":true,"messages":[{"role":"user","content":"Hi"}]}' &
  held_pids+=("$!")
done
sleep 1
expect "sk-ci-b over its concurrency" 429 "$(chat sk-ci-b gpt-4o)"
for pid in "${held_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
held_pids=()

echo "==> GET /metrics"
curl -sS --fail --max-time 10 -D "$tmp/metrics.head" -o "$tmp/metrics" "$root/metrics"
grep -qi '^content-type: text/plain; version=0.0.4' "$tmp/metrics.head" \
  || { echo "metrics-test: /metrics is not Prometheus text" >&2; cat "$tmp/metrics.head" >&2; exit 1; }
echo "$(grep -vc '^#' "$tmp/metrics") series"

echo "==> promtool check metrics"
promtool check metrics <"$tmp/metrics"

echo "==> expected series"
status=0
# want REGEX: a series line matching it (name, labels and value) is in the scrape.
want() {
  if grep -Eq "$1" "$tmp/metrics"; then
    grep -E "$1" "$tmp/metrics" | head -n 1
  else
    echo "metrics-test: no series matches /$1/" >&2
    status=1
  fi
}
# every upstream call ended in AiRetry: the 3 answers, the stream, the fallback's answer,
# the stalled stream's head and sk-ci-b's 4 streams are successes without a retry
want '^tower_ai_retry_calls_total\{outcome="success",retried="false"\} (9|[1-9][0-9]+)$'
# down-model: two retries after a 503 on backoff, then the fallback route served it
want '^tower_ai_retry_retries_total\{error_type="overloaded",wait_source="backoff"\} 2$'
want '^tower_ai_fallback_served_total\{route="gpt-4o-mini"\} 1$'
want '^tower_ai_fallback_fallbacks_total\{trigger="overloaded"\} 1$'
want '^tower_ai_retry_wait_seconds_bucket\{wait_source="backoff",le="\+Inf"\} 2$'
# the stalled stream, cut between chunks
want '^tower_ai_stall_stalls_total\{phase="idle"\} 1$'
# sk-ci-b's fifth request, refused by its concurrency limit
want '^tower_ai_budget_refused_total\{limit="concurrency"\} 1$'
# the breaker of the default model is tracked and closed
want '^tower_ai_circuit_breaker_state\{key="127\.0\.0\.1(:[0-9]+)?/gpt-4o",state="closed"\} 1$'
# the gateway counts the keys cooling at each scrape: none (a quota error teaches no cooldown)
want '^tower_ai_retry_after_keys_cooling 0$'
want '^# TYPE tower_ai_budget_queue_wait_seconds histogram$|^# TYPE tower_ai_retry_wait_seconds histogram$'
# the GenAI client metrics beside the layers' (the telemetry layer of the upstream stack)
want '^# TYPE gen_ai_client_operation_duration_seconds histogram$'

echo "==> GET /health"
curl -sS --fail --max-time 10 -o "$tmp/health" "$root/health"
if ! python3 - "$tmp/health" <<'PY'
import json, sys
h = json.load(open(sys.argv[1]))
assert h["status"] in ("ok", "degraded"), h
keys = {b["key"].rsplit("/", 1)[-1]: b["state"] for b in h["circuit_breakers"]}
assert keys.get("gpt-4o") == "closed", keys
assert isinstance(h["cooldowns"], list), h
print(f"status {h['status']}, {len(h['circuit_breakers'])} breakers, {len(h['cooldowns'])} cooling")
PY
then
  echo "metrics-test: /health is not what was expected:" >&2
  cat "$tmp/health" >&2
  status=1
fi

if [[ $status -ne 0 ]]; then
  echo "metrics-test: FAILED; the scrape follows" >&2
  grep -v '^#' "$tmp/metrics" >&2
fi
exit "$status"
