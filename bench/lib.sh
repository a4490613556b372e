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

# A free port below the ephemeral range (32768 and up here), so that the
# thousands of client sockets of a run cannot take it before the broker
# binds it.
free_port() {
  python3 - <<'PY'
import random, socket
while True:
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
PY
}
# Up to 20 s: after thousands of idle connections closed, starting the next
# process can take seconds on a busy machine.
wait_port() { for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; PIDS=(); }

# start_redis → RP (its port)
start_redis() {
  RP=$(free_port)
  redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
  PIDS+=("$!"); wait_port "$RP"
}
