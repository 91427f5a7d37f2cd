#!/usr/bin/env python3
"""RSS per idle keep-alive client connection: lbwasm beside NGINX, on 127.0.0.1 only.

Starts one NGINX backend (or `lbwasm backend` when NGINX is not installed), then for each
balancer (lbwasm, and NGINX as a load balancer when installed): starts it with one worker,
opens N client connections, sends one GET on each and reads its answer (so every
connection has served a request and is now idle, keep-alive), waits a moment, and prints
the balancer's RSS growth per connection. Every process it starts is stopped by its PID.

    python3 bench/idle_conns.py [-n 4000] [--lbwasm target/release/lbwasm]

With --pooled it measures idle *pooled backend* connections instead (the balancer's
keep-alive connections to backends, kept between requests): `lbwasm backend --latency-ms`
servers hold every answer back (1.5 s by default), N client requests go out at once so the
balancer opens N backend connections, all are answered, the client connections are closed,
and after the settle time the balancer's RSS growth is divided by the backend connections
it really holds (counted in /proc/net/tcp among its own sockets, and printed). lbwasm
keeps at most 256 idle connections per backend and worker (`MAX_IDLE` in
crates/proxy/src/proxy/client.rs, not configurable), so the requests are spread over
ceil(N / 256) backends unless --backends says otherwise; NGINX gets the same backends,
`keepalive 20000` and `keepalive_timeout 30s` (lbwasm's idle timeout). --peak-first sends
the same burst once before the baseline and waits for both pools to empty, so that what
the allocator keeps from the burst is in the baseline, not in the figure.

    python3 bench/idle_conns.py --pooled [-n 2000] [--backends K] [--delay-ms 1500]
                                [--peak-first]

With --in-flight it measures requests *in flight* instead: the same held-back backends
(8 s by default), N requests at once, and once the balancer holds N backend connections
(every request forwarded and waiting for its answer) its RSS growth divided by N: what a
waiting request costs (long polls, slow backends). Then all are answered and closed.

    python3 bench/idle_conns.py --in-flight [-n 2000] [--delay-ms 8000]

Large N (issue 17 asks for 50,000): the script raises its open-files limit to 2N + 1000,
the hard limit too when it may (root with CAP_SYS_RESOURCE, up to fs.nr_open; the
balancers inherit it: lbwasm raises its soft limit to the hard one, NGINX gets
`worker_rlimit_nofile` and `worker_connections` of 2N + 1000, or the hard limit), and
refuses an N the hard limit cannot hold (about limit - 600). KiB/conn is the RSS growth
divided by the connections the balancer still holds (NGINX short of worker_connections
closes idle ones; `held` is printed). One client address reaches one listener port from at
most ~28,000 ephemeral ports (net.ipv4.ip_local_port_range 32768-60999), so connection i
is bound to source address 127.0.0.(1 + i // --per-source) (20,000 by default) with
IP_BIND_ADDRESS_NO_PORT (the port is picked at connect, for the whole 4-tuple); below
--per-source nothing is bound, as before. With all N open, one more connection sends a GET
and must get its 200 (printed), and with --admin-check lbwasm gets an admin listener whose
/healthz and /metrics must answer too.

    python3 bench/idle_conns.py -n 50000 [--admin-check]
"""

import argparse
import http.client
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BACKEND_PORT = 9351
LB_PORT = 9352
# --pooled: backends on consecutive ports from here.
POOLED_PORT = 9361
# lbwasm's cap on idle connections per backend and worker (MAX_IDLE in client.rs).
LBWASM_MAX_IDLE = 256
BATCH = os.environ.get("BATCH") == "1"
# Client connections per source address (127.0.0.1, .2, ...); set by --per-source.
PER_SOURCE = 20000
# Linux IP_BIND_ADDRESS_NO_PORT: bind() takes the address only, connect() picks the port.
IP_BIND_ADDRESS_NO_PORT = 24
ADMIN_PORT = 9353


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def total_rss_kib(pids):
    return sum(rss_kib(p) for p in pids)


