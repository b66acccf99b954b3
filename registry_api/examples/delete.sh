#!/usr/bin/env bash
source "$(dirname "$0")/_common.sh"
curl -sS -o /dev/null -w '%{http_code}\n' -X DELETE "$API/$1" "${auth[@]}"
