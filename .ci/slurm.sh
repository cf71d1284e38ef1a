#!/usr/bin/env bash
# A throwaway one-node SLURM cluster for the tests (tests/test_slurm.py), run as root on loopback:
#   `slurm.sh start DIR` makes and starts it in DIR and prints the path of its slurm.conf (the tests read it from
#   MNIST_SWEEP_TEST_SLURM and give it to SLURM's commands as SLURM_CONF) once `sinfo` shows the node idle;
#   `slurm.sh stop DIR` stops every daemon it started there (by their pid files).
# Needs Debian's slurm-wlm, slurmdbd, munge and mariadb-server (22.05 in bookworm).
#
# Why a database: submitit, behind hydra/launcher=slurm, learns that a job ended without a result (scancel, time
# limit, a dead node) only from `sacct`, and so do the tests. SLURM 22.05's sacct reads job records from slurmdbd
# alone: AccountingStorageType takes only none or slurmdbd, jobcomp/filetxt only writes a text file that sacct
# cannot read (its --completion reader was removed years ago), and slurmdbd stores only in MySQL/MariaDB. So the
# lightest real setup is slurmdbd over a MariaDB that lives in DIR, on loopback, without grant tables (nothing
# but this machine can reach it, and it is deleted with DIR).
#
# Cgroups are not needed (containers often lack them): proctrack/linuxproc finds a job's processes by their
# parents, task/none binds nothing. KillWait is short so a cancelled job is gone in seconds, as the tests need.
set -euo pipefail
action=$1 dir=$(realpath -m "$2")
conf=$dir/slurm.conf
export SLURM_CONF=$conf  # slurmdbd also finds slurmdbd.conf beside it
host=$(hostname -s)
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds, else say WHAT and fail
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until timeout 10 "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "slurm.sh: $what did not come up in ${seconds}s (logs in $dir)" >&2
            return 1
        fi
        sleep 0.5
    done
}
stop_pid() {  # stop_pid PIDFILE: TERM the daemon it names, wait for it to go, then KILL
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
}

case $action in
start)
    for cmd in munged mungekey slurmctld slurmd slurmdbd mariadbd mariadb-install-db sinfo sacctmgr; do
        command -v "$cmd" >/dev/null || { echo "slurm.sh: $cmd not found (apt-get install slurm-wlm slurmdbd munge mariadb-server)" >&2; exit 1; }
    done
    [ "$(id -u)" = 0 ] || { echo "slurm.sh: needs root (the daemons run as root here)" >&2; exit 1; }
    mkdir -p "$dir"/{munge,state,spool,mysql}
    chmod 700 "$dir" "$dir/munge"

    # munge: SLURM's authentication, with a key made for this cluster
    mungekey --create --keyfile="$dir/munge/munge.key"
    munged --force --socket="$dir/munge/socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed"

    # MariaDB for slurmdbd: small buffers, no binary log, loopback TCP only
    db_port=$(port)
    mariadb-install-db --no-defaults --datadir="$dir/mysql" --user=root --skip-test-db \
        --auth-root-authentication-method=normal >"$dir/mariadb-install.log" 2>&1
    mariadbd --no-defaults --datadir="$dir/mysql" --user=root --socket="$dir/mysql.sock" \
        --pid-file="$dir/mariadb.pid" --bind-address=127.0.0.1 --port="$db_port" --skip-grant-tables \
        --skip-log-bin --innodb-buffer-pool-size=32M --performance-schema=OFF \
        --log-error="$dir/mariadb.log" >/dev/null 2>&1 &
    wait_for 60 MariaDB mariadb-admin --no-defaults --socket="$dir/mysql.sock" ping

    ctld_port=$(port) slurmd_port=$(port) dbd_port=$(port)
    cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$dir/slurmdbd.pid
LogFile=$dir/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/slurmdbd.conf"  # slurmdbd refuses a config others can read
    # the node as slurmd sees this machine (CPUs, sockets, cores, memory), reached on loopback
    node=$(slurmd -C | head -1)
    cat >"$conf" <<EOF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$dir/munge/socket
JobCompType=jobcomp/none
KillWait=2
MinJobAge=30
ReturnToService=2
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -i list cluster
    sacctmgr -i add cluster ci >/dev/null
    slurmctld -c -i
    slurmd
    wait_for 90 "the idle node" bash -c '[ "$(sinfo -h -o %t)" = idle ]'
    echo "$conf" ;;
stop)  # also after a start that failed half-way: each daemon that wrote its pid file is stopped
    [ -f "$conf" ] && timeout 10 scancel --quiet --user=root 2>/dev/null || true
    for daemon in slurmd slurmctld slurmdbd; do stop_pid "$dir/$daemon.pid"; done
    stop_pid "$dir/mariadb.pid"
    stop_pid "$dir/munge/munged.pid" ;;
*)
    echo "usage: slurm.sh start|stop DIR" >&2; exit 2 ;;
esac
