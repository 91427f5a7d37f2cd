#!/usr/bin/env bash
# tls.sh - TLS termination in lbwasm (rustls) and NGINX (OpenSSL), side by side, loopback
# (127.0.0.1) only.
#
# Makes, in a fresh temp dir, a CA and a server certificate for a.test (+ IP SAN 127.0.0.1),
# ECDSA P-256, with openssl; then starts, each in its own session (tracked by PID, killed
# by process group on exit, never by name):
#   * backends : ONE `lbwasm backend --count 3` process, 127.0.0.1:9401-9403, HTTP/1.1
#   * lbwasm   : https://127.0.0.1:9411, `serve --tls-cert --tls-key --plugin round_robin`,
#                1 worker; admin on 127.0.0.1:9413 (read between runs: TLS handshake
#                counters)
#   * nginx    : https://127.0.0.1:9412, `listen ... ssl`, TLSv1.2 TLSv1.3, session
#                tickets/cache at their defaults, `proxy_pass` to an upstream of the 3
#                backends with `keepalive 32`, 1 worker, access_log off; stub_status on
#                127.0.0.1:9414 and, for the resumption probe only, a copy of the TLS
#                server logging $ssl_session_reused on 127.0.0.1:9415
# checks that each balancer answers `curl --cacert ca.pem https://a.test:PORT/` with 200,
# reports what `openssl s_client` negotiates (TLS 1.3 and 1.2, ALPN, resumption), then runs
# wrk rounds alternating lbwasm, nginx, lbwasm, nginx ... of two scenarios:
#   keepalive : wrk -t1 -c32 --latency https://127.0.0.1:PORT/ (TLS once per connection)
#   handshake : the same with -H 'Connection: close': one new TLS connection per request
#               (wrk offers each new connection the TLS session of its previous one, so these
#               are mostly resumed handshakes; the probe says how many)
# Prints, per scenario, medians of req/s, p50/p99 (wrk), new connections per second (seen
# by the balancer: lbwasm's handshake counter, nginx's accepted connections), the CPU each
# balancer's process used per request (utime+stime from /proc, its whole session), errors,
# and the lbwasm/nginx ratios.
#
# Usage: bench/tls.sh [options]
#   -d SECS  duration of each wrk run (default 10)   -c N  wrk connections (default 32)
#   -t N     wrk threads (default 1)                 -r N  rounds (default 3)
#   -w SECS  warmup per balancer and scenario (default 2)
#   -S LIST  scenarios, comma-separated, from keepalive,handshake (default both)
#   -L LIST  balancers, comma-separated, from lbwasm,nginx (default both)
#   -T SECS  hard wall-clock limit for the whole script (default 240)
#   -k       keep the temp dir (certificates, configs, logs, wrk output)
#   -h       this help
# Env: TB_BASE (default /tmp/tlsbench), TB_BACKEND_BASE (9401), TB_LBWASM_PORT (9411),
#      TB_NGINX_PORT (9412), TB_LBWASM_ADMIN_PORT (9413), TB_NGINX_STATUS_PORT (9414),
#      TB_NGINX_PROBE_PORT (9415), LBWASM (default: target/release/lbwasm, built if missing),
#      TB_LBWASM_LOG (lbwasm --log-level, default warn,rustls=error: wrk sends the IP address
#      as SNI, and rustls warns about that once per handshake, which would bench logging).
# Exit status: 0 done, 1 error, 2 a required tool (wrk, nginx, openssl) is missing.

set -uo pipefail
set +m
export PATH="$PATH:/usr/sbin:/sbin:/usr/local/sbin"
export LC_ALL=C

TB_BASE=${TB_BASE:-/tmp/tlsbench}
BACKEND_BASE=${TB_BACKEND_BASE:-9401}
LBWASM_PORT=${TB_LBWASM_PORT:-9411}
NGINX_PORT=${TB_NGINX_PORT:-9412}
ADMIN_PORT=${TB_LBWASM_ADMIN_PORT:-9413}
STATUS_PORT=${TB_NGINX_STATUS_PORT:-9414}
PROBE_PORT=${TB_NGINX_PROBE_PORT:-9415}
REPO=$(cd "$(dirname "$0")/.." && pwd)
LBWASM=${LBWASM:-$REPO/target/release/lbwasm}
LBWASM_LOG=${TB_LBWASM_LOG:-warn,rustls=error}

