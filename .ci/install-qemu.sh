#!/usr/bin/env bash
# Install QEMU 10 (qemu-system-x86) from Debian backports, as ../shared/bench/qemu-multifd-bench.sh does:
# backports is added *for the apt command only* (no file under /etc is touched), on the mirror this machine's
# apt configuration already uses for its release (/etc/apt/sources.list, /etc/apt/sources.list.d/*.list and
# *.sources): no mirror is guessed; without one, QEMU is skipped with the reason.
# Idempotent: exits at once when a qemu-system-x86_64 of major version >= 10 is already on PATH, and adds no
# backports source when the configuration already has one.
# Needs root (apt-get). Never fails the caller: without QEMU the interop tests skip with a visible reason.
set -uo pipefail
. "$(dirname "$0")/apt-sources.sh"

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

codename=$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")
if [[ -z "$codename" ]]; then
  echo "install-qemu: /etc/os-release names no release (VERSION_CODENAME); QEMU interop tests will be skipped" >&2
  exit 0
fi
if apt_has_suite /etc/apt "${codename}-backports"; then
  APT_BP=()
else
  mirror=$(apt_mirror_for /etc/apt "$codename")
  if [[ -z "$mirror" ]]; then
    echo "install-qemu: no apt source for ${codename} in /etc/apt/sources.list or /etc/apt/sources.list.d, so no" \
      "mirror for ${codename}-backports; QEMU interop tests will be skipped" >&2
    exit 0
  fi
  tmp=$(mktemp -d /tmp/install-qemu.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  # the machine's own sources.list stays in use beside sources.list.d; backports is added on its mirror
  { [[ -f /etc/apt/sources.list ]] && cat /etc/apt/sources.list; echo "deb $mirror ${codename}-backports main"; } > "$tmp/bp.list"
  APT_BP=(-o "Dir::Etc::sourcelist=$tmp/bp.list" -o "Dir::Etc::sourceparts=/etc/apt/sources.list.d"
          -o "APT::Get::List-Cleanup=0")
  echo "install-qemu: ${codename}-backports from $mirror (the mirror of ${codename} in the apt configuration)"
fi

echo "install-qemu: apt-get update (stable + ${codename}-backports)"
timeout 300 apt-get update -qq ${APT_BP[@]+"${APT_BP[@]}"} >/dev/null || echo "install-qemu: apt-get update had errors" >&2
if DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
     ${APT_BP[@]+"${APT_BP[@]}"} -t "${codename}-backports" qemu-system-x86 >/dev/null; then
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
