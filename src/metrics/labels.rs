//! The label values that do not come from a `protocol` enum: the method, the status code, and
//! the opt-in, capped repository name.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use http::Method;

/// The method label's values: a closed set, anything else is `other` ([`method_index`]).
pub(crate) const METHODS: [&str; 8] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"];

pub(crate) fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::PUT => 2,
        Method::POST => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The `code` label: the status as text, from a table built once (no formatting per request).
/// No status (the client left before one was sent) is `0`.
pub(crate) fn status_label(status: Option<u16>) -> &'static str {
    static CODES: OnceLock<Vec<String>> = OnceLock::new();
    let codes = CODES.get_or_init(|| (100..600).map(|c: u16| c.to_string()).collect());
    match status {
        Some(s @ 100..=599) => &codes[usize::from(s - 100)],
        _ => "0",
    }
}

/// The opt-in repository label, capped: the first `cap` distinct repositories get their own
/// value, every later one is `other`, so a client cannot grow the series count without bound.
pub(crate) struct RepositoryLabels {
    cap: usize,
    seen: Mutex<HashSet<Box<str>>>,
}

impl RepositoryLabels {
    pub(crate) fn new(cap: usize) -> Self {
        RepositoryLabels { cap, seen: Mutex::new(HashSet::new()) }
    }

    /// The label value to use for `repository`. Called once per request, only when enabled.
    pub(crate) fn label(&self, repository: Option<&str>) -> String {
        let Some(repository) = repository else {
            return "none".to_owned();
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(repository) {
            return repository.to_owned();
        }
        if seen.len() < self.cap {
            seen.insert(repository.into());
            return repository.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_label_is_capped() {
        let labels = RepositoryLabels::new(2);
        assert_eq!(labels.label(Some("a")), "a");
        assert_eq!(labels.label(Some("b")), "b");
        assert_eq!(labels.label(Some("c")), "other");
        assert_eq!(labels.label(Some("a")), "a");
        assert_eq!(labels.label(None), "none");
    }

    #[test]
    fn method_label_is_closed() {
        assert_eq!(METHODS[method_index(&Method::PATCH)], "PATCH");
        assert_eq!(METHODS[method_index(&Method::from_bytes(b"BREW").unwrap())], "other");
    }
}
