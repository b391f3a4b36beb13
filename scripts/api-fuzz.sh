#!/usr/bin/env bash
# The API contract, checked by a fuzzer: schemathesis (pinned, in a venv under
# target/) generates requests for every operation of /v1/openapi.json and
# checks each answer (no server error, a declared status, the declared
# content type and body schema). The server runs here, on the production path
# (TLS), on a port it picks, in a temp dir, and is stopped afterwards. A
# project, an image and a node exist first, so operations behind a name are
# reached; the document's links lead from creates to gets and deletes.
#   EXAMPLES=N   generated cases per operation and phase (default 25)
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${EXAMPLES:-25}
venv=target/schemathesis-venv
if ! "$venv/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  echo "api-fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet -p novacron
dir=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
# A rate limit no generated burst reaches: 429 is checked by the test suite, not here.
# Backup stores it adds go under the temp dir (the server makes their directories).
target/debug/novacron server --data-dir "$dir" --listen 127.0.0.1:0 \
  --rate-limit 100000 --rate-burst 100000 --backup-store-root "$dir/stores" >"$dir/server.log" 2>&1 &
server=$!
for _ in $(seq 300); do
  [ -s "$dir/listen.addr" ] && [ -s "$dir/admin.token" ] && [ -s "$dir/pki/ca.crt" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  sleep 0.1
done
base="https://$(tr -d '\n' <"$dir/listen.addr")"
token=$(tr -d '\n' <"$dir/admin.token")
ca="$dir/pki/ca.crt"
api() {
  local method=$1 path=$2
  shift 2
  curl -fsS --cacert "$ca" -H "Authorization: Bearer $token" -X "$method" "$base$path" "$@" >/dev/null
}
api POST /v1/projects -H 'content-type: application/json' -d '{"name":"fuzz"}'
api POST /v1/images -H 'content-type: application/json' -d '{"name":"fuzz-image","format":"kernel","public":true}'
for part in kernel initrd; do
  head -c 4096 /dev/zero | api PUT "/v1/images/fuzz-image/files/$part" --data-binary @-
done

# The server's refusals say what the fuzzer ran into (a revoked token, a lockout).
refusals() {
  curl -fsS --cacert "$ca" -H "Authorization: Bearer $token" "$base/v1/audit?limit=1000" 2>/dev/null |
    python3 -c 'import collections, json, sys
items = json.load(sys.stdin)["items"]
seen = collections.Counter((r["entry"]["status"], r["entry"].get("reason")) for r in items if r["entry"]["status"] in (401, 403))
for (status, reason), n in seen.most_common(10):
    print(f"api-fuzz: {n} x {status} {reason}")' >&2 ||
    echo "api-fuzz: the fuzzer's own token no longer works" >&2
}
# From the temp dir: schemathesis keeps a cache of past failures in its working directory.
root=$PWD
fuzz() {
  (cd "$dir" && "$root/$venv/bin/st" --config-file "$root/scripts/schemathesis.toml" run "$base/v1/openapi.json" \
    --tls-verify "$ca" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$EXAMPLES" \
    --seed 1 \
    --generation-database none \
    --workers 1 \
    --no-color "$@")
}
# Revoking tokens last: the fuzzer finds the name of its own token in the
# token list, and once it revokes it every later request would be a 401.
fuzz --exclude-name "DELETE /v1/tokens/{name}" --exclude-path-regex '^/v1/ca/' || status=$?
refusals
# A CA rotation changes the server's certificate mid-run (and finishing one
# leaves a client that kept the old CA out): this phase checks the answers,
# not the trust, which the certificates tests check with real agents.
fuzz --include-path-regex '^/v1/ca/' --tls-verify false --phases examples,coverage,fuzzing || status=$?
fuzz --include-name "DELETE /v1/tokens/{name}" --phases examples,coverage,fuzzing || status=$?
exit "${status:-0}"
