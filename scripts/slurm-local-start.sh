#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster (munged + slurmctld + slurmd) on this machine,
# without systemd, for trying scripts/moetrain.sbatch and for tests/test_slurm.sh.
#
#   scripts/slurm-local-start.sh                 # then: export SLURM_CONF=$SLURM_DIR/slurm.conf
#   SLURM_DIR=/tmp/my-slurm SLURM_CPUS=4 scripts/slurm-local-start.sh
#   scripts/slurm-local-stop.sh                  # same SLURM_DIR; stops what this started
#
# Knobs (environment):
#   SLURM_DIR   (default /tmp/local-slurm) holds slurm.conf, state, spool, logs, pid files and the
#               munged socket; its parent directories must be searchable by the munge user
#   SLURM_CPUS  (default 8) CPUs the node advertises; may exceed the real cores (config_overrides),
#               so a 2-core machine can run 4- or 8-rank jobs, oversubscribed
#   SLURM_PORT  (default 6817, SLURM's own) slurmctld's port; slurmd uses SLURM_PORT+1. Give each
#               cluster on one machine its own (tests/test_slurm.sh picks a free pair)
#   SLURM_FIRST_JOB_ID  (default 1 on port 6817, else SLURM_PORT*1000+1) first job id. Clusters side
#               by side must not hand out the same ids: srun's PMIx namespace, and from it Open MPI's
#               shared-memory segment names (/dev/shm/vader_segment.<host>.<id hash>.<rank>), derive
#               from the job id, and two running "job 1"s crash each other's ranks
#
# Needs root (daemons run as root, munged as the munge user) and the Debian packages:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#   (scripts/install-deps.sh --slurm does that)
#
# Idempotent-ish: if the slurmctld/slurmd recorded in SLURM_DIR are still alive and answering, it
# prints the node state and exits 0 without touching them; if only one of them is left, it is
# stopped and the cluster started afresh. Everything is private to SLURM_DIR and SLURM_PORT (its own
# munged socket, ports, TmpFS), so several clusters can run side by side. Exits non-zero if SLURM
# does not come up (logs in $SLURM_DIR/log). The last line printed is the `export SLURM_CONF=...`
# that clients (sbatch, squeue, scontrol) need.
#
# Settings worth knowing for signal/requeue work (slurm.conf(5)):
#   KillWait=5       seconds between SIGTERM and SIGKILL when a job is ended (time limit, scancel,
#                    requeue); SLURM's default is 30. moetrain's SIGTERM checkpoint must fit in it,
#                    which is why moetrain.sbatch asks for an earlier SIGUSR1 warning instead.
#   OverTimeLimit=0  (the default) minutes a job may run past its time limit before it is killed.
#   MinJobAge=300    finished jobs stay visible to squeue/scontrol for 5 minutes.
#   (cred_expire)    not set: 120 s, which is also how long SLURM holds a requeued job before it may
#                    start again (tests/test_slurm.sh shortens that per job with
#                    `scontrol update JobId=... StartTime=now`).
#   Time limits and --signal warnings are checked every 30 s by slurmctld, so warnings come up
#   to ~30 s early and time-limit kills up to ~30 s late.
set -euo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/local-slurm}
SLURM_CPUS=${SLURM_CPUS:-8}
SLURM_PORT=${SLURM_PORT:-6817}
if [ "$SLURM_PORT" -eq 6817 ]; then SLURM_FIRST_JOB_ID=${SLURM_FIRST_JOB_ID:-1}
else SLURM_FIRST_JOB_ID=${SLURM_FIRST_JOB_ID:-$(( (SLURM_PORT % 65536) * 1000 + 1 ))}; fi
NODE=$(hostname -s)
export SLURM_CONF="$SLURM_DIR/slurm.conf"

for cmd in slurmctld slurmd scontrol munged; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || {
    echo "slurm-local-start: $cmd not found; install with:" >&2
    echo "  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 1
  }
done
[ "$(id -u)" -eq 0 ] || { echo "slurm-local-start: must run as root" >&2; exit 1; }

alive() { [ -f "$SLURM_DIR/$1" ] && kill -0 "$(cat "$SLURM_DIR/$1")" 2>/dev/null; }
node_up() { sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)'; }

