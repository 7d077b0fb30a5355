# etcd for the container fault test (tests/tests/containers_faults.rs): Debian's
# etcd-server (3.4, the version the process-level tests run) on the local
# debian:bookworm-slim, for machines without a registry. Made by scripts/base-images.sh
# as moe-test-etcd:3.4; not shipped.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    etcd --version
# Not root: the test gives it `--data-dir /tmp/etcd`.
USER 65534:65534
EXPOSE 2379
ENTRYPOINT ["etcd"]
