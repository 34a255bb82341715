//! Redirects to other hosts, routed back through regscope.
//!
//! A registry on object storage answers a blob `GET` with `307` and a presigned storage URL (a
//! CDN's, an S3 bucket's); the client would fetch the bytes from there, past regscope. In capture
//! mode the `Location` becomes a regscope URL under [`PREFIX`] carrying a handle: 128 random bits
//! that stand for the original URL, the repository and the digest. A request for the handle is
//! forwarded to the original URL byte for byte (its signature covers it) and timed as storage's.
//!
//! Not an open proxy: a handle only comes from an upstream response, it expires no later than the
//! URL's own `X-Amz-Expires` or [`Redirects::TTL`], and the table is bounded (the oldest go first).
//! An unknown, forged or expired handle reaches no host.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

/// The path redirected blobs are fetched under; no registry route starts with `/_`.
pub(crate) const PREFIX: &str = "/_regscope/storage/";
/// The path token requests to a registry's auth realm are sent to.
pub(crate) const AUTH_PREFIX: &str = "/_regscope/auth/";

/// What a handle stands for: a handle of one kind is unknown under the other's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A presigned storage or CDN URL for one blob.
    Storage,
    /// A token service's realm URL.
    Auth,
}

/// Where a handle leads.
#[derive(Debug, Clone)]
pub(crate) struct Redirect {
    /// The `Location` the upstream sent, exactly.
    pub url: http::Uri,
    /// The repository and digest of the request that was redirected, for the transfer it joins.
    pub repository: Option<Box<str>>,
    pub digest: Option<Box<str>>,
    kind: Kind,
    expires: Instant,
}

/// The live handles.
pub(crate) struct Redirects {
    table: Mutex<Table>,
    random: SystemRandom,
}

#[derive(Default)]
struct Table {
    /// Handles in the order they were made, each with where it leads.
    entries: VecDeque<([u8; 16], Redirect)>,
}

impl Redirects {
    /// Handles kept at most: each holds a URL of up to a few KiB.
    pub(crate) const CAPACITY: usize = 4096;
    /// The longest a handle lives, whatever the URL says.
    pub(crate) const TTL: Duration = Duration::from_secs(15 * 60);

    pub(crate) fn new() -> Self {
        Redirects { table: Mutex::new(Table::default()), random: SystemRandom::new() }
    }

    /// A handle for `url` (an absolute URL from an upstream `Location`), or `None` when no
    /// randomness could be had (the redirect is then passed as it is).
    pub(crate) fn capture(
        &self,
        url: http::Uri,
        repository: Option<&str>,
        digest: Option<&str>,
        now: Instant,
    ) -> Option<String> {
        let expires = now + url_lifetime(&url).map_or(Self::TTL, |life| life.min(Self::TTL));
        let repository = repository.map(Box::from);
        self.insert(Redirect { url, repository, digest: digest.map(Box::from), kind: Kind::Storage, expires })
    }

    /// A handle for a token service's `realm`: the live one made for the same realm if there is
    /// one (a client meets the same challenge again and again), a new one otherwise.
    pub(crate) fn capture_realm(&self, realm: http::Uri, now: Instant) -> Option<String> {
        {
            let table = self.lock();
            let live = table
                .entries
                .iter()
                .rev()
                .find(|(_, r)| r.kind == Kind::Auth && r.url == realm && r.expires > now + Self::TTL / 2);
            if let Some((key, _)) = live {
                return Some(hex(key));
            }
        }
        let expires = now + Self::TTL;
        self.insert(Redirect { url: realm, repository: None, digest: None, kind: Kind::Auth, expires })
    }

    fn insert(&self, redirect: Redirect) -> Option<String> {
        let mut key = [0u8; 16];
        self.random.fill(&mut key).ok()?;
        let mut table = self.lock();
        while table.entries.len() >= Self::CAPACITY {
            table.entries.pop_front();
        }
        table.entries.push_back((key, redirect));
        Some(hex(&key))
    }

