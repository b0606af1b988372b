#!/usr/bin/env bash
# A real one-node SLURM cluster, with accounting, for CI and for the pytest fixture that tests the
# submitit/SLURM path. Debian 12, as root, no systemd: the daemons are started and stopped here, by
# PID file. Accounting (slurmdbd + MariaDB) is not optional: without it `sacct` fails, submitit never
# learns a job's state and result() on a cancelled or killed job hangs. Facts behind every setting:
# shared/docs/slurm-local.md.
#
#   .ci/local-slurm.sh start    install what is missing, write the configs, start munged, mariadbd,
#                               slurmdbd, slurmctld and slurmd (each waited for); idempotent
#   .ci/local-slurm.sh stop     cancel leftover jobs, then TERM the daemons in reverse order by PID
#                               file (KILL after a bounded wait); idempotent
#   .ci/local-slurm.sh status   exit 0 and print sinfo if the controller and sacct answer, else 1
#
# LOCAL_SLURM_TIMEOUT (seconds, default 60) bounds each readiness wait and each daemon's exit.
# A failed start names the daemon and its log and leaves the daemons already up running: call stop.
set -euo pipefail

TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
PARTITION=debug
CLUSTER=localcluster
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurmdbpass
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
BINARIES=(/usr/sbin/munged /usr/bin/munge /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmdbd
          /usr/bin/sbatch /usr/bin/sacct /usr/bin/sacctmgr /usr/sbin/mariadbd /usr/bin/mariadb)

SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
SLURM_LOG_DIR=/var/log/slurm
MARIADB_LOG=/var/log/mysql/local-slurm-mariadbd.log
MUNGE_LOG=/var/log/munge/munged.log

# name | pid file | log file. Start order top to bottom, stop order bottom to top.
DAEMONS=(
  "munged|/run/munge/munged.pid|$MUNGE_LOG"
  "mariadbd|/run/mysqld/mysqld.pid|$MARIADB_LOG"
  "slurmdbd|/run/slurmdbd.pid|$SLURM_LOG_DIR/slurmdbd.log"
  "slurmctld|/run/slurmctld.pid|$SLURM_LOG_DIR/slurmctld.log"
  "slurmd|/run/slurmd.pid|$SLURM_LOG_DIR/slurmd.log"
)

