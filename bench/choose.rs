//! Plugin call costs: `choose` through wasmtime against a native Rust implementation of the
//! same algorithm, load and instantiation times, and how long the sandbox takes to stop a
//! hostile plugin. Run with `cargo bench --bench choose`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lbwasm::plugin::{PluginSource, RequestInfo, Runtime, RuntimeConfig, StaticPool};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SIZES: [usize; 4] = [4, 16, 64, 1000];

fn runtime(cache: bool) -> Runtime {
    lbwasm::install_builtins();
    let cache_dir = if cache {
        RuntimeConfig::default().cache_dir
    } else {
        None
    };
    Runtime::new(RuntimeConfig {
        cache_dir,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn choose(c: &mut Criterion) {
    let rt = runtime(true);
    let mut g = c.benchmark_group("choose");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for name in [
        "round_robin",
        "least_connections",
        "weighted_least_connections",
        "p2c_ewma",
        "consistent_hash",
        "weighted_rr",
        "least_loaded",
        "maglev",
    ] {
        let plugin = rt
            .load(&PluginSource::Builtin(name.into()), &[])
            .expect("load");
        for n in SIZES {
            let pool = StaticPool::with_servers(n);
            for i in 0..n {
                pool.set_in_flight(i, (i * 7 % 13) as u32);
                pool.set_latency_us(i, 1000 + (i * 37 % 500) as u32);
            }
            let view = pool.view();
            let mut sel = plugin.selector().expect("instance");
            let mut req = RequestInfo {
                hash_key: Some("user-1234".into()),
                ..RequestInfo::default()
            };
            g.bench_with_input(BenchmarkId::new(format!("wasm/{name}"), n), &n, |b, _| {
                b.iter(|| black_box(sel.choose(&view, &mut req, &[])))
            });
        }
    }
    // Native references: the same algorithms with no sandbox, reading the same pool.
    for n in SIZES {
        let pool = StaticPool::with_servers(n);
        let view = pool.view();
        let seq = AtomicU64::new(0);
        g.bench_with_input(BenchmarkId::new("native/round_robin", n), &n, |b, _| {
            b.iter(|| black_box(seq.fetch_add(1, Ordering::Relaxed) % view.len() as u64))
        });
        let mut column = Vec::with_capacity(n);
        let mut rot = 0usize;
        g.bench_with_input(
            BenchmarkId::new("native/least_connections", n),
            &n,
            |b, _| {
                b.iter(|| {
                    column.clear();
                    view.in_flight_column(&mut column);
                    rot = rot.wrapping_add(1);
                    let len = column.len();
                    let best = (0..len).map(|k| (k + rot) % len).min_by_key(|&i| column[i]);
                    black_box(best)
                })
            },
        );
    }
    g.finish();
}

fn load(c: &mut Criterion) {
    let mut g = c.benchmark_group("load");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let uncached = runtime(false);
    g.bench_function("compile/least_loaded", |b| {
        b.iter(|| {
            uncached
                .load(&PluginSource::Builtin("least_loaded".into()), &[])
                .expect("load")
        })
    });
    let cached = runtime(true);
    let _ = cached.load(&PluginSource::Builtin("least_loaded".into()), &[]);
    g.bench_function("cached/least_loaded", |b| {
        b.iter(|| {
            cached
                .load(&PluginSource::Builtin("least_loaded".into()), &[])
                .expect("load")
        })
    });
    let plugin = cached
        .load(&PluginSource::Builtin("least_loaded".into()), &[])
        .expect("load");
    g.bench_function("instantiate/least_loaded", |b| {
        b.iter(|| plugin.selector().expect("instance"))
    });
    g.finish();
}

fn sandbox(c: &mut Criterion) {
    let rt = runtime(true);
    let wasm = PathBuf::from(lbwasm_fixtures::WASM_DIR).join("hostile.wasm");
    let pool = StaticPool::with_servers(3);
    let view = pool.view();
    let mut g = c.benchmark_group("sandbox");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for mode in ["loop", "alloc", "trap"] {
        let opts = vec![("mode".to_string(), mode.to_string())];
        let plugin = rt
            .load(&PluginSource::File(wasm.clone()), &opts)
            .expect("load hostile");
        // Time from the call to the fallback's answer, with a fresh instance each time.
        g.bench_function(BenchmarkId::new("time_to_fallback", mode), |b| {
            b.iter_batched(
                || plugin.selector().expect("instance"),
                |mut sel| black_box(sel.choose(&view, &mut RequestInfo::default(), &[])),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, choose, load, sandbox);
criterion_main!(benches);
