# One image for the five medpipe binaries; Kubernetes picks the binary with `command`.
#
#   docker build -t medpipe:0.1.0 .
#
# Build stage: the release binaries, as `cargo build --release --workspace --bins` builds
# them in CI. librdkafka and zlib are compiled in (rdkafka's bundled build, `libz-static`);
# OpenSSL, which librdkafka needs for SASL/SCRAM and TLS (rdkafka's `ssl`), is linked from
# the system (libssl-dev here, libssl3 in the run image), beside glibc and libgcc.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/medpipe \
       target/release/medpipe-ingestion \
       target/release/medpipe-anonymization \
       target/release/medpipe-canonization \
       target/release/medpipe-auditing \
       /out/

# Run stage: distroless (glibc, libgcc, libssl3, CA certificates; no shell, no package
# manager), as its non-root user. The root file system can be mounted read-only: the stages write
# only to the volumes they are given (ingestion's folders, the audit store) and /tmp is
# not needed. Kubernetes probes /healthz and /readyz, so there is no HEALTHCHECK.
FROM gcr.io/distroless/cc-debian12:nonroot
# checkov:skip=CKV_DOCKER_2:Kubernetes probes /healthz and /readyz; distroless has no shell or curl for a HEALTHCHECK
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/medpipe"]
CMD ["--help"]
