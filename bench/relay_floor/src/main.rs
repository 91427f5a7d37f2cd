//! The kernel's floor for an HTTP/1.1 proxy on this machine: a byte relay that pairs each
//! client connection with a backend connection of its own (backends taken in turn) and
//! copies bytes both ways, with no parsing, no plugin, no timers and no allocation per
//! request. Whatever it costs per request is the socket work that any proxy pays, so it
//! bounds what a proxy can save. Two I/O paths, same relay:
//!
//! - `epoll`: level-triggered readiness, one `read` per event and one `write` per read
//!   (what NGINX and lbwasm do, without their work on top);
//! - `uring`: completions (io_uring, single issuer, deferred task work): a receive is
//!   always queued on each side, a send is queued when it completes, and one
//!   `io_uring_enter` submits everything queued and waits for the next completions.
//!
//! `bench/relay_floor.py` runs both beside lbwasm and NGINX on the same backends. Not a
//! proxy (no HTTP, a backend per client connection): a measuring instrument.
//!
//! Usage: `relay-floor epoll|uring LISTEN BACKEND[,BACKEND...]`

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

/// Bytes read at once: a request or a response of the benchmark fits many times.
const BUF: usize = 16 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: relay-floor epoll|uring LISTEN BACKEND[,BACKEND...]";
    let (Some(mode), Some(listen), Some(backends)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let backends: Vec<SocketAddr> = backends
        .split(',')
        .map(|b| {
            b.parse()
                .unwrap_or_else(|e| fail(&format!("backend {b}: {e}")))
        })
        .collect();
    let listener =
        TcpListener::bind(listen).unwrap_or_else(|e| fail(&format!("listen on {listen}: {e}")));
    println!("listening on {}", listener.local_addr().expect("bound"));
    let result = match mode.as_str() {
        "epoll" => epoll::run(listener, backends),
        "uring" => uring::run(listener, backends),
        _ => fail(usage),
    };
    if let Err(e) = result {
        fail(&format!("{mode}: {e}"));
    }
}

fn fail(why: &str) -> ! {
    eprintln!("relay-floor: {why}");
    std::process::exit(1)
}

/// A client connection and the backend connection it was given.
struct Pair {
    /// `[client, backend]`: side `s` sends to side `1 - s`.
    socks: [TcpStream; 2],
    bufs: [Box<[u8; BUF]>; 2],
}

impl Pair {
    /// Accepts nothing itself: pairs `client` with a new connection to `backend`, Nagle
    /// off on both as every proxy sets it.
    fn open(client: TcpStream, backend: SocketAddr) -> io::Result<Pair> {
        let upstream = TcpStream::connect(backend)?;
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        Ok(Pair {
            socks: [client, upstream],
            bufs: [Box::new([0; BUF]), Box::new([0; BUF])],
        })
    }

    fn fd(&self, side: usize) -> RawFd {
        self.socks[side].as_raw_fd()
    }
}

/// Readiness: `epoll_wait`, then `read` and `write` on what it reported.
mod epoll {
    use super::*;

    /// The listener's token; a pair's side is `slot << 1 | side`.
    const LISTENER: u64 = u64::MAX;