def children(pid):
    """The PIDs of a process and its children (NGINX's master and workers)."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def open_idle(port, n):
    """N connections, one GET each, answered; returns the sockets, still open."""
    socks = []
    sel = selectors.DefaultSelector()
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    for i in range(n):
        s = socket.socket()
        if n > PER_SOURCE:
            # One source address has ~28,000 ephemeral ports towards one listener.
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((f"127.0.0.{1 + i // PER_SOURCE}", 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE, i)
        # Keep the handshakes flowing: drain what is ready every 200 connections.
        if i % 200 == 199:
            pump(sel, request, block=BATCH)
    pump(sel, request, block=True)
    return socks


def pump(sel, request, block):
    deadline = time.time() + 60
    while sel.get_map():
        events = sel.select(timeout=1 if block else 0)
        if not events and not block:
            return
        if time.time() > deadline:
            raise RuntimeError(f"{len(sel.get_map())} connections got no answer")
        for key, mask in events:
            s = key.fileobj
            if mask & selectors.EVENT_WRITE:
                s.send(request)
                sel.modify(s, selectors.EVENT_READ, key.data)
            else:
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("a connection was closed")
                if b"\r\n\r\n" in data:  # small answers arrive whole on loopback
                    sel.unregister(s)


def established(port):
    """Established connections to 127.0.0.1:port (the balancer's side of them)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[3] == "01" and cols[1] == f"0100007F:{port:04X}":
                n += 1
    return n


def fresh_get(port, path="/"):
    """One GET on a new connection: (status, milliseconds)."""
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, (time.time() - t0) * 1000, body
    finally:
        c.close()


def measure(name, pids_of, port, n, settle, admin=None):
    wait_port(port)
    # Warm up: the first requests allocate what the process keeps anyway.
    for s in open_idle(port, 50):
        s.close()
    time.sleep(0.5)
    before = total_rss_kib(pids_of())
    t0 = time.time()
    socks = open_idle(port, n)
    took = time.time() - t0
    # Let the allocator return what the requests' buffers took at the peak.
    time.sleep(settle)
    after = total_rss_kib(pids_of())
    # What the balancer still holds: NGINX short of worker_connections closes idle ones.
    held = established(port)
    per = (after - before) / held if held else float("nan")
    print(f"{name:8} {n:7d} {before / 1024:9.1f} {after / 1024:9.1f} {per:10.2f}"
          f" {(after - before) / 1024:9.1f} {took:6.1f} {held:6d}", flush=True)
    if n > PER_SOURCE or admin:
        status, ms, _ = fresh_get(port)
        line = (f"#   {name}: {held} established to :{port} while held; a new connection's"
                f" GET / -> {status} in {ms:.1f} ms")
        if admin:
            hs, hms, _ = fresh_get(admin, "/healthz")
            ms_, mms, body = fresh_get(admin, "/metrics")
            line += (f"; admin /healthz -> {hs} in {hms:.1f} ms, /metrics -> {ms_}"
                     f" ({len(body)} bytes) in {mms:.1f} ms")
        print(line, flush=True)
    for s in socks:
        s.close()
    return per


def socket_inodes(pids):
    """The inodes of the sockets these processes hold."""
    out = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                link = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


def backend_conns(pids, ports):
    """Established TCP connections these processes hold to one of `ports`."""
    inodes = socket_inodes(pids)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    rem_port = int(cols[2].rsplit(":", 1)[1], 16)
                    if cols[3] == "01" and rem_port in ports and int(cols[9]) in inodes:
                        n += 1
        except FileNotFoundError:
            pass
    return n


def measure_pooled(name, pids_of, port, n, settle, ports, peak_first):
    """RSS growth per idle pooled backend connection: N requests at once (held in flight
    by the backends' delay), all answered, client connections closed, settle, divide by
    the backend connections the balancer really holds then. With `peak_first`, the same N
    requests at once go first and the pool is left to empty (idle timeout), so that what
    the allocator keeps from that peak is in the baseline, not in the figure."""
    wait_port(port)
    # Warm up: the first requests allocate what the process keeps anyway.
    for s in open_idle(port, n if peak_first else 50):
        s.close()
    if peak_first:
        deadline = time.time() + 90
        while backend_conns(pids_of(), ports) and time.time() < deadline:
            time.sleep(1)
    time.sleep(settle)
    pids = pids_of()
    before = total_rss_kib(pids)
    pooled_before = backend_conns(pids, ports)
    t0 = time.time()
    socks = open_idle(port, n)
    took = time.time() - t0
    for s in socks:
        s.close()
    # Let the allocator return what the exchanges took at the peak.
    time.sleep(settle)
    pids = pids_of()
    after = total_rss_kib(pids)
    pooled = backend_conns(pids, ports)
    held = pooled - pooled_before
    per = (after - before) / held if held > 0 else float("nan")
    print(f"{name:8} {n:6d} {took:5.1f} {pooled_before:6d} {pooled:6d} {held:6d}"
          f" {before / 1024:9.1f} {after / 1024:9.1f} {per:9.2f}", flush=True)
    return per


def measure_in_flight(name, pids_of, port, n, ports, delay):
    """RSS growth per request in flight: N requests sent at once, measured while the
    backends hold every answer back (all N forwarded: N backend connections held), then
    all answers read."""
    wait_port(port)
    for s in open_idle(port, 50):  # warm-up, as the other modes
        s.close()
    time.sleep(2)
    pids = pids_of()
    before = total_rss_kib(pids)
    t0 = time.time()
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        socks.append(s)
    # Every request forwarded: the balancer holds a backend connection for each (the
    # warm-up's pooled ones are reused, the rest are new).
    deadline = t0 + delay / 1000 * 0.6
    waiting = 0
    while time.time() < deadline:
        waiting = backend_conns(pids_of(), ports)
        if waiting >= n:
            break
        time.sleep(0.1)
    took = time.time() - t0
    during = total_rss_kib(pids_of())
    if waiting < n or took > delay / 1000 * 0.6:
        raise RuntimeError(f"{name}: only {waiting} of {n} requests forwarded after"
                           f" {took:.1f}s (raise --delay-ms)")
    pump(sel, b"", block=True)
    for s in socks:
        s.close()
    per = (during - before) / n
    print(f"{name:8} {n:6d} {took:5.1f} {waiting:7d} {before / 1024:11.1f}"
          f" {during / 1024:11.1f} {per:9.2f}", flush=True)
    return per


def main():
    global PER_SOURCE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4000, help="idle connections (default 4000)")
    ap.add_argument("--lbwasm", default="target/release/lbwasm")
    ap.add_argument("--settle", type=float, default=6.0,
                    help="seconds between the last answer and the RSS reading (default 6:"
                         " lbwasm workers return freed pages every 5 s)")
    ap.add_argument("--pooled", action="store_true",
                    help="measure idle pooled backend connections instead of client ones")
    ap.add_argument("--backends", type=int, default=0,
                    help="--pooled: backends to spread the requests over (default"
                         f" ceil(N / {LBWASM_MAX_IDLE}), lbwasm's idle cap per backend)")
    ap.add_argument("--peak-first", action="store_true",
                    help="--pooled: run the N requests once first and wait (~35 s) for the"
                         " pools to empty, so the allocator's leftovers of that peak are in"
                         " the baseline")
    ap.add_argument("--in-flight", action="store_true",
                    help="measure requests in flight (held by the backends) instead")
    ap.add_argument("--delay-ms", type=int, default=0,
                    help="--pooled, --in-flight: how long the backends hold each answer"
                         " (default 1500, --in-flight 8000)")
    ap.add_argument("--per-source", type=int, default=PER_SOURCE,
                    help="client connections per source address 127.0.0.X when N is larger"
                         f" (default {PER_SOURCE})")
    ap.add_argument("--admin-check", action="store_true",
                    help=f"give lbwasm an admin listener (127.0.0.1:{ADMIN_PORT}) and check"
                         " that /healthz and /metrics answer while the N are held")
    args = ap.parse_args()
    PER_SOURCE = args.per_source
    args.delay_ms = args.delay_ms or (8000 if args.in_flight else 1500)
    args.pooled = args.pooled or args.in_flight  # the same backends and balancers
    if args.pooled:
        args.settle = min(args.settle, 20.0)  # lbwasm closes pooled ones idle for 30 s
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.n * 2 + 1000
    if hard < want:
        # Raising the hard limit needs CAP_SYS_RESOURCE (root normally has it; some
        # containers drop it); the balancers inherit the new limit.
        with open("/proc/sys/fs/nr_open") as f:
            new_hard = min(want, int(f.read()))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, new_hard), new_hard))
            print(f"# raised the open-files hard limit {hard} -> {new_hard} (inherited by"
                  f" the balancers)", flush=True)
            hard = new_hard
        except (ValueError, OSError) as e:
            print(f"# cannot raise the open-files hard limit {hard} -> {new_hard}: {e}"
                  f" (needs CAP_SYS_RESOURCE)", flush=True)
    # This script holds N client sockets, a balancer N accepted ones (+ its backend side).
    if hard < args.n + 600:
        print(f"-n {args.n} needs an open-files hard limit of at least {args.n + 600}"
              f" (here {hard}: the balancer holds one descriptor per client connection);"
              f" raise it (ulimit -Hn / prlimit --nofile as root with CAP_SYS_RESOURCE,"
              f" LimitNOFILE=) or use -n {max(0, hard - 600)} or less", file=sys.stderr)
        return 1
    want = min(hard, want)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    nofile = want  # NGINX's worker_rlimit_nofile and worker_connections

    nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    work = tempfile.mkdtemp(prefix="idle-conns-")
    procs = []

    def start(cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        procs.append(p)
        return p

    def nginx_conf(name, body):
        path = os.path.join(work, name)
        with open(path, "w") as f:
            f.write(f"""daemon off; worker_processes 1; pid {work}/{name}.pid;
error_log {work}/{name}.err; worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile}; }}
http {{ access_log off; keepalive_timeout 300s; keepalive_requests 100000;
client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
uwsgi_temp_path {work}; scgi_temp_path {work};
{body} }}
""")
        return path

    def stop(p):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    try:
        if args.pooled:
            k = args.backends or -(-args.n // LBWASM_MAX_IDLE)
            ports = set(range(POOLED_PORT, POOLED_PORT + k))
            addrs = [f"127.0.0.1:{p}" for p in sorted(ports)]
            print(f"# {k} backend(s) `lbwasm backend --latency-ms {args.delay_ms}`, ports"
                  f" {POOLED_PORT}-{POOLED_PORT + k - 1}; lbwasm keeps at most"
                  f" {LBWASM_MAX_IDLE} idle per backend and worker"
                  f" (so at most {LBWASM_MAX_IDLE * k} here)", flush=True)
            start([args.lbwasm, "backend", "--port", str(POOLED_PORT), "--count", str(k),
                   "--latency-ms", str(args.delay_ms), "--log-level", "warn"])
            for p in sorted(ports):
                wait_port(p)
            if args.in_flight:
                print("# KiB/req = (rss_during - rss_before) / requests in flight, measured once"
                      " the balancer holds a backend connection for each")
                print("balancer  reqs  secs waiting rss_bef_MiB rss_dur_MiB   KiB/req")
            else:
                print("# KiB/conn = (rss_after - rss_before) / (pooled_after - pooled_before),"
                      " pooled = established connections the balancer holds to the backends")
                print("balancer  reqs  secs p_bef p_aft   held rss_bef_MiB rss_aft_MiB  KiB/conn")

            def run(name, pids_of):
                if args.in_flight:
                    measure_in_flight(name, pids_of, LB_PORT, args.n, ports, args.delay_ms)
                else:
                    measure_pooled(name, pids_of, LB_PORT, args.n, args.settle, ports,
                                   args.peak_first)

            lb = start([args.lbwasm, "serve", "--listen", f"127.0.0.1:{LB_PORT}",
                        "--backends", ",".join(addrs), "--plugin", "round_robin",
                        "--workers", "1", "--no-load-poll", "--log-level", "warn"])
            run("lbwasm", lambda: [lb.pid])
            stop(lb)
            if nginx:
                servers = " ".join(f"server {a};" for a in addrs)
                conf = nginx_conf("lb", f"upstream b {{ {servers} keepalive 20000;"
                                        f" keepalive_timeout 30s; }}"
                                        f"server {{ listen 127.0.0.1:{LB_PORT}; location / {{"
                                        f" proxy_pass http://b; proxy_http_version 1.1;"
                                        f' proxy_set_header Connection ""; }} }}')
                ngx = start([nginx, "-c", conf, "-e", f"{work}/lb.err"])
                run("nginx", lambda: children(ngx.pid))
            else:
                print("nginx    (not installed: apt-get install nginx)")
            return 0
        if nginx:
            conf = nginx_conf("backend", f'server {{ listen 127.0.0.1:{BACKEND_PORT}; '
                                         f'location / {{ return 200 "ok"; }} }}')
            start([nginx, "-c", conf, "-e", f"{work}/backend.err"])
        else:
            start([args.lbwasm, "backend", "--port", str(BACKEND_PORT)])
        wait_port(BACKEND_PORT)
        print("# KiB/conn = RSS growth / connections the balancer holds (held, ESTABLISHED in"
              " /proc/net/tcp)")
        print("balancer  conns  rss_before_MiB rss_after_MiB  KiB/conn growth_MiB open_s   held")
        admin = ["--admin", f"127.0.0.1:{ADMIN_PORT}"] if args.admin_check else []
        lb = start([args.lbwasm, "serve", "--listen", f"127.0.0.1:{LB_PORT}", "--backends",
                    f"127.0.0.1:{BACKEND_PORT}", "--plugin", "round_robin", "--workers", "1",
                    "--no-load-poll", "--log-level", "warn"] + admin)
        if admin:
            wait_port(ADMIN_PORT)
        measure("lbwasm", lambda: [lb.pid], LB_PORT, args.n, args.settle,
                ADMIN_PORT if admin else None)
        lb.send_signal(signal.SIGTERM)
        lb.wait(timeout=10)
        if nginx:
            conf = nginx_conf("lb", f"upstream b {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 32; }}"
                                    f"server {{ listen 127.0.0.1:{LB_PORT}; location / {{"
                                    f" proxy_pass http://b; proxy_http_version 1.1;"
                                    f' proxy_set_header Connection ""; }} }}')
            ngx = start([nginx, "-c", conf, "-e", f"{work}/lb.err"])
            measure("nginx", lambda: children(ngx.pid), LB_PORT, args.n, args.settle)
        else:
            print("nginx    (not installed: apt-get install nginx)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
