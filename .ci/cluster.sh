#!/usr/bin/env bash
# The cluster that tests/test_cluster.py trains on: Debian's Open MPI and a single-node Slurm
# (munge, slurmctld, slurmd, MpiDefault=pmi2) on this machine. Run as root; safe to rerun.
# Daemons are started directly since a CI container has no init system, and a slurm.conf this
# script did not write is left alone, so a developer's real cluster is never reconfigured.
# iproute2 is for the cluster that tests/test_multinode.py emulates (scripts/emulated-cluster.sh).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by ddl's .ci/cluster.sh"
PACKAGES=(openmpi-bin munge slurmd slurmctld slurm-client iproute2)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get -qq -o DPkg::Lock::Timeout=300 update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi

if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "cluster.sh: $CONF was not written by ddl; using that Slurm as it is"
    exit 0
fi

host=$(hostname -s)
# More CPUs than the machine has (config_overrides keeps slurmd from draining the node), so
# that 2- and 4-rank jobs start on a 1- or 2-core machine, as mpiexec's would.
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
cat > "$CONF" <<CONF
$MARK
ClusterName=ddl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=pmi2
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create

running() { pgrep -x "$1" >/dev/null; }
running munged || runuser -u munge -- /usr/sbin/munged
running slurmctld || slurmctld
running slurmd || slurmd

for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case "$state" in
        idle*|mix*|alloc*) echo "cluster.sh: Slurm up ($host, $cpus CPUs, $state)"; exit 0 ;;
        drain*|down*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "cluster.sh: Slurm did not come up; see /var/log/slurm/" >&2
exit 1
