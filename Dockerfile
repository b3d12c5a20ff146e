# syntax=docker/dockerfile:1
# Multi-stage build of the one `workerpush` binary (every role is a subcommand of it).
# No system protoc is needed: build.rs compiles the proto with protox.
# Build and runtime share Debian bookworm, so the binary finds the glibc it was linked against.

FROM rust:1.95-bookworm AS build
# The build context has no .git: pass the commit for --version and workerpush_build_info
# (docker build --build-arg WORKERPUSH_COMMIT=$(git rev-parse --short=12 HEAD) .).
ARG WORKERPUSH_COMMIT=unknown
WORKDIR /src
COPY . .
# The caches keep the registry and target/ between builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin workerpush \
    && install -D -m 0755 target/release/workerpush /out/workerpush

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 workerpush \
    && useradd --system --uid 10001 --gid workerpush --home-dir /var/lib/workerpush \
        --shell /usr/sbin/nologin workerpush \
    && mkdir -p /certs /data /workers /var/lib/workerpush \
    && chown workerpush:workerpush /certs /data /workers /var/lib/workerpush
COPY --from=build /out/workerpush /usr/local/bin/workerpush
# An empty named volume mounted on /certs, /data or /workers starts with their ownership, so the
# unprivileged user can write its certificates, store and worker files there.
# Numeric, so that Kubernetes (runAsNonRoot) can verify it is not root.
USER 10001:10001
WORKDIR /var/lib/workerpush
ENV CERTS_DIR=/certs DATA_DIR=/data
EXPOSE 50051/tcp 50052/udp 8082/tcp 8080/tcp
ENTRYPOINT ["workerpush"]
CMD ["--help"]
