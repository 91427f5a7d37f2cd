#!/usr/bin/env python3
"""Least connections at many backends through the proxy: lbwasm beside NGINX, 127.0.0.1 only.

Starts ONE NGINX instance that answers `200 ok` on N ports (127.0.0.1:12000.., one server
block with a `listen` line per port, plus a stub_status port that counts the connections
the backends accept). Then, for each pool size N (3 and 1,000 by default), starts, each in
its own process and in front of the same backends:

  * lbwasm-lc   lbwasm serve --backends <N addresses> --plugin least_connections --workers 1
  * lbwasm-rr   the same with --plugin round_robin (its choose costs the same at any N, so
                its N=3 -> N=1,000 difference is what many backends cost besides choose)
  * nginx-lc-kaK  NGINX, one worker: `upstream { least_conn; server ...xN; keepalive K; }`,
                proxy_http_version 1.1, Connection "" (one NGINX per K in --nginx-keepalive,
                32 and 1024 by default: NGINX's keep-alive cache is per upstream, and with 32
                for 1,000 backends it connects anew for nearly every request)

warms each up, waits (at most --quiet-wait s) for the machine to be quiet (other
processes < 20% of a core), and drives them with alternating `wrk -t1 -c32 -d5s --latency`
rounds (A B C D A B C D ...). For each run it records req/s, p50, p99, errors, the
balancer's CPU (utime+stime of its processes from /proc/PID/stat around the run, as
../shared/bench/peerbench.sh) per request, the backends', wrk's, the whole box's, and the
connections the backends accepted per request. Medians of the rounds are printed per N,
then each balancer's change from the smallest N to the largest, and lbwasm's least
connections against its N=3 figure plus the extra `choose` cost the criterion bench
predicts (README "Benchmarks": ~0.45 us up to 16 backends, 1.9-2.1 us at 1,000).

    python3 bench/many_backends.py [-n 3,1000] [-r 3] [-d 5] [-c 32]
                                   [--plugins least_connections,round_robin]
                                   [--nginx-keepalive 32,1024] [--nice -15]
                                   [--lbwasm target/release/lbwasm] [-k]

Everything runs in its own session under `nice -n -15` with the session's autogroup at -15
(root only; --nice 0 turns it off). Every process is stopped by its PID (its process
group); the whole run is bounded by --max-secs (900).
"""

import argparse
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BE_BASE = 12000          # backends: 12000 .. 12000 + N - 1
BE_STATUS = 11900        # backend NGINX stub_status
LBWASM_PORT = 11901      # + i for the i-th --plugins value
NGINX_PORT = 11911       # + i for the i-th --nginx-keepalive value
SHORT = {"least_connections": "lc", "round_robin": "rr"}
HZ = os.sysconf("SC_CLK_TCK")
# README "Benchmarks" (criterion, `cargo bench --bench choose`): least_connections through
# wasmtime, microseconds per choose.
CHOOSE_SMALL_US = 0.45           # 4-16 backends (447-507 ns over runs)
CHOOSE_1000_US = (1.9, 2.1)      # 1,000 backends, across runs (3.4-5.1 before the SIMD scan)


class Timeout(Exception):
    pass


def log(msg):
    print(f"many_backends: {msg}", file=sys.stderr, flush=True)


