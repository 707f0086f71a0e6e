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

write_config() {
  mkdir -p "$data_dir/logs"
  cat >"$config" <<EOF
process.roles=broker,controller
node.id=$node_id
$(if [ -n "$voters" ]; then echo "controller.quorum.voters=$voters"; else echo "controller.quorum.bootstrap.servers=127.0.0.1:$controller_port"; fi)
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
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
    "${java_cmd[@]}" kafka.tools.StorageTool format --config "$config" --cluster-id "$cluster_id" \
      "${standalone[@]}" --ignore-formatted >"$data_dir/format.log" 2>&1
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