# ---- already running? -----------------------------------------------------------------------
if alive slurmctld.bgpid && alive slurmd.bgpid && scontrol ping 2>/dev/null | grep -q UP && node_up; then
  echo "slurm-local-start: already running in $SLURM_DIR"
  sinfo
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
# half-started (one daemon died): stop what is left, then start afresh
if alive slurmctld.bgpid || alive slurmd.bgpid; then
  SLURM_DIR=$SLURM_DIR "$(dirname "$0")/slurm-local-stop.sh" --keep-munge
fi

REAL_MEM_MB=$(awk '/MemTotal/ {print int($2/1024*0.9)}' /proc/meminfo)
mkdir -p "$SLURM_DIR"/{state,log,tmp} "$SLURM_DIR/spool/slurmd-$NODE"

# slurmd registers by host name, which must resolve
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts

# ---- munge (authentication between clients and daemons) ------------------------------------
# A private munged on its own socket (slurm.conf AuthInfo=socket=...), so that stopping this
# cluster never pulls the rug from under another one (or the system's munged). It shares the
# machine's key, /etc/munge/munge.key, created here if missing.
MUNGE_DIR=$SLURM_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
chmod 0755 "$SLURM_DIR"          # munged runs as the munge user and must reach its directory
install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
munge_ok() { munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }
if ! munge_ok; then
  # munged refuses to run as root: run it as the munge user (it daemonizes, writes its pid file)
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
    { echo "slurm-local-start: munged did not start (the munge user must be able to reach $MUNGE_DIR; see $MUNGE_DIR/munged.log)" >&2; exit 1; }
  for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
  cp "$MUNGE_DIR/munged.pid" "$SLURM_DIR/munged.pid"   # for slurm-local-stop.sh
fi
munge_ok || { echo "slurm-local-start: munge does not work (socket $MUNGE_SOCKET)" >&2; exit 1; }
echo "munge OK ($MUNGE_SOCKET)"

# ---- slurm.conf -----------------------------------------------------------------------------
# proctrack/linuxproc + task/none: no cgroups needed (containers, no systemd).
# SlurmdParameters=config_overrides: trust CPUs= below rather than the hardware.
# MpiDefault=pmix: Debian's Open MPI only works with `srun --mpi=pmix`.
# Ports, TmpFS (where srun's pmix puts its per-step directories, named by job id) and the job ids
# are private to this SLURM_DIR/SLURM_PORT, so two such clusters on one machine do not collide.
cat > "$SLURM_CONF" <<CONF
ClusterName=local
SlurmctldHost=$NODE
SlurmctldPort=$SLURM_PORT
SlurmdPort=$((SLURM_PORT + 1))
TmpFS=$SLURM_DIR/tmp
FirstJobId=$SLURM_FIRST_JOB_ID
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=pmix
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/slurmd-%n
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$SLURM_CPUS RealMemory=$REAL_MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# ---- daemons: foreground mode (-D), backgrounded here so that we own their PIDs --------------
# -i: ignore state left in StateSaveLocation by an earlier run (start clean).
nohup slurmctld -D -i -f "$SLURM_CONF" >"$SLURM_DIR/log/slurmctld.out" 2>&1 &
echo $! > "$SLURM_DIR/slurmctld.bgpid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping 2>/dev/null | grep -q UP || {
  echo "slurm-local-start: slurmctld did not come up; tail of $SLURM_DIR/log/slurmctld.log:" >&2
  tail -20 "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmctld.out" >&2 2>/dev/null; exit 1; }

nohup slurmd -D -f "$SLURM_CONF" >"$SLURM_DIR/log/slurmd.out" 2>&1 &
echo $! > "$SLURM_DIR/slurmd.bgpid"
for _ in $(seq 100); do node_up && break; sleep 0.2; done
node_up || {
  echo "slurm-local-start: node $NODE is not idle; tail of $SLURM_DIR/log/slurmd.log:" >&2
  sinfo >&2 || true
  tail -20 "$SLURM_DIR/log/slurmd.log" "$SLURM_DIR/log/slurmd.out" >&2 2>/dev/null; exit 1; }

sinfo
echo "export SLURM_CONF=$SLURM_CONF"
