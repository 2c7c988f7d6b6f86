#!/usr/bin/env bash
# System libraries the workspace builds against, installed from Debian's packages when
# missing: OpenSSL's headers and pkg-config, for librdkafka with TLS and SASL (the facade's
# `kafka-ssl` feature, which the integration tests enable). Run by .ci/run before it builds,
# and by scripts/test.sh. apt-get is idempotent, so an interrupted install is finished by the
# next run.
set -euo pipefail

missing=()
for pkg in libssl-dev pkg-config; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "[deps.sh] installing ${missing[*]}" >&2
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }
