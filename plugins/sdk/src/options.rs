//! Plugin options (`key = value` strings from the config file) with typed getters and
//! errors that name the option. Every option a plugin does not read is refused by
//! [`Options::finish`], so a typo is an error at start-up, not a silent default.

use std::collections::BTreeMap;
use std::str::FromStr;

/// Options given to `configure`.
#[derive(Debug, Default)]
pub struct Options {
    values: BTreeMap<String, String>,
    known: Vec<&'static str>,
}

impl Options {
    /// Wraps the raw pairs; a key given twice keeps its last value.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Options {
            values: pairs.into_iter().collect(),
            known: Vec::new(),
        }
    }

    /// Options from `&str` pairs (tests).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The raw string, if given.
    pub fn string(&mut self, key: &'static str) -> Option<String> {
        self.known.push(key);
        self.values.get(key).cloned()
    }

    /// A value parsed with `FromStr`, or `default`; the error names the key and the value.
    pub fn parse<T: FromStr>(
        &mut self,
        key: &'static str,
        default: T,
        expected: &str,
    ) -> Result<T, String> {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("option `{key}`: expected {expected}, got `{v}`")),
        }
    }

    /// A number within `min..=max`.
    pub fn number<T>(&mut self, key: &'static str, default: T, min: T, max: T) -> Result<T, String>
    where
        T: FromStr + PartialOrd + Copy + std::fmt::Display,
    {
        let v = self.parse(key, default, &format!("a number from {min} to {max}"))?;
        // Written so that NaN (which compares false with everything) is refused too.
        let in_range = v >= min && v <= max;
        if !in_range {
            return Err(format!("option `{key}`: {v} is out of range {min}..={max}"));
        }
        Ok(v)
    }

    /// `true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0`).
    pub fn boolean(&mut self, key: &'static str, default: bool) -> Result<bool, String> {
        match self.string(key).as_deref().map(str::trim) {
            None => Ok(default),
            Some("true" | "yes" | "on" | "1") => Ok(true),
            Some("false" | "no" | "off" | "0") => Ok(false),
            Some(v) => Err(format!("option `{key}`: expected true or false, got `{v}`")),
        }
    }

    /// One of `choices`.
    pub fn choice(
        &mut self,
        key: &'static str,
        default: &'static str,
        choices: &[&'static str],
    ) -> Result<&'static str, String> {
        let Some(v) = self.string(key) else {
            return Ok(default);
        };
        let v = v.trim();
        choices
            .iter()
            .copied()
            .find(|c| c.eq_ignore_ascii_case(v))
            .ok_or_else(|| {
                format!(
                    "option `{key}`: expected one of {}, got `{v}`",
                    choices.join(", ")
                )
            })
    }

    /// Refuses options that were never read.
    pub fn finish(&self) -> Result<(), String> {
        let unknown: Vec<&str> = self
            .values
            .keys()
            .map(String::as_str)
            .filter(|k| !self.known.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let mut known = self.known.clone();
        known.sort_unstable();
        known.dedup();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        Err(format!(
            "unknown option `{}` (this plugin takes: {known})",
            unknown.join("`, `")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_option_is_named() {
        let mut o = Options::from_pairs(&[("vnodes", "10"), ("colour", "red")]);
        assert_eq!(o.number("vnodes", 1u32, 1, 100), Ok(10));
        let e = o.finish().unwrap_err();
        assert!(e.contains("`colour`") && e.contains("vnodes"), "{e}");
    }

    #[test]
    fn range_and_type_errors_name_the_key() {
        let mut o = Options::from_pairs(&[("a", "x"), ("b", "500")]);
        assert!(o.number("a", 1u32, 1, 9).unwrap_err().contains("`a`"));
        assert!(
            o.number("b", 1u32, 1, 9)
                .unwrap_err()
                .contains("out of range")
        );
        assert!(o.choice("c", "fnv1a", &["fnv1a", "xxh3"]).is_ok());
        let mut o = Options::from_pairs(&[("f", "NaN")]);
        assert!(
            o.number("f", 0.5f64, 0.0, 10.0)
                .unwrap_err()
                .contains("`f`")
        );
    }
}
