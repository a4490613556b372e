#!/usr/bin/env bash
# Compare Cirrus with Eclipse Mosquitto on this machine, in one run:
#   mosquitto      Debian's Mosquitto, equivalent limits (queue 1000,
#                  in-flight 100, TCP_NODELAY)
#   memory         cirrus-broker, memory store
#   redis-1        cirrus-broker on a local redis-server, one pod
#   redis-2        two pods on one redis-server: publishers on pod A,
#                  subscribers on pod B
#   before         with BASELINE_BROKER=path/to/cirrus-broker (another
#                  build, e.g. of an earlier commit): that binary, memory
#                  store, to see what a change did
#   before-redis-2 that binary as redis-2 (two pods on one redis-server)
# Targets are interleaved within each round, ROUNDS rounds (default 3), and
# the table shows medians and the ratio to Mosquitto. Raw JSON lines go to
# target/bench/results.jsonl. TARGETS="a b ..." runs only those targets.
#
#   bash bench/compare.sh            # everything (about 10 minutes)
#   COST_ONLY=1 TARGETS="redis-1 redis-2 redis-4" bash bench/compare.sh
#   ROUNDS=1 QUICK=1 bash bench/compare.sh
#   BASELINE_BROKER=/tmp/before/target/release/cirrus-broker \
#     TARGETS="mosquitto before memory" bash bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_setup results.jsonl

# Redis commands and publishes so far on pod A (from its /metrics).
scrape() {
  python3 - "$1" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
cmds = pubs = 0.0
for l in body.splitlines():
    if l.startswith("cirrus_redis_commands_total "):
        cmds = float(l.split()[1])
    if l.startswith("cirrus_publish_received_total{"):
        pubs += float(l.split()[1])
print(cmds, pubs)
PY
}

# start TARGET → sets PUB (publishers' broker), SUB (subscribers'), BPID
start() {
  cleanup
  ADMIN_A=
  local p1 p2 rp
  p1=$(free_port)
  case $1 in
    mosquitto)
      printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 1000\nmax_inflight_messages 100\nmax_connections -1\n' "$p1" >"$OUT/mosquitto.conf"
      /usr/sbin/mosquitto -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
      BPID=$!; PIDS+=("$BPID"); wait_port "$p1"; PUB=127.0.0.1:$p1; SUB=$PUB ;;
    memory|before)
      local bin=$BROKER; [ "$1" = before ] && bin=$BASELINE_BROKER
      $bin --listen 127.0.0.1:"$p1" --admin 127.0.0.1:0 --sys-interval 0 --max-connections 200000 >"$OUT/cirrus.log" 2>&1 &
      BPID=$!; PIDS+=("$BPID"); wait_port "$p1"; PUB=127.0.0.1:$p1; SUB=$PUB ;;
    redis-1|redis-2|redis-4|before-redis-2)
      local bin=$BROKER; [ "$1" = before-redis-2 ] && bin=$BASELINE_BROKER
      ADMIN_A=127.0.0.1:$(free_port)
      start_redis; rp=$RP
      $bin --listen 127.0.0.1:"$p1" --admin "$ADMIN_A" --sys-interval 0 --max-connections 200000 --redis redis://127.0.0.1:"$rp" >"$OUT/cirrus-a.log" 2>&1 &
      BPID=$!; PIDS+=("$BPID"); wait_port "$p1"; PUB=127.0.0.1:$p1; SUB=$PUB
      if [ "$1" != redis-1 ]; then
        p2=$(free_port)
        $bin --listen 127.0.0.1:"$p2" --admin 127.0.0.1:0 --sys-interval 0 --redis redis://127.0.0.1:"$rp" >"$OUT/cirrus-b.log" 2>&1 &
        PIDS+=("$!"); wait_port "$p2"; SUB=127.0.0.1:$p2
      fi
      if [ "$1" = redis-4 ]; then
        # Two more pods that subscribe to nothing: a publish must not cost more.
        for _ in 1 2; do
          local px; px=$(free_port)
          $BROKER --listen 127.0.0.1:"$px" --admin 127.0.0.1:0 --sys-interval 0 --redis redis://127.0.0.1:"$rp" >>"$OUT/cirrus-x.log" 2>&1 &
          PIDS+=("$!"); wait_port "$px"
        done
      fi ;;
  esac
}

# run TARGET NAME ARGS...
run() {
  local target=$1 name=$2; shift 2
  start "$target"
  local sub_args=()
  [ "$SUB" != "$PUB" ] && sub_args=(--sub-broker "$SUB")
  local before=""
  [ -n "$ADMIN_A" ] && before=$(scrape "$ADMIN_A")
  if ! timeout 180 $BENCH --broker "$PUB" "${sub_args[@]}" --label "$target|$name" --prefix "b$RANDOM" "$@" >>"$RESULTS"; then
    echo "{\"label\":\"$target|$name\",\"failed\":true}" >>"$RESULTS"
  fi
  if [ -n "$ADMIN_A" ]; then
    # The Redis work pod A did per publish it received.
    read -r c0 p0 <<<"$before"; read -r c1 p1 <<<"$(scrape "$ADMIN_A")"
    python3 -c "import json; d=$p1-$p0; print(json.dumps({'label':'$target|$name|cost','redis_commands_per_publish':($c1-$c0)/d if d else None}))" >>"$RESULTS"
  fi
  cleanup
}

TARGETS=${TARGETS:-mosquitto memory redis-1 redis-2 redis-4}
[ -n "${BASELINE_BROKER:-}" ] && [[ " $TARGETS " != *" before "* ]] && TARGETS="$TARGETS before"
# wanted T...: those of the targets given that this run measures.
wanted() { for t in "$@"; do [[ " $TARGETS " == *" $t "* ]] && echo "$t"; done; return 0; }

