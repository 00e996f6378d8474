#!/bin/sh
# Write .env (next to docker-compose.yml) with a fresh random RAY_AUTH_TOKEN, readable by you only.
#   deploy/make-env.sh           # refuses to overwrite an existing .env
#   deploy/make-env.sh --force   # rotate the token (restart the cluster afterwards)
# .env is git-ignored: never commit it, never bake it into an image.
set -eu
cd "$(dirname "$0")/.."
if [ -e .env ] && [ "${1:-}" != "--force" ]; then
    echo "make-env: .env already exists; pass --force to replace its token" >&2
    exit 1
fi
token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
umask 077
tmp=$(mktemp .env.XXXXXX)
printf 'RAY_AUTH_TOKEN=%s\n' "$token" >"$tmp"
chmod 600 "$tmp"
mv "$tmp" .env
echo "make-env: wrote $(pwd)/.env (mode 600) with a new RAY_AUTH_TOKEN"
