//! [`StoreData`]: what a plugin's calls into the host can reach — the pool view and the
//! request of the current call — and the host side of the WIT imports (`load`, `request`,
//! `shared`).

use super::bindings::lbwasm::balancer::{load, request, shared, types};
use super::bindings::{WitProtocol, WitServerLoad};
use super::stats::SharedCounters;
use super::{PoolView, Protocol, RequestInfo, clock_ms};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use wasmtime::StoreLimits;

/// What the host functions can reach during a call.
pub struct StoreData {
    pub(super) limits: StoreLimits,
    pub(super) shared: Arc<SharedCounters>,
    /// The pool view whose server list the instance was last given; live figures come from it.
    pub(super) view: Option<Arc<dyn PoolView>>,
    /// The request of the current call, moved in for the call and back out after it.
    pub(super) request: RequestInfo,
}

impl types::Host for StoreData {}

impl load::Host for StoreData {
    fn in_flight(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(v) = &self.view {
            out.reserve_exact(v.len());
            v.in_flight_column(&mut out);
        }
        out
    }

    fn latency_us(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(v) = &self.view {
            out.reserve_exact(v.len());
            v.latency_column(&mut out);
        }
        out
    }

    fn figures(&mut self, index: u32) -> wasmtime::Result<WitServerLoad> {
        let view = self
            .view
            .as_ref()
            .ok_or_else(|| wasmtime::Error::msg("figures() before set-servers"))?;
        if index as usize >= view.len() {
            return Err(wasmtime::Error::msg(format!(
                "figures({index}): index out of range (pool has {})",
                view.len()
            )));
        }
        let l = view.load(index as usize);
        Ok(WitServerLoad {
            in_flight: l.in_flight,
            latency_us: l.latency_us,
            requests: l.requests,
            failures: l.failures,
        })
    }

    fn now_ms(&mut self) -> u64 {
        clock_ms()
    }
}

impl request::Host for StoreData {
    fn kind(&mut self) -> WitProtocol {
        match self.request.protocol {
            Protocol::Http => WitProtocol::Http,
            Protocol::Tcp => WitProtocol::Tcp,
        }
    }

    fn method(&mut self) -> String {
        match self.request.protocol {
            Protocol::Http => self.request.method.as_str().to_string(),
            Protocol::Tcp => String::new(),
        }
    }

    fn path(&mut self) -> String {
        match self.request.protocol {
            Protocol::Http => self
                .request
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string(),
            Protocol::Tcp => String::new(),
        }
    }

    fn header(&mut self, name: String) -> Option<String> {
        let v = self.request.headers.get(&name)?;
        Some(String::from_utf8_lossy(v).into_owned())
    }

    fn client_ip(&mut self) -> String {
        self.request.client_ip.to_string()
    }

    fn hash_key(&mut self) -> Option<String> {
        self.request.hash_key.clone()
    }

    fn attempt(&mut self) -> u32 {
        self.request.attempt
    }
}

impl shared::Host for StoreData {
    fn next(&mut self, counter: u8) -> u64 {
        self.shared.slot(counter).fetch_add(1, Ordering::Relaxed) as u64
    }

    fn add(&mut self, counter: u8, delta: i64) -> i64 {
        self.shared
            .slot(counter)
            .fetch_add(delta, Ordering::Relaxed)
            .wrapping_add(delta)
    }

    fn get(&mut self, counter: u8) -> i64 {
        self.shared.slot(counter).load(Ordering::Relaxed)
    }
}
