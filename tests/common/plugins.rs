//! Plugin options as the runtime takes them, from the pairs a test writes. (The built
//! components themselves come from `lbwasm_fixtures::wasm`.)

/// Plugin options from `(key, value)` pairs.
pub fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
