//! The real `lbwasm` binary as a child process: started, its addresses read off its
//! standard output, signalled and reaped by its PID. The child never outlives the test:
//! [`Reaped`] kills it when dropped, also when the test panics.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A child process killed (by PID) when dropped.
pub struct Reaped(pub Child);

impl Reaped {
    /// The child's PID, to look at it in `/proc` or find what it named after itself.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `lbwasm` binary that cargo built for these tests.
pub fn lbwasm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lbwasm"))
}

/// A started `lbwasm serve`: the child, and the addresses it printed.
pub struct Serving {
    pub child: Reaped,
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Starts `cmd` (`lbwasm serve ...`; its standard error is the caller's choice) and reads
/// the addresses of its `listeners` listeners (and of its admin endpoint when `admin`) off
/// its standard output, which is drained afterwards so that the child never writes to a
/// closed pipe.
pub async fn serving(mut cmd: Command, listeners: usize, admin: bool) -> Serving {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start lbwasm");
    let stdout = child.stdout.take().expect("stdout");
    let child = Reaped(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut listen = Vec::new();
        let mut admin_addr = None;
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("lbwasm listening on ") {
                listen.extend(a.parse::<SocketAddr>().ok());
            } else if let Some(a) = line.strip_prefix("lbwasm admin on ") {
                admin_addr = a.parse::<SocketAddr>().ok();
            }
            if !sent && listen.len() == listeners && (!admin || admin_addr.is_some()) {
                let _ = tx.send((listen.clone(), admin_addr));
                sent = true;
            }
        }
        if !sent {
            let _ = tx.send((listen, admin_addr));
        }
    });
    let (listen, admin_addr) = tokio::task::spawn_blocking(move || rx.recv().expect("stdout"))
        .await
        .expect("join");
    assert_eq!(listen.len(), listeners, "lbwasm exited before listening");
    assert!(
        !admin || admin_addr.is_some(),
        "lbwasm printed no admin address"
    );
    Serving {
        child,
        listen,
        admin: admin_addr,
    }
}

/// Sends `signal` to the child, by its PID.
pub fn signal(child: &Reaped, signal: i32) {
    let pid = i32::try_from(child.pid()).expect("pid");
    // SAFETY: signalling our own child by its PID.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Sends `sig`, then waits for the exit status.
pub async fn stop(child: Reaped, sig: i32) -> ExitStatus {
    signal(&child, sig);
    let mut child = child;
    tokio::task::spawn_blocking(move || (child.0.wait(), child))
        .await
        .expect("join")
        .0
        .expect("wait")
}