def proc_stat(pid):
    """Fields after '(comm) ' of /proc/PID/stat: [0]=state [3]=session [11]=utime [12]=stime."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()


def session_ticks(sid):
    """utime+stime of every live process of a session (threads included)."""
    t = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = proc_stat(int(d))
        except (OSError, ValueError):
            continue
        if int(f[3]) == sid:
            t += int(f[11]) + int(f[12])
    return t


def sys_busy_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[5] + v[6]


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_port(port, proc, name, logf, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if listening(port):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited during startup:\n{tail(logf)}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout}s\n{tail(logf)}")


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def get(port, path="/"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def parse_wrk(text):
    def ms(v):
        m = re.match(r"([0-9.]+)(us|ms|s|m)?$", v)
        n, u = float(m.group(1)), m.group(2) or "ms"
        return {"us": n / 1000, "ms": n, "s": n * 1000, "m": n * 60000}[u]

    out = {"bad": 0}
    for line in text.splitlines():
        w = line.split()
        if not w:
            continue
        if w[0] == "Requests/sec:":
            out["rps"] = float(w[1])
        elif w[0] == "50%":
            out["p50"] = ms(w[1])
        elif w[0] == "99%":
            out["p99"] = ms(w[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            out["bad"] += int(w[-1])
        elif line.strip().startswith("Socket errors:"):
            out["bad"] += sum(int(x) for x in re.findall(r"\d+", line))
        elif re.match(r"\s*\d+ requests in", line):
            out["reqs"] = int(w[0])
    if "rps" not in out:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    return out


def socket_inodes(pids):
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


def session_pids(sid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(proc_stat(int(d))[3]) == sid:
                    out.append(int(d))
            except (OSError, ValueError):
                pass
    return out


def backend_conns(sid, lo, hi):
    """Established connections a session's processes hold to ports lo..hi, and how many
    distinct backend ports they reach."""
    inodes = socket_inodes(session_pids(sid))
    n, ports = 0, set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            c = line.split()
            rport = int(c[2].rsplit(":", 1)[1], 16)
            if c[3] == "01" and lo <= rport <= hi and int(c[9]) in inodes:
                n += 1
                ports.add(rport)
    return n, len(ports)


def stub_accepts():
    _, body = get(BE_STATUS, "/status")
    # "Active connections: 1 \nserver accepts handled requests\n 12 12 34 \n..."
    return int(body.split(b"\n")[2].split()[0])


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", default="3,1000", help="pool sizes, comma-separated (default 3,1000)")
    ap.add_argument("-r", "--rounds", type=int, default=3, help="rounds per N (default 3)")
    ap.add_argument("-d", "--duration", type=int, default=5, help="wrk seconds per run (5)")
    ap.add_argument("-c", "--conns", type=int, default=32, help="wrk connections (32)")
    ap.add_argument("--warmup", type=int, default=3, help="wrk warm-up seconds per target (3)")
    ap.add_argument("--plugins", default="least_connections,round_robin",
                    help="lbwasm plugins, one lbwasm target each (default least_connections,"
                         "round_robin: round robin's choose costs the same at any N, so its"
                         " N=3 -> N=1000 difference is what many backends cost besides"
                         " choose); a path to a .wasm file is loaded as it is, e.g. two builds"
                         " of a plugin")
    ap.add_argument("--nginx-keepalive", default="32,1024",
                    help="NGINX upstream keepalive values, one NGINX least_conn target each"
                         " (default 32,1024: with 32 and 1,000 backends NGINX's cache,"
                         " per upstream, holds too few to keep one per backend)")
    ap.add_argument("--nice", type=int, default=-15,
                    help="nice and autogroup nice of everything started (default -15; 0: off)")
    ap.add_argument("--quiet-wait", type=int, default=60,
                    help="before each N, wait up to this many s for other processes < 20%% of"
                         " a core (default 60)")
    ap.add_argument("--lbwasm", default="target/release/lbwasm")
    ap.add_argument("--max-secs", type=int, default=900, help="hard limit for the whole run")
    ap.add_argument("-k", "--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    kas = [int(x) for x in args.nginx_keepalive.split(",") if x]   # "" = no NGINX
    plugins = [x for x in args.plugins.split(",") if x]              # "" = no lbwasm
    if len(plugins) > 10 or len(kas) > 10:
        sys.exit("at most 10 plugins and 10 keepalive values")
    nmax = max(sizes)
    if args.nice < 0 and os.geteuid() != 0:
        sys.exit("--nice below 0 needs root (use --nice 0)")
    if not os.path.exists(args.lbwasm):
        sys.exit(f"no lbwasm binary at {args.lbwasm}")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    wrk = shutil.which("wrk")
    if not (os.path.exists(nginx) and wrk):
        sys.exit("needs nginx and wrk (apt-get install nginx wrk)")
    own_ports = [BE_STATUS] + [LBWASM_PORT + i for i in range(len(plugins))] \
        + [NGINX_PORT + i for i in range(len(kas))] \
        + list(range(BE_BASE, BE_BASE + nmax))
    busy = [p for p in own_ports if listening(p)]
    if busy:
        sys.exit(f"port(s) already in use: {busy[:10]}")
    # NGINX's worker_rlimit_nofile needs a hard limit above it (raising the hard limit
    # needs CAP_SYS_RESOURCE); a few thousand descriptors are enough here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = min(hard, 65536)
    if nofile < nmax + 4 * args.conns + 100:
        sys.exit(f"open-files hard limit {hard} too low for {nmax} backends")
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    work = tempfile.mkdtemp(prefix="many-backends-")
    procs = []

    def boost(pid):
        if args.nice:
            try:
                with open(f"/proc/{pid}/autogroup", "w") as f:
                    f.write(str(args.nice))
            except OSError:
                pass

    def start(name, cmd):
        logf = os.path.join(work, f"{name}.log")
        pre = ["nice", "-n", str(args.nice)] if args.nice else []
        with open(logf, "ab") as out:
            p = subprocess.Popen(pre + cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        boost(p.pid)
        return p, logf

    def stop(p):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def alarm(*_):
        raise Timeout(f"time limit ({args.max_secs} s) reached")

    signal.signal(signal.SIGALRM, alarm)
    signal.signal(signal.SIGTERM, alarm)
    signal.alarm(args.max_secs)

    def nginx_head(d):
        return f"""daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile // 2}; }}