    pub fn run(listener: TcpListener, backends: Vec<SocketAddr>) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        // SAFETY: plain system calls on descriptors this function owns.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        add(ep, listener.as_raw_fd(), LISTENER)?;
        let mut pairs: Vec<Option<Pair>> = Vec::new();
        let mut next = 0;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            // SAFETY: `events` has room for the count passed.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events[..n as usize] {
                let token = ev.u64;
                if token == LISTENER {
                    while let Ok((client, _)) = listener.accept() {
                        let pair = Pair::open(client, backends[next % backends.len()])?;
                        next += 1;
                        let slot = pairs.iter().position(Option::is_none).unwrap_or_else(|| {
                            pairs.push(None);
                            pairs.len() - 1
                        });
                        for side in 0..2 {
                            pair.socks[side].set_nonblocking(true)?;
                            add(ep, pair.fd(side), (slot as u64) << 1 | side as u64)?;
                        }
                        pairs[slot] = Some(pair);
                    }
                    continue;
                }
                let (slot, side) = ((token >> 1) as usize, (token & 1) as usize);
                let Some(pair) = pairs[slot].as_mut() else {
                    continue;
                };
                if !relay_once(pair, side) {
                    pairs[slot] = None; // closing the sockets takes them out of the set
                }
            }
        }
    }

    /// One read from `side` and what it read written to the other side; false when the
    /// pair is done.
    fn relay_once(pair: &mut Pair, side: usize) -> bool {
        let Pair { socks, bufs } = pair;
        let [a, b] = socks;
        let (from, to) = if side == 0 { (a, b) } else { (b, a) };
        let n = match from.read(&mut bufs[side][..]) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        };
        let mut data = &bufs[side][..n];
        while !data.is_empty() {
            match to.write(data) {
                Ok(n) => data = &data[n..],
                // The benchmark's messages never fill a socket buffer; waiting here keeps
                // the relay correct if one ever does.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(to.as_raw_fd()),
                Err(_) => return false,
            }
        }
        true
    }

    fn wait_writable(fd: RawFd) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 1000) };
    }

    fn add(ep: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: a valid event for a descriptor the caller owns.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Completions: a receive always queued on each side, a send queued when one completes.
mod uring {
    use super::*;
    use io_uring::{IoUring, opcode, squeue, types};

    /// Operation in `user_data`'s low bits; the pair's slot above them.
    const ACCEPT: u64 = 0;
    const RECV: u64 = 1; // | side << 2
    const SEND: u64 = 2; // | side << 2 (sending what `side` received)

    /// A pair in the ring: what each direction has left to send, and how many operations
    /// the kernel still holds buffers of (the pair is dropped only at zero).
    struct Slot {
        pair: Pair,
        /// `(offset, end)` of the bytes side `s` received that are not sent yet.
        pending: [(usize, usize); 2],
        in_flight: u32,
        closing: bool,
    }

    pub fn run(listener: TcpListener, backends: Vec<SocketAddr>) -> io::Result<()> {
        let mut ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(4096)?;
        let (submitter, mut sq, mut cq) = ring.split();
        let mut slots: Vec<Option<Slot>> = Vec::new();
        let mut queue: Vec<squeue::Entry> = Vec::new();
        let lfd = types::Fd(listener.as_raw_fd());
        queue.push(opcode::Accept::new(lfd, std::ptr::null_mut(), std::ptr::null_mut()).build());
        let mut next = 0;
        loop {
            for e in queue.drain(..) {
                // SAFETY: every buffer an entry points at is boxed in a slot that is kept
                // until the kernel has completed every operation on it (`in_flight`).
                while unsafe { sq.push(&e) }.is_err() {
                    sq.sync();
                    submitter.submit()?;
                }
            }
            sq.sync();
            match submitter.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            cq.sync();
            for cqe in &mut cq {
                let (ud, res) = (cqe.user_data(), cqe.result());
                let op = ud & 3;
                if op == ACCEPT {
                    queue.push(
                        opcode::Accept::new(lfd, std::ptr::null_mut(), std::ptr::null_mut())
                            .build(),
                    );
                    if res < 0 {
                        continue;
                    }
                    // SAFETY: the kernel handed this descriptor to us alone.
                    let client = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(res) };
                    let pair = Pair::open(client, backends[next % backends.len()])?;
                    next += 1;
                    let index = slots.iter().position(Option::is_none).unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    let mut slot = Slot {
                        pair,
                        pending: [(0, 0); 2],
                        in_flight: 0,
                        closing: false,
                    };
                    for side in 0..2 {
                        queue.push(recv(&mut slot, index, side));
                    }
                    slots[index] = Some(slot);
                    continue;
                }
                let (index, side) = ((ud >> 3) as usize, ((ud >> 2) & 1) as usize);
                let Some(slot) = slots[index].as_mut() else {
                    continue;
                };
                slot.in_flight -= 1;
                if slot.closing || res <= 0 {
                    close(slot);
                } else if op == RECV {
                    slot.pending[side] = (0, res as usize);
                    queue.push(send(slot, index, side));
                } else {
                    slot.pending[side].0 += res as usize;
                    let (off, end) = slot.pending[side];
                    queue.push(if off < end {
                        send(slot, index, side)
                    } else {
                        recv(slot, index, side)
                    });
                }
                if slot.closing && slot.in_flight == 0 {
                    slots[index] = None;
                }
            }
        }
    }

    /// Ends both sockets so that the operations still queued on them complete.
    fn close(slot: &mut Slot) {
        if !slot.closing {
            slot.closing = true;
            for s in &slot.pair.socks {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn recv(slot: &mut Slot, index: usize, side: usize) -> squeue::Entry {
        slot.in_flight += 1;
        let buf = slot.pair.bufs[side].as_mut_ptr();
        opcode::Recv::new(types::Fd(slot.pair.fd(side)), buf, BUF as u32)
            .build()
            .user_data((index as u64) << 3 | (side as u64) << 2 | RECV)
    }

    fn send(slot: &mut Slot, index: usize, side: usize) -> squeue::Entry {
        slot.in_flight += 1;
        let (off, end) = slot.pending[side];
        // SAFETY: `off < end <= BUF`.
        let data = unsafe { slot.pair.bufs[side].as_ptr().add(off) };
        opcode::Send::new(types::Fd(slot.pair.fd(1 - side)), data, (end - off) as u32)
            .build()
            .user_data((index as u64) << 3 | (side as u64) << 2 | SEND)
    }
}
