#!/usr/bin/env bash
# Stand-in for ssh in the multi-node rehearsal (scripts/netns_rehearsal.sh): PRRTE calls
#   netns_agent.sh HOST COMMAND...
# exactly as it would call `ssh HOST COMMAND...`. HOST (an address or name from the hostfile) is
# looked up in the map file $UCLUSTER_NETNS_MAP (lines "HOST NAMESPACE HOSTNAME"); the command then
# runs inside that network namespace, under its own hostname (a private UTS namespace), with a
# fresh environment like an ssh login: HOME, and PATH with the venv's bin first.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 HOST COMMAND..." >&2; exit 2; }
host=$1; shift
map=${UCLUSTER_NETNS_MAP:?netns_agent.sh: UCLUSTER_NETNS_MAP (the rehearsal map file) is not set}
read -r ns name < <(awk -v h="$host" '$1 == h { print $2, $3; exit }' "$map") || true
[[ -n ${ns:-} ]] || { echo "netns_agent.sh: host '$host' is not in $map" >&2; exit 255; }
venv_bin=${UCLUSTER_VENV_BIN:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin}
# ssh hands its arguments, joined by spaces, to the remote login shell; so do we.
exec ip netns exec "$ns" unshare --uts -- env -i HOME="${HOME:-/root}" PATH="$venv_bin:/usr/local/bin:/usr/bin:/bin" \
  bash -c 'hostname "$0" && exec bash -c "$1"' "$name" "$*"
