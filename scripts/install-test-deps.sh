#!/usr/bin/env bash
# Installs the Debian packages the tests drive as real clients and peers:
#   qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin (nbdinfo, nbdcopy), python3-libnbd (nbdsh),
#   nbdkit, fio (with its nbd engine), chromium (/usr/bin/chromium, driven by playwright-core in the
#   dashboard test; Playwright never downloads a browser). Needs root (or sudo) and apt. Idempotent: only
#   missing packages are installed, and nothing at all when every one is there.
set -euo pipefail
packages=(qemu-utils libnbd-bin python3-libnbd nbdkit fio chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "test dependencies already installed: ${packages[*]}"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
