# Shared by the benchmark scripts (sourced): build, ports, processes.
# shellcheck shell=bash

# bench_setup RESULTS_FILE: ROUNDS, QUICK, OUT and RESULTS (emptied), the
# packages and release binaries, and the process cleanup.
bench_setup() {
  ROUNDS=${ROUNDS:-3}
  QUICK=${QUICK:-0}
  OUT=target/bench
  mkdir -p "$OUT"
  RESULTS=$OUT/$1
  : >"$RESULTS"
  local need=()
  [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  [ -x /usr/bin/redis-server ] || need+=(redis-server)
  if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  cargo build --release --locked -q -p cirrus-broker -p cirrus-bench
  BROKER=target/release/cirrus-broker
  BENCH=target/release/cirrus-bench
  ulimit -n 1048576 2>/dev/null || ulimit -n 65536 2>/dev/null || true
  PIDS=()
  trap cleanup EXIT
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; PIDS=(); }

# start_redis → RP (its port)
start_redis() {
  RP=$(free_port)
  redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
  PIDS+=("$!"); wait_port "$RP"
}
