#!/usr/bin/env bash
# The cost of observability on the publish path, in one run on this machine:
#   off          memory store, no exporter (the default)
#   scraped      /metrics scraped 10 times a second during the run
#   traced-1pct  OTLP export on, OTEL_TRACES_SAMPLER=traceidratio, 0.01
#   traced-all   OTLP export on, every publish traced (the SDK default)
# and the same off/traced-all pair for two pods on Redis (publishers on pod
# A, subscribers on pod B: the trace crosses the Redis hop). The exporter
# sends to a local OTLP/HTTP sink that accepts and discards. Metrics
# counters are always on (relaxed atomics), so "off" already includes them;
# "scraped" adds the cost of rendering /metrics.
# With BASELINE_BROKER=path/to/cirrus-broker (a build of a commit before
# tracing existed), a "baseline" variant runs that binary: "off" against it
# is the cost of the tracing code when tracing is off.
# Variants are interleaved in each of ROUNDS rounds (default 3); the table
# shows medians and the ratio to "off".
#
#   bash bench/telemetry.sh
#   ROUNDS=1 QUICK=1 bash bench/telemetry.sh
#   git worktree add /tmp/before 5b496f6 &&
#     (cd /tmp/before && cargo build --release -p cirrus-broker) &&
#     BASELINE_BROKER=/tmp/before/target/release/cirrus-broker bash bench/telemetry.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_setup telemetry.jsonl

# An OTLP/HTTP sink: 200 to every POST, body discarded.
SINK_PORT=$(free_port)
python3 - "$SINK_PORT" >"$OUT/sink.log" 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
SINK_PID=$!
wait_port "$SINK_PORT"
trap 'cleanup; kill $SINK_PID 2>/dev/null || true' EXIT

# broker PORT ADMIN VARIANT [REDIS_URL]: start one broker in the background.
broker() {
  local env=()
  case $3 in
    traced-all) env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf) ;;
    traced-1pct) env=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
                      OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.01) ;;
  esac
  local redis=()
  [ -n "${4:-}" ] && redis=(--redis "$4")
  local bin=$BROKER
  [ "$3" = baseline ] && bin=$BASELINE_BROKER
  env "${env[@]}" "$bin" --listen 127.0.0.1:"$1" --admin "$2" --sys-interval 0 "${redis[@]}" >>"$OUT/cirrus-telemetry.log" 2>&1 &
  PIDS+=("$!"); wait_port "$1"
}

# run STORE VARIANT NAME ARGS...
run() {
  local store=$1 variant=$2 name=$3; shift 3
  cleanup
  local pa aa pb sub_args=() scraper=
  pa=$(free_port); aa=127.0.0.1:$(free_port)
  if [ "$store" = redis-2 ]; then
    start_redis
    broker "$pa" "$aa" "$variant" redis://127.0.0.1:"$RP"
    pb=$(free_port)
    broker "$pb" 127.0.0.1:0 "$variant" redis://127.0.0.1:"$RP"
    sub_args=(--sub-broker 127.0.0.1:"$pb")
  else
    broker "$pa" "$aa" "$variant"
  fi
  if [ "$variant" = scraped ]; then
    (while sleep 0.1; do curl -s -o /dev/null "http://$aa/metrics" || true; done) &
    scraper=$!
  fi
  if ! timeout 180 $BENCH --broker 127.0.0.1:"$pa" "${sub_args[@]}" --label "$store|$variant|$name" --prefix "t$RANDOM" "$@" >>"$RESULTS"; then
    echo "{\"label\":\"$store|$variant|$name\",\"failed\":true}" >>"$RESULTS"
  fi
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null || true
  cleanup
}

M=50000; [ "$QUICK" = 1 ] && M=10000
SCEN=(
  "fanin-q0|--scenario fan-in --qos 0 --messages $M"
  "pairs-q1|--scenario pairs --qos 1 --messages $((M / 5))"
  "latency-10k|--scenario pairs --qos 1 --rate 1000 --messages 5000"
)
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  for s in "${SCEN[@]}"; do
    name=${s%%|*}; args=${s#*|}
    variants=(off scraped traced-1pct traced-all)
    [ -n "${BASELINE_BROKER:-}" ] && variants=(baseline "${variants[@]}")
    for v in "${variants[@]}"; do
      # shellcheck disable=SC2086
      run memory "$v" "$name" $args
    done
    for v in off traced-all; do
      # shellcheck disable=SC2086
      run redis-2 "$v" "$name" $args
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys, statistics, collections
rows = collections.defaultdict(list)
order = []
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    store, variant, name = d["label"].split("|")
    rows[(store, name, variant)].append(d)
    if (store, name) not in order:
        order.append((store, name))
def med(ds, k):
    v = [d[k] for d in ds if d.get(k) is not None and not d.get("failed")]
    return statistics.median(v) if v else None
print("| store | scenario | variant | msg/s (median) | × off | p50 ms | p99 ms |")
print("|---|---|---|---:|---:|---:|---:|")
for store, name in order:
    base = med(rows.get((store, name, "off"), []), "delivered_per_sec")
    for v in ["baseline", "off", "scraped", "traced-1pct", "traced-all"]:
        ds = rows.get((store, name, v))
        if not ds:
            continue
        x = med(ds, "delivered_per_sec")
        if x is None:
            print(f"| {store} | {name} | {v} | failed | | | |")
            continue
        r = f"{x / base:.2f}" if base else "–"
        print(f"| {store} | {name} | {v} | {x:,.0f} | {r} | {med(ds, 'latency_ms_p50'):.2f} | {med(ds, 'latency_ms_p99'):.2f} |")
PY
