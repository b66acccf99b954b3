#!/usr/bin/env bash
source "$(dirname "$0")/_common.sh"
curl -sS -X POST "$API/$1/refresh" "${auth[@]}"; echo
