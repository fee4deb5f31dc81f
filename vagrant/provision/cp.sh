#!/usr/bin/env bash
# The control plane VM: weft-cp with its dataplane server on the private network, the
# permission web -> backend, and the CA and join tokens the dataplane VMs need, left in
# vagrant/.shared/. Safe to run again (`vagrant provision cp`): it also issues fresh tokens.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${CP_IP:?CP_IP is not set (see the Vagrantfile)}"
CA=/var/lib/weft/tls/ca.pem

install_weft_pkg weft-cp
getent passwd weft >/dev/null || die "the weft-cp package did not create the weft user"
command -v weftctl >/dev/null || die "weftctl is not installed (expected in the weft-cp package)"

# The API and diagnostics stay on localhost; dataplanes reach 5678 over the private network,
# and the generated serving certificate carries the private IP.
put_file /etc/weft/cp.toml 640 root:weft <<TOML
# Written by vagrant/provision/cp.sh; the next provision overwrites local edits.
[store]
type = "sled"
path = "/var/lib/weft/cp"
[api]
address = "127.0.0.1:5681"
[dp_server]
address = "0.0.0.0:5678"
tls_dir = "/var/lib/weft/tls"
tls_sans = ["$CP_IP"]
[diagnostics]
address = "127.0.0.1:5680"
TOML

start_unit weft-cp.service "$CHANGED"
log "waiting for weft-cp to be ready"
wait_until 120 "weft-cp /ready on 127.0.0.1:5680" curl -fsS http://127.0.0.1:5680/ready
[ -s "$CA" ] || die "$CA is missing after weft-cp started"

weftctl apply -f "$WEFT_ROOT/vagrant/policies/allow-web-to-backend.yaml"

# Only used for a dataplane's first join (later it authenticates with its certificate), so
# a fresh token each provision is harmless; they expire after 1h.
log "sharing the CA and dataplane tokens in vagrant/.shared/"
rm -f "$SHARED/ready"
share_file ca.pem <"$CA"
for pair in web:web backend:backend; do
  name=${pair%%:*} service=${pair#*:}
  token=$(weftctl generate dataplane-token --mesh default --name "$name" \
    --tag "kuma.io/service=$service" --valid-for 1h)
  [ -n "$token" ] || die "weftctl generate dataplane-token printed nothing for $name"
  printf '%s\n' "$token" | share_file "$name.token"
done
# Written last: the dataplane VMs wait for it. Its content is the time the tokens were made.
date +%s | share_file ready

weftctl inspect dataplanes --mesh default || true
log "control plane ready on https://$CP_IP:5678"