DUR=10; CONNS=32; THREADS=1; ROUNDS=3; WARM=2; SCENARIOS="keepalive,handshake"
TARGETS="lbwasm,nginx"; MAX_SECS=240; KEEP=0

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
die()   { printf 'tlsbench: ERROR: %b\n' "$*" >&2; exit 1; }
log()   { printf 'tlsbench: %b\n' "$*" >&2; }

while getopts ":d:c:t:r:w:S:L:T:kh" opt; do
  case $opt in
    d) DUR=$OPTARG ;;  c) CONNS=$OPTARG ;;  t) THREADS=$OPTARG ;;  r) ROUNDS=$OPTARG ;;
    w) WARM=$OPTARG ;;  S) SCENARIOS=$OPTARG ;;  L) TARGETS=$OPTARG ;;  T) MAX_SECS=$OPTARG ;;
    k) KEEP=1 ;;  h) usage; exit 0 ;;
    :) die "option -$OPTARG needs a value (see -h)" ;;
    \?) die "unknown option -$OPTARG (see -h)" ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || die "unexpected argument '$1' (see -h)"
for v in DUR CONNS THREADS ROUNDS MAX_SECS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $WARM =~ ^[0-9]+$ ]] || die "-w must be a whole number of seconds (got '$WARM')"
(( CONNS >= THREADS )) || die "-c must be at least -t (wrk gives each thread a share)"
(( CONNS <= 10000 )) || die "-c: at most 10000 connections"
T_NAMES=(); S_NAMES=()
IFS=, read -r -a wanted <<<"$TARGETS"
for t in "${wanted[@]}"; do
  case $t in lbwasm|nginx) T_NAMES+=("$t") ;; *) die "-L: unknown balancer '$t' (lbwasm, nginx)" ;; esac
done
[ ${#T_NAMES[@]} -gt 0 ] || die "-L: no balancer"
IFS=, read -r -a wanted <<<"$SCENARIOS"
for s in "${wanted[@]}"; do
  case $s in keepalive|handshake) S_NAMES+=("$s") ;; *) die "-S: unknown scenario '$s' (keepalive, handshake)" ;; esac
