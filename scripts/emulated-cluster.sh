#!/usr/bin/env bash
# A cluster of N "nodes" on this machine, for tests, CI and trying ddl across a network:
#
#   scripts/emulated-cluster.sh up N RATE     nodes n1..nN (RATE: none, 100mbit, 1gbit)
#   scripts/emulated-cluster.sh exec NODE CMD...   run CMD on NODE as its user would
#   scripts/emulated-cluster.sh status        the nodes, their addresses and link counters
#   scripts/emulated-cluster.sh down          remove everything `up` made
#
# Each node is a network namespace with one interface, eth0, at 10.99.0.K/24: one end of a veth
# pair whose other end is a port of a bridge in a namespace of its own (the switch), so nothing is
# added to this machine's own network. Every link is shaped both ways with tbf at RATE (netem is
# not available everywhere). Names resolve through /etc/netns/NODE/hosts, which `ip netns exec`
# puts over /etc/hosts. scripts/netns-agent is the cluster's ssh: mpiexec on a node starts the
# others' processes through it (docs/clusters-emulated.md). Needs root, iproute2, and the kernel's
# veth, bridge and tbf.
#
# DDL_CLUSTER_PREFIX=P (lower-case letters; default n) names the nodes P1..PN instead, with a
# switch and a state of their own: a second cluster beside the first, which the first's `down`
# leaves alone (tests of different parts can run at once).
set -euo pipefail

P=${DDL_CLUSTER_PREFIX:-n}
[[ $P =~ ^[a-z]+$ ]] || { echo "emulated-cluster.sh: DDL_CLUSTER_PREFIX must be lower-case letters, not '$P'" >&2; exit 1; }
if [ "$P" = n ]; then
    SWITCH=ddl-switch STATE=/run/ddl-emulated-cluster       # STATE: "N RATE" while it is up
else
    SWITCH=ddl-switch-$P STATE=/run/ddl-emulated-cluster-$P
fi
SUBNET=10.99.0

die() { echo "emulated-cluster.sh: $*" >&2; exit 1; }
nodes() { seq 1 "$(cut -d' ' -f1 "$STATE")"; }

# tbf needs a bucket of at least one packet (64 KiB with veth's segmentation offloads) and about
# a timer tick's worth of bytes at the rate; 2 ms of traffic covers both at 100 Mbit/s and up.
shape() {   # NAMESPACE DEVICE RATE
    local bits=${3%bit}
    case $bits in *g) bits=$(( ${bits%g} * 1000000000 ));; *m) bits=$(( ${bits%m} * 1000000 ));; esac
    local burst=$(( bits / 8 / 500 > 65536 ? bits / 8 / 500 : 65536 ))
    tc -n "$1" qdisc replace dev "$2" root tbf rate "$3" burst "$burst" latency 100ms
}

# Whether namespace $1 exists, by its whole name: `grep -w ddl-switch` also matched a second
# cluster's ddl-switch-el, and refused to start the first beside it.
has_ns() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

