# syntax=docker/dockerfile:1
#
# ichibase in a container:
#   docker build -t ichibase .
#   docker run -p 8080:8080 -v ichibase-data:/data ichibase
#
# Build stage: a release binary. SQLite is compiled from the bundled C sources (rusqlite
# "bundled"), so the image needs only Rust and a C compiler, both in rust:*-bookworm.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Cargo.toml declares [[bench]] point_select, so benches/ must be present for the manifest to load;
# docs/bundles.md is compiled into the binary (the model's bundle guide). tests/dockerfile.rs
# checks that every file the build reads is copied here.
COPY Cargo.toml Cargo.lock build.rs ./
# .cargo/config.toml sets LIBSQLITE3_FLAGS (SQLite's pre-update hook, for change capture).
COPY .cargo ./.cargo
COPY src ./src
COPY benches ./benches
COPY docs ./docs
# Cache mounts keep the registry and compiled dependencies between builds (BuildKit); the
# binary is copied out of the cached target directory so it lands in the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ichibase \
    && install -m 0755 target/release/ichibase /usr/local/bin/ichibase

# Runtime stage: the binary only (it links glibc dynamically, as in bookworm).
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 ichibase \
    && useradd --system --uid 10001 --gid ichibase --home-dir /data --no-create-home --shell /usr/sbin/nologin ichibase \
    && mkdir -p /data \
    && chown ichibase:ichibase /data
COPY --from=build /usr/local/bin/ichibase /usr/local/bin/ichibase
USER ichibase:ichibase
# The data directory (SQLite database and WAL); created by chown above so a fresh named volume
# is writable by the non-root user.
VOLUME /data
EXPOSE 8080
# No curl in slim images: bash's /dev/tcp asks GET /ping directly. Adjust the port if you
# override --listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /ping HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && grep -q '^Ok\\.' <&3"]
# ichibase stops cleanly on SIGTERM (docker stop), finishing in-flight requests first.
ENTRYPOINT ["ichibase"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--data-dir", "/data"]
