# syntax=docker/dockerfile:1
#
# The mailscope image: one static-ish Rust binary (rustls, no OpenSSL) on a distroless base with
# CA certificates and no shell, running as the unprivileged user 65532.
#
#   DOCKER_BUILDKIT=1 docker build -t mailscope:0.1.0 .
#
# The chart runs it as `mailscope serve --no-worker`, `serve --worker-only`, `migrate` and
# `sandbox`; see docs/deploy.md. Pin both base images by digest in production, e.g.
#   --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:...

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions in Cargo.lock, or fail. The cache mounts keep the
# crate registry and compiled dependencies between builds; the binary is copied out of the target
# mount because cache mounts are not part of the image. `--help` proves it runs on this libc.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin mailscope \
    && install -D -m 0755 target/release/mailscope /out/mailscope \
    && /out/mailscope --help > /dev/null

# Debian 12 like the build stage, so the glibc the binary links against is there; it brings
# CA certificates and tzdata, and no shell or package manager.
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="mailscope" \
      org.opencontainers.image.description="Scope a Microsoft Entra app's Graph application permissions to chosen Exchange Online mailboxes, and prove it." \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/mailscope /usr/local/bin/mailscope
# Inside a container the API must listen on every interface; logs go out as JSON lines.
ENV MAILSCOPE_LISTEN=0.0.0.0:8080 \
    MAILSCOPE_LOG_FORMAT=json
# distroless "nonroot"; numeric so Kubernetes can verify runAsNonRoot.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mailscope"]
CMD ["serve"]
