#!/usr/bin/env bash
# Install what bigtent's demo and tests need on Debian/Ubuntu: Nix, sshd, zstd, git, bubblewrap,
# Chromium (the dashboard's browser tests drive it headless) and the PostgreSQL server the tests
# start throwaway clusters of (BIGTENT_TEST_DB=postgresql).
# Idempotent: does nothing when everything is already there.
set -euo pipefail
need=()
command -v nix-store >/dev/null 2>&1 || need+=(nix-bin)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
# Nix CI: the runner fetches projects with git and bounds evaluations with prlimit.
command -v git >/dev/null 2>&1 || need+=(git)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
# CI evaluation runs Nix under bubblewrap, away from the runner's files (docs/security.md).
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ -x /usr/bin/chromium ] || need+=(chromium fonts-dejavu-core)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
need_root() {
  [ -z "$SUDO" ] || command -v sudo >/dev/null 2>&1 ||
    { echo "install-deps: need root (or sudo) to $1" >&2; exit 1; }
}
if [ ${#need[@]} -gt 0 ]; then
  need_root "install: ${need[*]}"
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# Build users, as Nix's own installer makes them: Nix run as root builds as one of the members
# of `build-users-group` (default `nixbld`), one per concurrent build, and refuses to build
# when that group does not exist. Debian's nix-bin makes neither (docs/security.md).
NIXBLD_USERS=${NIXBLD_USERS:-32}
if ! getent group nixbld >/dev/null; then
  need_root "create the nixbld group"
  echo "install-deps: creating the nixbld group and $NIXBLD_USERS build users"
  $SUDO groupadd --system nixbld
fi
for i in $(seq 1 "$NIXBLD_USERS"); do
  if ! getent passwd "nixbld$i" >/dev/null; then
    need_root "create the build user nixbld$i"
    $SUDO useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin \
      --gid nixbld --groups nixbld --comment "Nix build user $i" "nixbld$i"
  fi
done
