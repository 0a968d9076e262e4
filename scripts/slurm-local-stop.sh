#!/usr/bin/env bash
# Stop the local SLURM started by scripts/slurm-local-start.sh (same SLURM_DIR, default
# /tmp/local-slurm). Only the PIDs that script recorded are signalled: slurmd, slurmctld, and
# munged if (and only if) the start script launched it. Safe to run twice or when nothing runs.
#   --keep-munge   leave munged running (used by the start script when it restarts SLURM)
# Jobs still running are killed with slurmd (their processes are its children's children; a stray
# moetrain rank may need `scancel` first if you care about its checkpoint).
SLURM_DIR=${SLURM_DIR:-/tmp/local-slurm}
files="slurmd.bgpid slurmctld.bgpid munged.pid"
[ "${1:-}" = "--keep-munge" ] && files="slurmd.bgpid slurmctld.bgpid"
for f in $files; do
  [ -f "$SLURM_DIR/$f" ] || continue
  pid=$(cat "$SLURM_DIR/$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped ${f%%.*} (pid $pid)"
  fi
  rm -f "$SLURM_DIR/$f"
done
exit 0
