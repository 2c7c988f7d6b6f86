#!/usr/bin/env bash
# Publishing checks: what crates.io would receive for every published crate (`cargo package`,
# a dry run: nothing is uploaded) and the dependency tree's licences, bans and sources
# (`cargo deny`, settings in deny.toml). Advisories are not checked here: they need the
# RustSec database from GitHub, which this CI cannot reach; run `cargo deny check advisories`
# in your own CI.
#
# cargo-deny is built from crates.io into the cache on first use (a few minutes, once per
# machine); an interrupted build is thrown away and redone.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ackstack/target}"
CACHE="${ACKSTACK_CACHE:-$HOME/.cache/ackstack}"
TOOLS="$CACHE/tools"
DENY_VERSION="0.20.2"

log() { printf '[package.sh] %s\n' "$*" >&2; }

if [[ "$("$TOOLS/bin/cargo-deny" --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]]; then
  log "building cargo-deny $DENY_VERSION into $TOOLS"
  rm -rf "$TOOLS.partial"
  cargo install cargo-deny --version "=$DENY_VERSION" --locked --root "$TOOLS.partial"
  rm -rf "$TOOLS"
  mv "$TOOLS.partial" "$TOOLS"
fi

PUBLISHED=(ackstack-core ackstack ackstack-rabbitmq ackstack-sqs ackstack-kafka ackstack-redis
  ackstack-postgres ackstack-nats ackstack-redis-streams ackstack-testkit ackstack-cli)
args=()
for crate in "${PUBLISHED[@]}"; do args+=(-p "$crate"); done
# --no-verify: building each packaged crate again from its archive would rebuild every
# dependency in a target directory of its own (about ten minutes here); the workspace build
# and tests cover the same sources.
log "cargo package (dry run) of ${PUBLISHED[*]}"
cargo package --no-verify "${args[@]}"

log "cargo deny check licenses bans sources"
"$TOOLS/bin/cargo-deny" check licenses bans sources
