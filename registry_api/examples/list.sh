#!/usr/bin/env bash
source "$(dirname "$0")/_common.sh"
curl -sS "$API?limit=${1:-50}" "${auth[@]}"; echo
