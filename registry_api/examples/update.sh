#!/usr/bin/env bash
# update.sh ID NEW_NAME
source "$(dirname "$0")/_common.sh"
curl -sS -X PATCH "$API/$1" "${auth[@]}" -H 'Content-Type: application/json' -d "{\"name\": \"$2\"}"; echo
