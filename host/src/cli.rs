//! Command-line interface: the clap definitions and the dispatch to each command's module.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lbwasm_plugin_host::{self as plugin, PluginSource, Runtime, RuntimeConfig};
use std::process::ExitCode;

/// lbwasm: a load balancer whose balancing algorithms are sandboxed WebAssembly components.
#[derive(Parser, Debug)]
#[command(name = "lbwasm", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level or filter (`info`, `debug`, `lbwasm=trace`); defaults to RUST_LOG, then `info`.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
// Parsed once at start: the size of the largest variant (serve's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy: listeners, backends and the plugin that balances them.
    Serve(lbwasm_proxy::config::ServeArgs),
    /// Run demo backend servers that report their real CPU, memory and connection load.
    Backend(lbwasm_sim::backend::BackendArgs),
    /// List the built-in plugins, inspect a component file, or export a built-in to a file.
    Plugins(PluginsArgs),
    /// Run backends, the proxy and simulated clients in one process, compare the plugins
    /// in a suite of experiments, and write a report (HTML, charts, JSON, CSV).
    Simulate(lbwasm_sim::simulate::SimulateArgs),
    /// Cluster mode from outside a replica: write a file's pools into etcd, or show the
    /// replicas and whether they run the latest configuration.
    Cluster(ClusterArgs),
}

/// `lbwasm cluster seed|status`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ClusterAction,
}

/// The cluster commands. Both take `serve`'s flags (`--config`, `--etcd`, `--cluster`),
/// so they read the same `[cluster]` table a replica does.
#[derive(Subcommand, Debug)]
pub enum ClusterAction {
    /// Write the file's listeners (backends, plugin, options) into the cluster store, each
    /// only if the store has none for it yet (as the first replica does on its own).
    Seed(lbwasm_proxy::config::ServeArgs),
    /// Show the cluster's configuration, its live replicas, the configuration revision
    /// each has applied and what differs; exit 2 when a replica is behind or differs.
    Status(lbwasm_proxy::config::ServeArgs),
}

/// `lbwasm plugins [inspect FILE | export NAME [-o FILE]]`.
#[derive(clap::Args, Debug)]
pub struct PluginsArgs {
    /// Inspect instead of list.
    #[command(subcommand)]
    pub action: Option<PluginsAction>,
}

/// What `plugins` can do besides listing.
#[derive(Subcommand, Debug)]
pub enum PluginsAction {
    /// Show a component's exports and imports and whether it fits the balancer world.
    Inspect {
        /// A `.wasm` component, or a built-in name.
        file: String,
    },
    /// Write a built-in plugin's component to a file (a starting point, or to run it as
    /// `--plugin NAME.wasm`).
    Export {
        /// The built-in's name (see `lbwasm plugins`).
        name: String,
        /// Where to write it; default `NAME.wasm` in the current folder, `-` for standard
        /// output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
}

/// Sets up `tracing`: `--log-level` wins over `RUST_LOG`, the default is `info`. Colours
/// only on a terminal (and not with `NO_COLOR`): logs sent to a file or a collector stay
/// plain text. A `--log-level` that is not a valid filter is an error, not a silent `info`.
pub fn init_tracing(level: Option<&str>) -> Result<()> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l)
            .map_err(|e| anyhow::anyhow!("--log-level: {l:?} is not a log filter: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    Ok(())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(lbwasm_proxy::serve::run(
                args,
                std::sync::Arc::new(lbwasm_admin::Admin),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backend(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(lbwasm_sim::backend::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => {
            lbwasm_sim::simulate::run_blocking(args, cli.log_level.is_some())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterArgs { action }) => cluster(action),
        Command::Plugins(PluginsArgs { action: None }) => list_plugins(),
        Command::Plugins(PluginsArgs {
            action: Some(PluginsAction::Inspect { file }),
        }) => inspect_plugin(&file),
        Command::Plugins(PluginsArgs {
            action: Some(PluginsAction::Export { name, output }),
        }) => export_plugin(&name, output),
    }
}

/// `lbwasm cluster seed|status`.
fn cluster(action: ClusterAction) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let ClusterAction::Seed(args) | ClusterAction::Status(args) = &action
        && args.check
    {
        anyhow::bail!("--check is `lbwasm serve --check`; `lbwasm cluster` has no check mode");
    }
    match action {
        ClusterAction::Seed(args) => {
            let config = args.load()?;
            print!(
                "{}",
                rt.block_on(lbwasm_proxy::cluster::command::seed(&config))?
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterAction::Status(args) => {
            let config = args.load_cluster()?;
            let (text, all_same) = rt.block_on(lbwasm_proxy::cluster::command::status(&config))?;
            print!("{text}");
            Ok(if all_same {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

fn export_plugin(name: &str, output: Option<std::path::PathBuf>) -> Result<ExitCode> {
    use std::io::Write as _;
    let bytes = plugin::builtin::get(name).with_context(|| {
        format!(
            "no built-in plugin named `{name}` (built-ins: {})",
            plugin::builtin::names().collect::<Vec<_>>().join(", ")
        )
    })?;
    let path = output.unwrap_or_else(|| format!("{name}.wasm").into());
    if path.as_os_str() == "-" {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).context("writing to standard output")?;
        out.flush().context("writing to standard output")?;
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} ({} KB): run it with `lbwasm serve --plugin {}`",
        path.display(),
        bytes.len() / 1024,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn list_plugins() -> Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    println!("{:<28} {:>8}  description", "built-in plugin", "size");
    for name in plugin::builtin::names() {
        let p = runtime.load(&PluginSource::Builtin(name.to_string()), &[])?;
        println!("{:<28} {:>6}KB  {}", name, p.size() / 1024, p.description());
    }
    println!(
        "\nUse one with `lbwasm serve --plugin NAME`, or give a path to your own .wasm component;\n\
         `lbwasm plugins export NAME` writes a built-in to NAME.wasm. Plugins marked [reads-load]\n\
         get their backends' /load figures."
    );
    Ok(ExitCode::SUCCESS)
}

fn inspect_plugin(file: &str) -> Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        ..RuntimeConfig::default()
    })?;
    let (name, bytes) = match PluginSource::parse(file) {
        PluginSource::Builtin(n) => match plugin::builtin::get(&n) {
            Some(b) => (n, b.to_vec()),
            None => anyhow::bail!(
                "no built-in plugin named `{n}`, and `{file}` is not a path to a .wasm file"
            ),
        },
        PluginSource::File(p) => {
            if let Some(hint) = lbwasm_proxy::serve::missing_builtin_hint(&p) {
                anyhow::bail!(hint);
            }
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            (p.display().to_string(), bytes)
        }
    };
    let (fits, report) = plugin::inspect::report(&runtime, &name, &bytes)?;
    print!("{report}");
    Ok(if fits {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