http {{ access_log off; default_type text/plain;
client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
uwsgi_temp_path {d}; scgi_temp_path {d};
keepalive_requests 1000000; keepalive_timeout 60s;
"""

    def run_wrk(port, secs, sids):
        f = os.path.join(work, "wrk.out")
        pre = ["nice", "-n", str(args.nice)] if args.nice else []
        cmd = pre + ["timeout", "-k", "2", str(secs + 15), wrk, "-t1", f"-c{args.conns}",
                     f"-d{secs}s", "--latency", f"http://127.0.0.1:{port}/"]
        t0s = {k: session_ticks(s) for k, s in sids.items()}
        sb0, sq0 = sys_busy_ticks()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        acc0 = stub_accepts()
        t0 = time.time()
        with open(f, "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            boost(p.pid)
            try:
                rc = p.wait()
            except BaseException:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise
        t1 = time.time()
        acc1 = stub_accepts()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sb1, sq1 = sys_busy_ticks()
        t1s = {k: session_ticks(s) for k, s in sids.items()}
        text = open(f, errors="replace").read()
        if rc != 0:
            raise RuntimeError(f"wrk failed (rc {rc}):\n{text}")
        r = parse_wrk(text)
        reqs = r.get("reqs") or r["rps"] * (t1 - t0)
        us = lambda ticks: ticks / HZ * 1e6 / reqs  # noqa: E731
        r["cpu_us"] = {k: us(t1s[k] - t0s[k]) for k in sids}
        r["lb_pct"] = 100 * (t1s["lb"] - t0s["lb"]) / HZ / (t1 - t0)
        r["wrk_us"] = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e6 / reqs
        r["box_us"] = us(sb1 - sb0)
        r["sirq_us"] = us(sq1 - sq0)
        r["other_pct"] = max(0.0, 100 * ((sb1 - sb0) - sum(t1s[k] - t0s[k] for k in sids))
                             / HZ / (t1 - t0) - 100 * r["wrk_us"] * reqs / 1e6 / (t1 - t0)
                             - 100 * (sq1 - sq0) / HZ / (t1 - t0))
        # the stub_status GET itself is one accepted connection
        r["new_conns_per_req"] = max(0, acc1 - acc0 - 1) / reqs
        return r

    def background(own_sids):
        sb0, _ = sys_busy_ticks()
        o0 = sum(session_ticks(s) for s in own_sids)
        t0 = time.time()
        time.sleep(1)
        sb1, _ = sys_busy_ticks()
        o1 = sum(session_ticks(s) for s in own_sids)
        return max(0.0, 100 * ((sb1 - sb0) - (o1 - o0)) / HZ / (time.time() - t0))

    def quiet(own_sids):
        bg = background(own_sids)
        end = time.time() + args.quiet_wait
        if bg > 20 and args.quiet_wait > 0:
            log(f"background CPU {bg:.0f}% of a core: waiting up to {args.quiet_wait}s")
            while bg > 20 and time.time() < end:
                bg = background(own_sids)
        log(f"background CPU before the block: {bg:.0f}% of one core"
            + ("" if bg <= 20 else " (BUSY: results will be noisy)"))
        return bg

    results = {}   # (N, target) -> list of run dicts
    bgs = {}
    pool_state = {}
    try:
        # ---- backends: one NGINX, nmax ports
        bd = os.path.join(work, "be")
        os.makedirs(bd)
        listens = "\n".join(f"  listen 127.0.0.1:{p};" for p in range(BE_BASE, BE_BASE + nmax))
        with open(os.path.join(bd, "nginx.conf"), "w") as f:
            f.write(nginx_head(bd) + f"""server {{
{listens}
  location / {{ return 200 "ok\\n"; }}
}}
server {{ listen 127.0.0.1:{BE_STATUS}; location /status {{ stub_status; }} }}
}}
""")
        be, belog = start("backends", [nginx, "-p", bd, "-e", f"{bd}/error.log", "-c",
                                       f"{bd}/nginx.conf"])
        wait_port(BE_STATUS, be, "backend nginx", f"{bd}/error.log")
        for p in (BE_BASE, BE_BASE + nmax - 1):
            wait_port(p, be, "backend nginx", f"{bd}/error.log")
        log(f"backend nginx (pid {be.pid}) on 127.0.0.1:{BE_BASE}-{BE_BASE + nmax - 1}")

        for n in sizes:
            addrs = [f"127.0.0.1:{p}" for p in range(BE_BASE, BE_BASE + n)]
            targets, started = [], []   # (name, port, session id); processes of this N
            for i, plugin in enumerate(plugins):
                port = LBWASM_PORT + i
                # A built-in's name, or a .wasm file (two builds of one plugin side by side)
                # named by its file name.
                label = SHORT.get(plugin, os.path.basename(plugin).removesuffix(".wasm"))
                p, logf = start(f"lbwasm-{label}-{n}", [
                    args.lbwasm, "serve", "--listen", f"127.0.0.1:{port}",
                    "--backends", ",".join(addrs), "--plugin", plugin,
                    "--workers", "1", "--no-load-poll", "--log-level", "warn"])
                started.append((p, port, "lbwasm", logf))
                targets.append((f"lbwasm-{label}", port, p.pid))
            servers = "\n".join(f"    server {a};" for a in addrs)
            for i, ka in enumerate(kas):
                port = NGINX_PORT + i
                nd = os.path.join(work, f"ngx-{n}-ka{ka}")
                os.makedirs(nd)
                with open(os.path.join(nd, "nginx.conf"), "w") as f:
                    f.write(nginx_head(nd) + f"""upstream lc {{
    least_conn;
{servers}
    keepalive {ka}; keepalive_requests 1000000; keepalive_timeout 60s;
}}
server {{ listen 127.0.0.1:{port};
  location / {{ proxy_pass http://lc; proxy_http_version 1.1;
               proxy_set_header Connection ""; }} }}
}}
""")
                p, _ = start(f"nginx-lb-{n}-ka{ka}", [nginx, "-p", nd, "-e", f"{nd}/error.log",
                                                      "-c", f"{nd}/nginx.conf"])
                started.append((p, port, "nginx LB", f"{nd}/error.log"))
                targets.append((f"nginx-lc-ka{ka}", port, p.pid))
            for p, port, what, logf in started:
                wait_port(port, p, what, logf)
            for name, port, _ in targets:
                st, b = get(port)
                if st != 200 or not b.startswith(b"ok"):
                    raise RuntimeError(f"{name}: GET / gave {st} {b[:60]!r}")
            log(f"N={n}: " + ", ".join(f"{t[0]} pid {t[2]}" for t in targets)
                + f"; warm-up {args.warmup}s each")
            for name, port, sid in targets:
                run_wrk(port, args.warmup, {"lb": sid, "be": be.pid})
            bgs[n] = quiet([be.pid] + [t[2] for t in targets])
            for rnd in range(1, args.rounds + 1):
                for name, port, sid in targets:
                    r = run_wrk(port, args.duration, {"lb": sid, "be": be.pid})
                    results.setdefault((n, name), []).append(r)
                    log(f"N={n:<5} round {rnd}/{args.rounds} {name:15} {r['rps']:8.0f} rps"
                        f"  p99 {r['p99']:6.3f} ms  lb {r['cpu_us']['lb']:5.1f} us/r"
                        f" ({r['lb_pct']:3.0f}% core)  be {r['cpu_us']['be']:4.1f}"
                        f"  wrk {r['wrk_us']:4.1f}  box {r['box_us']:5.1f} us/r"
                        f"  new be conns/req {r['new_conns_per_req']:.3f}"
                        f"  other {r['other_pct']:3.0f}%  err {r['bad']}")
                    time.sleep(0.3)
            pool_state[n] = {name: backend_conns(sid, BE_BASE, BE_BASE + n - 1)
                             for name, _, sid in targets}
            for p, *_ in reversed(started):
                stop(p)
    except Timeout as e:
        log(f"ERROR: {e}; printing what was measured")
    finally:
        signal.alarm(0)
        for p in reversed(procs):
            stop(p)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # ---- report
    print(f"\nmany_backends: {subprocess.run([nginx, '-v'], capture_output=True, text=True).stderr.strip()},"
          f" wrk -t1 -c{args.conns} -d{args.duration}s x {args.rounds} rounds (alternating),"
          f" one worker each, nice {args.nice}, {os.cpu_count()} CPUs shared by all")
    print(f"{'N':>5} {'balancer':15} {'rps_med':>8} {'p50_ms':>7} {'p99_ms':>7} {'lb_us/r':>8}"
          f" {'be_us/r':>8} {'wrk_us/r':>8} {'box_us/r':>8} {'newc/req':>8} {'errs':>5}"
          f" {'be_conns(ports)':>15}  rps per round")
    for (n, name), rs in results.items():
        held = pool_state.get(n, {}).get(name)
        print(f"{n:5d} {name:15} {med([r['rps'] for r in rs]):8.0f}"
              f" {med([r['p50'] for r in rs]):7.3f} {med([r['p99'] for r in rs]):7.3f}"
              f" {med([r['cpu_us']['lb'] for r in rs]):8.2f}"
              f" {med([r['cpu_us']['be'] for r in rs]):8.2f}"
              f" {med([r['wrk_us'] for r in rs]):8.2f} {med([r['box_us'] for r in rs]):8.2f}"
              f" {med([r['new_conns_per_req'] for r in rs]):8.3f} {sum(r['bad'] for r in rs):5d}"
              f" {(f'{held[0]}({held[1]})' if held else '-'):>15}  "
              + " ".join(f"{r['rps']:.0f}" for r in rs))
    print("(medians of rounds; *_us/r = CPU (user+sys) in us per request of the balancer's"
          " processes, the backend NGINX, wrk, and the whole box incl. softirq; newc/req ="
          " connections the backends accepted per request; be_conns = established connections"
          " the balancer held to the backends after the last round (distinct backends);"
          f" background CPU before each N: "
          + ", ".join(f"N={n} {b:.0f}%" for n, b in bgs.items()) + ")")
    lo, hi = min(sizes), max(sizes)
    if hi == lo:
        return 0
    lbus = lambda rs: med([r["cpu_us"]["lb"] for r in rs])  # noqa: E731
    rps = lambda rs: med([r["rps"] for r in rs])  # noqa: E731
    print(f"\nN={lo} -> N={hi}, medians:")
    names = list(dict.fromkeys(name for (_, name) in results))
    for name in names:
        a, b = results.get((lo, name)), results.get((hi, name))
        if a and b:
            print(f"  {name:15} CPU per request {lbus(a):6.2f} -> {lbus(b):6.2f} us"
                  f" ({lbus(b) - lbus(a):+6.2f} us), req/s {rps(a):6.0f} -> {rps(b):6.0f}"
                  f" ({100 * (rps(b) / rps(a) - 1):+5.1f}%)")
    a, b = results.get((lo, "lbwasm-lc")), results.get((hi, "lbwasm-lc"))
    if a and b and hi > 16:
        lb_a, lb_b = lbus(a), lbus(b)
        box_a = med([r["box_us"] for r in a])
        rps_a, rps_b = rps(a), rps(b)
        d_lo, d_hi = CHOOSE_1000_US[0] - CHOOSE_SMALL_US, CHOOSE_1000_US[1] - CHOOSE_SMALL_US
        print(f"lbwasm least_connections against the criterion prediction (choose ~{CHOOSE_SMALL_US} us"
              f" at <=16 backends, {CHOOSE_1000_US[0]}-{CHOOSE_1000_US[1]} us at 1,000:"
              f" {d_lo:+.1f} to {d_hi:+.1f} us per request):")
        print(f"  CPU per request: measured {lb_a:.2f} -> {lb_b:.2f} us ({lb_b - lb_a:+.2f});"
              f" predicted {lb_a + d_lo:.1f}-{lb_a + d_hi:.1f} us")
        print(f"  req/s: measured {rps_a:.0f} -> {rps_b:.0f} ({100 * (rps_b / rps_a - 1):+.1f}%);"
              f" predicted {rps_a * box_a / (box_a + d_hi):.0f}-{rps_a * box_a / (box_a + d_lo):.0f}"
              f" ({100 * (box_a / (box_a + d_hi) - 1):+.1f}% to {100 * (box_a / (box_a + d_lo) - 1):+.1f}%)"
              f" if the box is CPU-bound ({box_a:.1f} us of box CPU per request at N={lo}),"
              f" {rps_a * lb_a / (lb_a + d_hi):.0f}-{rps_a * lb_a / (lb_a + d_lo):.0f}"
              f" if lbwasm's one worker is")
        ra, rb = results.get((lo, "lbwasm-rr")), results.get((hi, "lbwasm-rr"))
        if ra and rb:
            other = lbus(rb) - lbus(ra)
            print(f"  round robin (same choose cost at any N) grew {other:+.2f} us: what many"
                  f" backends cost besides choose (a different pooled connection per request);"
                  f" least connections' growth beyond it: {lb_b - lb_a - other:+.2f} us"
                  f" (predicted {d_lo:+.1f} to {d_hi:+.1f});"
                  f" lc - rr at N={hi}: {lb_b - lbus(rb):+.2f} us, at N={lo}: {lb_a - lbus(ra):+.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
