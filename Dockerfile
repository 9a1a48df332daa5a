# syntax=docker/dockerfile:1
#
# pgswitch container image.
#
#   docker build -t pgswitch .
#   docker run --init -v "$PWD/pgswitch.toml:/etc/pgswitch/pgswitch.toml:ro" \
#       -e PGSWITCH_ADMIN_TOKEN -p 6432:6432 -p 127.0.0.1:9930:9930 pgswitch
#
# - Runs as the unprivileged user `pgswitch` (uid 10001), never as root.
# - The config file is mounted at $PGSWITCH_CONFIG; nothing secret is in the image: passwords live
#   in the mounted config (or a secret file), the admin token in PGSWITCH_ADMIN_TOKEN.
# - Inside a container, set listen = "0.0.0.0:6432" and admin_listen = "0.0.0.0:9930" so that
#   clients and Prometheus can reach them. The admin API's changing endpoints then need a token
#   (admin_token / PGSWITCH_ADMIN_TOKEN); without one they answer only to loopback peers
#   (`docker exec ... pgswitch switchover --to n1`).
# - HEALTHCHECK runs `pgswitch healthcheck` (GET /health on $PGSWITCH_ADMIN, default
#   http://127.0.0.1:9930): nothing but pgswitch is needed in the image, no curl.
# - The standalone state file (coordination.state_file) belongs under /var/lib/pgswitch, a volume.
# - Use `docker run --init` (or compose `init: true`) so that hook processes are reaped.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pgswitch \
    && install -D -m 0755 target/release/pgswitch /out/pgswitch \
    && strip --strip-debug /out/pgswitch

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="pgswitch" \
      org.opencontainers.image.description="PostgreSQL proxy with connection pooling and built-in failover" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pgswitch \
    && useradd --system --uid 10001 --gid pgswitch --home-dir /var/lib/pgswitch \
       --shell /usr/sbin/nologin pgswitch \
    && install -d -o pgswitch -g pgswitch -m 0750 /var/lib/pgswitch \
    && install -d -m 0755 /etc/pgswitch
COPY --from=build /out/pgswitch /usr/local/bin/pgswitch
ENV PGSWITCH_CONFIG=/etc/pgswitch/pgswitch.toml \
    PGSWITCH_ADMIN=http://127.0.0.1:9930
VOLUME ["/var/lib/pgswitch"]
WORKDIR /var/lib/pgswitch
USER 10001:10001
EXPOSE 6432 9930
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["pgswitch", "healthcheck"]
CMD ["pgswitch", "run"]
