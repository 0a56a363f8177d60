#!/usr/bin/env bash
# A real two-node Slurm cluster (with accounting) on this one machine, for tests/cluster.
#
#   cluster.sh install        apt-get the Debian packages (idempotent; leaves no daemon running)
#   cluster.sh up             start munged, mariadbd, slurmdbd, slurmctld, slurmd n1 + n2; wait idle
#   cluster.sh down [--purge] stop everything, remove namespaces/bridge/hosts entries
#                             (--purge also deletes the state dir: DB, job state, logs)
#   cluster.sh status         sinfo + which daemons run
#   cluster.sh env            print the `export SLURM_CONF=...` line
#
# Each node is a network namespace (srmae-n1, srmae-n2) on a bridge srmae-br0 (10.77.0.1/24), its
# slurmd in its own UTS namespace so `hostname` says n1 / n2. slurmctld and slurmdbd run in the
# root namespace (controller name srmae-ctl = 10.77.0.1). Where namespaces cannot be made, both
# slurmd run on loopback with distinct ports (SRMAE_CLUSTER_MODE=local forces that).
# Needs root. Everything (config, logs, pids, spool, MariaDB datadir) lives under the state dir.
#
# Environment: SRMAE_SLURM_STATE (default /tmp/srmae-slurm), SRMAE_CLUSTER_MODE (auto|netns|local),
#              SRMAE_CLUSTER_TIMEOUT (seconds to wait for idle nodes, default 60).
set -euo pipefail

STATE=${SRMAE_SLURM_STATE:-/tmp/srmae-slurm}
MODE=${SRMAE_CLUSTER_MODE:-auto}
TIMEOUT=${SRMAE_CLUSTER_TIMEOUT:-60}
CLUSTER=srmae
CTL=srmae-ctl
NODES=(n1 n2)
BR=srmae-br0
NET=10.77.0
CTL_IP=$NET.1
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819 DB_PORT=3316
ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log SPOOL=$STATE/spool DATA=$STATE/mysql
CONF=$ETC/slurm.conf
# The default munge socket: not every Slurm client honours AuthInfo=socket= (sacctmgr -> slurmdbd
# does not in 22.05), so munged listens where all of them look.
MUNGE_SOCK=/run/munge/munge.socket.2
DB_SOCK=$RUN/mysqld.sock
HOSTS_TAG="srmae-slurm test cluster"
# Every daemon we start carries this in its environment (so does slurmstepd, which
# inherits it): `down` finds leftovers by it and never touches anything else.
MARK="SRMAE_SLURM_CLUSTER=$STATE"

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }
need_root() { [[ $(id -u) == 0 ]] || die "must run as root (it starts daemons and creates network namespaces)"; }

# One timestamped line per step in $LOG/cluster.log (where the seconds of an up/down go).
step() { if [[ -d $LOG ]]; then echo "$(date +%T.%3N) $*" >>"$LOG/cluster.log"; fi; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ip() { # n1 -> 10.77.0.11
    echo "$NET.$((10 + ${1#n}))"
}

tail_logs() {
    local f
    for f in "$@"; do
        [[ -f $f ]] || continue
        # X.out (the daemon's stderr) repeats X.log once logging is set up: show it only without.
        if [[ $f == *.out && -s ${f%.out}.log ]]; then continue; fi
        echo "---- last lines of $f" >&2
        tail -n 15 "$f" >&2
    done
}

# ------------------------------------------------------------------------------------------ install
cmd_install() {
    need_root
    local pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
    local p missing=0
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing=1
    done
    if ((!missing)); then
        say "packages already installed ($(slurmctld -V))"
        return 0
    fi
    command -v apt-get >/dev/null || die "install: apt-get not found (needs Debian/Ubuntu)"
    daemon_pids() { local d; for d in munged mariadbd mysqld slurmdbd slurmctld slurmd; do pgrep -x "$d" || true; done; }
    local before
    before=" $(daemon_pids | tr '\n' ' ') "
    # Keep the packages' postinst from starting daemons (there is no init system here anyway).
    local policy=/usr/sbin/policy-rc.d made_policy=0 ok=1
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local log=/tmp/srmae-slurm-install.log
    local apt=(apt-get -y -qq -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold --no-install-recommends)
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt-get update -qq >"$log" 2>&1 || ok=0
    fi
    if ((ok)) && ! "${apt[@]}" install "${pkgs[@]}" >>"$log" 2>&1; then
        # Stale package lists are the usual reason: refresh once and retry.
        { apt-get update -qq && "${apt[@]}" install "${pkgs[@]}"; } >>"$log" 2>&1 || ok=0
    fi
    if ((made_policy)); then rm -f "$policy"; fi
    if ((!ok)); then
        tail -n 20 "$log" >&2
        die "install: apt-get install ${pkgs[*]} failed (log: $log)"
    fi
    # Whatever a postinst may still have started: stop it (by pid); `up` starts its own copies.
    local pid
    for pid in $(daemon_pids); do
        [[ $before == *" $pid "* ]] && continue
        say "install: stopping $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid), started by a package postinst"
        kill "$pid" 2>/dev/null || true
    done
    for b in slurmctld slurmd slurmdbd munged mariadbd sacctmgr; do
        command -v "$b" >/dev/null || die "install: $b missing after apt-get install"
    done
    say "installed: $(slurmctld -V)"
}

# ---------------------------------------------------------------------------------------- network
pick_mode() {
    local err
    case $MODE in
        auto)
            if err=$(setup_netns 2>&1); then
                MODE=netns
            else
                say "up: network namespaces unavailable (${err##*$'\n'}); running both slurmd on loopback"
                teardown_netns >/dev/null 2>&1
                MODE=local
            fi ;;
        netns) err=$(setup_netns 2>&1) || die "up: could not create the bridge/namespaces: ${err##*$'\n'} (try SRMAE_CLUSTER_MODE=local)" ;;
        local) ;;
        *) die "SRMAE_CLUSTER_MODE must be auto, netns or local (got '$MODE')" ;;
    esac
    echo "$MODE" >"$STATE/mode"
}

