#!/usr/bin/env bash
# A local Apache Kafka node in KRaft mode (combined broker + controller), run from the official jars
# that pom.xml fetches from Maven Central. No Docker, no downloads beyond Maven. Alone it is a
# single-node cluster; several, each with its own data dir and ports and the same KAFKA_VOTERS and
# KAFKA_CLUSTER_ID, form a replicated cluster (service/local_kafka.py's LocalKafkaCluster does that).
#
#   kafka.sh fetch            fetch the jars (once; Maven caches them)
#   kafka.sh start            format storage if new, start in the background, wait until ready
#   kafka.sh launch           the same without waiting (start every node of a cluster, then wait)
#   kafka.sh wait             wait until the node takes clients
#   kafka.sh stop             stop the node started from the same data dir (SIGTERM, then SIGKILL)
#   kafka.sh kill             kill -9 the node (a crash, for failure tests)
#   kafka.sh status           exit 0 if it is running
#
# Settings (environment):
#   KAFKA_PORT            client port (default 9092)
#   KAFKA_CONTROLLER_PORT controller port (default KAFKA_PORT + 1)
#   KAFKA_DATA_DIR        log dirs, pid file and broker.log (default .kafka under the repository)
#   KAFKA_READY_TIMEOUT   seconds to wait for the broker (default 90)
#   KAFKA_NODE_ID         this node's id (default 1)
#   KAFKA_VOTERS          the controller quorum, id@host:port,... (default: this node alone)
#   KAFKA_CLUSTER_ID      shared by every node of a cluster (default: a new random one)
#   KAFKA_REPLICATION     replicas of internal and new topics (default 1); min.insync.replicas is
#                         2 when it is 3 or more, else 1
#   KAFKA_TLS_DIR         with ca.pem (the CA clients' certificates must chain to) and broker.pem (the
#                         broker's private key and certificate): adds two listeners, SASL_SSL with
#                         SCRAM-SHA-512 on KAFKA_SASL_SSL_PORT and SSL requiring a client certificate
#                         on KAFKA_SSL_PORT (the PLAINTEXT one stays, for the broker itself)
#   KAFKA_SCRAM_USER      name=password of a SCRAM-SHA-512 user created when the storage is formatted
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
libs="$here/target/libs"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-$((port + 1))}"
data_dir="${KAFKA_DATA_DIR:-$repo/.kafka}"
ready_timeout="${KAFKA_READY_TIMEOUT:-90}"
node_id="${KAFKA_NODE_ID:-1}"
voters="${KAFKA_VOTERS:-}"
replication="${KAFKA_REPLICATION:-1}"
tls_dir="${KAFKA_TLS_DIR:-}"
scram_user="${KAFKA_SCRAM_USER:-}"
min_isr=1
if [ "$replication" -ge 3 ]; then min_isr=2; fi
pid_file="$data_dir/broker.pid"
log_file="$data_dir/broker.log"
config="$data_dir/server.properties"

# A small heap: the broker shares a 2-core machine with training.
java_cmd=(java -Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true
  -Dlog4j2.configurationFile="$here/log4j2.properties" -cp "$libs/*")

fetch() {
  if [ ! -f "$libs/.complete" ]; then
    mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies
    touch "$libs/.complete"
  fi
}

# The listeners: PLAINTEXT and CONTROLLER, and with KAFKA_TLS_DIR a SASL_SSL (SCRAM) and an SSL
# (client certificates required) one.
secure_listeners() {
  if [ -z "$tls_dir" ]; then
    echo "listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port"
    echo "advertised.listeners=PLAINTEXT://127.0.0.1:$port"
    echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    return
  fi
  local sasl="SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT" tls="SSL://127.0.0.1:$KAFKA_SSL_PORT"
  echo "listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port,$sasl,$tls"
  echo "advertised.listeners=PLAINTEXT://127.0.0.1:$port,$sasl,$tls"
  echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL"
  echo "sasl.enabled.mechanisms=SCRAM-SHA-512"
  echo "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;"
  echo "listener.name.ssl.ssl.client.auth=required"
  echo "ssl.keystore.type=PEM"
  echo "ssl.keystore.location=$tls_dir/broker.pem"
  echo "ssl.truststore.type=PEM"
  echo "ssl.truststore.location=$tls_dir/ca.pem"
}

write_config() {
  mkdir -p "$data_dir/logs"
  cat >"$config" <<EOF
process.roles=broker,controller
node.id=$node_id
$(if [ -n "$voters" ]; then echo "controller.quorum.voters=$voters"; else echo "controller.quorum.bootstrap.servers=127.0.0.1:$controller_port"; fi)
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
$(secure_listeners)
log.dirs=$data_dir/logs
num.partitions=3
default.replication.factor=$replication
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replication
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=$replication
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$replication
share.coordinator.state.topic.min.isr=$min_isr
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
EOF
}

running() {
  [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

launch() {
  fetch
  if running; then
    echo "kafka: already running (pid $(cat "$pid_file")) on 127.0.0.1:$port"
    return 0
  fi
  write_config
  if [ ! -f "$data_dir/logs/meta.properties" ]; then
    cluster_id="${KAFKA_CLUSTER_ID:-$("${java_cmd[@]}" kafka.tools.StorageTool random-uuid)}"
    # A single node bootstraps its own quorum; cluster nodes name theirs in KAFKA_VOTERS.
    standalone=(--standalone)
    if [ -n "$voters" ]; then standalone=(); fi
    scram=()
    if [ -n "$scram_user" ]; then
      scram=(--add-scram "SCRAM-SHA-512=[name=${scram_user%%=*},password=${scram_user#*=}]")
    fi
    "${java_cmd[@]}" kafka.tools.StorageTool format --config "$config" --cluster-id "$cluster_id" \
      "${standalone[@]}" "${scram[@]}" --ignore-formatted >"$data_dir/format.log" 2>&1
  fi
  : >"$log_file"
  nohup "${java_cmd[@]}" kafka.Kafka "$config" >>"$log_file" 2>&1 &
  echo $! >"$pid_file"
}

wait_ready() {
  local waited=0
  until grep -q "Kafka Server started" "$log_file"; do
    if ! running; then
      echo "kafka: broker exited during start-up; last lines of $log_file:" >&2
      tail -n 30 "$log_file" >&2
      return 1
    fi
    if [ "$waited" -ge "$((ready_timeout * 2))" ]; then
      echo "kafka: not ready after ${ready_timeout}s; see $log_file" >&2
      return 1
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "kafka: node $node_id ready on 127.0.0.1:$port (pid $(cat "$pid_file"), data $data_dir)"
}

start() {
  launch
  wait_ready
}

kill_node() {
  if running; then
    kill -9 "$(cat "$pid_file")"
    echo "kafka: node $node_id killed"
  fi
  rm -f "$pid_file"
}

stop() {
  if ! running; then
    echo "kafka: not running"
    rm -f "$pid_file"
    return 0
  fi
  local pid
  pid="$(cat "$pid_file")"
  kill "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pid_file"
  echo "kafka: stopped"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  launch) launch ;;
  wait) wait_ready ;;
  stop) stop ;;
  kill) kill_node ;;
  status) running ;;
  *)
    echo "usage: $0 fetch|start|launch|wait|stop|kill|status" >&2
    exit 2
    ;;
esac
