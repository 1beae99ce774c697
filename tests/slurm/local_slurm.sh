#!/bin/bash
# A throw-away single-node SLURM cluster (munged + slurmctld + slurmd, as root) for the
# requeue drill (tests/slurm/test_requeue.py).
#
#   local_slurm.sh start [BASE]   -> prints "export SLURM_CONF=BASE/etc/slurm.conf"
#   local_slurm.sh stop  [BASE]   -> cancels jobs, stops daemons, leaves BASE (logs) in place
#   local_slurm.sh status [BASE]
#
# BASE (required): keep it short (unix socket paths < 108 chars).
# munged runs with --force because it otherwise refuses a socket dir with a parent that is
# not o+x (pytest's /tmp/pytest-of-root is 0700). Env knobs:
#   CTLD_PORT / SLURMD_PORT   fixed ports (default: two free ports picked at start)
#   CLUSTER_NAME              default "local<ctldport>"
# Everything (munge key+socket, state, spool, logs, pid files) lives under BASE; nothing in
# /etc is used, so several clusters can run side by side (distinct BASE and ports).
set -euo pipefail
cmd=${1:-}
BASE=${2:?usage: local_slurm.sh start|stop|status BASE}
CONF=$BASE/etc/slurm.conf
MUNGE_SOCK=$BASE/munge/munge.sock

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    if pid_alive "$BASE/run/slurmctld.pid"; then echo "already running: $BASE" >&2; exit 1; fi
    command -v slurmctld >/dev/null || { echo "install: apt-get install -y slurmctld slurmd slurm-client munge" >&2; exit 1; }
    rm -rf "$BASE/state" "$BASE/spool" "$BASE/run" "$BASE/log/jobcomp.txt"
    mkdir -p "$BASE"/{etc,munge,state,spool,log,run}
    chmod 755 "$BASE" "$BASE/munge"
    # --- munge: private key + socket (no /etc/munge, no system munged needed)
    if [[ ! -s $BASE/munge/munge.key ]]; then
        dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$BASE/munge/munge.key"
    fi
    munged --force --key-file="$BASE/munge/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$BASE/munge/munged.pid" --log-file="$BASE/log/munged.log" \
        --seed-file="$BASE/munge/munged.seed"
    # --- slurm.conf
    local ctld_port=${CTLD_PORT:-$(free_port)} slurmd_port=${SLURMD_PORT:-$(free_port)}
    local host; host=$(hostname -s)
    # node line straight from the hardware slurmd sees (CPUs/sockets/cores/RealMemory),
    # so the node is never drained for "Low RealMemory"/"Low socket*core*thread count"
    local node; node=$(slurmd -C | head -n1)
    cat > "$CONF" <<EOF
ClusterName=${CLUSTER_NAME:-local$ctld_port}
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munge socket; cred_expire also sets the BeginTime delay of a requeued job
# (default 120 s); 5 is the smallest value accepted
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=86400
KillWait=5
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    # SLURM_CONF in the daemons' environment also marks their slurmstepd children (stop()).
    SLURM_CONF=$CONF slurmctld -f "$CONF"
    SLURM_CONF=$CONF slurmd -f "$CONF"
    for _ in $(seq 1 150); do
        [[ $(SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null) == idle ]] && { echo "export SLURM_CONF=$CONF"; return 0; }
        sleep 0.2
    done
    echo "node did not become idle; see $BASE/log" >&2
    SLURM_CONF=$CONF sinfo -R >&2 || true
    exit 1
}

stop() {
    export SLURM_CONF=$CONF
    if pid_alive "$BASE/run/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 50); do [[ -z $(squeue -h -t R,CG,S 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    # TERM all three at once (each takes ~1.5-2 s to exit), KILL what is left after 10 s
    local pids=()
    for f in "$BASE/run/slurmd.pid" "$BASE/run/slurmctld.pid" "$BASE/munge/munged.pid"; do
        pid_alive "$f" && { pids+=("$(cat "$f")"); kill -TERM "$(cat "$f")"; }
    done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p"
    done
    # leftover slurmstepd of THIS cluster: forked by our slurmd, so they carry our SLURM_CONF
    for d in /proc/[0-9]*; do
        [[ $(cat "$d/comm" 2>/dev/null) == slurmstepd ]] || continue
        if tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            kill -KILL "${d#/proc/}" 2>/dev/null || true
        fi
    done
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
}

status() {
    for f in "$BASE/munge/munged.pid" "$BASE/run/slurmctld.pid" "$BASE/run/slurmd.pid"; do
        if pid_alive "$f"; then echo "$(basename "$f" .pid): running pid $(cat "$f")"; else echo "$(basename "$f" .pid): stopped"; fi
    done
    pid_alive "$BASE/run/slurmctld.pid" && SLURM_CONF=$CONF sinfo
    return 0
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [BASE]" >&2; exit 2 ;;
esac
