//! The `--tcp` face of a backend: a line protocol for balancing plain TCP.
//!
//! Each line is one request, answered in order on the same connection:
//! `PING` → `PONG <id>` (like `/heartbeat`: sees faults, no other knob; `ERROR <id>`
//! during an `error` fault); anything else → `<id> <line>` after the knobs (latency, CPU
//! work, capacity), or `ERROR <id>` when the error rate or an `error` fault strikes.
//! Lines longer than 64 KiB are refused with `ERROR <id> line too long` and the
//! connection is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::config::Fault;
use super::state::{Gauge, Outcome, Shared};

const MAX_LINE: usize = 64 * 1024;

pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if let Err(error) = lines(&shared, stream).await {
        tracing::debug!(server = %shared.id, %peer, %error, "tcp connection ended with an error");
    }
}

async fn lines(shared: &Arc<Shared>, stream: TcpStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut read)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > MAX_LINE {
            let reply = format!("ERROR {} line too long\n", shared.id);
            write.write_all(reply.as_bytes()).await?;
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        let reply = if line.trim() == "PING" {
            match shared.fault() {
                Some(Fault::Down) => return Ok(()),
                Some(Fault::Error) => format!("ERROR {}\n", shared.id),
                Some(Fault::Slow(d)) => {
                    tokio::time::sleep(d).await;
                    format!("PONG {}\n", shared.id)
                }
                None => format!("PONG {}\n", shared.id),
            }
        } else {
            let _active = shared.enter(Gauge::Active);
            match shared.process().await {
                Outcome::Ok => format!("{} {line}\n", shared.id),
                Outcome::Error => format!("ERROR {}\n", shared.id),
                Outcome::Down => return Ok(()),
            }
        };
        write.write_all(reply.as_bytes()).await?;
    }
}