setup_netns() { # idempotent
    if ! ip link show "$BR" >/dev/null 2>&1; then
        ip link add "$BR" type bridge || return 1
    fi
    ip addr show dev "$BR" | grep "inet $CTL_IP/" >/dev/null || ip addr add "$CTL_IP/24" dev "$BR" || return 1
    ip link set "$BR" up || return 1
    local n ns veth
    for n in "${NODES[@]}"; do
        ns=srmae-$n veth=srmae-v$n
        [[ -e /run/netns/$ns ]] || ip netns add "$ns" || return 1
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip -n "$ns" link del eth0 2>/dev/null || true
            ip link add "$veth" type veth peer name eth0 netns "$ns" || return 1
        fi
        ip link set "$veth" master "$BR" up || return 1
        ip -n "$ns" link set lo up || return 1
        ip -n "$ns" addr show dev eth0 | grep "inet $(node_ip "$n")/" >/dev/null ||
            ip -n "$ns" addr add "$(node_ip "$n")/24" dev eth0 || return 1
        ip -n "$ns" link set eth0 up || return 1
        ip -n "$ns" route show default | grep . >/dev/null || ip -n "$ns" route add default via "$CTL_IP" || return 1
    done
}

teardown_netns() {
    local n
    for n in "${NODES[@]}"; do
        [[ -e /run/netns/srmae-$n ]] && { ip netns del "srmae-$n" || say "down: could not delete netns srmae-$n"; }
        ip link del "srmae-v$n" 2>/dev/null || true
    done
    if ip link show "$BR" >/dev/null 2>&1; then ip link del "$BR" || say "down: could not delete bridge $BR"; fi
}

write_hosts() { # replace our tagged lines in /etc/hosts (rewritten in place: it may be a bind mount)
    local body
    body=$(grep -v "# $HOSTS_TAG\$" /etc/hosts || true)
    {
        printf '%s\n' "$body"
        if [[ $1 == add ]]; then
            local ip=127.0.0.1 n
            [[ $MODE == netns ]] && ip=$CTL_IP
            echo "$ip $CTL # $HOSTS_TAG"
            for n in "${NODES[@]}"; do
                [[ $MODE == netns ]] && ip=$(node_ip "$n")
                echo "$ip $n # $HOSTS_TAG"
            done
        fi
    } >/etc/hosts.srmae.tmp
    cat /etc/hosts.srmae.tmp >/etc/hosts
    rm -f /etc/hosts.srmae.tmp
}

