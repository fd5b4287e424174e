#!/bin/sh
# `hodei-compose-init` (in hodei/admin): makes the keys a compose deployment runs with, once,
# and keeps them on later runs. Compose runs it as the one-shot service `init` before anything
# else starts.
#
#   /etc/hodei/tls/            a local CA and a server certificate for the names nats,
#                              api-gateway, localhost and 127.0.0.1 (`hodei-admin tls init`),
#                              served by nats-server and by the gateway
#   /etc/hodei/nats/           a NATS nkey per service and one per agent slot, agent-1 to
#                              agent-$HODEI_AGENT_SLOTS (default 16), and the server's
#                              authorization block (`hodei-admin nats init|agent-add`), plus
#                              nats.conf, which includes it
#   /etc/hodei/secrets.xk      the control plane's secrets key (`hodei-admin secrets init`);
#   /etc/hodei/secrets.pub     its public half, for the gateway's HODEI_SECRETS_PUBLIC_KEY
#   /etc/hodei-agent/          what agents get, in a volume of their own: the slots' seeds and
#                              the CA certificate (no service key, no CA key, no secrets key)
#
# Agent slots added later (a larger HODEI_AGENT_SLOTS) need a restart of nats to be admitted.
set -eu

config=/etc/hodei
agent_keys=/etc/hodei-agent
slots="${HODEI_AGENT_SLOTS:-16}"
case "$slots" in
'' | *[!0-9]*)
    echo "hodei-compose-init: HODEI_AGENT_SLOTS must be a number, not '$slots'" >&2
    exit 2
    ;;
esac

if [ ! -f "$config/tls/ca.pem" ]; then
    hodei-admin tls init --dir "$config/tls" --name nats --name api-gateway --name localhost \
        --name 127.0.0.1 >/dev/null
    echo "hodei-compose-init: made a CA and a server certificate in $config/tls" >&2
fi

hodei-admin nats init --dir "$config/nats" \
    --tls-cert "$config/tls/server.pem" --tls-key "$config/tls/server-key.pem" >/dev/null
i=1
added=0
while [ "$i" -le "$slots" ]; do
    if [ ! -f "$config/nats/agents/agent-$i.nk" ]; then
        hodei-admin nats agent-add --dir "$config/nats" --id "agent-$i" >/dev/null 2>&1
        added=$((added + 1))
    fi
    i=$((i + 1))
done
[ "$added" -eq 0 ] || echo "hodei-compose-init: made NATS keys for $added agent slots" >&2

cat >"$config/nats/nats.conf" <<'EOF'
# Written by hodei-compose-init. One nats-server with JetStream; TLS and the nkeys of
# auth.conf (hodei-admin nats) only.
server_name: hodei-nats
port: 4222
http_port: 8222
jetstream {
  store_dir: /data
}
include auth.conf
EOF

hodei-admin secrets init --file "$config/secrets.xk" >"$config/secrets.pub"

# Agents get their slots' seeds and the CA, nothing else.
for seed in "$config"/nats/agents/agent-*.nk; do
    cp "$seed" "$agent_keys/"
done
cp "$config/tls/ca.pem" "$agent_keys/ca.pem"
echo "hodei-compose-init: ready ($slots agent slots)" >&2
