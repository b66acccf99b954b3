#!/usr/bin/env bash
# Register an OAuth upstream (authorization code), then print the URL to open in a browser to connect.
# usage: oauth_connect.sh ENDPOINT_URL CLIENT_ID CLIENT_SECRET
source "$(dirname "$0")/_common.sh"
id=$(curl -sS -X POST "$API" "${auth[@]}" -H 'Content-Type: application/json' -d "{
  \"name\": \"hosted-oauth\", \"endpoint_url\": \"$1\", \"auth_type\": \"oauth2\",
  \"oauth\": {\"grant\": \"authorization_code\", \"client_id\": \"$2\", \"scopes\": [\"mcp\"]},
  \"credentials\": {\"client_secret\": \"$3\"}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["id"])')
echo "server $id (pending_authorization until you connect)"
curl -sS -o /dev/null -w '%{redirect_url}\n' "$API/$id/oauth/authorize" "${auth[@]}"
# Disconnect later: curl -sS -X DELETE "$API/$id/oauth/token" "${auth[@]}"
