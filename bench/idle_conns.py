#!/usr/bin/env python3
"""RSS per idle keep-alive client connection: lbwasm beside NGINX, on 127.0.0.1 only.

Starts one NGINX backend (or `lbwasm backend` when NGINX is not installed), then for each
balancer (lbwasm, and NGINX as a load balancer when installed): starts it with one worker,
opens N client connections, sends one GET on each and reads its answer (so every
connection has served a request and is now idle, keep-alive), waits a moment, and prints
the balancer's RSS growth per connection. Every process it starts is stopped by its PID.

    python3 bench/idle_conns.py [-n 4000] [--lbwasm target/release/lbwasm]

Raise `ulimit -n` first for large N (each connection costs this script one descriptor).
"""

import argparse
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
BATCH = os.environ.get("BATCH") == "1"


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


def measure(name, pids_of, port, n, settle):
    wait_port(port)
    # Warm up: the first requests allocate what the process keeps anyway.
    for s in open_idle(port, 50):
        s.close()
    time.sleep(0.5)
    before = total_rss_kib(pids_of())
    socks = open_idle(port, n)
    # Let the allocator return what the requests' buffers took at the peak.
    time.sleep(settle)
    after = total_rss_kib(pids_of())
    per = (after - before) / n
    print(f"{name:8} {n:7d} {before / 1024:9.1f} {after / 1024:9.1f} {per:10.2f}", flush=True)
    for s in socks:
        s.close()
    return per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4000, help="idle connections (default 4000)")
    ap.add_argument("--lbwasm", default="target/release/lbwasm")
    ap.add_argument("--settle", type=float, default=6.0,
                    help="seconds between the last answer and the RSS reading (default 6:"
                         " lbwasm workers return freed pages every 5 s)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.n * 2 + 1000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

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
error_log {work}/{name}.err; worker_rlimit_nofile {args.n * 2 + 1000};
events {{ worker_connections {args.n * 2 + 1000}; }}
http {{ access_log off; keepalive_timeout 300s; keepalive_requests 100000;
client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
uwsgi_temp_path {work}; scgi_temp_path {work};
{body} }}
""")
        return path

    try:
        if nginx:
            conf = nginx_conf("backend", f'server {{ listen 127.0.0.1:{BACKEND_PORT}; '
                                         f'location / {{ return 200 "ok"; }} }}')
            start([nginx, "-c", conf, "-e", f"{work}/backend.err"])
        else:
            start([args.lbwasm, "backend", "--port", str(BACKEND_PORT)])
        wait_port(BACKEND_PORT)
        print("balancer  conns  rss_before_MiB rss_after_MiB  KiB/conn")
        lb = start([args.lbwasm, "serve", "--listen", f"127.0.0.1:{LB_PORT}", "--backends",
                    f"127.0.0.1:{BACKEND_PORT}", "--plugin", "round_robin", "--workers", "1",
                    "--no-load-poll", "--log-level", "warn"])
        measure("lbwasm", lambda: [lb.pid], LB_PORT, args.n, args.settle)
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
