//! An in-process DNS server for discovery tests: `hickory-server` on UDP and TCP
//! 127.0.0.1 (one port, 0 asked), answering A, AAAA and SRV from a table the test changes
//! while it runs (TTL 1 s), and made to answer SERVFAIL or nothing at all on demand.
//! Names are absolute and lower case (`web.lbwasm.test.`). An absent name is NXDOMAIN; a
//! name with records of another type only answers NOERROR with none (NODATA).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

/// The TTL of every record served.
pub const TTL: u32 = 1;

/// How the server treats queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// From the table.
    Answer,
    /// SERVFAIL to everything.
    ServFail,
    /// No answer at all (UDP: nothing sent; the client times out).
    Silent,
}

#[derive(Default)]
struct Table {
    records: HashMap<String, Vec<RData>>,
    mode: Option<Mode>,
}

/// The running server and its table.
#[derive(Clone)]
pub struct DnsServer {
    /// UDP and TCP, 127.0.0.1.
    pub addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    queries: Arc<AtomicUsize>,
}

struct Handler {
    table: Arc<Mutex<Table>>,
    queries: Arc<AtomicUsize>,
}

impl DnsServer {
    /// Binds UDP 127.0.0.1:0 and TCP on the same port (another port when TCP's is taken),
    /// and serves on the caller's runtime until it ends.
    pub async fn start() -> DnsServer {
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp");
            let port = udp.local_addr().expect("addr").port();
            if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("addr");
        let table = Arc::new(Mutex::new(Table::default()));
        let queries = Arc::new(AtomicUsize::new(0));
        let mut server = Server::new(Handler {
            table: table.clone(),
            queries: queries.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        DnsServer {
            addr,
            table,
            queries,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `name`'s A and AAAA records become `ips` (none: the name is gone, NXDOMAIN).
    pub fn set_addresses(&self, name: &str, ips: &[IpAddr]) {
        let records = ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            })
            .collect();
        self.set(name, records);
    }

    /// `name`'s SRV records become `(priority, weight, port, target)` each.
    pub fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)]) {
        let records = records
            .iter()
            .map(|&(priority, weight, port, target)| {
                RData::SRV(SRV::new(priority, weight, port, name_of(target)))
            })
            .collect();
        self.set(name, records);
    }

    fn set(&self, name: &str, records: Vec<RData>) {
        let key = name_of(name).to_ascii().to_ascii_lowercase();
        let mut table = self.table();
        if records.is_empty() {
            table.records.remove(&key);
        } else {
            table.records.insert(key, records);
        }
    }

    /// How queries are treated from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.table().mode = Some(mode);
    }

    /// Queries received so far (answered or not).
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

fn name_of(name: &str) -> Name {
    Name::from_ascii(name).unwrap_or_else(|e| panic!("DNS name {name:?}: {e}"))
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let (mode, answers) = {
            let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let mode = table.mode.unwrap_or(Mode::Answer);
            let answers = request.request_info().ok().map(|info| {
                let name = info.query.name().to_string().to_ascii_lowercase();
                let kind = info.query.query_type();
                table.records.get(&name).map(|records| {
                    records
                        .iter()
                        .filter(|r| r.record_type() == kind)
                        .map(|r| {
                            Record::from_rdata(info.query.original().name().clone(), TTL, r.clone())
                        })
                        .collect::<Vec<_>>()
                })
            });
            (mode, answers)
        };
        let builder = MessageResponseBuilder::from_message_request(request);
        let sent = match (mode, answers) {
            (Mode::Silent, _) => {
                metadata.response_code = ResponseCode::ServFail;
                return ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
            }
            (Mode::ServFail, _) | (Mode::Answer, None) => {
                response
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::ServFail))
                    .await
            }
            (Mode::Answer, Some(None)) => {
                response
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::NXDomain))
                    .await
            }
            (Mode::Answer, Some(Some(records))) => {
                response
                    .send_response(builder.build(
                        metadata,
                        records.iter(),
                        std::iter::empty(),
                        std::iter::empty(),
                        std::iter::empty(),
                    ))
                    .await
            }
        };
        sent.unwrap_or_else(|_| {
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        })
    }
}
