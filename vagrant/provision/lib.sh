# shellcheck shell=bash disable=SC2034  # CHANGED is read by the scripts that source this
# Helpers for the provisioning scripts (sourced, not run). Everything here is idempotent:
# files are rewritten and services restarted only when something changed.

WEFT_ROOT=/weft                              # the repository root, synced from the host
PACKAGES=$WEFT_ROOT/target/packages          # what packaging/build produced on the host
SHARED=$WEFT_ROOT/vagrant/.shared            # CA and tokens, from the cp VM to the others
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -o DPkg::Lock::Timeout=300 --no-install-recommends -o Dpkg::Options::=--force-confold)

log() { printf '==> [%s] %s\n' "$(hostname)" "$*"; }
die() { printf 'ERROR [%s]: %s\n' "$(hostname)" "$*" >&2; exit 1; }

# Set to 1 by install_weft_pkg and put_file when they change something (read by the callers).
CHANGED=0

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

# apt_install PKG...: installs the packages that are missing (apt-get update at most once).
apt_install() {
  local p missing=()
  for p in "$@"; do is_installed "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ]; then return 0; fi
  log "apt: installing ${missing[*]}"
  apt-get update -o DPkg::Lock::Timeout=300
  apt-get install "${APT_OPTS[@]}" "${missing[@]}"
}

# install_weft_pkg NAME: installs the newest $PACKAGES/NAME_*_amd64.deb, unless that exact
# file (by checksum) is what was installed last time.
install_weft_pkg() {
  local name=$1 deb sum stamp=/var/lib/weft-vagrant/$1.sha256
  local debs=()
  shopt -s nullglob
  debs=("$PACKAGES/${name}"_*_amd64.deb)
  shopt -u nullglob
  [ ${#debs[@]} -gt 0 ] ||
    die "no ${name}_*_amd64.deb in target/packages/: run packaging/build on the host first"
  deb=$(printf '%s\n' "${debs[@]}" | sort -V | tail -n 1)
  sum=$(sha256sum "$deb" | cut -d' ' -f1)
  if is_installed "$name" && [ "$(cat "$stamp" 2>/dev/null || true)" = "$sum" ]; then
    log "$name: $(basename "$deb") already installed"
    return 0
  fi
  log "$name: installing $(basename "$deb")"
  # A local copy: apt's sandbox user may not be able to read the synced folder.
  install -D -m 644 "$deb" "/var/cache/weft-vagrant/$(basename "$deb")"
  apt-get install "${APT_OPTS[@]}" --reinstall --allow-downgrades \
    "/var/cache/weft-vagrant/$(basename "$deb")"
  install -D -m 644 /dev/null "$stamp"
  echo "$sum" >"$stamp"
  CHANGED=1
}

# put_file DEST MODE OWNER:GROUP < content: writes DEST when its content, mode or owner differ.
put_file() {
  local dest=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest" &&
    [ "$(stat -c '%a %U:%G' "$dest")" = "$mode $owner" ]; then
    rm -f "$tmp"
    return 0
  fi
  install -D -m "$mode" -o "${owner%%:*}" -g "${owner#*:}" "$tmp" "$dest"
  rm -f "$tmp"
  log "wrote $dest"
  CHANGED=1
}

# share_file NAME < content: atomically writes $SHARED/NAME (the synced folder may be NFS
# with squashed ownership, so no chown here).
share_file() {
  mkdir -p "$SHARED"
  cat >"$SHARED/.$1.tmp"
  mv -f "$SHARED/.$1.tmp" "$SHARED/$1"
}

# try_until SECONDS CMD...: runs CMD every second until it succeeds; fails after SECONDS.
try_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

# wait_until SECONDS WHAT CMD...: try_until, and dies saying what it waited for.
wait_until() {
  local timeout=$1 what=$2
  shift 2
  try_until "$timeout" "$@" || die "timed out after ${timeout}s waiting for $what"
}

# start_unit UNIT RESTART: enables UNIT and starts it, or restarts it when RESTART is 1;
# dies with the unit's journal when it is not active afterwards.
start_unit() {
  local unit=$1 restart=$2
  systemctl daemon-reload
  systemctl enable "$unit"
  if [ "$restart" = 1 ]; then
    log "restarting $unit"
    systemctl restart "$unit" || true
  else
    systemctl start "$unit" || true
  fi
  if ! systemctl is-active --quiet "$unit"; then
    systemctl status --no-pager "$unit" || true
    journalctl -u "$unit" -n 50 --no-pager || true
    die "$unit is not running (journal above)"
  fi
  log "$unit is active"
}