M=50000; [ "$QUICK" = 1 ] && M=10000
SCEN=(
  "fanin-q0|--scenario fan-in --qos 0 --messages $M"
  "fanin-q1|--scenario fan-in --qos 1 --messages $((M / 5))"
  "pairs-q0|--scenario pairs --qos 0 --messages $M"
  "pairs-q1|--scenario pairs --qos 1 --messages $((M / 5))"
  "fanout-q1|--scenario fan-out --qos 1 --subscribers 10 --messages $((M / 5))"
  "shared-q1|--scenario shared --qos 1 --publishers 10 --subscribers 10 --messages $((M / 10))"
  "latency-10k|--scenario pairs --qos 1 --rate 1000 --messages 5000"
  "v5-pairs-q1|--scenario pairs --qos 1 --protocol 5 --messages $((M / 5))"
)
# IDLE_ONLY=1: only the idle connections; COST_ONLY=1: only the Redis
# commands per publish with 1, 2 and 4 pods (idle-pods-q1).
[ "${IDLE_ONLY:-0}" = 1 ] && SCEN=()
[ "${COST_ONLY:-0}" = 1 ] && SCEN=()
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  for s in "${SCEN[@]}"; do
    name=${s%%|*}; args=${s#*|}
    for t in $(wanted mosquitto before memory redis-1 redis-2 before-redis-2); do
      # shellcheck disable=SC2086
      run "$t" "$name" $args
    done
  done
  # Persistent sessions on the Redis store (QoS 1 through session streams).
  [ "${IDLE_ONLY:-0}" = 1 ] || [ "${COST_ONLY:-0}" = 1 ] || for t in $(wanted mosquitto before memory redis-2 before-redis-2); do
    run "$t" persistent-q1 --scenario pairs --qos 1 --protocol 5 --persistent --messages $((M / 5))
  done
  # Idle pods must not make a publish dearer (invariant 3).
  [ "${IDLE_ONLY:-0}" = 1 ] || for t in $(wanted redis-1 redis-2 redis-4 before-redis-2); do
    run "$t" idle-pods-q1 --scenario pairs --qos 1 --rate 1000 --messages 5000
  done
  # Idle connections: connect rate and broker memory per connection, with
  # 64 and with 256 handshakes at once (a reconnect storm: past a broker's
  # listen backlog, dropped handshakes wait a second for the retry).
  C=${CONNS:-9000}; [ "$QUICK" = 1 ] && C=5000
  for conc in 64 256; do
    [ "${COST_ONLY:-0}" = 1 ] && break
    for t in $(wanted mosquitto before memory redis-1); do
      start "$t"
      label="$t|idle-$C-c$conc"
      timeout 180 $BENCH --scenario connections --broker "$PUB" --connections "$C" --source-ips 4 \
        --concurrency "$conc" --broker-pid "$BPID" --label "$label" >>"$RESULTS" ||
        echo "{\"label\":\"$label\",\"failed\":true}" >>"$RESULTS"
      cleanup
      sleep 2 # the sockets of C connections close
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys, statistics, collections
rows = collections.defaultdict(list)
costs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    t, name = d["label"].split("|", 1)
    if name.endswith("|cost"):
        costs[(name[:-5], t)].append(d["redis_commands_per_publish"])
        continue
    rows[(name, t)].append(d)
def med(ds, k):
    v = [d[k] for d in ds if d.get(k) is not None and not d.get("failed")]
    return statistics.median(v) if v else None
names = sorted({n for n, _ in rows}, key=lambda n: list(dict.fromkeys(n for n, _ in rows)).index(n))
targets = ["mosquitto", "before", "memory", "redis-1", "redis-2", "before-redis-2", "redis-4"]
print("| scenario | target | msg/s (median) | × Mosquitto | lost | p50 ms | p99 ms | Redis cmds per publish (pod A) |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for n in names:
    if n.startswith("idle-") and not n.startswith("idle-pods"):
        continue
    base = med(rows.get((n, "mosquitto"), []), "delivered_per_sec")
    for t in targets:
        ds = rows.get((n, t))
        if not ds:
            continue
        v = med(ds, "delivered_per_sec")
        ratio = f"{v / base:.2f}" if v and base else "–"
        lost = med(ds, "lost")
        c = [x for x in costs.get((n, t), []) if x is not None]
        cost = f"{statistics.median(c):.3f}" if c else "–"
        print(f"| {n} | {t} | {v:,.0f} | {ratio} | {lost:.0f} | {med(ds, 'latency_ms_p50'):.2f} | {med(ds, 'latency_ms_p99'):.2f} | {cost} |" if v is not None else f"| {n} | {t} | failed | | | | | |")
print()
print("| idle connections | target | connects/s | broker bytes per connection | per added connection | broker CPU µs per connect |")
print("|---|---|---:|---:|---:|---:|")
for n in names:
    if not n.startswith("idle-") or n.startswith("idle-pods"):
        continue
    for t in targets:
        ds = rows.get((n, t))
        if ds:
            c = med(ds, "connects_per_sec"); b = med(ds, "broker_bytes_per_connection")
            m = med(ds, "broker_bytes_per_added_connection")
            ms = f"{m:,.0f}" if m else "–"
            u = med(ds, "broker_cpu_us_per_connect")
            us = f"{u:.0f}" if u else "–"
            print(f"| {n} | {t} | {c:,.0f} | {b:,.0f} | {ms} | {us} |" if c and b else f"| {n} | {t} | {c} | {b} | {ms} | {us} |")
PY
