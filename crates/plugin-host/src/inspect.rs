//! `lbwasm plugins inspect`: what a component exports and imports, and whether it fits the
//! `balancer` world — or exactly why not.

use super::runtime::Runtime;
use super::types_text::type_text;
use std::fmt::Write as _;
use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

/// The world's exports and their signatures, as `inspect` prints them.
const REQUIRED: &[(&str, &str)] = &[
    ("describe", "func() -> string"),
    (
        "configure",
        "func(options: list<tuple<string, string>>) -> result<_, string>",
    ),
    ("set-servers", "func(servers: list<record>) -> ()"),
    ("choose", "func(sequence: u64) -> option<u32>"),
    (
        "choose-loaded",
        "func(sequence: u64, in-flight: tuple<u64, u64, u64, u64, u64, u64, u64, u64>) -> option<u32>",
    ),
];

/// Interfaces lbwasm provides (package prefix and version); every other import is linked
/// to a trap (no capability).
const PROVIDED: &str = "lbwasm:balancer/";
const VERSION: &str = "@0.2.0";

/// Names of the world's exports that `component` lacks or exports as something else.
pub fn missing_exports(engine: &Engine, component: &Component) -> Vec<String> {
    let ty = component.component_type();
    REQUIRED
        .iter()
        .filter_map(|(name, sig)| {
            let found = ty
                .exports(engine)
                .find(|(n, _)| n == name)
                .map(|(_, item)| item_text(engine, &item.ty));
            match found {
                None => Some(format!("`{name}` ({sig}) is missing")),
                Some(f) if f != *sig => Some(format!("`{name}` should be {sig}, found {f}")),
                Some(_) => None,
            }
        })
        .collect()
}

/// A human-readable report on the component in `bytes`; `Err` when it cannot be compiled.
pub fn report(runtime: &Runtime, name: &str, bytes: &[u8]) -> anyhow::Result<(bool, String)> {
    let mut out = String::new();
    writeln!(out, "{name}: {} bytes", bytes.len())?;
    if !bytes.starts_with(b"\0asm") {
        writeln!(out, "  not a WebAssembly file (no \\0asm header)")?;
        return Ok((false, out));
    }
    let engine = runtime.engine();
    let component = match Component::new(engine, bytes) {
        Ok(c) => c,
        Err(e) => {
            let first = format!("{e:#}");
            writeln!(out, "  not a valid WebAssembly component: {first}")?;
            return Ok((false, out));
        }
    };
    let ty = component.component_type();
    writeln!(out, "  exports:")?;
    for (n, item) in ty.exports(engine) {
        writeln!(out, "    {n}: {}", item_text(engine, &item.ty))?;
    }
    writeln!(out, "  imports:")?;
    for (n, _) in ty.imports(engine) {
        let note = if n.starts_with(PROVIDED) && n.ends_with(VERSION) {
            "provided"
        } else if n.starts_with(PROVIDED) {
            "another version of lbwasm's interfaces: not provided (rebuild the plugin against wit/balancer.wit)"
        } else {
            "not provided: traps if called (no WASI capability is granted)"
        };
        writeln!(out, "    {n}: {note}")?;
    }
    let missing = missing_exports(engine, &component);
    let fits = match runtime.pre(&component) {
        Ok(_) if missing.is_empty() => {
            writeln!(out, "  fits the world lbwasm:balancer/balancer@0.2.0")?;
            // Fitting the types is not enough: start one instance as the proxy would.
            match runtime.load_bytes(name, bytes, &[]) {
                Ok(p) => {
                    writeln!(out, "  starts: describe() = {:?}", p.description())?;
                    true
                }
                Err(e) => {
                    writeln!(out, "  but does NOT start with default options: {e:#}")?;
                    false
                }
            }
        }
        Ok(_) => {
            writeln!(
                out,
                "  does NOT fit lbwasm:balancer/balancer@0.2.0: {}",
                missing.join("; ")
            )?;
            false
        }
        Err(e) => {
            writeln!(out, "  does NOT fit: {e:#}")?;
            false
        }
    };
    Ok((fits, out))
}

fn item_text(engine: &Engine, item: &ComponentItem) -> String {
    match item {
        ComponentItem::ComponentFunc(f) => {
            let params: Vec<String> = f
                .params()
                .map(|(n, t)| format!("{n}: {}", type_text(&t)))
                .collect();
            let results: Vec<String> = f.results().map(|t| type_text(&t)).collect();
            let results = match results.len() {
                0 => "()".to_string(),
                1 => results[0].clone(),
                _ => format!("({})", results.join(", ")),
            };
            format!("func({}) -> {results}", params.join(", "))
        }
        ComponentItem::ComponentInstance(i) => {
            let names: Vec<String> = i.exports(engine).map(|(n, _)| n.to_string()).collect();
            format!("instance {{ {} }}", names.join(", "))
        }
        ComponentItem::CoreFunc(_) => "core func".into(),
        ComponentItem::Module(_) => "core module".into(),
        ComponentItem::Component(_) => "component".into(),
        ComponentItem::Type(t) => format!("type {}", type_text(t)),
        ComponentItem::Resource(_) => "resource".into(),
    }
}