    /// Where `handle` of `kind` leads, if it is live.
    pub(crate) fn resolve(&self, handle: &str, kind: Kind, now: Instant) -> Option<Redirect> {
        let key = parse_hex(handle)?;
        let mut table = self.lock();
        table.entries.retain(|(_, r)| r.expires > now);
        table.entries.iter().find(|(k, r)| *k == key && r.kind == kind).map(|(_, r)| r.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

/// How long a presigned URL says it is valid (`X-Amz-Expires`, seconds), counted from now: it
/// was signed moments ago.
fn url_lifetime(url: &http::Uri) -> Option<Duration> {
    let query = url.query()?;
    let value = query.split('&').find_map(|pair| pair.strip_prefix("X-Amz-Expires="))?;
    value.parse::<u64>().ok().map(Duration::from_secs)
}

fn hex(bytes: &[u8; 16]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char]).collect()
}

fn parse_hex(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> http::Uri {
        text.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_handle_leads_to_its_url_until_it_expires() {
        let redirects = Redirects::new();
        let now = Instant::now();
        let presigned = url("http://127.0.0.1:9/b/blob?X-Amz-Expires=60&X-Amz-Signature=ab");
        let handle = redirects.capture(presigned.clone(), Some("team/app"), Some("sha256:aa"), now).unwrap();
        assert_eq!(handle.len(), 32);
        let found = redirects.resolve(&handle, Kind::Storage, now + Duration::from_secs(59)).unwrap();
        assert_eq!(found.url, presigned);
        assert_eq!((found.repository.as_deref(), found.digest.as_deref()), (Some("team/app"), Some("sha256:aa")));
        assert!(
            redirects.resolve(&handle, Kind::Storage, now + Duration::from_secs(61)).is_none(),
            "expired with the URL"
        );
        assert!(redirects.resolve(&handle, Kind::Storage, now).is_none(), "and gone for good");
        let plain = redirects.capture(url("http://127.0.0.1:9/cdn/blob"), None, None, now).unwrap();
        assert!(redirects.resolve(&plain, Kind::Storage, now + Redirects::TTL - Duration::from_secs(1)).is_some());
        assert!(
            redirects.resolve(&plain, Kind::Storage, now + Redirects::TTL).is_none(),
            "bounded without a date in the URL"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_and_forged_handles_lead_nowhere() {
        let redirects = Redirects::new();
        let now = Instant::now();
        let handle = redirects.capture(url("http://127.0.0.1:9/x"), None, None, now).unwrap();
        let mut forged = handle.clone().into_bytes();
        forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
        for bad in [
            String::from_utf8(forged).unwrap(),
            "0".repeat(32),
            "zz".repeat(16),
            handle[..31].to_owned(),
            String::new(),
        ] {
            assert!(redirects.resolve(&bad, Kind::Storage, now).is_none(), "{bad:?}");
        }
        assert!(redirects.resolve(&handle, Kind::Storage, now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded_and_the_newest_handles_live() {
        let redirects = Redirects::new();
        let now = Instant::now();
        let handles: Vec<String> =
            (0..10_000).map(|i| redirects.capture(url(&format!("http://s/{i}")), None, None, now).unwrap()).collect();
        assert_eq!(redirects.len(), Redirects::CAPACITY);
        assert!(redirects.resolve(&handles[0], Kind::Storage, now).is_none(), "the oldest made room");
        assert!(redirects.resolve(handles.last().unwrap(), Kind::Storage, now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_realm_keeps_its_handle_and_the_kinds_do_not_mix() {
        let redirects = Redirects::new();
        let now = Instant::now();
        let realm = url("http://127.0.0.1:9/token");
        let first = redirects.capture_realm(realm.clone(), now).unwrap();
        assert_eq!(redirects.capture_realm(realm.clone(), now + Duration::from_secs(60)).unwrap(), first);
        assert!(redirects.resolve(&first, Kind::Storage, now).is_none(), "an auth handle is no storage handle");
        assert_eq!(redirects.resolve(&first, Kind::Auth, now).unwrap().url, realm);
        let later = redirects.capture_realm(realm, now + Redirects::TTL).unwrap();
        assert_ne!(later, first, "a new handle well before the old one expires");
    }
}
