#!/usr/bin/env bash
# Local dev stack for medpipe: a real single-node Apache Kafka (KRaft) and a
# Confluent-compatible Schema Registry (rivven-schema), no Docker.
#
#   scripts/devstack.sh install   fetch Java/Maven (apt, only if missing), the
#                                 Kafka jars (Maven Central) and rivven-schema
#                                 (crates.io) into the cache
#   scripts/devstack.sh start     install, then start both (idempotent)
#   scripts/devstack.sh stop      stop both (idempotent)
#   scripts/devstack.sh status    exit 0 if both are up and answering, else 3
#   scripts/devstack.sh reset     stop, then delete Kafka data and logs
#   scripts/devstack.sh crash-broker   SIGKILL the broker (fault tests; 'start' brings
#                                      it back with its data)
#   scripts/devstack.sh pause-broker   SIGSTOP the broker (it stops answering, keeps
#                                      its sockets); resume-broker sends SIGCONT
#   scripts/devstack.sh pause-registry SIGSTOP the Schema Registry (an outage that keeps
#                                      its in-memory schemas); resume-registry: SIGCONT
#
# Endpoints:  Kafka bootstrap 127.0.0.1:9092 (KRaft controller 127.0.0.1:9093;
#             SASL/SCRAM-SHA-512 with ACLs on 127.0.0.1:9094, and the same over TLS on
#             127.0.0.1:9095, its certificate signed by a dev CA made at first start:
#             $MEDPIPE_STATE/tls/ca.crt)
#             Schema Registry http://127.0.0.1:8081 (schemas in memory only)
#
# Environment:
#   MEDPIPE_CACHE    jars and tools       (default: ~/.cache/medpipe)
#   MEDPIPE_STATE    data, logs, pids     (default: $MEDPIPE_CACHE/devstack)
#   KAFKA_HEAP_OPTS  broker heap          (default: -Xms256m -Xmx1g)
#
# Admin CLIs run from the same classpath, e.g.:
#   java -Dlog4j2.configurationFile=scripts/devstack/kafka/log4j2-tools.properties \
#        -cp "$HOME/.cache/medpipe/kafka-4.1.1/libs/*" \
#        org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 --list
set -euo pipefail

readonly KAFKA_VERSION=4.1.1
readonly RIVVEN_VERSION=0.0.22
readonly KAFKA_HOST=127.0.0.1
readonly KAFKA_PORT=9092
readonly CONTROLLER_PORT=9093
readonly SASL_PORT=9094
readonly SASL_SSL_PORT=9095
readonly REGISTRY_HOST=127.0.0.1
readonly REGISTRY_PORT=8081
# A broker restarted after a SIGKILL first recovers every partition's log; with many
# partitions on two busy cores that has taken over 90 s (a game day's ninth run).
readonly KAFKA_START_TIMEOUT=300
readonly REGISTRY_START_TIMEOUT=30
readonly STOP_TIMEOUT=30

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly DEVSTACK_DIR=$SCRIPT_DIR/devstack
readonly POM=$DEVSTACK_DIR/kafka/pom.xml
readonly SERVER_PROPERTIES_TEMPLATE=$DEVSTACK_DIR/kafka/server.properties
readonly LOG4J2_CONFIG=$DEVSTACK_DIR/kafka/log4j2.properties
readonly KAFKA_PING=$DEVSTACK_DIR/kafka_ping.py

readonly MEDPIPE_CACHE=${MEDPIPE_CACHE:-$HOME/.cache/medpipe}
readonly MEDPIPE_STATE=${MEDPIPE_STATE:-$MEDPIPE_CACHE/devstack}

readonly KAFKA_HOME=$MEDPIPE_CACHE/kafka-$KAFKA_VERSION
readonly KAFKA_LIBS=$KAFKA_HOME/libs
readonly KAFKA_MARKER=$KAFKA_HOME/.libs-complete
readonly RIVVEN_ROOT=$MEDPIPE_CACHE/tools/rivven-schema-$RIVVEN_VERSION
readonly RIVVEN_BIN=$RIVVEN_ROOT/bin/rivven-schema

