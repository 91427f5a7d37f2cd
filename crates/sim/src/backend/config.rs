//! Configuration of demo backends: the `lbwasm backend` flags, the per-server
//! [`BackendConfig`] they turn into, faults and their validation.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, ensure};

/// Most servers one `lbwasm backend` may start.
const MAX_COUNT: u16 = 1024;
/// Largest `--memory-mb` accepted (per server).
const MAX_MEMORY_MB: u64 = 64 * 1024;

/// Flags of `lbwasm backend`.
#[derive(clap::Args, Clone, Debug)]
pub struct BackendArgs {
    /// First port to listen on (0 = an ephemeral port per server).
    #[arg(long, default_value_t = 9101)]
    pub port: u16,
    /// Number of servers, on consecutive ports from --port.
    #[arg(long, default_value_t = 1)]
    pub count: u16,
    /// Address to bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Server id (with --count > 1, a prefix: `<id>-1`, `<id>-2`, …); default `backend-<port>`.
    #[arg(long)]
    pub id: Option<String>,
    /// Fixed latency added to every workload request, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Uniform random extra latency in [0, N] milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Real CPU burnt per workload request on a blocking thread, microseconds of CPU time.
    #[arg(long, default_value_t = 0)]
    pub cpu_work_us: u64,
    /// At most N workload requests processed at once, the rest queue (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub capacity: usize,
    /// Fraction of workload requests answered 500, in 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fault window KIND:START_S:END_S (seconds after start), KIND one of slow|error|down;
    /// repeatable.
    #[arg(long = "fault", value_name = "KIND:START_S:END_S")]
    pub faults: Vec<FaultSpec>,
    /// Latency a `slow` fault adds, milliseconds.
    #[arg(long, default_value_t = 500)]
    pub fault_latency_ms: u64,
    /// Speak a line protocol over TCP instead of HTTP (`PING` → `PONG <id>`, else echo).
    #[arg(long)]
    pub tcp: bool,
    /// Seed for the random knobs (jitter, error rate); server i uses seed + i.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Memory each server allocates and keeps resident, MiB.
    #[arg(long, default_value_t = 0)]
    pub memory_mb: u64,
    /// Attach an ORCA load report to every response: header `endpoint-load-metrics` in
    /// this format (gRPC responses: trailer `endpoint-load-metrics-bin`). Default: none.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub orca: Option<OrcaFormat>,
}

/// A fault window as written on the command line; the `slow` latency comes from
/// `--fault-latency-ms` when the flags become a [`BackendConfig`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub start: Duration,
    pub end: Duration,
}

/// The kinds of fault `--fault` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Slow,
    Error,
    Down,
}

impl FromStr for FaultSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let (Some(kind), Some(start), Some(end), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("expected KIND:START_S:END_S, got `{s}`"));
        };
        let kind = match kind.trim().to_ascii_lowercase().as_str() {
            "slow" => FaultKind::Slow,
            "error" => FaultKind::Error,
            "down" => FaultKind::Down,
            other => return Err(format!("unknown fault kind `{other}` (slow|error|down)")),
        };
        let secs = |what: &str, v: &str| -> Result<Duration, String> {
            let f: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("{what} `{v}` is not a number"))?;
            Duration::try_from_secs_f64(f)
                .map_err(|_| format!("{what} `{v}` must be a finite number of seconds >= 0"))
        };
        let start = secs("START_S", start)?;
        let end = secs("END_S", end)?;
        if end <= start {
            return Err(format!("END_S must be after START_S in `{s}`"));
        }
        Ok(Self { kind, start, end })
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FaultKind::Slow => "slow",
            FaultKind::Error => "error",
            FaultKind::Down => "down",
        };
        write!(
            f,
            "{kind}:{}:{}",
            self.start.as_secs_f64(),
            self.end.as_secs_f64()
        )
    }
}

/// What a faulty server does instead of its normal job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every workload request and heartbeat takes this much longer.
    Slow(Duration),
    /// Every workload request and heartbeat is answered 500 at once.
    Error,
    /// The listener is closed (connections refused) and open connections are dropped.
    Down,
}

/// A fault active from `start` to `end` after the server started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultWindow {
    pub fault: Fault,
    pub start: Duration,
    pub end: Duration,
}

impl FaultWindow {
    pub(crate) fn contains(&self, t: Duration) -> bool {
        self.start <= t && t < self.end
    }
}

/// Wire protocol of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.
    #[default]
    Http,
    /// One request per line: `PING` → `PONG <id>`, anything else → `<id> <line>`.
    Tcp,
}

/// Everything one backend server needs; built by [`BackendArgs::to_config`] or by hand
/// (simulator, tests) from [`BackendConfig::new`].
#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub host: IpAddr,
    /// 0 = ephemeral.
    pub port: u16,
    /// `None` = `backend-<bound port>`.
    pub id: Option<String>,
    pub latency: Duration,
    /// Uniform random extra latency in [0, jitter].
    pub latency_jitter: Duration,
    /// CPU time burnt per workload request, on a blocking thread.
    pub cpu_work: Duration,
    /// Workload requests processed at once; 0 = unlimited.
    pub capacity: usize,
    /// Fraction of workload requests answered 500, 0..=1.
    pub error_rate: f64,
    pub faults: Vec<FaultWindow>,
    pub protocol: Protocol,
    /// `None` = seeded from the OS.
    pub seed: Option<u64>,
    /// Ballast allocated and kept resident, MiB.
    pub memory_mb: u64,
    /// ORCA in-band load reports on every HTTP response; `None` = none.
    pub orca: Option<OrcaFormat>,
}

