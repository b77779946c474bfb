#!/usr/bin/env bash
# Install and prepare what Flagella needs from the machine: Debian packages, kernel headers
# for bcc, the BPF filesystem. Idempotent; run as root.
set -euo pipefail

need_pkgs=(bpfcc-tools python3-bpfcc libbpfcc bpftool nftables iproute2 iptables iperf3 sockperf strace
           etcd-server curl python3-venv nghttp2-client wrk)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

kver=$(uname -r)
have_headers=no
[ -e "/lib/modules/$kver/build/include/generated/autoconf.h" ] && have_headers=yes

if [ ${#missing[@]} -gt 0 ] || [ "$have_headers" = no ]; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [ "$have_headers" = no ]; then
  # Prefer headers that match this kernel; otherwise the newest 6.x cloud headers in apt.
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver"
  else
    pkg=$(apt-cache search --names-only '^linux-headers-6\.[0-9.+a-z-]*-cloud-amd64$' \
          | awk '{print $1}' | sort -V | tail -n 1)
    [ -n "$pkg" ] || { echo "setup: no linux-headers-6.*-cloud-amd64 package found" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"
    arch_dir="/usr/src/linux-headers-${pkg#linux-headers-}"
    common_dir="${arch_dir%-cloud-amd64}-common"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$arch_dir" "/lib/modules/$kver/build"
    ln -sfn "$common_dir" "/lib/modules/$kver/source"
  fi
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "setup-system: ok (kernel $kver, headers $(readlink -f /lib/modules/$kver/build))"
