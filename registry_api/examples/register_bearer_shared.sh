#!/usr/bin/env bash
# Register a tenant-shared server with a bearer credential: register_bearer_shared.sh ENDPOINT_URL SECRET
source "$(dirname "$0")/_common.sh"
curl -sS -X POST "$API" "${auth[@]}" -H 'Content-Type: application/json' \
  -d "{\"name\": \"shared\", \"endpoint_url\": \"$1\", \"auth_type\": \"bearer\",
       \"credentials\": {\"authorization\": \"$2\"}, \"is_tenant_shared\": true, \"consent_tier\": \"confirm\"}"
echo
