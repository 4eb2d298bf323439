# syntax=docker/dockerfile:1
# The qcow2-csi image: the plugin (`qcow2-csi`) and the image tool (`qcow2util`) on a slim
# Debian with what the node plugin runs: mkfs/fsck/grow tools, mount and losetup, nbdfuse and
# fusermount3 (hosts without the nbd module), kmod (loading nbd). Build: `make image`.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# Build as an unprivileged user; cargo's registry goes to its home, not /usr/local/cargo.
# The directories the cache mounts land in are made (and owned) here, not by the mounts.
RUN groupadd --gid 10001 builder \
    && useradd --create-home --uid 10001 --gid 10001 builder \
    && mkdir -p /home/builder/src /home/builder/.cargo /home/builder/out \
    && chown -R builder:builder /home/builder
USER 10001:10001
ENV CARGO_HOME=/home/builder/.cargo
WORKDIR /home/builder/src
COPY --chown=builder:builder . .
RUN --mount=type=cache,target=/home/builder/.cargo/registry,uid=10001,gid=10001 \
    --mount=type=cache,target=/home/builder/src/target,uid=10001,gid=10001 \
    cargo build --release --locked -p qcow2-csi -p qcow2-engine --bins \
    && cp target/release/qcow2-csi target/release/qcow2util /home/builder/out/

FROM debian:${DEBIAN_RELEASE}-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="qcow2-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver: block storage on qcow2 image files" \
      org.opencontainers.image.source="https://github.com/qcow2-csi/qcow2-csi" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs \
        xfsprogs \
        util-linux \
        mount \
        nbdfuse \
        fuse3 \
        kmod \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /home/builder/out/qcow2-csi /home/builder/out/qcow2util /usr/local/bin/
# The node plugin mounts, attaches loop devices and loads modules: it runs privileged, as
# root, by design (the chart sets the securityContext).
ENTRYPOINT ["/usr/local/bin/qcow2-csi"]
CMD ["--help"]
