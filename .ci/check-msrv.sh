#!/usr/bin/env bash
# The MSRV checks CI can make offline, with the one toolchain it has (README, "Minimum
# supported Rust version"):
#  - clippy's `incompatible_msrv` lint (denied in the workspace's [lints]) fails
#    `cargo clippy` on any standard-library API stabilised after `rust-version`; it reads
#    `rust-version` from Cargo.toml. That check runs in .ci/run's clippy step.
#  - this script: every crate that the library crates pull in (normal and build
#    dependencies, as locked in Cargo.lock) declares a `rust-version` no newer than ours,
#    except the ones a feature brings whose own MSRV the README names.
# Not checked: language features (clippy's lint sees APIs only) and an actual build with
# Rust 1.85, which would need a second toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked --offline >target/msrv-metadata.json
exec python3 - target/msrv-metadata.json <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
pkgs = {p["id"]: p for p in m["packages"]}
nodes = {n["id"]: n for n in m["resolve"]["nodes"]}
members = [i for i in m["workspace_members"] if pkgs[i]["name"] != "tower-ai-workspace"]
ours = {pkgs[i]["rust_version"] for i in members}
assert len(ours) == 1, f"library crates disagree on rust-version: {ours}"
msrv = ours.pop()
# Crates only a feature brings, and the Rust they need (the README says so).
feature_msrv = {"tonic": "1.88", "tonic-types": "1.88"}
# tower-ai-redis (the facade's `redis` feature) needs Rust 1.88 with all it pulls in
# (redis-rs, and url's ICU crates): its graph is checked against that.
redis_msrv = "1.88"

def v(s):
    parts = [int(x) for x in s.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

def walk(roots, skip):
    seen, stack = set(), list(roots)
    while stack:
        i = stack.pop()
        if i in seen or pkgs[i]["name"] in skip:
            continue
        seen.add(i)
        for d in nodes[i]["deps"]:
            if any(k["kind"] in (None, "build") for k in d["dep_kinds"]):
                stack.append(d["pkg"])
    return seen

def too_new(ids, limit, allowances):
    bad = []
    for i in sorted(ids, key=lambda i: pkgs[i]["name"]):
        p = pkgs[i]
        need = p.get("rust_version")
        if need and v(need) > v(limit):
            allowed = allowances.get(p["name"])
            if allowed is None or v(need) > v(allowed):
                bad.append(f"{p['name']} {p['version']} needs Rust {need}")
    return bad

redis_roots = [i for i in members if pkgs[i]["name"] == "tower-ai-redis"]
seen = walk([i for i in members if i not in redis_roots], {"tower-ai-redis"})
bad = too_new(seen, msrv, feature_msrv)
redis_seen = walk(redis_roots, set())
bad += [f"{b} (tower-ai-redis: {redis_msrv})" for b in too_new(redis_seen, redis_msrv, {})]
print(f"rust-version {msrv}: the {len(seen)} crates of the library crates' dependency graph checked; {redis_msrv}: the {len(redis_seen)} of tower-ai-redis")
if bad:
    sys.exit("dependencies that need a Rust newer than our MSRV:\n  " + "\n  ".join(bad))
PY
