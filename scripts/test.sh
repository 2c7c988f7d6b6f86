#!/usr/bin/env bash
# Runs every test of the workspace against real brokers, setting up what is missing first:
# the system libraries of scripts/deps.sh are installed if missing; Redis, PostgreSQL,
# RabbitMQ and NATS (with JetStream) are started if they do not answer; moto (the SQS emulator) is installed
# into a virtualenv and started, and stopped again at the end; promtool is unpacked into the
# cache. Kafka tests use librdkafka's in-process mock cluster unless KAFKA_BROKERS is set.
#
# Usage: bash scripts/test.sh [a test filter, passed to cargo-nextest (cargo test without it)]
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ackstack/target}"
CACHE="${ACKSTACK_CACHE:-$HOME/.cache/ackstack}"
VENV="$CACHE/venv"
MOTO_PORT=4566
export SQS_ENDPOINT="${SQS_ENDPOINT:-http://127.0.0.1:$MOTO_PORT}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
mkdir -p "$CACHE"

log() { printf '[test.sh] %s\n' "$*" >&2; }

# port_open PORT: whether something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT SECONDS NAME
wait_port() {
  local deadline=$((SECONDS + $2))
  until port_open "$1"; do
    if ((SECONDS >= deadline)); then log "$3 did not come up on port $1"; return 1; fi
    sleep 1
  done
}

ensure_redis() {
  if port_open 6379; then return; fi
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 30 Redis
}

ensure_postgres() {
  if port_open 5432; then return; fi
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_port 5432 60 PostgreSQL
}

ensure_rabbitmq() {
  if port_open 5672; then return; fi
  log "starting RabbitMQ"
  # Each queue costs RabbitMQ file handles, and the suites declare hundreds: more than the
  # usual 1,024 open files allow it (it then stops accepting connections).
  (ulimit -n 65536 2>/dev/null || true; rabbitmq-server -detached)
  wait_port 5672 120 RabbitMQ
  # The port opens before the broker accepts logins; give it a moment to finish booting.
  rabbitmqctl await_startup >/dev/null 2>&1 || sleep 5
}

ensure_nats() {
  if port_open 4222; then return; fi
  log "starting NATS with JetStream"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222 30 NATS
}

# A virtualenv counts as installed only once the marker is written after a complete install,
# so an interrupted install is thrown away and redone.
ensure_moto() {
  if [[ ! -f "$VENV/.ackstack-installed" || ! -x "$VENV/bin/moto_server" ]]; then
    log "installing moto into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]'
    touch "$VENV/.ackstack-installed"
  fi
}

# promtool (for the alert rules' checks) from Debian's prometheus package, unpacked into the
# cache rather than installed: nothing is started, nothing system-wide changes. Unpacked into a
# temporary folder and renamed when complete, so an interrupted download is redone. Without
# network access the rules' promtool checks say so and are skipped.
ensure_promtool() {
  if command -v promtool >/dev/null; then return; fi
  local dest="$CACHE/promtool"
  if [[ ! -x "$dest/usr/bin/promtool" ]]; then
    log "fetching promtool (Debian package prometheus)"
    local tmp
    tmp="$(mktemp -d "$CACHE/promtool.XXXXXX")"
    if (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 \
          || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
        && dpkg -x prometheus_*.deb unpacked); then
      rm -rf "$dest"
      mv "$tmp/unpacked" "$dest"
    else
      log "could not fetch promtool; the alert rules will not be checked by it"
    fi
    rm -rf "$tmp"
  fi
  if [[ -x "$dest/usr/bin/promtool" ]]; then export PROMTOOL="$dest/usr/bin/promtool"; fi
}

MOTO_PID=""
start_moto() {
  if [[ -n "${SQS_ENDPOINT_EXTERNAL:-}" ]]; then return; fi
  if port_open "$MOTO_PORT"; then
    log "an SQS endpoint already answers on port $MOTO_PORT; using it"
    return
  fi
  ensure_moto
  log "starting moto on 127.0.0.1:$MOTO_PORT"
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$CACHE/moto.log" 2>&1 &
  MOTO_PID=$!
  wait_port "$MOTO_PORT" 60 moto
}

stop_moto() {
  if [[ -n "$MOTO_PID" ]]; then
    kill "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
  fi
}
trap stop_moto EXIT

bash scripts/deps.sh
ensure_redis
ensure_postgres
ensure_rabbitmq
ensure_nats
ensure_promtool
start_moto

log "running the tests"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  # Test binaries run side by side (.config/nextest.toml); nextest does not run doc tests.
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
  if [[ $# -eq 0 ]]; then
    cargo test --workspace --doc --no-fail-fast || status=$?
  fi
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi
# The workspace build turns on the `tls` features of ackstack-postgres and ackstack-redis
# (the TLS tests need them); their own tests once more without them cover the plaintext-only
# builds (the facade's defaults).
if [[ $# -eq 0 ]]; then
  log "running ackstack-postgres's and ackstack-redis's own tests without the tls feature"
  cargo test -p ackstack-postgres --lib || status=$?
  cargo test -p ackstack-redis --no-default-features --lib || status=$?
fi
exit "$status"
