#!/usr/bin/env bash
# grpc.sh - gRPC-shaped load through lbwasm (backend_protocol h2c) and NGINX (grpc_pass),
# side by side, loopback (127.0.0.1) only.
#
# Starts, each in its own session (tracked by PID, killed by process group on exit, never
# by name), configs and logs in a fresh temp dir:
#   * backends : ONE `lbwasm backend --count 3` process, 127.0.0.1:9301-9303; each serves
#                HTTP/1.1 and h2c on its port and answers gRPC calls by echoing the
#                request's messages, trailer grpc-status 0
#   * lbwasm   : 127.0.0.1:9311, `serve --backend-protocol h2c --plugin round_robin`,
#                1 worker
#   * nginx    : 127.0.0.1:9312, `listen ... http2` (h2c), `grpc_pass` to an upstream of the
#                3 backends with `keepalive`, 1 worker
# checks that each balancer answers a gRPC call with 200, grpc-status 0 and the echoed
# message (nghttp), then runs h2load rounds alternating lbwasm, nginx, lbwasm, nginx ...:
# POST of one gRPC-framed message (5-byte prefix + payload), content-type
# application/grpc, te: trailers; every request must be a 2xx and every one must have
# reached a backend (the backends' own request counters, from /load, must add up).
# Prints medians of req/s, p50/p99 (from h2load's per-request log), the CPU each
# balancer's process used per request (utime+stime from /proc, its whole session), and
# the lbwasm/nginx ratios.
#
# Usage: bench/grpc.sh [options]
#   -n N     requests per run (default 100000)     -c N  h2load clients/connections (default 16)
#   -m N     max concurrent streams per connection (default 10)
#   -r N     rounds (default 3)                    -s N  payload bytes per message (default 64)
#   -L LIST  balancers to run, comma-separated, from lbwasm,nginx (default both)
#   -T SECS  hard wall-clock limit for the whole script (default 300)
#   -k       keep the temp dir (configs, logs, h2load output)
#   -h       this help
# Env: GB_BASE (default /tmp/grpcbench), GB_BACKEND_BASE (9301), GB_LBWASM_PORT (9311),
#      GB_NGINX_PORT (9312), LBWASM (default: target/release/lbwasm, built if missing).
# Exit status: 0 done, 1 error, 2 a required tool (h2load, nghttp) is missing.

set -uo pipefail
set +m
export PATH="$PATH:/usr/sbin:/sbin:/usr/local/sbin"
export LC_ALL=C

GB_BASE=${GB_BASE:-/tmp/grpcbench}
BACKEND_BASE=${GB_BACKEND_BASE:-9301}
LBWASM_PORT=${GB_LBWASM_PORT:-9311}
NGINX_PORT=${GB_NGINX_PORT:-9312}
REPO=$(cd "$(dirname "$0")/.." && pwd)
LBWASM=${LBWASM:-$REPO/target/release/lbwasm}

N=100000; CONNS=16; STREAMS=10; ROUNDS=3; PAYLOAD=64; TARGETS="lbwasm,nginx"
MAX_SECS=300; KEEP=0

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
die()   { printf 'grpcbench: ERROR: %b\n' "$*" >&2; exit 1; }
log()   { printf 'grpcbench: %b\n' "$*" >&2; }

while getopts ":n:c:m:r:s:L:T:kh" opt; do
  case $opt in
    n) N=$OPTARG ;;  c) CONNS=$OPTARG ;;  m) STREAMS=$OPTARG ;;  r) ROUNDS=$OPTARG ;;
    s) PAYLOAD=$OPTARG ;;  L) TARGETS=$OPTARG ;;  T) MAX_SECS=$OPTARG ;;
    k) KEEP=1 ;;  h) usage; exit 0 ;;
    :) die "option -$OPTARG needs a value (see -h)" ;;
    \?) die "unknown option -$OPTARG (see -h)" ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || die "unexpected argument '$1' (see -h)"
for v in N CONNS STREAMS ROUNDS PAYLOAD MAX_SECS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
(( PAYLOAD <= 1048576 )) || die "-s: at most 1 MiB per message"
(( N >= CONNS )) || die "-n must be at least -c (h2load gives each client a share)"
T_NAMES=()
IFS=, read -r -a wanted <<<"$TARGETS"
for t in "${wanted[@]}"; do
  case $t in lbwasm|nginx) T_NAMES+=("$t") ;; *) die "-L: unknown balancer '$t' (lbwasm, nginx)" ;; esac
