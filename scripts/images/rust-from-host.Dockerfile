# A local stand-in for the public `rust:<version>-slim-bookworm` image, for machines
# without a registry: Debian (the locally imported debian:bookworm-slim) with a C
# compiler, plus the host's Rust toolchain copied into the build context as ./rust.
# Made by scripts/base-images.sh; not shipped.
FROM debian:bookworm-slim
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev ca-certificates; \
    rm -rf /var/lib/apt/lists/*
# The host's own extra CA certificates (a TLS-inspecting egress proxy, say), so cargo
# reaches crates.io from the build stage as it does from the host.
COPY extra-ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY rust /usr/local/rust
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/usr/local/cargo
RUN cargo --version && rustc --version
