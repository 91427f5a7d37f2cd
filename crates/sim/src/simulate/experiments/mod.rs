//! The experiments of the suite, one module each; every one starts its own backends and
//! proxy, drives traffic, and returns an [`ExperimentReport`] (runs, figures, tables,
//! charts). Shared here: dispatch and number formatting.

mod baseline;
mod distribution;
mod failure;
mod hashing;
mod heterogeneous;
mod inband;
mod scaling;

use std::net::SocketAddr;
use std::time::Duration;

use super::clients::{Pacing, Route, Stop, Workload};
use super::report::ExperimentReport;
use super::{Ctx, Experiment};

/// Runs one experiment.
pub async fn run(e: Experiment, ctx: &Ctx) -> anyhow::Result<ExperimentReport> {
    match e {
        Experiment::Distribution => distribution::run(ctx).await,
        Experiment::Scaling => scaling::run(ctx).await,
        Experiment::Failure => failure::run(ctx).await,
        Experiment::Hashing => hashing::run(ctx).await,
        Experiment::Baseline => baseline::run(ctx).await,
        Experiment::Heterogeneous => heterogeneous::run(ctx).await,
        Experiment::Inband => inband::run(ctx).await,
    }
}

/// A workload through one address with the usual mix (30% POST, user keys).
fn workload(
    addr: SocketAddr,
    pacing: Pacing,
    stop: Stop,
    timeout: Duration,
    seed: u64,
) -> Workload {
    Workload {
        route: Route::Direct(vec![addr]),
        pacing,
        stop,
        timeout,
        post_share: 0.3,
        user_keys: Some(1_000_000),
        seed,
    }
}

/// One decimal.
fn f1(v: f64) -> String {
    format!("{v:.1}")
}

/// Two decimals.
fn f2(v: f64) -> String {
    format!("{v:.2}")
}

/// A share as a percentage with one decimal.
fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}