done
[ ${#S_NAMES[@]} -gt 0 ] || die "-S: no scenario"
has() { local x=$1 y; shift; for y in "$@"; do [ "$x" = "$y" ] && return 0; done; return 1; }
# Rough run time: the wrk runs, plus ~15 s of start-up, checks and pauses.
EST=$(( ${#T_NAMES[@]} * ${#S_NAMES[@]} * (ROUNDS * (DUR + 1) + WARM + 1) + 15 ))
(( EST < MAX_SECS )) || die "these options need about ${EST}s, more than the -T limit of ${MAX_SECS}s"

# ---------------------------------------------------------------- tools
missing=()
for t in wrk nginx openssl; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  printf 'tlsbench: required tool(s) missing: %s (Debian/Ubuntu packages wrk, nginx, openssl):\n' "${missing[*]}" >&2
  printf '  apt-get install -y wrk nginx openssl\n' >&2
  exit 2
fi
declare -A PKG=([curl]=curl [ss]=iproute2 [ps]=procps [setsid]=util-linux
  [flock]=util-linux [timeout]=coreutils [getconf]=libc-bin [awk]=mawk [sort]=coreutils)
missing=()
for t in "${!PKG[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  pk=(); for t in "${missing[@]}"; do pk+=("${PKG[$t]}"); done
  die "missing tool(s): ${missing[*]}\n  install with: apt-get install -y ${pk[*]}"
fi
CLK_TCK=$(getconf CLK_TCK)
if [ ! -x "$LBWASM" ]; then
  [ "$LBWASM" = "$REPO/target/release/lbwasm" ] || die "LBWASM=$LBWASM is not executable"
  log "building $LBWASM (cargo build --release -p lbwasm)"
  (cd "$REPO" && nice cargo build --release -p lbwasm) || die "cargo build failed"
fi

# ---------------------------------------------------------------- process helpers
PIDS=(); WRK_PID=""; WATCHDOG_PID=""; WD=""
mkdir -p "$TB_BASE" || die "cannot create $TB_BASE"
proc_stat() { local l; { read -r l <"/proc/$1/stat"; } 2>/dev/null || return 1; echo "${l##*) }"; }
proc_field() {             # proc_field PID INDEX (0 = state, after the command name)
  local l fl; l=$(proc_stat "$1") || return 1; read -r -a fl <<<"$l"; echo "${fl[$2]}"; }
proc_start() { proc_field "$1" 19 || true; }
is_running() { local s; s=$(proc_field "$1" 0) || return 1; [ "$s" != Z ]; }
sess_alive() { ps -o stat= --sid "$1" 2>/dev/null | awk '$1 !~ /^Z/ {f=1} END {exit !f}'; }
sess_ticks() {             # utime+stime (clock ticks) summed over a session's live processes
  local s=0 p l fl
  for p in $(ps -o pid= --sid "$1" 2>/dev/null); do
    l=$(proc_stat "$p") || continue
    read -r -a fl <<<"$l"; s=$(( s + fl[11] + fl[12] ))
  done; echo "$s"; }
sess_rss_kib() {           # VmRSS summed over a session's live processes
  local s=0 p r
  for p in $(ps -o pid= --sid "$1" 2>/dev/null); do
    r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) && s=$(( s + ${r:-0} ))
  done; echo "$s"; }
kill_group() {             # TERM the session led by $1, KILL after 3 s, reap
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 30; i++)); do sess_alive "$pid" || break; sleep 0.1; done
  if sess_alive "$pid"; then
    log "pid $pid ignored SIGTERM, sending SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null; sleep 0.2
  fi
  wait "$pid" 2>/dev/null || true
}
start_proc() {             # start_proc LOGFILE CMD... -> own session, PID in LAST_PID
  local logf=$1; shift
  setsid "$@" </dev/null >>"$logf" 2>&1 9>&- &
  LAST_PID=$!; PIDS+=("$LAST_PID")
}
listen_addrs() { ss -Hltn "sport = :$1" 2>/dev/null | awk '{print $4}'; }
wait_port() {              # wait_port PORT PID NAME LOGFILE
  local port=$1 pid=$2 name=$3 logf=$4 i
  for ((i = 0; i < 150; i++)); do
    [ -n "$(listen_addrs "$port")" ] && break
    is_running "$pid" || die "$name exited during startup; last log lines:\n$(tail -n 15 "$logf" 2>/dev/null)"
    sleep 0.1
  done
  [ -n "$(listen_addrs "$port")" ] || die "$name did not listen on 127.0.0.1:$port within 15s (log: $logf)"
  local bad; bad=$(listen_addrs "$port" | grep -v '^127\.' || true)
  [ -z "$bad" ] || die "$name listens on non-loopback address(es): $bad"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  [ -n "$WRK_PID" ] && kill_group "$WRK_PID"
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill_group "${PIDS[i]}"; done
  [ -n "$WATCHDOG_PID" ] && kill_group "$WATCHDOG_PID"
  if [ -n "$WD" ] && [ -d "$WD" ]; then
    if [ "$KEEP" = 1 ]; then log "kept work dir $WD"; else rm -rf "$WD"; fi
  fi
  exit "$rc"
}

exec 9>"$TB_BASE/.tlsbench.lock"
flock -n 9 || die "another tls.sh run holds $TB_BASE/.tlsbench.lock"
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP

BACKEND_PORTS=("$BACKEND_BASE" $((BACKEND_BASE + 1)) $((BACKEND_BASE + 2)))
BACKENDS_CSV=$(printf '127.0.0.1:%s,' "${BACKEND_PORTS[@]}"); BACKENDS_CSV=${BACKENDS_CSV%,}
for p in "${BACKEND_PORTS[@]}" "$LBWASM_PORT" "$NGINX_PORT" "$ADMIN_PORT" "$STATUS_PORT" "$PROBE_PORT"; do
  [ -z "$(listen_addrs "$p")" ] || die "port $p is already in use:\n$(ss -Hltnp "sport = :$p")"
done
WD=$(mktemp -d "$TB_BASE/run.XXXXXX") || die "mktemp failed in $TB_BASE"
# Hard time limit; the watchdog leaves by itself once this script (PID + start time) is gone.
# shellcheck disable=SC2016  # the watchdog's own variables, expanded by its own shell
WATCHDOG_SRC='end=$((SECONDS + $1))
while [ "$SECONDS" -lt "$end" ]; do
  { read -r l <"/proc/$2/stat"; } 2>/dev/null || exit 0; l=${l##*) }; read -r -a f <<<"$l"
  [ "${f[19]}" = "$3" ] || exit 0
  sleep 1
done
echo "tlsbench: ERROR: time limit ($1 s) reached, aborting" >&2; kill -TERM "$2"'
setsid bash -c "$WATCHDOG_SRC" _ "$MAX_SECS" "$$" "$(proc_start $$)" </dev/null 9>&- &
WATCHDOG_PID=$!
T0=$EPOCHREALTIME

# ---------------------------------------------------------------- certificates
# A CA, and a server certificate for a.test + IP 127.0.0.1 it signs; ECDSA P-256, 2 days.
PKI=$WD/pki; mkdir -p "$PKI"
ossl() { openssl "$@" >>"$PKI/openssl.log" 2>&1 || die "openssl $1 failed:\n$(tail -n 15 "$PKI/openssl.log")"; }
ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/ca.key"
ossl req -x509 -new -key "$PKI/ca.key" -sha256 -days 2 -subj "/CN=tlsbench test CA" \
  -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' \
  -out "$PKI/ca.pem"
ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/key.pem"
ossl req -new -key "$PKI/key.pem" -subj "/CN=a.test" -out "$PKI/server.csr"
printf '%s\n' 'subjectAltName=DNS:a.test,IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
  'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$PKI/server.ext"
ossl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -set_serial 2 \
  -days 2 -sha256 -extfile "$PKI/server.ext" -out "$PKI/cert.pem"
ossl verify -CAfile "$PKI/ca.pem" "$PKI/cert.pem"
CA=$PKI/ca.pem; CERT=$PKI/cert.pem; KEY=$PKI/key.pem

# ---------------------------------------------------------------- start everything
start_proc "$WD/backends.log" "$LBWASM" backend --host 127.0.0.1 --port "$BACKEND_BASE" --count 3 --id b
BE_PID=$LAST_PID
for p in "${BACKEND_PORTS[@]}"; do wait_port "$p" "$BE_PID" backends "$WD/backends.log"; done

declare -A PORT SID
PORT[lbwasm]=$LBWASM_PORT; PORT[nginx]=$NGINX_PORT
for t in "${T_NAMES[@]}"; do
  case $t in
    lbwasm)
      start_proc "$WD/lbwasm.log" "$LBWASM" serve --listen "127.0.0.1:$LBWASM_PORT" \
        --backends "$BACKENDS_CSV" --plugin round_robin --workers 1 \
        --tls-cert "$CERT" --tls-key "$KEY" --admin "127.0.0.1:$ADMIN_PORT" \
        --no-load-poll --log-level "$LBWASM_LOG"
      SID[lbwasm]=$LAST_PID
      wait_port "$LBWASM_PORT" "$LAST_PID" lbwasm "$WD/lbwasm.log"
      wait_port "$ADMIN_PORT" "$LAST_PID" "lbwasm admin" "$WD/lbwasm.log" ;;
    nginx)
      mkdir -p "$WD/ngx"
      # As root the master would hand the worker to `nobody`: keep it the current user.
      user_line=""; [ "$(id -u)" = 0 ] && user_line="user $(id -un) $(id -gn);"
      tls_server() {         # tls_server PORT EXTRA: the TLS server block, one per port
        cat <<EOF
  server {
    listen 127.0.0.1:$1 ssl;
    server_name a.test;
    ssl_certificate $CERT;
    ssl_certificate_key $KEY;
    ssl_protocols TLSv1.2 TLSv1.3;
    $2
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
EOF
      }
      cat >"$WD/nginx.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
master_process on;
pid $WD/ngx/nginx.pid;
error_log $WD/ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WD/ngx/body; proxy_temp_path $WD/ngx/proxy;
  fastcgi_temp_path $WD/ngx/fcgi; uwsgi_temp_path $WD/ngx/uwsgi; scgi_temp_path $WD/ngx/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  log_format reuse '\$ssl_protocol \$ssl_session_reused';
  upstream backends {
$(for p in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$p;"; done)
    keepalive 32; keepalive_requests 1000000; keepalive_timeout 60s;
  }
$(tls_server "$NGINX_PORT" "")
$(tls_server "$PROBE_PORT" "access_log $WD/ngx/probe.log reuse;")
  server {
    listen 127.0.0.1:$STATUS_PORT;
    location = /status { stub_status; }
  }
}
EOF
      nginx -t -q -p "$WD/ngx" -e "$WD/ngx/error.log" -c "$WD/nginx.conf" 2>"$WD/ngx/test.log" \
        || die "nginx config invalid:\n$(cat "$WD/ngx/test.log")"
      start_proc "$WD/nginx.log" nginx -p "$WD/ngx" -e "$WD/ngx/error.log" -c "$WD/nginx.conf"
      SID[nginx]=$LAST_PID
      wait_port "$NGINX_PORT" "$LAST_PID" nginx "$WD/ngx/error.log"
      wait_port "$STATUS_PORT" "$LAST_PID" "nginx status" "$WD/ngx/error.log"
      wait_port "$PROBE_PORT" "$LAST_PID" "nginx probe" "$WD/ngx/error.log" ;;
  esac
done

# ---------------------------------------------------------------- counters
backend_requests() {       # sum of the backends' workload counters (their /load)
  local s=0 p r
  for p in "${BACKEND_PORTS[@]}"; do
    r=$(curl -s -m 2 "http://127.0.0.1:$p/load" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p')
    [ -n "$r" ] || die "backend 127.0.0.1:$p: no /load report"
    s=$(( s + r ))
  done; echo "$s"; }
conn_counters() {          # conn_counters NAME -> "connections tls_failures" seen by the balancer
  case $1 in
    lbwasm) curl -s -m 2 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '
      /^lbwasm_tls_handshakes_total[{ ]/ { h += $NF }
      /^lbwasm_tls_handshake_failures_total[{ ]/ { f += $NF }
      END { printf "%d %d\n", h, f }' ;;
    nginx) curl -s -m 2 "http://127.0.0.1:$STATUS_PORT/status" | awk '
      NR == 3 { a = $1 } END { printf "%d -\n", a }' ;;
  esac; }

# ---------------------------------------------------------------- sanity and what TLS says
declare -A TLSINFO
for t in "${T_NAMES[@]}"; do
  for ((j = 0; j < 3; j++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 --cacert "$CA" \
      --resolve "a.test:${PORT[$t]}:127.0.0.1" "https://a.test:${PORT[$t]}/") || code="curl rc $?"
    [ "$code" = 200 ] || die "$t: curl --cacert ca.pem https://a.test:${PORT[$t]}/ gave $code, not 200"
  done
  ver=$(curl -s -o /dev/null -w '%{http_version}' -m 5 --cacert "$CA" \
    --resolve "a.test:${PORT[$t]}:127.0.0.1" "https://a.test:${PORT[$t]}/")
  sc() { timeout 5 openssl s_client -connect "127.0.0.1:${PORT[$t]}" -servername a.test \
    -CAfile "$CA" -verify_return_error "$@" 2>&1 | tr -d '\0'; }
  o13=$(sc -alpn h2,http/1.1 </dev/null)
  grep -q 'Verify return code: 0 (ok)' <<<"$o13" || die "$t: openssl s_client did not verify:\n$o13"
  v13=$(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)/\1 \2/p' <<<"$o13" | head -n 1)
  grp=$(sed -n 's/^Server Temp Key: \([^,]*\).*/\1/p' <<<"$o13" | head -n 1)
  alpn=$(sed -n 's/^ALPN protocol: //p' <<<"$o13" | head -n 1); alpn=${alpn:-none}
  o12=$(sc -tls1_2 </dev/null)
  v12=$(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)/\1 \2/p' <<<"$o12" | head -n 1)
  # Resumption: a request over http/1.1 (reading the answer also reads TLS 1.3 tickets),
  # the session saved, then a second connection offering it.
  req=$'GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n'
  sc -alpn http/1.1 -sess_out "$WD/sess-$t.pem" -ign_eof <<<"$req" >"$WD/sclient1-$t.txt"
  res=$(sc -alpn http/1.1 -sess_in "$WD/sess-$t.pem" -ign_eof <<<"$req" | tee "$WD/sclient2-$t.txt" |
    awk '/^Reused, / { r = "yes" } /^New, / { r = "no" } END { print r ? r : "?" }')
  TLSINFO[$t]="TLS ${v13:-?} (${grp:-?}, ALPN ${alpn}); TLSv1.2: ${v12:-refused}; resumption ${res}; curl: HTTP/$ver"
  log "check $(printf '%-7s' "$t") https://a.test:${PORT[$t]}/ -> 200; ${TLSINFO[$t]}"
done

# ---------------------------------------------------------------- measurement
run_wrk() {                # run_wrk NAME SCENARIO OUTFILE SECS [PORT]
  local hdr=() port=${5:-${PORT[$1]}}
  [ "$2" = handshake ] && hdr=(-H 'Connection: close')
  setsid timeout -k 2 $(( $4 + 20 )) wrk -t "$THREADS" -c "$CONNS" -d "${4}s" --latency \
    "${hdr[@]}" "https://127.0.0.1:$port/" </dev/null >"$3" 2>&1 9>&- &
  WRK_PID=$!; wait "$WRK_PID"; local rc=$?; WRK_PID=""; return $rc; }
to_ms() { awk '{ v = $1; u = v; sub(/^[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
  m = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
  if (m < 0) print "?"; else printf "%.3f\n", v * m }'; }
median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{a[NR] = $1}
  END { if (NR == 0) { print "-"; exit } if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Background load from processes that are not ours (a compile beside us makes results noisy).
sys_busy() { local u n s q sq st; read -r _ u n s _ _ q sq st _ < /proc/stat; echo $((u + n + s + q + sq + st)); }
b0=$(sys_busy); bt0=$EPOCHREALTIME; sleep 1; b1=$(sys_busy); bt1=$EPOCHREALTIME
BG=$(awk -v a="$b0" -v b="$b1" -v t0="$bt0" -v t1="$bt1" -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", 100 * (b - a) / hz / (t1 - t0) }')
log "background CPU before load: ${BG}% of one core (of $(nproc)00%)"
(( BG <= 20 )) || log "WARNING: the machine is busy (${BG}% of a core used by other processes): results will be noisy"

# How wrk reconnects: does it resume the TLS session? (nginx logs $ssl_session_reused)
REUSE="not probed (needs nginx)"
if has nginx "${T_NAMES[@]}" && has handshake "${S_NAMES[@]}"; then
  run_wrk nginx handshake "$WD/probe.txt" 1 "$PROBE_PORT" || die "wrk probe failed:\n$(cat "$WD/probe.txt")"
  REUSE=$(awk '{ n++; if ($2 == "r") r++; v[$1]++ } END { s = ""; for (k in v) s = s " " k
    printf "%d of %d connections resumed (%.0f%%; %s)", r, n, n ? 100 * r / n : 0, substr(s, 2) }' "$WD/ngx/probe.log")
  log "wrk with Connection: close: $REUSE"
fi

if (( WARM > 0 )); then
  log "warmup: ${WARM}s per balancer and scenario"
  for s in "${S_NAMES[@]}"; do
    for t in "${T_NAMES[@]}"; do
      run_wrk "$t" "$s" "$WD/warmup-$s-$t.txt" "$WARM" \
        || die "wrk warmup failed for $t ($s):\n$(cat "$WD/warmup-$s-$t.txt")"
    done
  done
fi

declare -A RPS P50 P99 CPU_US CPS ERRS RSS
NOTES=()
for ((r = 1; r <= ROUNDS; r++)); do
  for s in "${S_NAMES[@]}"; do
    for t in "${T_NAMES[@]}"; do
      k="$s/$t"; f="$WD/wrk-r$r-$s-$t.txt"
      be0=$(backend_requests); read -r n0 x0 < <(conn_counters "$t"); c0=$(sess_ticks "${SID[$t]}")
      run_wrk "$t" "$s" "$f" "$DUR" || die "wrk failed for $t ($s, round $r):\n$(cat "$f")"
      c1=$(sess_ticks "${SID[$t]}"); read -r n1 x1 < <(conn_counters "$t"); be1=$(backend_requests)
      [ "$s" = keepalive ] && RSS[$t]=$(sess_rss_kib "${SID[$t]}")
      read -r reqs secs rps se non2xx p50 p99 < <(awk '
        / requests in / { n = $1; t = $4; sub(/s,$/, "", t) }
        /^Requests\/sec:/ { q = $2 }
        /Socket errors:/ { gsub(/,/, ""); e = $4 + $6 + $8 + $10 }
        /Non-2xx or 3xx responses:/ { x = $NF }
        $1 == "50%" { p50 = $2 } $1 == "99%" { p99 = $2 }
        END { printf "%s %s %s %d %d %s %s\n", n ? n : "-", t ? t : "-", q ? q : "-", e, x, p50 ? p50 : "-", p99 ? p99 : "-" }' "$f")
      if ! [[ $reqs =~ ^[0-9]+$ ]] || (( reqs == 0 )); then die "$t ($s): wrk completed no request:\n$(cat "$f")"; fi
      p50=$(to_ms <<<"$p50"); p99=$(to_ms <<<"$p99")
      us=$(awk -v c="$(( c1 - c0 ))" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", c / hz * 1e6 / n }')
      cps=$(awk -v a="$n0" -v b="$n1" -v t="$secs" 'BEGIN { printf "%.0f", (b - a) / t }')
      errs=$(( se + non2xx )); fails="-"; [ "$x0" != - ] && fails=$(( x1 - x0 ))
      bed=$(( be1 - be0 ))
      (( errs == 0 )) || NOTES+=("$t $s round $r: $se socket errors, $non2xx non-2xx/3xx ($(grep -h 'Socket errors' "$f" | sed 's/^ *//'))")
      if [ "$fails" != - ] && (( fails > 0 )); then
        # wrk opens one connection more than -c (nginx counts it too) and, when it stops,
        # drops whatever connections are mid-handshake: up to -c + 1 per run is wrk's doing.
        why="more than the -c + 1 that wrk itself leaves unfinished"
        (( fails <= CONNS + 1 )) && why="at most -c + 1: wrk's extra connection and those it dropped mid-handshake when it stopped"
        NOTES+=("$t $s round $r: $fails failed TLS handshakes (lbwasm_tls_handshake_failures_total; $why)")
      fi
      (( bed >= reqs && bed <= reqs + CONNS )) \
        || NOTES+=("$t $s round $r: the backends counted $bed requests, wrk $reqs completed")
      RPS[$k]+="$rps "; P50[$k]+="$p50 "; P99[$k]+="$p99 "; CPU_US[$k]+="$us "; CPS[$k]+="$cps "
      ERRS[$k]=$(( ${ERRS[$k]:-0} + errs ))
      log "round $r/$ROUNDS $(printf '%-9s %-7s %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %6s us/req  %6s conn/s  errors %d' \
        "$s" "$t" "$rps" "$p50" "$p99" "$us" "$cps" "$errs")"
      sleep 0.5
    done
  done
done
for t in "${T_NAMES[@]}"; do
  if [ "$t" = nginx ] && grep -q '\[\(error\|crit\|alert\|emerg\)\]' "$WD/ngx/error.log" 2>/dev/null; then
    NOTES+=("nginx error.log: $(grep -c '\[\(error\|crit\|alert\|emerg\)\]' "$WD/ngx/error.log") error lines, e.g. $(grep -m 1 '\[\(error\|crit\|alert\|emerg\)\]' "$WD/ngx/error.log")")
  fi
  if [ "$t" = lbwasm ]; then
    why=$(curl -s -m 2 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^lbwasm_tls_handshake_failures_total[{ ]/ {
      r = $1; sub(/.*reason="/, "", r); sub(/".*/, "", r); s = s sep r "=" $NF; sep = ", " } END { print s }')
    [ -z "$why" ] || NOTES+=("lbwasm TLS handshake failures over its whole life (probes and warmups too): $why")
  fi
  if [ "$t" = lbwasm ] && grep -qiE 'error|warn' "$WD/lbwasm.log" 2>/dev/null; then
    NOTES+=("lbwasm log: $(grep -ciE 'error|warn' "$WD/lbwasm.log") warn/error lines, e.g. $(grep -m 1 -iE 'error|warn' "$WD/lbwasm.log" | cut -c 1-200)")
  fi
done

# ---------------------------------------------------------------- report
echo
echo "tls.sh: $(nginx -v 2>&1 | sed 's/.*version: //') + $(openssl version | awk '{print $1, $2}'), lbwasm rustls/ring," \
     "$(wrk --version 2>&1 | awk 'NR == 1 {print $1, $2}'), $(nproc) CPUs, $(uname -r)"
echo "wrk -t $THREADS -c $CONNS -d ${DUR}s --latency https://127.0.0.1:PORT/, x $ROUNDS rounds (alternating);" \
     "balancers 1 worker; 3 backends (one lbwasm backend process); ECDSA P-256 certificate"
printf '%-9s %-8s %10s %9s %9s %10s %8s %6s  %s\n' scenario name 'req/s' p50_ms p99_ms cpu_us/req conn/s errors 'req/s per round'
declare -A MED MCPU
for s in "${S_NAMES[@]}"; do
  for t in "${T_NAMES[@]}"; do
    k="$s/$t"; MED[$k]=$(median "${RPS[$k]}"); MCPU[$k]=$(median "${CPU_US[$k]}")
    printf '%-9s %-8s %10.0f %9.3f %9.3f %10s %8.0f %6d  %s\n' "$s" "$t" "${MED[$k]}" "$(median "${P50[$k]}")" \
      "$(median "${P99[$k]}")" "${MCPU[$k]}" "$(median "${CPS[$k]}")" "${ERRS[$k]}" "$(read -r -a v <<<"${RPS[$k]}"; printf '%.0f ' "${v[@]}")"
  done
  if [ -n "${MED[$s/lbwasm]:-}" ] && [ -n "${MED[$s/nginx]:-}" ]; then
    awk -v s="$s" -v a="${MED[$s/lbwasm]}" -v b="${MED[$s/nginx]}" -v c="${MCPU[$s/lbwasm]}" -v d="${MCPU[$s/nginx]}" 'BEGIN {
      printf "%-9s lbwasm/nginx: req/s x%.2f, CPU per request x%.2f\n", s, (b > 0) ? a / b : 0, (d > 0) ? c / d : 0 }'
  fi
done
for t in "${T_NAMES[@]}"; do
  printf '%-8s %s; RSS after keep-alive runs %s KiB\n' "$t" "${TLSINFO[$t]}" "${RSS[$t]:--}"
done
has handshake "${S_NAMES[@]}" && echo "handshake: wrk (Connection: close) resumption, probed on nginx: $REUSE"
echo "(medians over rounds; p50/p99 from wrk --latency; cpu_us/req = the balancer's processes'" \
     "utime+stime / requests wrk completed; conn/s = connections the balancer saw (lbwasm: TLS" \
     "handshakes, nginx: accepts) / run time; errors = wrk socket errors + non-2xx/3xx, all rounds;" \
     "background CPU before start: ${BG}%)"
if [ ${#NOTES[@]} -gt 0 ]; then
  echo "notes:"; printf '  %s\n' "${NOTES[@]}"
fi
log "total time $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.0f", b - a}')s"
