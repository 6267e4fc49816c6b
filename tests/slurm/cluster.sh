# A one-node Slurm on loopback for tests, run as root in a temporary folder (sourced).
#   slurm_cluster_start DIR   starts munged, slurmctld and slurmd; exports SLURM_CONF
#   slurm_cluster_stop        stops them (the pids recorded in DIR)
# Settings checked on Debian 12 (slurm-wlm 22.05): proctrack/linuxproc and task/none need no
# cgroups, so it runs in a container; the ports are not Slurm's defaults, so a real Slurm on
# the machine is left alone.

slurm_cluster_start() {
  SLURM_TEST_DIR=$1
  local d=$SLURM_TEST_DIR host cpus mem
  mkdir -p "$d"/munge "$d"/state "$d"/spool "$d"/log
  chmod 700 "$d"/munge
  host=$(hostname -s)
  cpus=$(nproc)
  # slurmd -C reports what slurmd itself will find; a node that claims more is drained.
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=${mem:-1000}

  dd if=/dev/urandom of="$d"/munge/munge.key bs=1024 count=1 status=none
  chmod 400 "$d"/munge/munge.key
  munged --force -S "$d"/munge/munge.socket --key-file "$d"/munge/munge.key \
    --pid-file "$d"/munge/munged.pid --log-file "$d"/log/munged.log --seed-file "$d"/munge/munge.seed ||
    { echo "slurm test: munged did not start (see $d/log/munged.log)" >&2; return 1; }

  cat >"$d"/slurm.conf <<EOF
ClusterName=crashtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$d/munge/munge.socket,cred_expire=10
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# One line per finished job (also each requeued run): the test reads states from it.
JobCompType=jobcomp/filetxt
JobCompLoc=$d/log/jobcomp.txt
KillWait=10
MinJobAge=3600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$d/slurm.conf
  slurmctld -i -f "$SLURM_CONF" || { echo "slurm test: slurmctld did not start (see $d/log/slurmctld.log)" >&2; return 1; }
  slurmd -f "$SLURM_CONF" -N "$host" || { echo "slurm test: slurmd did not start (see $d/log/slurmd.log)" >&2; return 1; }
  local i
  for i in $(seq 60); do
    if [ "$(sinfo -h -n "$host" -o %t 2>/dev/null)" = idle ]; then return 0; fi
    sleep 1
  done
  echo "slurm test: node $host not idle after 60 s:" >&2
  sinfo -N -l >&2 || true
  tail -20 "$d"/log/slurmctld.log "$d"/log/slurmd.log >&2
  return 1
}

slurm_cluster_stop() {
  local d=$SLURM_TEST_DIR f pid
  [ -n "$d" ] || return 0
  for f in "$d"/slurmd.pid "$d"/slurmctld.pid "$d"/munge/munged.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  done
}
