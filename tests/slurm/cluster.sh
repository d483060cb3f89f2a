#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the workflow tests and CI.
#
#   bash tests/slurm/cluster.sh start    # idempotent: starts whatever is not running (a few seconds)
#   bash tests/slurm/cluster.sh status   # exit 0 when the cluster answers, 1 otherwise
#   bash tests/slurm/cluster.sh stop
#
# Daemons, in start order: munged, a private MariaDB (accounting storage), slurmdbd, slurmctld, slurmd.
# Accounting matters: submitit polls job states with sacct; without slurmdbd every state reads UNKNOWN
# and a cancelled job makes job.result() hang. Recipe and gotchas: docs/PROTOCOL.md
# ("A local SLURM cluster"). Needs root (daemons, /etc/slurm) and the Debian packages from scripts/install.sh.
#
# Environment: D2V2_SLURM_STATE  state/log/spool folder (default /tmp/d2v2-slurm)
#              D2V2_SLURM_PARTITION  the one partition's name (default "debug")
#              D2V2_SLURM_DB_PORT    MariaDB TCP port on 127.0.0.1 (default 3307)
set -euo pipefail

STATE=${D2V2_SLURM_STATE:-/tmp/d2v2-slurm}
PARTITION=${D2V2_SLURM_PARTITION:-debug}
DB_PORT=${D2V2_SLURM_DB_PORT:-3307}
CONF_DIR=/etc/slurm
NODE=localhost

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# A pid file names a live process (a zombie counts as stopped: daemons may linger as zombies).
alive() {
  local pidfile=$1 pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] || return 1
  [ -d "/proc/$pid" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what did not come up within ${secs}s (logs: $STATE/log)"
    sleep 0.2
  done
}

cluster_answers() {  # cheap pid check first: sinfo retries for ~10 s when slurmctld is down
  alive "$STATE/run/slurmctld.pid" && alive "$STATE/run/slurmd.pid" || return 1
  sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)' && sacct -n -X -S now >/dev/null 2>&1
}

write_configs() {
  local cpus mem
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem > 2048 ? mem - 1024 : mem))  # headroom for the daemons
  mkdir -p "$CONF_DIR" "$STATE"/{log,ctld,spool,run}
  cat > "$STATE/slurm.conf.tmp" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster (no cgroups, no systemd).
ClusterName=d2v2test
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$STATE/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
  umask 077
  cat > "$STATE/slurmdbd.conf.tmp" <<EOF
# Written by tests/slurm/cluster.sh
AuthType=auth/munge
DbdHost=$NODE
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=d2v2test
StorageLoc=slurm_acct_db
EOF
  mv "$STATE/slurmdbd.conf.tmp" "$CONF_DIR/slurmdbd.conf"
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  umask 022
}

start_munge() {
  alive "$STATE/run/munged.pid" && return 0
  if [ ! -s /etc/munge/munge.key ]; then mungekey --create; fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid 2>>"$STATE/log/munged.log"
  wait_for 10 munged bash -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$STATE/run/munged.pid"
}

start_mariadb() {
  alive "$STATE/run/mariadb.pid" && return 0
  local fresh=0
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    fresh=1
  fi
  mariadbd --user=root --datadir="$STATE/mysql" --socket="$STATE/run/mysqld.sock" \
    --pid-file="$STATE/run/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --log-error="$STATE/log/mariadb.log" --skip-log-bin --innodb-buffer-pool-size=64M \
    </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
  disown
  wait_for 30 mariadbd mariadb --socket="$STATE/run/mysqld.sock" -e 'SELECT 1'
  if [ $fresh -eq 1 ]; then
    mariadb --socket="$STATE/run/mysqld.sock" <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'd2v2test';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'd2v2test';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  fi
}

start_slurm() {
  if ! alive "$STATE/run/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  if ! alive "$STATE/run/slurmctld.pid"; then
    slurmctld -i
    wait_for 30 slurmctld scontrol ping
  fi
  if ! alive "$STATE/run/slurmd.pid"; then
    slurmd -N "$NODE"
  fi
  wait_for 30 "the node" cluster_answers
  # A node left DOWN/DRAIN by an earlier unclean stop is returned to service.
  if sinfo -h -o '%T' | grep -Eq 'down|drain'; then
    scontrol update NodeName="$NODE" State=RESUME || true
  fi
}

stop_pidfile() {
  local pidfile=$1 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pidfile" || break; sleep 0.1; done
  alive "$pidfile" && kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  start)
    [ "$(id -u)" -eq 0 ] || die "start needs root (daemons and /etc/slurm); run as root or with sudo"
    for bin in munged mariadbd slurmdbd slurmctld slurmd sinfo sacct; do
      command -v "$bin" >/dev/null || die "'$bin' not found: run scripts/install.sh (Debian packages slurmctld slurmd slurm-client munge slurmdbd mariadb-server)"
    done
    if cluster_answers; then log "already running (state: $STATE)"; exit 0; fi
    t0=$(date +%s.%N)
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "up in $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo '?') s: partition '$PARTITION', state $STATE"
    ;;
  stop)
    for d in slurmd slurmctld slurmdbd mariadb munged; do stop_pidfile "$STATE/run/$d.pid"; done
    log "stopped"
    ;;
  status)
    if cluster_answers; then sinfo; exit 0; else log "not running"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2; exit 2
    ;;
esac