say() { echo "local-slurm: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

field() { # field NAME INDEX -> pid file (1) or log (2) of daemon NAME
  local d n p l
  for d in "${DAEMONS[@]}"; do
    IFS='|' read -r n p l <<<"$d"
    if [[ $n == "$1" ]]; then
      if [[ $2 == 1 ]]; then echo "$p"; else echo "$l"; fi
      return 0
    fi
  done
  return 1
}

# alive PID: the process exists and is not a zombie. A daemon that has exited stays a zombie until
# PID 1 reaps it, which on the CI machines takes about 2 s; it holds no ports or files by then.
alive() {
  local state
  state="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# PID of daemon NAME if its pid file names a live process of that name (guards against PID reuse).
live_pid() {
  local pidfile pid comm
  pidfile="$(field "$1" 1)"
  [[ -s $pidfile ]] || return 1
  pid="$(tr -dc '0-9' <"$pidfile")"
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive "$pid" || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  [[ -z $comm || $comm == "$1"* ]] || return 1
  echo "$pid"
}

log_tail() {
  local log
  log="$(field "$1" 2)"
  if [[ -r $log ]]; then
    say "last lines of $log:"
    tail -n 15 "$log" | sed 's/^/    /' >&2
  fi
}

# wait_ready NAME DESCRIPTION CMD... : poll CMD every 0.2 s until it succeeds, at most TIMEOUT s.
# Fails at once if daemon NAME has written its pid file and that process is gone.
wait_ready() {
  local name="$1" what="$2" deadline pidfile
  shift 2
  pidfile="$(field "$name" 1)"
  deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if [[ -s $pidfile ]] && ! live_pid "$name" >/dev/null; then
      log_tail "$name"
      die "$name exited during start-up (waiting for: $what); see its log $(field "$name" 2)"
    fi
    if (( $(date +%s) >= deadline )); then
      log_tail "$name"
      die "$name not ready after ${TIMEOUT}s (waiting for: $what); see its log $(field "$name" 2)"
    fi
    sleep 0.2
  done
}

# ---- readiness checks ----
munge_ok() { munge -n | unmunge; }
mariadb_ok() { mariadb-admin --silent ping; }
dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
ctld_ok() { scontrol ping | grep -q 'is UP'; }
# The node must be usable and registered by the slurmd we started: slurmctld keeps showing a node
# "idle" for SlurmdTimeout seconds after its slurmd is gone, and restores it from saved state.
SLURMD_SINCE=0
node_ok() {
  local state started
  state="$(sinfo -h -n "$NODE" -p "$PARTITION" -o %T | head -n1)"
  [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
  started="$(scontrol -o show node "$NODE" | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)"
  [[ $started =~ ^[0-9]{4}- ]] && (( $(date -d "$started" +%s) >= SLURMD_SINCE ))
}
cluster_registered() { sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; }
sacct_ok() { sacct -n -X -S now -o JobID; }

# ---- install ----
install_packages() {
  local b missing=0
  for b in "${BINARIES[@]}"; do [[ -x $b ]] || missing=1; done
  (( missing )) || return 0
  command -v apt-get >/dev/null || die "packages missing and no apt-get (this script is for Debian 12)"
  local t0 policy_added=0
  t0="$(now)"
  say "installing ${PACKAGES[*]}"
  # Without systemd, a package's postinst would start its daemon through the sysvinit script;
  # we start them ourselves, so forbid that for the duration of the install (unless already set).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}"
  } >/tmp/local-slurm-apt.log 2>&1 || rc=$?
  (( policy_added )) && rm -f /usr/sbin/policy-rc.d
  if (( rc != 0 )); then
    tail -n 20 /tmp/local-slurm-apt.log >&2
    die "apt-get failed (rc=$rc); full output in /tmp/local-slurm-apt.log"
  fi
  for b in "${BINARIES[@]}"; do [[ -x $b ]] || die "$b still missing after apt-get install"; done
  say "installed in $(since "$t0") s"
}

# ---- configuration ----
# write_if_changed FILE OWNER MODE < content ; returns 0 if the file changed
write_if_changed() {
  local file="$1" owner="$2" mode="$3" tmp
  tmp="$(mktemp "$file.XXXXXX")"
  cat >"$tmp"
  chown "$owner" "$tmp"
  chmod "$mode" "$tmp"
  if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
    rm -f "$tmp"
    chown "$owner" "$file"
    chmod "$mode" "$file"
    return 1
  fi
  mv -f "$tmp" "$file"
  return 0
}

write_configs() {
  local cpus mem_mb changed=0
  cpus="$(nproc)"
  mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 * 0.8 / 1024 }' /proc/meminfo)"
  mkdir -p /etc/slurm
  write_if_changed "$SLURM_CONF" root:root 644 <<EOF && changed=1 || true
# Written by .ci/local-slurm.sh: a one-node cluster for tests. Edits are overwritten on start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# accounting through slurmdbd, so that sacct (and submitit's job states) work
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
# submitit ignores SIGTERM: a cancelled job holds its CPUs until SIGKILL, KillWait seconds later
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
# a second partition on the same node: where a rule's slurm_partition resource sends its jobs in the tests
PartitionName=cpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
  write_if_changed "$DBD_CONF" slurm:slurm 600 <<EOF && changed=1 || true
# Written by .ci/local-slurm.sh. Edits are overwritten on start.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$SLURM_LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
  if (( changed )) && live_pid slurmctld >/dev/null; then
    say "WARNING: the configuration changed while slurmctld runs; run '$0 stop' then '$0 start' to apply it"
  fi
  CPUS="$cpus"
}

make_dirs() {
  # /run is a tmpfs: these are gone after a reboot
  mkdir -p /run/munge /run/mysqld /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$SLURM_LOG_DIR"
  chown munge:munge /run/munge
  chown mysql:root /run/mysqld
  chown slurm:slurm /var/lib/slurm/slurmctld "$SLURM_LOG_DIR"
  [[ -d /var/log/mysql ]] || install -d -o mysql -g adm -m 2750 /var/log/mysql
  [[ -d /var/log/munge ]] || install -d -o munge -g munge -m 700 /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    say "initialising /var/lib/mysql"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$MARIADB_LOG" 2>&1 ||
      die "mariadb-install-db failed; see $MARIADB_LOG"
  fi
}

# start_daemon NAME CMD... : run CMD unless NAME already runs; a stale pid file is removed first.
start_daemon() {
  local name="$1" pid
  shift
  if pid="$(live_pid "$name")"; then
    say "$name already running (pid $pid)"
    return 0
  fi
  rm -f "$(field "$name" 1)"
  # 9>&-: the daemons must not inherit (and so hold forever) the lock taken in main
  "$@" 9>&- || { log_tail "$name"; die "$name failed to start; see its log $(field "$name" 2)"; }
}

start_mariadbd() {
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
    >>"$MARIADB_LOG" 2>&1 </dev/null &
}

setup_db() {
  mariadb -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost'; FLUSH PRIVILEGES;" ||
    die "could not create the accounting database in MariaDB; see $MARIADB_LOG"
}

# bring_up NAME WHAT READY_FN START_CMD... : start NAME (unless running) and wait until READY_FN passes
bring_up() {
  local name="$1" what="$2" ready="$3" t
  shift 3
  t="$(now)"
  start_daemon "$name" "$@"
  wait_ready "$name" "$what" "$ready"
  say "$name ready in $(since "$t") s"
}

cmd_start() {
  local t0
  t0="$(now)"
  install_packages
  NODE="$(hostname -s)"
  write_configs
  make_dirs

  bring_up munged "munge -n | unmunge" munge_ok runuser -u munge -- /usr/sbin/munged
  bring_up mariadbd "mariadb-admin ping" mariadb_ok start_mariadbd
  setup_db
  bring_up slurmdbd "sacctmgr list cluster" dbd_ok /usr/sbin/slurmdbd
  bring_up slurmctld "scontrol ping" ctld_ok /usr/sbin/slurmctld
  live_pid slurmd >/dev/null || SLURMD_SINCE="$(date +%s)"
  bring_up slurmd "node $NODE registered and idle" node_ok /usr/sbin/slurmd
  wait_ready slurmctld "cluster $CLUSTER registered in slurmdbd" cluster_registered
  wait_ready slurmdbd "sacct answers" sacct_ok

  echo "local SLURM up: partition $PARTITION, $CPUS CPUs, accounting on ($(since "$t0") s)"
}

# ---- stop ----
cancel_jobs() {
  live_pid slurmctld >/dev/null && ctld_ok 2>/dev/null || return 0
  local ids deadline
  ids="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
  [[ -n ${ids// /} ]] || return 0
  say "cancelling jobs left in the queue: $ids"
  # shellcheck disable=SC2086
  scancel $ids || true
  deadline=$(( $(date +%s) + TIMEOUT ))
  while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && (( $(date +%s) < deadline )); do sleep 0.5; done
}

stop_daemon() {
  local name="$1" pidfile pid deadline t
  pidfile="$(field "$name" 1)"
  if ! pid="$(live_pid "$name")"; then
    rm -f "$pidfile"
    return 0
  fi
  t="$(now)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$(( $(date +%s) + TIMEOUT ))
  while kill -0 "$pid" 2>/dev/null && alive "$pid"; do
    if (( $(date +%s) >= deadline )); then
      say "$name (pid $pid) ignored TERM for ${TIMEOUT}s; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
  done
  # slurmctld and slurmdbd run as slurm and cannot remove their pid files in /run
  rm -f "$pidfile"
  say "$name stopped (pid $pid, $(since "$t") s)"
}

cmd_stop() {
  local t0 i n
  t0="$(now)"
  if command -v squeue >/dev/null; then cancel_jobs; fi
  for (( i = ${#DAEMONS[@]} - 1; i >= 0; i-- )); do
    n="${DAEMONS[i]%%|*}"
    stop_daemon "$n"
  done
  echo "local SLURM stopped ($(since "$t0") s)"
}

# ---- status ----
cmd_status() {
  command -v scontrol >/dev/null || { echo "local SLURM: not installed"; exit 1; }
  if scontrol ping 2>/dev/null | grep -q 'is UP' && sacct -n -X -S now -o JobID >/dev/null 2>&1; then
    sinfo
    exit 0
  fi
  echo "local SLURM: not answering (scontrol ping or sacct failed)"
  exit 1
}

main() {
  [[ $# -eq 1 ]] || { echo "usage: $0 start|stop|status" >&2; exit 2; }
  case "$1" in
    start|stop)
      [[ $EUID -eq 0 ]] || die "must run as root"
      # one start/stop at a time (parallel test workers may call this together)
      exec 9>/run/local-slurm.lock
      flock -w $(( TIMEOUT * 5 )) 9 || die "another $0 start/stop holds /run/local-slurm.lock"
      "cmd_$1"
      ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
  esac
}

main "$@"
