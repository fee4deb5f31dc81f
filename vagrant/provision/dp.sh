#!/usr/bin/env bash
# A dataplane VM: a demo HTTP service on 127.0.0.1:$DP_SERVICE_PORT and weft-dp@$DP_NAME in
# front of it (inbound $DP_ADDRESS:$DP_INBOUND_PORT, mTLS), joined to the cp VM with the CA
# and token it left in vagrant/.shared/. Safe to run again (`vagrant provision web`).
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${DP_NAME:?}" "${DP_SERVICE:?}" "${DP_ADDRESS:?}" "${DP_INBOUND_PORT:?}" "${DP_SERVICE_PORT:?}"
: "${CP_IP:?}"
DP_OUTBOUND=${DP_OUTBOUND:-}               # "PORT:SERVICE" or empty
TOKEN_MAX_AGE=3300                         # tokens are valid 1h; leave some margin
ADMIN_ADDRESS=127.0.0.1:9901
UNIT=weft-dp@$DP_NAME.service
STATE=/var/lib/weft/dp/$DP_NAME
ETC=/etc/weft/dp

install_weft_pkg weft-dp
getent passwd weft >/dev/null || die "the weft-dp package did not create the weft user"
pkg_changed=$CHANGED

# --- the demo service -------------------------------------------------------------------
CHANGED=0
put_file /srv/weft-demo/index.html 644 root:root <<EOF_HTML
hello from $DP_SERVICE ($(hostname))
EOF_HTML
put_file /etc/systemd/system/weft-demo.service 644 root:root <<EOF_UNIT
# Written by vagrant/provision/dp.sh: the demo service behind weft-dp@$DP_NAME.
[Unit]
Description=weft demo service $DP_SERVICE (python3 http.server)
After=network.target

[Service]
DynamicUser=yes
ExecStart=/usr/bin/python3 -m http.server $DP_SERVICE_PORT --bind 127.0.0.1 --directory /srv/weft-demo
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF_UNIT
start_unit weft-demo.service "$CHANGED"
wait_until 30 "the demo service on 127.0.0.1:$DP_SERVICE_PORT" \
  curl -fsS "http://127.0.0.1:$DP_SERVICE_PORT/"

# --- what the control plane shared -------------------------------------------------------
log "waiting for the cp VM's CA and tokens in vagrant/.shared/ (provision cp first)"
wait_until 900 "vagrant/.shared/ready from the cp VM" test -s "$SHARED/ready"
for f in ca.pem "$DP_NAME.token"; do
  [ -s "$SHARED/$f" ] || die "vagrant/.shared/$f is missing: run 'vagrant provision cp'"
done

CHANGED=$pkg_changed
# A different CA means a new control plane: the old identity is worthless, join again.
if [ -f "$ETC/ca.pem" ] && ! cmp -s "$SHARED/ca.pem" "$ETC/ca.pem"; then
  log "the control plane's CA changed: dropping $DP_NAME's old identity to join again"
  systemctl stop "$UNIT" || true
  rm -rf "${STATE:?}"/* "$ETC/$DP_NAME.token"
fi
put_file "$ETC/ca.pem" 640 root:weft <"$SHARED/ca.pem"

# The token only matters for the first join; once joined the dataplane renews with its
# certificate, so an existing identity keeps its old token file.
if [ ! -s "$STATE/cert.pem" ] || [ ! -s "$ETC/$DP_NAME.token" ]; then
  age=$(($(date +%s) - $(cat "$SHARED/ready")))
  [ "$age" -lt "$TOKEN_MAX_AGE" ] ||
    die "the tokens in vagrant/.shared/ are ${age}s old (valid 1h): run 'vagrant provision cp', then 'vagrant provision $DP_NAME'"
  put_file "$ETC/$DP_NAME.token" 640 root:weft <"$SHARED/$DP_NAME.token"
fi

# --- weft-dp -------------------------------------------------------------------------------
put_file "$ETC/$DP_NAME.toml" 640 root:weft <<EOF_TOML
# Written by vagrant/provision/dp.sh; the next provision overwrites local edits.
cp_address = "https://$CP_IP:5678"
ca_cert_file = "$ETC/ca.pem"
dataplane_file = "$ETC/$DP_NAME.yaml"
dataplane_token_file = "$ETC/$DP_NAME.token"
admin_address = "$ADMIN_ADDRESS"
EOF_TOML

outbound=""
if [ -n "$DP_OUTBOUND" ]; then
  outbound="  outbound:
    - port: ${DP_OUTBOUND%%:*}
      tags:
        kuma.io/service: ${DP_OUTBOUND#*:}"
fi
put_file "$ETC/$DP_NAME.yaml" 640 root:weft <<EOF_YAML
# Written by vagrant/provision/dp.sh; the next provision overwrites local edits.
type: Dataplane
mesh: default
name: $DP_NAME
networking:
  address: $DP_ADDRESS
  inbound:
    - port: $DP_INBOUND_PORT
      servicePort: $DP_SERVICE_PORT
      tags:
        kuma.io/service: $DP_SERVICE
        kuma.io/protocol: http
$outbound
EOF_YAML

start_unit "$UNIT" "$CHANGED"
log "waiting for $UNIT to be ready (joined, certificate and config received)"
wait_until 120 "$UNIT /ready on $ADMIN_ADDRESS" curl -fsS "http://$ADMIN_ADDRESS/ready"

# --- end to end --------------------------------------------------------------------------
# web checks its outbound. backend is defined (and so brought up) first; a parallel
# `vagrant up` may still be working on it, so a failure here is a warning with a hint.
if [ -n "$DP_OUTBOUND" ]; then
  port=${DP_OUTBOUND%%:*} target=${DP_OUTBOUND#*:}
  if try_until 60 curl -fsS "http://127.0.0.1:$port/"; then
    log "through the mesh: $(curl -fsS "http://127.0.0.1:$port/")"
  else
    log "WARNING: $target is not reachable through 127.0.0.1:$port yet (is the $target VM up?)."
    log "  try again: vagrant ssh $DP_NAME -c 'curl -s 127.0.0.1:$port/'"
  fi
fi
log "$DP_NAME is in the mesh: inbound $DP_ADDRESS:$DP_INBOUND_PORT -> 127.0.0.1:$DP_SERVICE_PORT"
