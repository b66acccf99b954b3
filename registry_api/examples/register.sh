#!/usr/bin/env bash
# Register a personal server (no credentials): register.sh ENDPOINT_URL [NAME]
source "$(dirname "$0")/_common.sh"
curl -sS -X POST "$API" "${auth[@]}" -H 'Content-Type: application/json' \
  -d "{\"name\": \"${2:-example}\", \"endpoint_url\": \"$1\", \"transport\": \"streamable_http\"}"
echo
