#!/usr/bin/env bash
# Start the servers the suite needs when they do not answer (a plain Debian machine): Redis on 6379,
# RabbitMQ on 5672 (guest/guest), PostgreSQL on 5432 (trust on loopback, database `test`).
# Each is left alone when it already answers, or when DSPEX_TEST_*_URL points the suite elsewhere.
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
wait_for_port() {
  for _ in $(seq 300); do answers "$1" && return 0; sleep 0.2; done
  echo "services.sh: nothing answers on 127.0.0.1:$1 after 60 s" >&2
  return 1
}

# Tests that restart Redis start their own redis-server on a free port: the binary must be there;
# the Redis Cluster and Sentinel tests start theirs too (redis-cli joins the cluster, from redis-tools).
command -v redis-server >/dev/null 2>&1 || apt_install redis-server
command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
if [ -z "${DSPEX_TEST_REDIS_URL:-}" ] && ! answers 6379; then
  redis-server --daemonize yes --port 6379 --bind 127.0.0.1 --save "" --appendonly no
  wait_for_port 6379
fi

if [ -z "${DSPEX_TEST_AMQP_URL:-}" ] && ! answers 5672; then
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
  wait_for_port 5672
fi

if [ -z "${DSPEX_TEST_POSTGRES_URL:-}" ] && ! answers 5432; then
  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || apt_install postgresql
  bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
  data=/var/lib/dspex-test-postgres
  if [ ! -s "$data/PG_VERSION" ]; then
    install -d -o postgres -g postgres "$data"
    su postgres -c "$bin/initdb -D $data -A trust -U postgres" >/dev/null
  fi
  su postgres -c "$bin/pg_ctl -D $data -l $data/server.log -o '-c listen_addresses=127.0.0.1 -p 5432' start" >/dev/null
  wait_for_port 5432
  su postgres -c "$bin/psql -h 127.0.0.1 -p 5432 -U postgres -tc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" \
    | grep -q 1 || su postgres -c "$bin/createdb -h 127.0.0.1 -p 5432 -U postgres test"
fi