up() {
    local n=$1 rate=$2
    [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 200 )) || die "N must be 1 to 200, not '$n'"
    [[ $rate =~ ^(none|[0-9]+[mg]bit)$ ]] || die "RATE must be none, 100mbit, 1gbit (or Nmbit, Ngbit), not '$rate'"
    (( EUID == 0 )) || die "needs root (network namespaces)"
    command -v ip >/dev/null && command -v tc >/dev/null || die "needs ip and tc (apt-get install iproute2)"
    [ -e "$STATE" ] && die "a cluster is already up ($(cat "$STATE")): run \`$0 down\` first"
    for k in $(seq 1 "$n"); do
        ! has_ns "$P$k" || die "namespace $P$k exists and is not this script's"
    done
    ! has_ns "$SWITCH" || die "namespace $SWITCH exists and is not this script's"
    echo "$n $rate" > "$STATE"
    trap 'echo "emulated-cluster.sh: up failed; cleaning up" >&2; down' ERR
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    local hosts="127.0.0.1 localhost"$'\n'
    for k in $(seq 1 "$n"); do hosts+="$SUBNET.$k $P$k"$'\n'; done
    for k in $(seq 1 "$n"); do
        ip netns add "$P$k"
        mkdir -p "/etc/netns/$P$k"
        printf '%s' "$hosts" > "/etc/netns/$P$k/hosts"
        ip -n "$SWITCH" link add "$P$k" type veth peer name eth0 netns "$P$k"
        ip -n "$SWITCH" link set "$P$k" master br0 up
        ip -n "$P$k" addr add "$SUBNET.$k/24" dev eth0
        ip -n "$P$k" link set eth0 up
        ip -n "$P$k" link set lo up
        if [ "$rate" != none ]; then
            shape "$P$k" eth0 "$rate"           # the node's uplink
            shape "$SWITCH" "$P$k" "$rate"      # and the switch's port down to it
        fi
    done
    trap - ERR
    echo "emulated-cluster.sh: ${P}1..$P$n up at $SUBNET.1..$SUBNET.$n, links $rate"
}

down() {
    local n=0
    [ -e "$STATE" ] && n=$(cut -d' ' -f1 "$STATE")
    for k in $(seq 1 "$n"); do
        # Processes left on a node (a job's, cut off by its link) would keep it alive unseen.
        ip netns pids "$P$k" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
        ip netns del "$P$k" 2>/dev/null || true
        rm -rf "/etc/netns/$P$k"
    done
    ip netns del "$SWITCH" 2>/dev/null || true
    rmdir /etc/netns 2>/dev/null || true
    rm -f "$STATE"
}

status() {
    [ -e "$STATE" ] || { echo "no emulated cluster is up"; return 3; }
    echo "up: $(cut -d' ' -f1 "$STATE") nodes, links $(cut -d' ' -f2 "$STATE")"
    for k in $(nodes); do
        local s=/sys/class/net/eth0
        ip netns exec "$P$k" sh -c "echo $P$k $SUBNET.$k eth0 \$(cat $s/operstate) \
            rx=\$(cat $s/statistics/rx_bytes) tx=\$(cat $s/statistics/tx_bytes)"
    done
}

# What a user's shell on NODE would have: the same machine's cores shared by every node (ddl's
# ranks then yield when idle, as when oversubscribed; Open MPI must not bind, or every node would
# pin its first rank to core 0), and MPI told to use the link, not the shared memory that
# processes in different namespaces of one machine could still reach.
node_env() {
    export DDL_CLUSTER_PREFIX=$P DDL_NODES_SHARE_CORES=1 UCX_TLS=tcp,self UCX_NET_DEVICES=eth0 \
        OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=eth0 OMPI_MCA_oob_tcp_if_include=eth0 \
        OMPI_MCA_hwloc_base_binding_policy=none
}

run_on() {
    local node=$1; shift
    [ -e "$STATE" ] || die "no emulated cluster is up"
    [[ $node =~ ^$P[0-9]+$ ]] && (( ${node#"$P"} >= 1 && ${node#"$P"} <= $(cut -d' ' -f1 "$STATE") )) \
        || die "no node '$node' (the nodes are ${P}1..$P$(cut -d' ' -f1 "$STATE"))"
    node_env
    # A host name of its own too (a UTS namespace), as MPI_Get_processor_name reports it.
    exec ip netns exec "$node" unshare --uts sh -c 'echo "$0" > /proc/sys/kernel/hostname; exec "$@"' \
        "$node" "$@"
}

case ${1:-} in
    up) (( $# == 3 )) || die "usage: $0 up N RATE"; up "$2" "$3" ;;
    down) down; echo "emulated-cluster.sh: down" ;;
    status) status ;;
    exec) (( $# >= 3 )) || die "usage: $0 exec NODE COMMAND..."; shift; run_on "$@" ;;
    *) die "usage: $0 up N RATE | down | status | exec NODE COMMAND..." ;;
esac