done
[ ${#T_NAMES[@]} -gt 0 ] || die "-L: no balancer"

# ---------------------------------------------------------------- tools
if ! command -v h2load >/dev/null 2>&1 || ! command -v nghttp >/dev/null 2>&1; then
  printf 'grpcbench: h2load and nghttp are required (Debian/Ubuntu package nghttp2-client):\n' >&2
  printf '  apt-get install -y nghttp2-client\n' >&2
  exit 2
fi
declare -A PKG=([nginx]=nginx [curl]=curl [ss]=iproute2 [ps]=procps [setsid]=util-linux
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
PIDS=(); H2_PID=""; WATCHDOG_PID=""; WD=""
mkdir -p "$GB_BASE" || die "cannot create $GB_BASE"
proc_stat() { local l; { read -r l <"/proc/$1/stat"; } 2>/dev/null || return 1; echo "${l##*) }"; }
proc_start() { local f; f=($(proc_stat "$1")) || return 0; echo "${f[19]}"; }
is_running() { local f; f=($(proc_stat "$1")) || return 1; [ "${f[0]}" != Z ]; }
sess_alive() { ps -o stat= --sid "$1" 2>/dev/null | awk '$1 !~ /^Z/ {f=1} END {exit !f}'; }
sess_ticks() {             # utime+stime (clock ticks) summed over a session's live processes
  local s=0 p f
  for p in $(ps -o pid= --sid "$1" 2>/dev/null); do
    f=($(proc_stat "$p")) && s=$(( s + f[11] + f[12] ))
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
  [ -n "$H2_PID" ] && kill_group "$H2_PID"
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill_group "${PIDS[i]}"; done
  [ -n "$WATCHDOG_PID" ] && kill_group "$WATCHDOG_PID"
  if [ -n "$WD" ] && [ -d "$WD" ]; then
    if [ "$KEEP" = 1 ]; then log "kept work dir $WD"; else rm -rf "$WD"; fi
  fi
  exit "$rc"
}

exec 9>"$GB_BASE/.grpcbench.lock"
flock -n 9 || die "another grpc.sh run holds $GB_BASE/.grpcbench.lock"
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP

BACKEND_PORTS=("$BACKEND_BASE" $((BACKEND_BASE + 1)) $((BACKEND_BASE + 2)))
BACKENDS_CSV=$(printf '127.0.0.1:%s,' "${BACKEND_PORTS[@]}"); BACKENDS_CSV=${BACKENDS_CSV%,}
for p in "${BACKEND_PORTS[@]}" "$LBWASM_PORT" "$NGINX_PORT"; do
  [ -z "$(listen_addrs "$p")" ] || die "port $p is already in use:\n$(ss -Hltnp "sport = :$p")"
done
WD=$(mktemp -d "$GB_BASE/run.XXXXXX") || die "mktemp failed in $GB_BASE"
# Hard time limit; the watchdog leaves by itself once this script (PID + start time) is gone.
WATCHDOG_SRC='end=$((SECONDS + $1))
while [ "$SECONDS" -lt "$end" ]; do
  { read -r l <"/proc/$2/stat"; } 2>/dev/null || exit 0; l=${l##*) }; f=($l); [ "${f[19]}" = "$3" ] || exit 0
  sleep 1
done
echo "grpcbench: ERROR: time limit ($1 s) reached, aborting" >&2; kill -TERM "$2"'
setsid bash -c "$WATCHDOG_SRC" _ "$MAX_SECS" "$$" "$(proc_start $$)" </dev/null 9>&- &
WATCHDOG_PID=$!
T0=$EPOCHREALTIME

# ---------------------------------------------------------------- the request body
# One gRPC message: flag 0, 4-byte big-endian length, then PAYLOAD bytes of 'x'.
BODY=$WD/request.grpc
{
  printf '\x00'
  printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(( PAYLOAD >> 24 & 255 )) $(( PAYLOAD >> 16 & 255 )) \
    $(( PAYLOAD >> 8 & 255 )) $(( PAYLOAD & 255 )))"
  head -c "$PAYLOAD" /dev/zero | tr '\0' x
} >"$BODY"
[ "$(stat -c %s "$BODY")" = $(( PAYLOAD + 5 )) ] || die "internal: request body has the wrong size"
GRPC_PATH=/bench.Echo/Say

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
        --backends "$BACKENDS_CSV" --backend-protocol h2c --plugin round_robin --workers 1 \
        --no-load-poll --log-level warn
      SID[lbwasm]=$LAST_PID
      wait_port "$LBWASM_PORT" "$LAST_PID" lbwasm "$WD/lbwasm.log" ;;
    nginx)
      mkdir -p "$WD/ngx"
      cat >"$WD/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WD/ngx/nginx.pid;
error_log $WD/ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WD/ngx/body; proxy_temp_path $WD/ngx/proxy;
  fastcgi_temp_path $WD/ngx/fcgi; uwsgi_temp_path $WD/ngx/uwsgi; scgi_temp_path $WD/ngx/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  http2_max_concurrent_streams 1024;
  upstream grpc_backends {
$(for p in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$p;"; done)
    keepalive 64; keepalive_requests 1000000; keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT http2;
    location / { grpc_pass grpc://grpc_backends; }
  }
}
EOF
      nginx -t -q -p "$WD/ngx" -e "$WD/ngx/error.log" -c "$WD/nginx.conf" 2>"$WD/ngx/test.log" \
        || die "nginx config invalid:\n$(cat "$WD/ngx/test.log")"
      start_proc "$WD/nginx.log" nginx -p "$WD/ngx" -e "$WD/ngx/error.log" -c "$WD/nginx.conf"
      SID[nginx]=$LAST_PID
      wait_port "$NGINX_PORT" "$LAST_PID" nginx "$WD/ngx/error.log" ;;
  esac
done

# ---------------------------------------------------------------- sanity: a real gRPC answer
backend_requests() {       # sum of the backends' workload counters (their /load)
  local s=0 p r
  for p in "${BACKEND_PORTS[@]}"; do
    r=$(curl -s -m 2 "http://127.0.0.1:$p/load" | sed -n 's/.*"requests":\([0-9]*\).*/\1/p')
    [ -n "$r" ] || die "backend 127.0.0.1:$p: no /load report"
    s=$(( s + r ))
  done; echo "$s"; }
for t in "${T_NAMES[@]}"; do
  for ((j = 0; j < 3; j++)); do
    out=$(timeout 5 nghttp -v -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
      "http://127.0.0.1:${PORT[$t]}$GRPC_PATH" 2>&1 | tr -d '\0') || die "$t: gRPC call failed:\n$out"
    grep -q ':status: 200' <<<"$out" || die "$t: no :status 200:\n$out"
    grep -q 'grpc-status: 0' <<<"$out" || die "$t: no grpc-status 0 trailer:\n$out"
    grep -q "$(head -c 16 /dev/zero | tr '\0' x)" <<<"$out" || (( PAYLOAD < 16 )) \
      || die "$t: the message did not come back:\n$out"
    served=$(sed -n 's/.*x-served-by: \(.*\)/\1/p' <<<"$out" | head -n 1)
    seen[$j]=$served
  done
  log "check $(printf '%-7s' "$t") 127.0.0.1:${PORT[$t]} -> 200, grpc-status 0, served by ${seen[*]}"
done

# ---------------------------------------------------------------- measurement
run_h2load() {             # run_h2load NAME OUTFILE LOGFILE N
  setsid timeout -k 2 $(( MAX_SECS )) h2load -n "$4" -c "$CONNS" -m "$STREAMS" -t 1 \
    -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$3" \
    "http://127.0.0.1:${PORT[$1]}$GRPC_PATH" </dev/null >"$2" 2>&1 9>&- &
  H2_PID=$!; wait "$H2_PID"; local rc=$?; H2_PID=""; return $rc; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1}
  END { if (NR == 0) { print "-"; exit } if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Background load from processes that are not ours (a compile beside us makes results noisy).
sys_busy() { local c u n s i w q sq st r; read -r c u n s i w q sq st r < /proc/stat; echo $((u + n + s + q + sq + st)); }
b0=$(sys_busy); bt0=$EPOCHREALTIME; sleep 1; b1=$(sys_busy); bt1=$EPOCHREALTIME
BG=$(awk -v a="$b0" -v b="$b1" -v t0="$bt0" -v t1="$bt1" -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", 100 * (b - a) / hz / (t1 - t0) }')
log "background CPU before load: ${BG}% of one core (of $(nproc)00%)"
(( BG <= 20 )) || log "WARNING: the machine is busy (${BG}% of a core used by other processes): results will be noisy"
log "warmup: $(( N / 10 )) requests per balancer"
for t in "${T_NAMES[@]}"; do
  run_h2load "$t" "$WD/warmup-$t.txt" "$WD/warmup-$t.log" $(( N / 10 )) \
    || die "h2load warmup failed for $t:\n$(cat "$WD/warmup-$t.txt")"
done

declare -A RPS P50 P99 CPU_US
for ((r = 1; r <= ROUNDS; r++)); do
  for t in "${T_NAMES[@]}"; do
    f="$WD/h2load-r$r-$t.txt"; lf="$WD/h2load-r$r-$t.log"
    be0=$(backend_requests); c0=$(sess_ticks "${SID[$t]}")
    run_h2load "$t" "$f" "$lf" "$N" || die "h2load failed for $t (round $r):\n$(cat "$f")"
    c1=$(sess_ticks "${SID[$t]}"); be1=$(backend_requests)
    rps=$(awk '/^finished in/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^req\/s/) { v = $i; gsub(/,/, "", v); print v } }' "$f")
    read -r done_ ok2xx < <(awk '/^requests:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^succeeded/) s = $i }
      /^status codes:/ { c = $3 } END { print s + 0, c + 0 }' "$f")
    [ -n "$rps" ] || die "cannot read req/s for $t:\n$(cat "$f")"
    (( done_ == N )) || die "$t: only $done_ of $N requests succeeded:\n$(cat "$f")"
    (( ok2xx == N )) || die "$t: only $ok2xx of $N requests were 2xx:\n$(cat "$f")"
    (( be1 - be0 == N )) || die "$t: the backends counted $(( be1 - be0 )) requests, not $N"
    read -r p50 p99 < <(awk -F'\t' '{ print $3 }' "$lf" | sort -n | awk '{ a[NR] = $1 }
      END { i50 = int(NR * 0.50); i99 = int(NR * 0.99); if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1
            printf "%.3f %.3f\n", a[i50] / 1000, a[i99] / 1000 }')
    us=$(awk -v c="$(( c1 - c0 ))" -v hz="$CLK_TCK" -v n="$N" 'BEGIN { printf "%.1f", c / hz * 1e6 / n }')
    RPS[$t]+="$rps "; P50[$t]+="$p50 "; P99[$t]+="$p99 "; CPU_US[$t]+="$us "
    log "round $r/$ROUNDS $(printf '%-7s %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  cpu %6s us/req' "$t" "$rps" "$p50" "$p99" "$us")"
    sleep 0.3
  done
done

# ---------------------------------------------------------------- report
echo
echo "grpc.sh: $(nginx -v 2>&1 | sed 's/.*version: //'), $(h2load --version | awk '{print $2}')," \
     "$(nproc) CPUs, $(uname -r)"
echo "h2load -n $N -c $CONNS -m $STREAMS -t 1, one ${PAYLOAD}-byte gRPC message per call, x $ROUNDS rounds" \
     "(alternating); balancers 1 worker; 3 backends (one lbwasm backend process)"
printf '%-8s %10s %9s %9s %10s  %s\n' name 'req/s' p50_ms p99_ms cpu_us/req 'req/s per round'
declare -A MED MCPU
for t in "${T_NAMES[@]}"; do
  MED[$t]=$(median ${RPS[$t]}); MCPU[$t]=$(median ${CPU_US[$t]})
  printf '%-8s %10.0f %9.3f %9.3f %10s  %s\n' "$t" "${MED[$t]}" "$(median ${P50[$t]})" \
    "$(median ${P99[$t]})" "${MCPU[$t]}" "${RPS[$t]% }"
done
if [ -n "${MED[lbwasm]:-}" ] && [ -n "${MED[nginx]:-}" ]; then
  awk -v a="${MED[lbwasm]}" -v b="${MED[nginx]}" -v c="${MCPU[lbwasm]}" -v d="${MCPU[nginx]}" 'BEGIN {
    printf "lbwasm/nginx: req/s x%.2f, CPU per request x%.2f\n", (b > 0) ? a / b : 0, (d > 0) ? c / d : 0 }'
fi
echo "(medians over rounds; p50/p99 from h2load's per-request log; cpu_us/req = the balancer's" \
     "processes' utime+stime / requests; every request was a 2xx and reached a backend;" \
     "background CPU before start: ${BG}%)"
log "total time $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.0f", b - a}')s"
