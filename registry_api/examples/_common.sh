#!/usr/bin/env bash
set -euo pipefail
: "${SCAILINK_URL:=http://127.0.0.1:8080}"
: "${TOKEN:?set TOKEN, e.g. TOKEN=\$(cat .scailink/dev_admin_token)}"
API="$SCAILINK_URL/v1/modules/scailink/remote-servers"
auth=(-H "Authorization: Bearer $TOKEN")
