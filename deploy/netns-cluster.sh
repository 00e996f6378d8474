#!/usr/bin/env bash
# A real multi-host Ray cluster on one Linux machine, without Docker: every service of
# docker-compose.yml runs in its own network namespace (own address on a private bridge), with the
# command, environment and healthcheck read from docker-compose.yml (see deploy/netns_cluster.py).
#
#   sudo deploy/netns-cluster.sh up       # namespaces + ray-head, ray-worker-1, ray-worker-2
#   sudo deploy/netns-cluster.sh status   # alive Ray nodes, as JSON
#   sudo deploy/netns-cluster.sh run      # the driver service's command; exits with its code
#   sudo deploy/netns-cluster.sh exec ray-head -- ray status
#   sudo deploy/netns-cluster.sh down     # kill every process, delete namespaces and state
#   sudo deploy/netns-cluster.sh demo     # up + run + down, cleaning up whatever happens
#
# Needs root and iproute2. Ray comes from $PYTHON's environment (default: the repo's .venv).
# DISTGRAPH_NETNS_PREFIX (default dg) and DISTGRAPH_NETNS_SUBNET (default 10.231.7.0/24) let two
# clusters coexist.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
PYTHON=${PYTHON:-$root/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
helper=("$PYTHON" "$here/netns_cluster.py" --compose "$root/docker-compose.yml")

action=${1:-}
[ $# -gt 0 ] && shift
case "$action" in
    up)
        # The helper cleans up after its own errors; the trap also covers signals and crashes.
        trap '"${helper[@]}" down >&2' EXIT
        "${helper[@]}" up "$@"
        trap - EXIT
        ;;
    run | exec | status | plan | down)
        exec "${helper[@]}" "$action" "$@"
        ;;
    demo)
        trap '"${helper[@]}" down' EXIT
        "${helper[@]}" up
        "${helper[@]}" status
        "${helper[@]}" run "$@"
        ;;
    *)
        echo "usage: $0 up|run|exec SERVICE -- CMD|status|plan|down|demo" >&2
        exit 2
        ;;
esac