# ----------------------------------------------------------------------------------------- config
write_config() {
    local ctl_addr=$CTL_IP n
    [[ $MODE == local ]] && ctl_addr=127.0.0.1
    mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL/ctld" "$STATE/munge"
    for n in "${NODES[@]}"; do mkdir -p "$SPOOL/$n"; done
    chmod 0755 "$STATE" "$RUN" "$STATE/munge"
    cat >"$CONF.new" <<EOF
# Written by tests/cluster/cluster.sh; regenerated by every 'up'.
ClusterName=$CLUSTER
SlurmctldHost=$CTL($ctl_addr)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10 (default 120), with KillWait=5 and the 2 s scheduler intervals below, is what
# makes a requeued job start again in ~12-17 s rather than ~160 s.
AuthInfo=cred_expire=10
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the nodes share one kernel and /sys. Tasks are bound to their CPUs by affinity,
# as on a real cluster, so a task's CPU count is what Slurm gave it.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node lines below rather than the hardware (both nodes are this one machine).
SlurmdParameters=config_overrides
# submitit reads job states through sacct: accounting is required.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
# Two "GPUs" per node: GRES scheduling without hardware, on device files named like NVIDIA's
# (gres.conf below), so jobs can ask for GPUs per node or per task and see CUDA_VISIBLE_DEVICES.
GresTypes=gpu
EOF
    local node_spec="CPUs=2 RealMemory=4000 Gres=gpu:2 State=UNKNOWN"
    for n in "${NODES[@]}"; do
        if [[ $MODE == netns ]]; then
            echo "NodeName=$n NodeAddr=$(node_ip "$n") $node_spec" >>"$CONF.new"
        else
            echo "NodeName=$n NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + 10 + ${n#n})) $node_spec" >>"$CONF.new"
        fi
    done
    mkdir -p "$STATE/dev"
    local i
    for i in 0 1; do # character devices (those of /dev/null) with the names slurmd parses an index from
        [[ -c $STATE/dev/nvidia$i ]] || mknod "$STATE/dev/nvidia$i" c 1 3
    done
    echo "Name=gpu File=$STATE/dev/nvidia[0-1]" >"$ETC/gres.conf"
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP" >>"$CONF.new"
    mv "$CONF.new" "$CONF"

    (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
# Written by tests/cluster/cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=srmae_slurm_acct
EOF
    )
    # Plain `sbatch` (no SLURM_CONF) finds the cluster too.
    mkdir -p /etc/slurm
    if [[ -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]] &&
        ! grep -q 'tests/cluster/cluster.sh' /etc/slurm/slurm.conf; then
        say "up: /etc/slurm/slurm.conf exists and is not ours; left alone (use SLURM_CONF)"
    else
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
}

# ---------------------------------------------------------------------------------------- daemons
# spawn NAME PIDFILE CMD...: start CMD detached (own session, stdio to LOG/NAME.out, never to the
# caller's pipes), tagged with $MARK; the command writes PIDFILE itself or we write $!.
spawn() {
    local name=$1 pidfile=$2
    shift 2
    env "$MARK" SLURM_CONF="$CONF" setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
    echo $! >"$pidfile"
}

wait_for() { # wait_for SECONDS WHAT CMD...: retry CMD (each try at most 5 s) until SECONDS pass;
    # gives up at once if WHAT is a daemon of ours (RUN/WHAT.pid) and it has exited.
    local t=$1 what=$2
    shift 2
    local end=$((SECONDS + t))
    while ((SECONDS < end)); do
        timeout 5 "$@" >/dev/null 2>&1 && return 0
        if [[ -f $RUN/$what.pid ]] && ! alive "$RUN/$what.pid"; then
            say "$what exited"
            return 1
        fi
        sleep 0.2
    done
    say "gave up waiting for $what after ${t}s"
    return 1
}

start_munge() {
    alive "$RUN/munged.pid" && return 0
    if [[ ! -s $STATE/munge/munge.key ]]; then
        (umask 077; dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none) ||
            die "up: could not create the munge key"
    fi
    chmod 0400 "$STATE/munge/munge.key"
    mkdir -p "$(dirname "$MUNGE_SOCK")"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    spawn munged "$RUN/munged.pid" munged --foreground --force --socket="$MUNGE_SOCK" \
        --key-file="$STATE/munge/munge.key" --log-file="$LOG/munged.log" \
        --pid-file="$RUN/munged.pid.own" --seed-file="$STATE/munge/munged.seed"
    wait_for 10 munged sh -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'" ||
        { tail_logs "$LOG/munged.log" "$LOG/munged.out"; die "up: munged did not start"; }
}

db() { mariadb --no-defaults -S "$DB_SOCK" -u root "$@"; }

