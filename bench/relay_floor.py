#!/usr/bin/env python3
"""CPU per request of lbwasm and NGINX against the kernel's floor, on 127.0.0.1 only.

The floor is `relay-floor` (bench/relay_floor): a byte relay that pairs each client
connection with a backend connection and copies bytes both ways, no HTTP, no plugin, no
timers, over epoll and over io_uring. What it costs per request is the socket work every
proxy on this kernel pays, so it bounds what lbwasm can save, and the io_uring row is
what a completion-based worker would save on that part.

Starts one NGINX serving three backend ports, then NGINX as a balancer (round robin,
keep-alive to backends), lbwasm (`round_robin`, one worker) and the two relays, all in
front of them, one worker or thread each, and runs alternating `wrk -t1 -c32` rounds (A B
C D A B C D ...). CPU is the balancer process's user and system time from /proc/PID/stat
around each round. Prints the medians. Every process it starts is stopped by its PID.

    cargo build --release -p lbwasm -p relay-floor
    python3 bench/relay_floor.py [-r 6] [-d 5] [--plugin round_robin]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BACKENDS = [9431, 9432, 9433]
NGINX_PORT, LBWASM_PORT, EPOLL_PORT, URING_PORT = 9434, 9435, 9436, 9437
HZ = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    """User and system seconds of the whole process (every thread)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / HZ, int(f[12]) / HZ


def wait_port(port, proc, deadline=10.0):
    import socket

    end = time.time() + deadline
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"relay_floor: the process for port {port} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"relay_floor: nothing listens on 127.0.0.1:{port} after {deadline}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--rounds", type=int, default=6)
    ap.add_argument("-d", "--duration", type=int, default=5)
    ap.add_argument("-c", "--connections", type=int, default=32)
    ap.add_argument("--plugin", default="round_robin")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--lbwasm", default=os.path.join(root, "target/release/lbwasm"))
    ap.add_argument("--relay", default=os.path.join(root, "target/release/relay-floor"))
    a = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"relay_floor: needs {tool} on PATH")
    for b in (a.lbwasm, a.relay):
        if not os.access(b, os.X_OK):
            sys.exit(f"relay_floor: {b} not built (cargo build --release -p lbwasm -p relay-floor)")

    tmp = tempfile.mkdtemp(prefix="relay_floor.")
    backends = ",".join(f"127.0.0.1:{p}" for p in BACKENDS)
    common = f"daemon off; worker_processes 1; error_log {tmp}/%s.err; pid {tmp}/%s.pid;\n" \
        "events { worker_connections 4096; }\n"
    with open(f"{tmp}/be.conf", "w") as f:
        f.write(common % ("be", "be") + "http { access_log off; keepalive_requests 1000000;\n"
                "server { " + " ".join(f"listen 127.0.0.1:{p};" for p in BACKENDS)
                + ' location / { return 200 "hello world"; } } }\n')
    lc = "least_conn;" if a.plugin == "least_connections" else ""
    with open(f"{tmp}/lb.conf", "w") as f:
        f.write(common % ("lb", "lb") + "http { access_log off; keepalive_requests 1000000;\n"
                f"upstream b {{ {lc} " + " ".join(f"server 127.0.0.1:{p};" for p in BACKENDS)
                + " keepalive 64; }\n"
                f"server {{ listen 127.0.0.1:{NGINX_PORT}; location / {{ proxy_pass http://b; "
                'proxy_http_version 1.1; proxy_set_header Connection ""; } } }\n')
    procs = []

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        be = start(["nginx", "-c", f"{tmp}/be.conf"])
        wait_port(BACKENDS[0], be)
        ngx = start(["nginx", "-c", f"{tmp}/lb.conf"])
        wait_port(NGINX_PORT, ngx)
        lbw = start([a.lbwasm, "serve", "--listen", f"127.0.0.1:{LBWASM_PORT}", "--backends",
                     backends, "--plugin", a.plugin, "--workers", "1", "--no-load-poll",
                     "--log-level", "warn"])
        wait_port(LBWASM_PORT, lbw)
        ep = start([a.relay, "epoll", f"127.0.0.1:{EPOLL_PORT}", backends])
        wait_port(EPOLL_PORT, ep)
        ur = start([a.relay, "uring", f"127.0.0.1:{URING_PORT}", backends])
        wait_port(URING_PORT, ur)
        # NGINX's master only forks; its worker is what serves.
        kids = subprocess.run(["pgrep", "-P", str(ngx.pid)], capture_output=True,
                              text=True).stdout.split()
        if not kids:
            sys.exit("relay_floor: the NGINX balancer has no worker")
        runs = [("nginx", int(kids[0]), NGINX_PORT), ("lbwasm", lbw.pid, LBWASM_PORT),
                ("relay epoll", ep.pid, EPOLL_PORT), ("relay uring", ur.pid, URING_PORT)]
        res = {n: [] for n, _, _ in runs}
        for r in range(a.rounds):
            for name, pid, port in runs:
                u0, s0 = cpu(pid)
                out = subprocess.run(["wrk", "-t1", f"-c{a.connections}", f"-d{a.duration}s",
                                      "--latency", f"http://127.0.0.1:{port}/"],
                                     capture_output=True, text=True).stdout
                u1, s1 = cpu(pid)
                m = re.search(r"(\d+) requests in", out)
                if not m:
                    sys.exit(f"relay_floor: wrk against {name} printed no count:\n{out}")
                n = int(m.group(1))
                bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
                p99 = re.search(r"99%\s+(\S+)", out).group(1)
                row = ((u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6, n / a.duration, p99)
                res[name].append(row)
                print(f"round {r} {name:12} user {row[0]:5.2f} sys {row[1]:5.2f} us/req "
                      f"{row[2]:8.0f} req/s p99 {p99}" + (f"  [{bad.group(0)}]" if bad else ""),
                      flush=True)

        def med(xs):
            return sorted(xs)[len(xs) // 2]

        base = med([u + s for u, s, _, _ in res["nginx"]])
        print(f"\nmedians of {a.rounds} rounds, wrk -t1 -c{a.connections} -d{a.duration}s, "
              f"plugin {a.plugin}:")
        print(f"{'':12} {'user':>6} {'sys':>6} {'total':>6} us/req  {'req/s':>8}  x NGINX CPU")
        for name in res:
            u = med([x[0] for x in res[name]])
            s = med([x[1] for x in res[name]])
            t = med([x[0] + x[1] for x in res[name]])
            print(f"{name:12} {u:6.2f} {s:6.2f} {t:6.2f}        {med([x[2] for x in res[name]]):8.0f}"
                  f"  {t / base:.2f}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
