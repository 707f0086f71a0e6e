#!/usr/bin/env bash
# A local single-node Apache Kafka broker in KRaft mode (combined broker + controller), run from the
# official jars that pom.xml fetches from Maven Central. No Docker, no downloads beyond Maven.
#
#   kafka.sh fetch            fetch the jars (once; Maven caches them)
#   kafka.sh start            format storage if new, start in the background, wait until ready
#   kafka.sh stop             stop the broker started from the same data dir
#   kafka.sh status           exit 0 if it is running
#
# Settings (environment):
#   KAFKA_PORT            client port (default 9092)
#   KAFKA_CONTROLLER_PORT controller port (default KAFKA_PORT + 1)
#   KAFKA_DATA_DIR        log dirs, pid file and broker.log (default .kafka under the repository)
#   KAFKA_READY_TIMEOUT   seconds to wait for the broker (default 90)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
libs="$here/target/libs"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-$((port + 1))}"
data_dir="${KAFKA_DATA_DIR:-$repo/.kafka}"
ready_timeout="${KAFKA_READY_TIMEOUT:-90}"
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
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$data_dir/logs
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
EOF
}

running() {
  [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

start() {
  fetch
  if running; then
    echo "kafka: already running (pid $(cat "$pid_file")) on 127.0.0.1:$port"
    return 0
  fi
  write_config
  if [ ! -f "$data_dir/logs/meta.properties" ]; then
    cluster_id="$("${java_cmd[@]}" kafka.tools.StorageTool random-uuid)"
    "${java_cmd[@]}" kafka.tools.StorageTool format --config "$config" --cluster-id "$cluster_id" \
      --standalone --ignore-formatted >"$data_dir/format.log" 2>&1
  fi
  : >"$log_file"
  nohup "${java_cmd[@]}" kafka.Kafka "$config" >>"$log_file" 2>&1 &
  echo $! >"$pid_file"
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
  echo "kafka: ready on 127.0.0.1:$port (pid $(cat "$pid_file"), data $data_dir)"
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
  stop) stop ;;
  status) running ;;
  *)
    echo "usage: $0 fetch|start|stop|status" >&2
    exit 2
    ;;
esac
