#!/usr/bin/env bash
# rotate_credential.sh ID FIELD VALUE
source "$(dirname "$0")/_common.sh"
curl -sS -X PUT "$API/$1/credentials/$2" "${auth[@]}" -H 'Content-Type: application/json' -d "{\"value\": \"$3\"}"; echo
