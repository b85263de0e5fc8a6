#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (slurmctld + slurmd + munge), for the launcher tests in
# tests/slurm/ and for trying slurm/train.sbatch by hand:
#
#   sudo bash scripts/local_slurm.sh          # idempotent: a second run with everything up takes ~1 s
#   sbatch --cpus-per-task=2 slurm/train.sbatch ...
#
# Settings are those verified in docs' reference recipe (slurm-wlm 22.05 on Debian bookworm): munge auth,
# proctrack/linuxproc and task/none because sandboxes like ours have no usable cgroups. All SLURM state,
# logs and pid files live under $FMRL_SLURM_DIR (default /var/lib/fmrl-slurm), so that a reset is
# `rm -rf` of one folder; the config has to be /etc/slurm/slurm.conf, where every SLURM command looks.
set -euo pipefail

STATE_DIR=${FMRL_SLURM_DIR:-/var/lib/fmrl-slurm}
CONF=/etc/slurm/slurm.conf
WAIT_S=${FMRL_SLURM_WAIT_S:-60}

die() {
    echo "local_slurm.sh: error: $*" >&2
    exit 1
}
log() { echo "local_slurm.sh: $*"; }

# the daemons run as root (SlurmUser=root) and the key, spool and /etc/slurm need root to write
[[ $(id -u) -eq 0 ]] || die "must run as root (the daemons, /etc/slurm and /etc/munge need it); try: sudo bash $0"

NODE=$(hostname -s)
# slurmctld binds to and slurmd registers as this name: if it does not resolve, both fail obscurely later
getent hosts "$NODE" >/dev/null || die "hostname '$NODE' does not resolve (add it to /etc/hosts)"

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }

# --- slurm.conf ---------------------------------------------------------------------------------------
# GNU nproc reports OMP_NUM_THREADS when it is set (tests run with OMP_NUM_THREADS=1): a 1-CPU node would
# keep the 2-process test jobs PENDING (Reason=PartitionConfig)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mib=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# a little under the machine's memory: slurmd drains a node that reports less than RealMemory
real_mem=$((mem_mib * 9 / 10))
new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# written by scripts/local_slurm.sh (fmrl-trainer): a one-node test cluster; state under $STATE_DIR
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again only after its old credentials expire: 120 s by default, which would
# make every preemption test wait two minutes; the one node verifies a credential within milliseconds
AuthInfo=cred_expire=10
# no mail on a test machine (the default /bin/mail is not installed: an error in every log otherwise)
MailProg=/bin/true
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
# no cgroups in a sandbox: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a node that went down (e.g. the machine restarted) comes back by itself when slurmd registers
ReturnToService=2
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
# no slurmdbd: sacct has nothing to show; "scontrol show job" is the record (MinJobAge keeps a finished
# job there for 10 minutes, with its state and Restarts count)
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# a main scheduling pass every 2 s (default 60): a requeued job starts soon after its BeginTime
SchedulerParameters=sched_interval=2
# short so that the test cluster frees the node quickly when a job ends or is requeued
KillWait=10
MinJobAge=600
NodeName=$NODE CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# Fast path: a working cluster with this very configuration and the node up; nothing is touched.
if command -v sinfo >/dev/null && cmp -s "$new_conf" "$CONF"; then
    case $(node_state) in
        idle | mixed | allocated | completing)
            log "cluster already up: node $NODE is $(node_state)"
            exit 0
            ;;
    esac
fi

# --- packages ---------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not available to install them"
    log "installing slurm-wlm and munge with apt-get (one-time, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    # the package scripts try to start the daemons through init; in a container that fails or would
    # start them with the stock config, so service starts are refused for the install (policy-rc.d)
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    apt_log=$(mktemp)
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >"$apt_log" 2>&1; then
        [[ $added_policy -eq 1 ]] && rm -f "$policy"
        tail -n 30 "$apt_log" >&2
        die "apt-get install slurm-wlm munge failed (output above)"
    fi
    [[ $added_policy -eq 1 ]] && rm -f "$policy"
    rm -f "$apt_log"
fi

# --- munge --------------------------------------------------------------------------------------------
# every SLURM message is signed with this key; one node needs only a local random one
key=/etc/munge/munge.key
if [[ ! -s $key ]]; then
    log "creating $key"
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
fi
chown munge:munge "$key" && chmod 400 "$key"
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    # --force: start even if a stale socket of a previous (dead) munged is left in /run/munge
    runuser -u munge -- munged --force || die "munged did not start; see /var/log/munge/munged.log"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munge credentials do not round-trip (munge -n | unmunge)"
fi

install -d -m 755 /etc/slurm "$STATE_DIR" "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log"
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF (node $NODE, $cpus CPUs, $real_mem MiB)"
    install -m 644 "$new_conf" "$CONF"
    conf_changed=1
fi

# --- daemons ------------------------------------------------------------------------------------------
running() { # pid file -> true if that process is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}
stop() { # pid file: stop the daemon we started earlier, by its pid
    if running "$1"; then
        local pid
        pid=$(cat "$1")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}
ctld_pid=$STATE_DIR/slurmctld.pid
slurmd_pid=$STATE_DIR/slurmd-$NODE.pid
if [[ $conf_changed -eq 1 ]]; then
    # running daemons read the old file: restart them (jobs on a test cluster are expendable)
    stop "$slurmd_pid"
    stop "$ctld_pid"
fi
if ! running "$ctld_pid"; then
    log "starting slurmctld"
    # -c: forget the jobs of a controller that was killed (a machine stopped mid-test): recovered as
    # RUNNING with no process behind them, they would hold the node and keep every new job PENDING
    slurmctld -c || die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log:
$(tail -n 20 "$STATE_DIR/log/slurmctld.log" 2>/dev/null)"
fi
if ! running "$slurmd_pid"; then
    log "starting slurmd"
    slurmd -c || die "slurmd did not start; see $STATE_DIR/log/slurmd-$NODE.log:
$(tail -n 20 "$STATE_DIR/log/slurmd-$NODE.log" 2>/dev/null)"
fi

# --- wait for the node ------------------------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
resumed=0
while :; do
    state=$(node_state)
    case $state in
        idle | mixed | allocated | completing) break ;;
        down* | drain* | fail*)
            # e.g. left down from an earlier run of the daemons; a test cluster may always take it back
            if [[ $resumed -eq 0 ]]; then
                log "node $NODE is $state: resuming it"
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
    esac
    if ((SECONDS > deadline)); then
        die "node $NODE not idle after ${WAIT_S} s (state '${state:-no answer}'); logs in $STATE_DIR/log:
$(tail -n 15 "$STATE_DIR/log/slurmctld.log" 2>/dev/null)
$(tail -n 15 "$STATE_DIR/log/slurmd-$NODE.log" 2>/dev/null)"
    fi
    sleep 0.5
done
log "cluster up: node $NODE is $state ($(sinfo --version))"
