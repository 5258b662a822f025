#!/usr/bin/env bash
# Multi-node rehearsal on one machine: two network namespaces joined by a veth pair stand in for two
# hosts, and `mpirun` with a hostfile naming both launches one rank on each, over TCP on that link.
#   sudo scripts/netns_rehearsal.sh [MPIRUN OPTIONS...] COMMAND [ARGS...]
# e.g. scripts/netns_rehearsal.sh -x JAX_PLATFORMS=cpu .venv/bin/python tests/mpi/equivalence.py mpi /tmp/o.npz
# Needs root and iproute2 (ip netns, veth) and util-linux (unshare). Host A (mpirun and rank 0) and
# host B (a prted started through scripts/netns_agent.sh in place of ssh, and rank 1) each have their
# own network namespace, address in $SUBNET, loopback and hostname. Everything is torn down on exit;
# before that the veth byte counters of host B are printed on stderr ("netns_rehearsal: veth B ...").
# Environment: NP (default 2), SUBNET (a /24 prefix such as 10.199.77, default that), VENV.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-$(cd "$HERE/.." && pwd)/.venv}
SUBNET=${SUBNET:-10.199.77}
NP=${NP:-2}
NS_A=ucA-$$ NS_B=ucB-$$            # unique per run: concurrent rehearsals do not clash
IF_A=ucvA$$ IF_B=ucvB$$            # interface names (<= 15 characters)
IP_A=$SUBNET.1 IP_B=$SUBNET.2
die() { echo "netns_rehearsal: $*" >&2; exit 3; }

[[ $# -ge 1 ]] || { sed -n '2,11p' "$0" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces and a veth pair); run it as root or under sudo"
command -v ip >/dev/null || die "needs iproute2 (the 'ip' command)"
command -v unshare >/dev/null || die "needs util-linux (the 'unshare' command)"
[[ -x $VENV/bin/mpirun ]] || die "no $VENV/bin/mpirun (set VENV)"

WORK=$(mktemp -d /tmp/netns_rehearsal.XXXXXX)
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  # counters first: deleting either namespace destroys the whole veth pair
  if [[ -e /run/netns/$NS_B ]]; then
    local rx tx
    rx=$(ip netns exec "$NS_B" cat "/sys/class/net/$IF_B/statistics/rx_bytes" 2>/dev/null || echo '?')
    tx=$(ip netns exec "$NS_B" cat "/sys/class/net/$IF_B/statistics/tx_bytes" 2>/dev/null || echo '?')
    echo "netns_rehearsal: veth B rx_bytes=$rx tx_bytes=$tx" >&2
  fi
  if [[ -n ${JOB:-} ]] && kill -0 "$JOB" 2>/dev/null; then  # interrupted: let mpirun end its ranks first
    kill -TERM "$JOB" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$JOB" 2>/dev/null || break; sleep 0.5; done
  fi
  for ns in "$NS_A" "$NS_B"; do
    [[ -e /run/netns/$ns ]] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done  # our leftovers only
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$NS_A" || die "cannot create a network namespace (needs root and iproute2)"
ip netns add "$NS_B" || die "cannot create a network namespace (needs root and iproute2)"
ip link add "$IF_A" netns "$NS_A" type veth peer name "$IF_B" netns "$NS_B" || die "cannot create a veth pair"
ip -n "$NS_A" addr add "$IP_A/24" dev "$IF_A"
ip -n "$NS_B" addr add "$IP_B/24" dev "$IF_B"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "$IF_A" up
ip -n "$NS_B" link set "$IF_B" up
if command -v ping >/dev/null; then
  ip netns exec "$NS_A" ping -c1 -W5 "$IP_B" >/dev/null 2>&1 || echo "netns_rehearsal: warning: $IP_A cannot ping $IP_B" >&2
fi

printf '%s %s %s\n' "$IP_A" "$NS_A" "$NS_A" "$IP_B" "$NS_B" "$NS_B" > "$WORK/map"
printf '%s slots=1\n' "$IP_A" "$IP_B" > "$WORK/hostfile"
echo "netns_rehearsal: host A $NS_A $IP_A ($IF_A), host B $NS_B $IP_B ($IF_B), hostfile $WORK/hostfile" >&2

# mpirun runs on host A (its namespace, its hostname); PRRTE starts host B's daemon through the agent.
# Open MPI is held to TCP on the veth: btl tcp (plus self), ob1, and the runtime's out-of-band
# channel (PRRTE oob and Open MPI's) on the same subnet.
ip netns exec "$NS_A" unshare --uts -- bash -c 'hostname "$0" && exec "$@"' "$NS_A" \
  env UCLUSTER_NETNS_MAP="$WORK/map" UCLUSTER_VENV_BIN="$VENV/bin" PATH="$VENV/bin:$PATH" \
  "$VENV/bin/mpirun" --allow-run-as-root -np "$NP" --hostfile "$WORK/hostfile" --map-by node --bind-to none \
    --prtemca plm_ssh_agent "$HERE/netns_agent.sh" \
    --prtemca oob_tcp_if_include "$SUBNET.0/24" \
    --mca oob_tcp_if_include "$SUBNET.0/24" \
    --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include "$SUBNET.0/24" \
    "$@" &
JOB=$!          # in the background, so that INT/TERM reach the trap at once and still tear down
wait "$JOB"
