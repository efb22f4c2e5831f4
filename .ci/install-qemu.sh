#!/usr/bin/env bash
# Install QEMU 10 (qemu-system-x86) from Debian backports, as ../shared/bench/qemu-multifd-bench.sh does:
# backports is added *for the apt command only* (no file under /etc is touched).
# Idempotent: exits at once when a qemu-system-x86_64 of major version >= 10 is already on PATH.
# Needs root (apt-get). Never fails the caller: without QEMU the interop tests skip with a visible reason.
set -uo pipefail

have_qemu10() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local major
  major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n 1)
  [[ -n "$major" && "$major" -ge 10 ]]
}

if have_qemu10; then
  echo "install-qemu: $(qemu-system-x86_64 --version | head -n 1) already installed"
  exit 0
fi
if [[ $EUID -ne 0 ]]; then
  echo "install-qemu: not root, cannot apt-get install; QEMU interop tests will be skipped" >&2
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-qemu: no apt-get; QEMU interop tests will be skipped" >&2; exit 0; }

codename=$(. /etc/os-release; echo "${VERSION_CODENAME:-bookworm}")
tmp=$(mktemp -d /tmp/install-qemu.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
[[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
[[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian
echo "deb $mirror ${codename}-backports main" > "$tmp/bp.list"
APT_BP=(-o "Dir::Etc::sourcelist=$tmp/bp.list" -o "Dir::Etc::sourceparts=/etc/apt/sources.list.d"
        -o "APT::Get::List-Cleanup=0")

echo "install-qemu: apt-get update (stable + ${codename}-backports)"
timeout 300 apt-get update -qq "${APT_BP[@]}" >/dev/null || echo "install-qemu: apt-get update had errors" >&2
if DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
     "${APT_BP[@]}" -t "${codename}-backports" qemu-system-x86 >/dev/null; then
  echo "install-qemu: installed qemu-system-x86 from ${codename}-backports"
else
  echo "install-qemu: backports install failed; QEMU interop tests will be skipped" >&2
  exit 0
fi
if have_qemu10; then
  echo "install-qemu: $(qemu-system-x86_64 --version | head -n 1)"
else
  echo "install-qemu: qemu-system-x86_64 >= 10 still missing; QEMU interop tests will be skipped" >&2
fi
exit 0
