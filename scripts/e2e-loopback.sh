#!/usr/bin/env bash
# Deployment end to end on 127.0.0.1, with the commands a real deployment uses:
# provision keys, start the coordinator (SuperLink with TLS + SuperNode auth on an internal
# port, nginx on the public one; needs nginx on PATH) and 3 site daemons, which connect through
# the proxy, as real processes, run 2 rounds of examples/tiny.toml in sealed mode, check the
# registry. Every process started here (and each of its descendants) is stopped by PID, also
# on failure.
#
#   scripts/e2e-loopback.sh [WORK_DIR]        (default: a new temp folder, kept for inspection)
#
# ROUNDS=N sets the number of rounds (default 2); PRIVACY=secure-sum runs the federation in
# secure-sum mode instead of sealed; benchmarks/bench_deploy.py uses both.
#
# With RESTART=1 it also SIGKILLs the coordinator (every process of it) after round 1 of 4,
# starts it again, and checks that the run finishes with every version exactly once.
# tests/test_e2e_resilience.py also compares the result bit for bit with an uninterrupted run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$REPO/.venv/bin}"
WORK="${1:-$(mktemp -d -t fedlora-e2e-XXXXXX)}"
ROUNDS="${ROUNDS:-2}"
PRIVACY="${PRIVACY:-sealed}"
[[ "${RESTART:-0}" == 1 ]] && ROUNDS=4
mkdir -p "$WORK"
cd "$WORK"

export PATH="$BIN:$PATH"
export FLWR_HOME="$WORK/flwr" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

PIDS=()
# tree PID: PID and its descendants. The SuperLink starts its SuperExec (which runs the
# ServerApp) in a session of its own, which a process group signal does not reach.
tree() { local child; echo "$1"; for child in $(ps -o pid= --ppid "$1"); do tree "$child"; done; }
cleanup() {
    local pid all=()
    for pid in "${PIDS[@]}"; do all+=($(tree "$pid")); done
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 3
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds, or fail.
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then echo "timed out after ${limit}s: $what" >&2; exit 1; fi
        sleep 1
    done
}
# start NAME COMMAND...: run in a new session (its own process group), log to NAME.log.
start() {
    local name=$1; shift
    setsid "$@" >"$name.log" 2>&1 &
    PIDS+=("$!")
}
start_coordinator() { start "coordinator-$1" "$BIN/fedlora" coordinator start --config coordinator.toml; }

PORT=$(free_port)
PROXY_PORT=$(free_port)
echo "work dir: $WORK (SuperLink on 127.0.0.1:$PORT, proxy on 127.0.0.1:$PROXY_PORT)"

# 1. Provision: CA, TLS certificate, coordinator keys, one bundle per site.
"$BIN/fedlora" keys init --out keys --sites a,b,c --san 127.0.0.1,localhost

# 2. Configs: the coordinator's, one per site (each with its own third of the data), the run.
cat >coordinator.toml <<EOF
[coordinator]
keys = "keys/coordinator"
state = "state"
runs = "runs"
host = "127.0.0.1"
port = $PORT

[proxy]
host = "127.0.0.1"
port = $PROXY_PORT
EOF
i=0
for site in a b c; do
    awk -v n=3 -v k=$i 'NR % n == k' "$REPO/examples/data/dolly-tiny.jsonl" >"$site.jsonl"
    cat >"site-$site.toml" <<EOF
[site]
id = "$site"
keys = "keys/sites/$site"
index = $i

[coordinator]
address = "127.0.0.1:$PROXY_PORT"

[model]
name = "tiny-llama"
device = "cpu"

[data]
path = "$site.jsonl"
format = "instruction"
holdout = 0.2

[supernode]
port = $(free_port)

[resources]
cpu-threads = 1
EOF
    i=$((i + 1))
done
# A deployed coordinator reads no training data (each site names its own in its site.toml).
sed -e '/^path = "data\/dolly-tiny.jsonl"$/d' \
    -e "s/^rounds = 3/rounds = $ROUNDS/" "$REPO/examples/tiny.toml" >run.toml
if [[ "$PRIVACY" != sealed ]]; then
    grep -q '^mode = "sealed"' run.toml || { echo "run.toml: no [privacy] mode to set" >&2; exit 2; }
    sed -i -e "s/^mode = \"sealed\"/mode = \"$PRIVACY\"/" run.toml
fi

# 3. The coordinator; the sites once their SuperNode keys are registered.
t0=$SECONDS
start_coordinator 1
wait_for 120 "site registration" grep -q "site c " coordinator-1.log
for site in a b c; do
    FLWR_HOME="$WORK/flwr-$site" start "site-$site" "$BIN/fedlora" site start --config "site-$site.toml"
done

# 4. The run.
"$BIN/fedlora" coordinator run run.toml --config coordinator.toml --name tiny
if [[ "${RESTART:-0}" == 1 ]]; then
    wait_for 600 "round 1" grep -q '"round": 1' runs/tiny/metrics.jsonl
    echo "SIGKILL the coordinator (SuperLink, SuperExec, ServerApp) during round 2"
    victims=($(tree "${PIDS[0]}"))
    kill -KILL -- "-${PIDS[0]}" "${victims[@]}" 2>/dev/null || true
    start_coordinator 2
fi
wait_for 900 "the run's summary.json" test -f runs/tiny/summary.json
echo "run finished in $((SECONDS - t0)) s"

# 5. The registry: every version exactly once, sealed, every site in the last cohort.
"$BIN/python" - "$ROUNDS" "$PRIVACY" <<'EOF'
import json, sys
from pathlib import Path
from common.registry import Registry

rounds, privacy = int(sys.argv[1]), sys.argv[2]
versions = Registry(Path("runs/tiny/registry")).versions("shared")
assert [v.version for v in versions] == list(range(rounds + 1)), [v.version for v in versions]
assert all(v.manifest["privacy"] == privacy for v in versions), versions[-1].manifest
assert sorted(versions[-1].manifest["cohort"]) == ["a", "b", "c"], versions[-1].manifest["cohort"]
lines = Path("runs/tiny/metrics.jsonl").read_text().splitlines()
assert [json.loads(x)["round"] for x in lines] == list(range(rounds + 1))
print(f"registry ok: v0000..v{rounds:04d}, {privacy}, cohort a, b, c")
EOF