start_mariadb() {
    if ! alive "$RUN/mariadbd.pid"; then
        if [[ ! -d $DATA/mysql ]]; then
            rm -rf "$DATA"
            mariadb-install-db --no-defaults --user=root --datadir="$DATA" \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$LOG/mariadb-install-db.log" 2>&1 ||
                { tail_logs "$LOG/mariadb-install-db.log"; die "up: mariadb-install-db failed"; }
        fi
        rm -f "$DB_SOCK"
        spawn mariadbd "$RUN/mariadbd.pid" mariadbd --no-defaults --user=root --datadir="$DATA" \
            --socket="$DB_SOCK" --pid-file="$RUN/mariadbd.pid.own" --log-error="$LOG/mariadbd.log" \
            --bind-address=127.0.0.1 --port=$DB_PORT --skip-name-resolve --skip-log-bin \
            --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --max-connections=50
    fi
    wait_for 30 mariadbd mariadb --no-defaults -S "$DB_SOCK" -u root -e 'SELECT 1' ||
        { tail_logs "$LOG/mariadbd.log" "$LOG/mariadbd.out"; die "up: mariadbd did not accept connections on $DB_SOCK"; }
    db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
           GRANT ALL ON srmae_slurm_acct.* TO 'slurm'@'127.0.0.1';" ||
        die "up: could not create the MariaDB user for slurmdbd"
}

start_slurmdbd() {
    alive "$RUN/slurmdbd.pid" && return 0
    spawn slurmdbd "$RUN/slurmdbd.pid" slurmdbd -D
    wait_for 30 slurmdbd sacctmgr -n -P show cluster ||
        { tail_logs "$LOG/slurmdbd.log" "$LOG/slurmdbd.out"; die "up: slurmdbd did not answer sacctmgr"; }
    if ! sacctmgr -n -P show cluster format=cluster | grep -x "$CLUSTER" >/dev/null; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "up: sacctmgr add cluster $CLUSTER failed"
    fi
    # The cluster comes with account root and user root; make sure (older DBs, hand edits).
    sacctmgr -n -P show user root format=user | grep -x root >/dev/null ||
        sacctmgr -i add user root account=root >/dev/null || die "up: sacctmgr add user root failed"
}

start_slurmctld() {
    alive "$RUN/slurmctld.pid" && return 0
    # Its own UTS namespace named like SlurmctldHost, so slurmctld knows it is the controller
    # without renaming this machine.
    spawn slurmctld "$RUN/slurmctld.pid" unshare --uts sh -c "hostname $CTL && exec slurmctld -D -f '$CONF'"
    wait_for 30 slurmctld scontrol ping ||
        { tail_logs "$LOG/slurmctld.log" "$LOG/slurmctld.out"; die "up: slurmctld did not answer scontrol ping"; }
}

start_slurmd() {
    local n=$1
    alive "$RUN/slurmd-$n.pid" && return 0
    if [[ $MODE == netns ]]; then
        spawn "slurmd-$n" "$RUN/slurmd-$n.pid" nsenter --net="/run/netns/srmae-$n" \
            unshare --uts sh -c "hostname $n && exec slurmd -D -N $n -f '$CONF'"
    else
        spawn "slurmd-$n" "$RUN/slurmd-$n.pid" unshare --uts sh -c "hostname $n && exec slurmd -D -N $n -f '$CONF'"
    fi
}

wait_idle() {
    local i states
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ $states == "n1=idle n2=idle " ]]; then return 0; fi
        # A node left down/drained from an earlier run: resume it once (ReturnToService=2 does the rest).
        if ((i == 10)) && grep -qE 'down|drain' <<<"$states"; then
            scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    say "up: nodes not idle after ${TIMEOUT}s: ${states:-sinfo gave nothing}"
    tail_logs "$LOG/slurmctld.log" "$LOG/slurmd-n1.log" "$LOG/slurmd-n2.log" "$LOG/slurmd-n1.out" "$LOG/slurmd-n2.out"
    die "up: nodes did not become idle (logs in $LOG)"
}

