#!/usr/bin/env bash
# TLS termination demo (issue 15): makes a CA and two certificates (a.test, b.test) with
# openssl in a temporary directory, starts two `lbwasm backend` demo backends and
# `lbwasm serve` terminating TLS in front of them (a certificate per SNI name), then shows
# what curl and `openssl s_client` see. Everything listens on 127.0.0.1, on ports the
# system picks; everything started here is killed by its PID on exit.
#
# Usage: scripts/tls-demo.sh            (LBWASM=path/to/lbwasm to use another binary)
set -euo pipefail

cd "$(dirname "$0")/.."
LBWASM=${LBWASM:-target/release/lbwasm}
if [[ ! -x $LBWASM ]]; then
    echo "no $LBWASM: build it first (cargo build --release)" >&2
    exit 1
fi
LBWASM=$(realpath "$LBWASM")

dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap cleanup EXIT

# Waits (up to 10 s) for a line matching $2 in file $1; prints the match.
wait_for_line() {
    local file=$1 pattern=$2
    for _ in $(seq 100); do
        if grep -m1 -E "$pattern" "$file" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for /$pattern/ in $file:" >&2
    cat "$file" >&2
    return 1
}

echo "== certificates (openssl) in $dir"
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.pem -days 2 -subj "/CN=lbwasm demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
serial=4096
for name in a.test b.test; do
    stem=${name%%.*}
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$stem.key" -out "$stem.csr" -subj "/CN=$name" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
        "$name" >"$stem.ext"
    openssl x509 -req -in "$stem.csr" -CA ca.pem -CAkey ca.key -set_serial "$serial" \
        -days 2 -out "$stem.pem" -extfile "$stem.ext" 2>/dev/null
    echo "$stem.pem: $(openssl x509 -in "$stem.pem" -noout -subject -serial | tr '\n' ' ')"
    serial=$((serial + 1))
done

echo "== demo backends"
"$LBWASM" backend --port 0 --count 2 --id demo >backends.out 2>backends.err &
pids+=($!)
for _ in $(seq 100); do
    [[ $(grep -c 'listening on' backends.out 2>/dev/null) -ge 2 ]] && break
    sleep 0.1
done
backends=$(grep -oE '127\.0\.0\.1:[0-9]+' backends.out | paste -sd, -)
[[ $backends == *,* ]] || { cat backends.out backends.err >&2; exit 1; }
echo "backends: $backends"

cat >lbwasm.toml <<EOF
workers = 1

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
plugin = "round_robin"

[listener.tls]
cert = "a.pem"
key = "a.key"

[[listener.tls.certificate]]
cert = "b.pem"
key = "b.key"
EOF
for b in ${backends//,/ }; do
    printf '\n[[listener.backend]]\naddress = "%s"\n' "$b" >>lbwasm.toml
done

echo "== lbwasm serve (lbwasm.toml)"
cat lbwasm.toml
"$LBWASM" serve --config lbwasm.toml >serve.out 2>serve.err &
pids+=($!)
line=$(wait_for_line serve.out '^lbwasm listening on ') || { cat serve.err >&2; exit 1; }
addr=${line#lbwasm listening on }
port=${addr##*:}
echo "$line"

for name in a.test b.test; do
    echo
    echo "== curl --cacert ca.pem --resolve $name:$port:127.0.0.1 https://$name:$port/"
    curl -sS --cacert ca.pem --resolve "$name:$port:127.0.0.1" -D - "https://$name:$port/"
done

echo
echo "== curl --http2 (ALPN h2)"
curl -sS --http2 --cacert ca.pem --resolve "a.test:$port:127.0.0.1" \
    -o /dev/null -w 'HTTP version: %{http_version}, status %{http_code}\n' "https://a.test:$port/"

for name in a.test b.test; do
    echo
    echo "== openssl s_client -servername $name -connect 127.0.0.1:$port"
    openssl s_client -servername "$name" -connect "127.0.0.1:$port" -CAfile ca.pem \
        -alpn h2,http/1.1 </dev/null 2>/dev/null |
        grep -E '^(subject=|issuer=|Verify return code|ALPN protocol|New, |Protocol)' || true
done

echo
echo "== lbwasm stderr"
cat serve.err
