# The images that need a shell and tools, on minimal Debian 12 root file systems that
# scripts/lib/rootfs.sh makes with debootstrap and imports (ROOTFS_BASE, ROOTFS_POSTGRES):
# hodei/agent, hodei/admin and hodei/postgres. Built by scripts/build-images.sh, one --target
# per image, in a context it prepares: bin/ (the Hodei binaries) and sh/ (this folder's
# scripts). Every image runs as uid 10001.
ARG ROOTFS_BASE
ARG ROOTFS_POSTGRES

# The agent runs jobs (a shell and the usual tools for them here) as its own user (uid 10001:
# HODEI_JOB_USER needs root). tini, as PID 1, reaps the processes jobs orphan.
# `hodei-compose-agent` picks a free worker id and NATS key in compose (see compose/).
FROM ${ROOTFS_BASE} AS agent
COPY bin/hodei-agent bin/hodei-probe /usr/local/bin/
COPY sh/agent-slot.sh /usr/local/bin/hodei-compose-agent
RUN install -d -o 10001 -g 10001 -m 0755 /var/lib/hodei /var/lib/hodei/work /var/lib/hodei/slots \
    && install -d -o 10001 -g 10001 -m 0700 /etc/hodei
ENV HODEI_METRICS_ADDR=0.0.0.0:9090 \
    HODEI_WORK_DIR=/var/lib/hodei/work \
    HOME=/var/lib/hodei
WORKDIR /var/lib/hodei
USER 10001:10001
EXPOSE 9090
# Healthy: alive, and connected to NATS.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/hodei-probe", "127.0.0.1:9090", "/healthz", "/readyz"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/hodei-agent"]

# The operators' tools: the `hodei` CLI and `hodei-admin` (tokens, TLS, NATS and secrets
# keys), with a shell to script them. `hodei-compose-init` makes compose's keys.
FROM ${ROOTFS_BASE} AS admin
COPY bin/hodei bin/hodei-admin bin/hodei-probe /usr/local/bin/
COPY sh/init.sh /usr/local/bin/hodei-compose-init
RUN install -d -o 10001 -g 10001 -m 0755 /var/lib/hodei \
    && install -d -o 10001 -g 10001 -m 0700 /etc/hodei /etc/hodei-agent
ENV HOME=/var/lib/hodei
WORKDIR /var/lib/hodei
USER 10001:10001
CMD ["hodei", "--help"]

# PostgreSQL 15 from Debian (with the security updates of the day the root file system was
# made), run as `postgres` (uid 10001). The entry point makes the cluster on first start.
FROM ${ROOTFS_POSTGRES} AS postgres
COPY sh/postgres-entrypoint.sh /usr/local/bin/hodei-postgres
RUN install -d -o 10001 -g 10001 -m 0700 /var/lib/postgresql/data \
    && install -d -o 10001 -g 10001 -m 2775 /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data/pgdata
USER 10001:10001
EXPOSE 5432
VOLUME /var/lib/postgresql/data
# SIGTERM would be a "smart" shutdown, which waits for every client (the services' pools) to
# leave; SIGINT is "fast": clients are disconnected, and the data is safe.
STOPSIGNAL SIGINT
HEALTHCHECK --interval=2s --timeout=3s --start-period=60s --retries=3 \
    CMD ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]
ENTRYPOINT ["/usr/local/bin/hodei-postgres"]