cmd_up() {
    need_root
    command -v slurmctld >/dev/null || die "up: slurmctld not installed (run: $0 install)"
    mkdir -p "$STATE" "$LOG" "$RUN"
    local prev
    prev=$(cat "$STATE/mode" 2>/dev/null || true)
    if [[ -n $prev ]] && alive "$RUN/slurmctld.pid"; then MODE=$prev; fi
    pick_mode
    write_config
    write_hosts add
    export SLURM_CONF=$CONF
    step start_munge; start_munge
    step start_mariadb; start_mariadb
    step start_slurmdbd; start_slurmdbd
    step start_slurmctld; start_slurmctld
    local n
    step start_slurmd; for n in "${NODES[@]}"; do start_slurmd "$n"; done
    step wait_idle; wait_idle
    step up done
    say "up: cluster '$CLUSTER' ready ($MODE mode, nodes ${NODES[*]}, partition debug; state in $STATE)"
    echo "export SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------------------------------- down
stop_daemons() { # stop_daemons NAME...: SIGTERM them together, wait up to 10 s, then SIGKILL
    local name f pid i pids=() names=()
    step "stop $*"
    for name in "$@"; do
        f=$RUN/$name.pid
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            pids+=("$pid") names+=("$name")
        fi
    done
    for ((i = 0; i < 100 && ${#pids[@]}; i++)); do
        kill -0 "${pids[@]}" 2>/dev/null || { local left=() j; for j in "${!pids[@]}"; do
            kill -0 "${pids[j]}" 2>/dev/null && left+=("${pids[j]}"); done; pids=(${left[@]+"${left[@]}"}); }
        ((${#pids[@]})) || break
        sleep 0.1
    done
    for pid in ${pids[@]+"${pids[@]}"}; do
        say "down: pid $pid ($(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | cut -c1-40)) ignored SIGTERM for 10 s; killing"
        kill -9 "$pid" 2>/dev/null || true
    done
    for name in "$@"; do rm -f "$RUN/$name.pid" "$RUN/$name.pid.own"; done
}

marked_pids() { # processes carrying our environment mark (daemons, slurmstepd, job tasks)
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        if grep -qz "^$MARK\$" "$p/environ" 2>/dev/null; then echo "${p#/proc/}"; fi
    done
    return 0
}

cmd_down() {
    need_root
    local purge=0
    [[ ${1:-} == --purge ]] && purge=1
    export SLURM_CONF=$CONF
    if [[ -f $CONF ]] && alive "$RUN/slurmctld.pid"; then
        # Cancel what is still queued or running so a later `up` does not inherit it.
        if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
            step scancel; scancel --full -u root 2>/dev/null || true
            wait_for 10 squeue sh -c '[ -z "$(squeue -h -t PD,R,CG,S -o %i)" ]' || say "down: jobs still listed after scancel"
        fi
    fi
    local n
    # slurmctld saves its state and queues unsent accounting records (sent at the next start);
    # slurmdbd needs MariaDB to finish; everyone needs munge until the end.
    stop_daemons $(printf 'slurmd-%s ' "${NODES[@]}") slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    # Leftovers: slurmstepd (inherits the mark from slurmd) and anything in the node namespaces.
    local pids
    pids=$(marked_pids)
    for n in "${NODES[@]}"; do
        [[ -e /run/netns/srmae-$n ]] && pids+=" $(ip netns pids "srmae-$n" 2>/dev/null | tr '\n' ' ')"
    done
    if [[ -n ${pids// /} ]]; then
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        sleep 1
        pids=$(marked_pids)
        # shellcheck disable=SC2086
        [[ -n $pids ]] && { say "down: killing leftover pids $pids"; kill -9 $pids 2>/dev/null || true; }
    fi
    step teardown_netns; teardown_netns
    write_hosts remove
    step down done
    if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]] && ((purge)); then
        rm -f /etc/slurm/slurm.conf
    fi
    rm -f "$STATE/mode"
    if ((purge)); then rm -rf "$STATE"; fi
    if ((purge)); then say "down: stopped; state $STATE removed"; else say "down: stopped (state kept in $STATE)"; fi
}

# ----------------------------------------------------------------------------------------- status
cmd_status() {
    export SLURM_CONF=$CONF
    local d f rc=0
    echo "state: $STATE  mode: $(cat "$STATE/mode" 2>/dev/null || echo none)"
    for d in munged mariadbd slurmdbd slurmctld slurmd-n1 slurmd-n2; do
        f=$RUN/$d.pid
        if alive "$f"; then echo "  $d: running (pid $(cat "$f"))"; else echo "  $d: not running"; rc=1; fi
    done
    if alive "$RUN/slurmctld.pid" && alive "$RUN/munged.pid"; then
        sinfo -N -o '%N %P %t %c %m' 2>&1 || rc=1
    fi
    return $rc
}

lock() { # one install/up/down at a time (several test sessions may share this machine)
    exec 9>"/tmp/srmae-slurm.lock"
    flock -w 300 9 || die "another cluster.sh install/up/down held /tmp/srmae-slurm.lock for 300 s"
}

case ${1:-} in
    install | up | down) lock ;;
esac
case ${1:-} in
    install) cmd_install ;;
    up) cmd_up ;;
    down) shift; cmd_down "$@" ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install | up | down [--purge] | status | env" >&2; exit 2 ;;
esac
