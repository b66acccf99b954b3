#!/usr/bin/env bash
source "$(dirname "$0")/_common.sh"
curl -sS "$API/$1" "${auth[@]}"; echo