readonly DATA_DIR=$MEDPIPE_STATE/kafka-data
readonly LOG_DIR=$MEDPIPE_STATE/logs
readonly KAFKA_CONFIG=$MEDPIPE_STATE/server.properties
readonly TLS_DIR=$MEDPIPE_STATE/tls
readonly KAFKA_PID_FILE=$MEDPIPE_STATE/kafka.pid
readonly REGISTRY_PID_FILE=$MEDPIPE_STATE/schema-registry.pid
readonly KAFKA_LOG=$LOG_DIR/server.log
readonly KAFKA_STDOUT=$LOG_DIR/kafka.out
readonly REGISTRY_LOG=$LOG_DIR/schema-registry.log
readonly LOCK_FILE=$MEDPIPE_STATE/.devstack.lock

KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}

# ----------------------------------------------------------------- helpers --

log() { printf 'devstack: %s\n' "$*"; }
warn() { printf 'devstack: %s\n' "$*" >&2; }
die() {
  printf 'devstack: ERROR: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo pipefail/{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

have() { command -v "$1" >/dev/null 2>&1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif have sudo; then
    sudo "$@"
  else
    die "need root to run: $* (no sudo available)"
  fi
}

APT_UPDATED=0
apt_install() {
  have apt-get || die "cannot install $* automatically (no apt-get); please install it yourself"
  log "installing $* with apt-get"
  if [[ $APT_UPDATED -eq 0 ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
      || die "apt-get update failed"
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" \
    || die "apt-get install $* failed"
}

# Serialize concurrent invocations that share a state dir (e.g. two `start`s).
take_lock() {
  mkdir -p "$MEDPIPE_STATE"
  have flock || return 0
  exec 9>"$LOCK_FILE"
  if ! flock -n 9; then
    log "waiting for another devstack.sh using $MEDPIPE_STATE ..."
    flock 9
  fi
}

# Full command line of a live process ('' if gone).
proc_cmdline() {
  local pid=$1
  [[ -r /proc/$pid/cmdline ]] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true
}

# True if PID exists and is not a zombie (a just-died child of ours would be).
pid_alive() {
  local pid=${1:-} state
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || true
  [[ $state != Z ]]
}

is_our_kafka() {
  local cmd
  cmd=$(proc_cmdline "$1")
  [[ $cmd == *" kafka.Kafka $KAFKA_CONFIG"* ]]
}

is_our_registry() {
  local cmd
  cmd=$(proc_cmdline "$1")
  [[ $cmd == "$RIVVEN_BIN serve "* ]]
}

# PIDs listening on a TCP port (best effort; may be empty if unknown).
port_pids() {
  local port=$1
  if have ss; then
    ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true
  elif have lsof; then
    lsof -nP -t -iTCP:"$port" -sTCP:LISTEN 2>/dev/null | sort -u || true
  fi
}

port_in_use() {
  local port=$1
  if have ss; then
    [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

# Print the PID of our running broker/registry (from the pid file, or, if
# that was lost, from whoever listens on our port with our command line).
# Returns 1 if not running.
find_pid() {
  local which=$1 pid_file port check pid
  case $which in
    kafka) pid_file=$KAFKA_PID_FILE port=$KAFKA_PORT check=is_our_kafka ;;
    registry) pid_file=$REGISTRY_PID_FILE port=$REGISTRY_PORT check=is_our_registry ;;
  esac
  if [[ -s $pid_file ]]; then
    pid=$(<"$pid_file")
    if [[ $pid =~ ^[0-9]+$ ]] && pid_alive "$pid" && "$check" "$pid"; then
      echo "$pid"
      return 0
    fi
  fi
  for pid in $(port_pids "$port"); do
    if "$check" "$pid"; then
      echo "$pid" >"$pid_file"
      echo "$pid"
      return 0
    fi
  done
  return 1
}

kafka_answers() { python3 "$KAFKA_PING" --host "$KAFKA_HOST" --port "$KAFKA_PORT" --timeout 3 --quiet; }
registry_answers() { curl -sf -o /dev/null --max-time 3 "http://$REGISTRY_HOST:$REGISTRY_PORT/subjects"; }

# Fail if PORT is taken by anything other than our own process.
require_port_free() {
  local port=$1 pids desc="" pid
  port_in_use "$port" || return 0
  pids=$(port_pids "$port")
  for pid in $pids; do
    desc+="${desc:+, }pid $pid: $(proc_cmdline "$pid" | cut -c1-120)"
  done
  die "port $port is already in use by another process (${desc:-pid unknown}); stop it or free the port"
}

show_log_tail() {
  local file=$1 n=${2:-30}
  if [[ -s $file ]]; then
    warn "---- last $n lines of $file ----"
    tail -n "$n" "$file" >&2
    warn "---- end of $file ----"
  else
    warn "($file is empty or missing)"
  fi
}

# Run "$@" detached in its own session, immune to SIGHUP, output to LOGFILE;
# the final process's PID goes to PID_FILE (bash execs, so $$ is that PID).
# fd 9 (our lock) is closed so the daemon does not hold the lock forever.
spawn() {
  local pid_file=$1 logfile=$2
  shift 2
  rm -f "$pid_file"
  # shellcheck disable=SC2016 # $$ and $@ must expand in the child bash
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pid_file" "$@" \
    </dev/null >>"$logfile" 2>&1 9>&- &
  for _ in $(seq 50); do
    [[ -s $pid_file ]] && return 0
    sleep 0.1
  done
  die "process did not start: $*"
}

# Send SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL.
terminate() {
  local name=$1 pid=$2 waited=0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  while pid_alive "$pid"; do
    if ((waited >= STOP_TIMEOUT * 10)); then
      warn "$name (pid $pid) did not exit after ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# ----------------------------------------------------------------- install --

java_major() {
  java -XshowSettings:properties -version 2>&1 \
    | sed -n 's/^ *java\.specification\.version = \([0-9.]*\).*/\1/p' | head -n1 | sed 's/^1\.//;s/\..*//'
}

install_java() {
  if ! have java; then
    apt_install openjdk-17-jre-headless
    have java || die "java still not on PATH after installing openjdk-17-jre-headless"
  fi
  local major
  major=$(java_major)
  if [[ -z $major || $major -lt 17 ]]; then
    die "Kafka $KAFKA_VERSION needs Java 17+, but 'java' is version ${major:-unknown} ($(command -v java))"
  fi
}

install_maven() {
  have mvn && return 0
  apt_install maven
  have mvn || die "mvn still not on PATH after installing maven"
}

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

kafka_libs_ok() {
  [[ -f $KAFKA_MARKER && -d $KAFKA_LIBS ]] && [[ $(<"$KAFKA_MARKER") == "$(pom_hash)" ]]
}

install_kafka_libs() {
  if kafka_libs_ok; then
    return 0
  fi
  install_maven
  mkdir -p "$KAFKA_HOME"
  local tmp=$KAFKA_HOME/libs.tmp.$$ mvn_log=$KAFKA_HOME/mvn-copy-dependencies.log
  rm -rf "$tmp"
  log "downloading Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS (log: $mvn_log)"
  if ! mvn -q -B -f "$POM" dependency:copy-dependencies \
    -DoutputDirectory="$tmp" -DincludeScope=runtime >"$mvn_log" 2>&1; then
    rm -rf "$tmp"
    tail -n 20 "$mvn_log" >&2 || true
    die "Maven could not download Kafka $KAFKA_VERSION from Maven Central (see $mvn_log)"
  fi
  if ! compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null; then
    rm -rf "$tmp"
    die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing (see $mvn_log)"
  fi
  rm -f "$KAFKA_MARKER"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  pom_hash >"$KAFKA_MARKER"
  log "Kafka jars ready ($(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars)"
}

install_registry() {
  [[ -x $RIVVEN_BIN ]] && return 0
  local cargo=cargo
  if ! have cargo; then
    cargo=${CARGO_HOME:-$HOME/.cargo}/bin/cargo
    [[ -x $cargo ]] || die "cargo not found; install Rust (https://rustup.rs) to build rivven-schema $RIVVEN_VERSION"
  fi
  mkdir -p "$RIVVEN_ROOT"
  local cargo_log=$MEDPIPE_CACHE/tools/rivven-schema-$RIVVEN_VERSION.install.log
  log "building rivven-schema $RIVVEN_VERSION from crates.io (takes ~10 min on 2 cores; log: $cargo_log)"
  if ! "$cargo" install rivven-schema --version "$RIVVEN_VERSION" --locked --root "$RIVVEN_ROOT" \
    >"$cargo_log" 2>&1; then
    tail -n 20 "$cargo_log" >&2 || true
    die "cargo could not install rivven-schema $RIVVEN_VERSION from crates.io (see $cargo_log)"
  fi
  [[ -x $RIVVEN_BIN ]] || die "cargo install succeeded but $RIVVEN_BIN is missing (see $cargo_log)"
}

cmd_install() {
  install_java
  have python3 || apt_install python3
  have curl || apt_install curl
  have openssl || apt_install openssl
  install_kafka_libs
  install_registry
}

# ------------------------------------------------------------------- start --

# The TLS listener's certificates, made once per state directory (reset deletes them): a
# dev CA (clients trust $TLS_DIR/ca.crt) and the broker's key and certificate for
# 127.0.0.1 and localhost, signed by it, in a PKCS12 keystore under a random password.
# Dev only: the CA's key sits beside it unencrypted.
ensure_dev_tls() {
  [[ -s $TLS_DIR/broker.p12 && -s $TLS_DIR/ca.crt && -s $TLS_DIR/keystore.password ]] && return 0
  local tmp
  tmp=$(mktemp -d "$MEDPIPE_STATE/tls.XXXXXX")
  if ! (
    cd "$tmp"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=medpipe dev stack CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj "/CN=localhost"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out broker.crt -days 3650 -extfile broker.ext
    openssl rand -hex 24 >keystore.password
    openssl pkcs12 -export -in broker.crt -inkey broker.key -certfile ca.crt \
      -name broker -out broker.p12 -passout "file:keystore.password"
    chmod 644 ca.crt
  ) >"$LOG_DIR/tls.log" 2>&1; then
    rm -rf "$tmp"
    show_log_tail "$LOG_DIR/tls.log"
    die "making the dev TLS certificates failed (see $LOG_DIR/tls.log)"
  fi
  chmod 755 "$tmp" # ca.crt is for every client; the keys stay 600
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
  log "made a dev CA and broker certificate in $TLS_DIR (clients trust $TLS_DIR/ca.crt)"
}

render_kafka_config() {
  mkdir -p "$DATA_DIR" "$LOG_DIR"
  ensure_dev_tls
  local escaped=${DATA_DIR//[\\&|]/\\&} tls=${TLS_DIR//[\\&|]/\\&} password
  password=$(<"$TLS_DIR/keystore.password")
  (
    umask 077
    sed -e "s|@LOG_DIRS@|$escaped|g" -e "s|@TLS_DIR@|$tls|g" \
      -e "s|@KEYSTORE_PASSWORD@|$password|g" "$SERVER_PROPERTIES_TEMPLATE" >"$KAFKA_CONFIG.tmp"
  )
  mv "$KAFKA_CONFIG.tmp" "$KAFKA_CONFIG"
}

kafka_java() {
  java -Dlog4j2.configurationFile="$LOG4J2_CONFIG" -Dkafka.logs.dir="$LOG_DIR" \
    -cp "$KAFKA_LIBS/*" "$@"
}

format_storage_if_needed() {
  [[ -f $DATA_DIR/meta.properties ]] && return 0
  # Without meta.properties the directory is not a usable KRaft log (fresh,
  # or an interrupted format): start it over.
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR"
  local cluster_id format_log=$LOG_DIR/kafka-format.log
  cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$format_log" | tail -n1)
  [[ -n $cluster_id ]] || die "kafka-storage random-uuid failed (see $format_log)"
  log "formatting KRaft storage in $DATA_DIR (cluster id $cluster_id)"
  if ! kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_CONFIG" \
    >>"$format_log" 2>&1; then
    show_log_tail "$format_log"
    die "kafka-storage format failed (see $format_log)"
  fi
}

start_kafka() {
  local pid t0
  if pid=$(find_pid kafka); then
    if kafka_answers; then
      log "Kafka already running (pid $pid) on $KAFKA_HOST:$KAFKA_PORT"
      return 0
    fi
    log "Kafka already running (pid $pid) but not answering yet; waiting"
  else
    require_port_free "$KAFKA_PORT"
    require_port_free "$CONTROLLER_PORT"
    require_port_free "$SASL_PORT"
    require_port_free "$SASL_SSL_PORT"
    render_kafka_config
    format_storage_if_needed
    log "starting Kafka $KAFKA_VERSION (logs: $LOG_DIR)"
    # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of JVM flags
    spawn "$KAFKA_PID_FILE" "$KAFKA_STDOUT" \
      java $KAFKA_HEAP_OPTS -server \
      -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
      -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
      "-Xlog:gc*,safepoint:file=$LOG_DIR/gc.log:time,uptime:filecount=3,filesize=20m" \
      -Dlog4j2.configurationFile="$LOG4J2_CONFIG" -Dkafka.logs.dir="$LOG_DIR" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONFIG"
    pid=$(<"$KAFKA_PID_FILE")
  fi
  t0=$SECONDS
  until kafka_answers; do
    if ! pid_alive "$pid"; then
      rm -f "$KAFKA_PID_FILE"
      show_log_tail "$KAFKA_LOG"
      [[ -s $KAFKA_STDOUT ]] && show_log_tail "$KAFKA_STDOUT" 15
      die "Kafka exited during start-up (logs in $LOG_DIR)"
    fi
    if ((SECONDS - t0 >= KAFKA_START_TIMEOUT)); then
      show_log_tail "$KAFKA_LOG"
      [[ -s $KAFKA_STDOUT ]] && show_log_tail "$KAFKA_STDOUT" 15
      die "Kafka (pid $pid) did not answer a metadata request on $KAFKA_HOST:$KAFKA_PORT within ${KAFKA_START_TIMEOUT}s (still running; '$0 stop' to kill it)"
    fi
    sleep 0.5
  done
  log "Kafka ready on $KAFKA_HOST:$KAFKA_PORT (pid $pid, $((SECONDS - t0))s)"
}

start_registry() {
  local pid t0
  if pid=$(find_pid registry); then
    if registry_answers; then
      log "Schema Registry already running (pid $pid) on http://$REGISTRY_HOST:$REGISTRY_PORT"
      return 0
    fi
    log "Schema Registry already running (pid $pid) but not answering yet; waiting"
  else
    require_port_free "$REGISTRY_PORT"
    mkdir -p "$LOG_DIR"
    log "starting Schema Registry (rivven-schema $RIVVEN_VERSION)"
    spawn "$REGISTRY_PID_FILE" "$REGISTRY_LOG" \
      env NO_COLOR=1 "$RIVVEN_BIN" serve --host "$REGISTRY_HOST" --port "$REGISTRY_PORT"
    pid=$(<"$REGISTRY_PID_FILE")
  fi
  t0=$SECONDS
  until registry_answers; do
    if ! pid_alive "$pid"; then
      rm -f "$REGISTRY_PID_FILE"
      show_log_tail "$REGISTRY_LOG"
      die "Schema Registry exited during start-up (log: $REGISTRY_LOG)"
    fi
    if ((SECONDS - t0 >= REGISTRY_START_TIMEOUT)); then
      show_log_tail "$REGISTRY_LOG"
      die "Schema Registry (pid $pid) did not answer GET /subjects within ${REGISTRY_START_TIMEOUT}s (still running; '$0 stop' to kill it)"
    fi
    sleep 0.2
  done
  log "Schema Registry ready on http://$REGISTRY_HOST:$REGISTRY_PORT (pid $pid, $((SECONDS - t0))s)"
}

cmd_start() {
  cmd_install
  local kpid rpid
  if kpid=$(find_pid kafka) && rpid=$(find_pid registry) && kafka_answers && registry_answers; then
    log "already running: Kafka pid $kpid, Schema Registry pid $rpid"
  else
    # Check every port we will need before starting anything.
    if ! find_pid kafka >/dev/null; then
      require_port_free "$KAFKA_PORT"
      require_port_free "$CONTROLLER_PORT"
      require_port_free "$SASL_PORT"
      require_port_free "$SASL_SSL_PORT"
    fi
    if ! find_pid registry >/dev/null; then
      require_port_free "$REGISTRY_PORT"
    fi
    start_kafka
    start_registry
  fi
  log "up: Kafka bootstrap $KAFKA_HOST:$KAFKA_PORT (controller $KAFKA_HOST:$CONTROLLER_PORT), Schema Registry http://$REGISTRY_HOST:$REGISTRY_PORT, state $MEDPIPE_STATE"
}

# -------------------------------------------------------------- stop/status --

stop_one() {
  local which=$1 name=$2 pid_file=$3 pid
  # Loop: also catches a second instance found via the port after the first.
  while pid=$(find_pid "$which"); do
    terminate "$name" "$pid"
    if pid_alive "$pid"; then
      die "could not stop $name (pid $pid)"
    fi
  done
  rm -f "$pid_file"
}

cmd_stop() {
  stop_one registry "Schema Registry" "$REGISTRY_PID_FILE"
  stop_one kafka "Kafka" "$KAFKA_PID_FILE"
  log "stopped"
}

cmd_status() {
  local rc=0 pid
  if pid=$(find_pid kafka); then
    if kafka_answers; then
      log "Kafka:           running (pid $pid), $KAFKA_HOST:$KAFKA_PORT answering"
    else
      log "Kafka:           process running (pid $pid) but $KAFKA_HOST:$KAFKA_PORT NOT answering"
      rc=3
    fi
  else
    log "Kafka:           not running"
    rc=3
  fi
  if pid=$(find_pid registry); then
    if registry_answers; then
      log "Schema Registry: running (pid $pid), http://$REGISTRY_HOST:$REGISTRY_PORT answering"
    else
      log "Schema Registry: process running (pid $pid) but http://$REGISTRY_HOST:$REGISTRY_PORT NOT answering"
      rc=3
    fi
  else
    log "Schema Registry: not running"
    rc=3
  fi
  return "$rc"
}

cmd_reset() {
  cmd_stop
  log "deleting Kafka data and logs in $MEDPIPE_STATE"
  rm -rf "$DATA_DIR" "$LOG_DIR" "$TLS_DIR" "$KAFKA_CONFIG" "$KAFKA_CONFIG.tmp" "$KAFKA_PID_FILE" "$REGISTRY_PID_FILE"
  log "reset done (jar/tool cache in $MEDPIPE_CACHE kept)"
}

# ------------------------------------------------------------ fault tests --

broker_pid_or_die() {
  local pid
  pid=$(find_pid kafka) || die "Kafka is not running"
  echo "$pid"
}

cmd_crash-broker() {
  local pid
  pid=$(broker_pid_or_die)
  log "crashing Kafka (SIGKILL pid $pid)"
  kill -KILL "$pid"
  while pid_alive "$pid"; do sleep 0.1; done
  # A killed JVM can hold its listening sockets a moment longer than its pid.
  local waited=0
  while port_in_use "$KAFKA_PORT" || port_in_use "$CONTROLLER_PORT"; do
    ((waited++ < 300)) || die "ports $KAFKA_PORT/$CONTROLLER_PORT still in use 30s after the crash"
    sleep 0.1
  done
  rm -f "$KAFKA_PID_FILE"
}

cmd_pause-broker() {
  local pid
  pid=$(broker_pid_or_die)
  log "pausing Kafka (SIGSTOP pid $pid)"
  kill -STOP "$pid"
}

cmd_resume-broker() {
  local pid
  pid=$(broker_pid_or_die)
  log "resuming Kafka (SIGCONT pid $pid)"
  kill -CONT "$pid"
}

cmd_pause-registry() {
  local pid
  pid=$(find_pid registry) || die "the Schema Registry is not running"
  log "pausing the Schema Registry (SIGSTOP pid $pid)"
  kill -STOP "$pid"
}

cmd_resume-registry() {
  local pid
  pid=$(find_pid registry) || die "the Schema Registry is not running"
  log "resuming the Schema Registry (SIGCONT pid $pid)"
  kill -CONT "$pid"
}

# -------------------------------------------------------------------- main --

main() {
  local cmd=${1:-}
  case $cmd in
    install | start | stop | status | reset | crash-broker | pause-broker | resume-broker | pause-registry | resume-registry) ;;
    -h | --help | help)
      usage
      return 0
      ;;
    *)
      usage >&2
      return 2
      ;;
  esac
  [[ -f $POM && -f $SERVER_PROPERTIES_TEMPLATE && -f $LOG4J2_CONFIG && -f $KAFKA_PING ]] \
    || die "dev-stack files missing under $DEVSTACK_DIR"
  take_lock
  "cmd_$cmd"
}

main "$@"
