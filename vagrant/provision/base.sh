#!/usr/bin/env bash
# Every VM: the synced repository is there and the few tools the other scripts use.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ -d "$WEFT_ROOT/vagrant" ] || die "$WEFT_ROOT is not the synced repository (synced folder not mounted?)"
apt_install curl ca-certificates python3