impl BackendConfig {
    /// A plain, healthy HTTP server on 127.0.0.1:`port`.
    pub fn new(port: u16) -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            id: None,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            cpu_work: Duration::ZERO,
            capacity: 0,
            error_rate: 0.0,
            faults: Vec::new(),
            protocol: Protocol::Http,
            seed: None,
            memory_mb: 0,
            orca: None,
        }
    }

    /// Rejects values a server cannot honour; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.error_rate.is_finite() && (0.0..=1.0).contains(&self.error_rate),
            "--error-rate must be within 0..=1, got {}",
            self.error_rate
        );
        if let Some(id) = &self.id {
            validate_id(id)?;
        }
        for w in &self.faults {
            ensure!(
                w.end > w.start,
                "--fault window must end after it starts: {w:?}"
            );
        }
        ensure!(
            self.capacity <= tokio::sync::Semaphore::MAX_PERMITS,
            "--capacity must be at most {}, got {}",
            tokio::sync::Semaphore::MAX_PERMITS,
            self.capacity
        );
        ensure!(
            self.orca.is_none() || self.protocol == Protocol::Http,
            "--orca reports ride on HTTP responses: not with --tcp"
        );
        ensure!(
            self.memory_mb <= MAX_MEMORY_MB,
            "--memory-mb must be at most {MAX_MEMORY_MB}, got {}",
            self.memory_mb
        );
        Ok(())
    }
}

fn validate_id(id: &str) -> anyhow::Result<()> {
    ensure!(!id.is_empty(), "--id must not be empty");
    ensure!(
        id.chars().all(|c| c.is_ascii_graphic()),
        "--id must be printable ASCII without spaces, got {id:?}"
    );
    Ok(())
}

impl BackendArgs {
    /// The first server's configuration (ports and ids of the others: [`Self::to_configs`]).
    pub fn to_config(&self) -> anyhow::Result<BackendConfig> {
        self.to_configs()?
            .into_iter()
            .next()
            .context("--count must be at least 1")
    }

    /// One configuration per server: consecutive ports, ids `<id>-<n>`, seeds `seed + n`.
    pub fn to_configs(&self) -> anyhow::Result<Vec<BackendConfig>> {
        ensure!(
            (1..=MAX_COUNT).contains(&self.count),
            "--count must be within 1..={MAX_COUNT}, got {}",
            self.count
        );
        if self.port != 0 {
            ensure!(
                u32::from(self.port) + u32::from(self.count) - 1 <= u32::from(u16::MAX),
                "--port {} with --count {} runs past port 65535",
                self.port,
                self.count
            );
        }
        if let Some(id) = &self.id {
            validate_id(id)?;
        }
        let ms = |flag: &str, v: u64| -> anyhow::Result<Duration> {
            ensure!(
                v <= 24 * 3_600_000,
                "--{flag} must be at most a day, got {v}"
            );
            Ok(Duration::from_millis(v))
        };
        let fault_latency = ms("fault-latency-ms", self.fault_latency_ms)?;
        let base = BackendConfig {
            host: self.host,
            port: self.port,
            id: None,
            latency: ms("latency-ms", self.latency_ms)?,
            latency_jitter: ms("latency-jitter-ms", self.latency_jitter_ms)?,
            cpu_work: {
                ensure!(
                    self.cpu_work_us <= 60_000_000,
                    "--cpu-work-us must be at most 60000000 (a minute), got {}",
                    self.cpu_work_us
                );
                Duration::from_micros(self.cpu_work_us)
            },
            capacity: self.capacity,
            error_rate: self.error_rate,
            faults: self
                .faults
                .iter()
                .map(|f| FaultWindow {
                    fault: match f.kind {
                        FaultKind::Slow => Fault::Slow(fault_latency),
                        FaultKind::Error => Fault::Error,
                        FaultKind::Down => Fault::Down,
                    },
                    start: f.start,
                    end: f.end,
                })
                .collect(),
            protocol: if self.tcp {
                Protocol::Tcp
            } else {
                Protocol::Http
            },
            seed: self.seed,
            memory_mb: self.memory_mb,
            orca: self.orca,
        };
        base.validate()?;
        (0..self.count)
            .map(|i| {
                let mut cfg = base.clone();
                if self.port != 0 {
                    cfg.port = self.port + i;
                }
                cfg.id = match (&self.id, self.count) {
                    (Some(id), 1) => Some(id.clone()),
                    (Some(id), _) => Some(format!("{id}-{}", i + 1)),
                    (None, _) => None,
                };
                cfg.seed = self.seed.map(|s| s.wrapping_add(u64::from(i)));
                cfg.validate()
                    .with_context(|| format!("server {}", i + 1))?;
                Ok(cfg)
            })
            .collect()
    }
}

/// How a backend writes its ORCA report; the three encodings Envoy's ORCA parser accepts,
/// so that every consumer can be tried against the same backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OrcaFormat {
    /// `TEXT cpu_utilization=…, mem_utilization=…`
    Text,
    /// `JSON {"cpu_utilization":…,"mem_utilization":…}`
    Json,
    /// `BIN <base64 protobuf OrcaLoadReport>`
    Bin,
}
