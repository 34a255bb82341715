//! A real browser on the admin UI: Debian's `chromium`, headless, one fresh process (and profile)
//! per page load. `--dump-dom` prints the DOM as the browser built it after the load event, and
//! `--screenshot` saves what it painted; that is all the UI tests need, with no WebDriver.
//!
//! Also here: a small reader for that serialized DOM ([`elements`]), enough to pick out tags by
//! name and class and read their attributes and text, and [`artifact_path`], where a test leaves a
//! screenshot for people to look at.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{check_bytes, TempDir};

/// How long one page load may take: seconds on a busy two-core machine; a minute means it hangs.
const TIMEOUT: Duration = Duration::from_secs(90);

/// The flags every run gets: no sandbox (tests run as root), nothing that phones home or updates
/// itself, no first-run UI.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
];

/// Debian's `chromium`, driven one page load at a time.
pub struct Browser {
    /// The executable, found on `PATH`.
    binary: PathBuf,
}

/// The headless browser. Panics when `chromium` is not installed: a UI test that skipped itself
/// would report a pass that proves nothing (`script/test` installs it).
pub fn chromium() -> Browser {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("chromium"))
        .find(|path| path.is_file());
    match found {
        Some(binary) => Browser { binary },
        None => panic!("chromium is not installed: run script/test, or `apt-get install chromium`"),
    }
}

impl Browser {
    /// Loads `url` and returns the DOM as serialized after the load event (scripts run, SVG parsed).
    pub fn dump_dom(&self, url: &str) -> String {
        let out = self.run(&["--dump-dom", url]);
        let dom = String::from_utf8(out).expect("chromium printed non-UTF-8");
        assert!(dom.contains("<html"), "chromium --dump-dom {url} printed no document:\n{dom}");
        dom
    }

    /// Loads `url` in a `width`×`height` window and saves what it painted as a PNG at `file`.
    pub fn screenshot(&self, url: &str, file: &Path, width: u32, height: u32) {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        let _ = std::fs::remove_file(file);
        self.run(&[&format!("--screenshot={}", file.display()), &format!("--window-size={width},{height}"), url]);
        let (w, h) = png_size(file);
        assert_eq!((w, h), (width, height), "screenshot {} of {url} has the wrong size", file.display());
    }

    /// Runs chromium with `args` after the common flags and a fresh profile; returns its stdout.
    fn run(&self, args: &[&str]) -> Vec<u8> {
        let profile = TempDir::new("chromium");
        let mut cmd = Command::new(&self.binary);
        cmd.args(FLAGS).arg(format!("--user-data-dir={}", profile.path().display())).args(args);
        check_bytes(&mut cmd, TIMEOUT)
    }
}

/// Width and height of a PNG file, from its IHDR chunk; panics if it is not a PNG.
pub fn png_size(file: &Path) -> (u32, u32) {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "{} is not a PNG",
        file.display()
    );
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Where a test leaves a file for people to look at: `target/test-artifacts/NAME` (under
/// `CARGO_TARGET_DIR` when that is set).
pub fn artifact_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-artifacts").join(name)
}

// === reading a serialized DOM ===

/// One element of an HTML (or SVG) text: its tag name, attributes and the markup between its start
/// and end tags.
#[derive(Clone, Debug)]
pub struct Element {
    pub tag: String,
    /// Names lower-cased, values with entities decoded, in document order.
    pub attrs: Vec<(String, String)>,
    /// The raw markup inside the element (empty for `<x/>` and void elements).
    pub inner: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The attribute, or a panic naming the element.
    pub fn req(&self, name: &str) -> &str {
        self.attr(name).unwrap_or_else(|| panic!("<{}> without {name}: {:?}", self.tag, self.attrs))
    }

    /// The attribute as a number, or a panic naming the element.
    pub fn num(&self, name: &str) -> f64 {
        let text = self.req(name);
        text.parse().unwrap_or_else(|_| panic!("<{}> {name}={text:?} is not a number", self.tag))
    }

    pub fn has_class(&self, class: &str) -> bool {
        self.attr("class").is_some_and(|c| c.split_ascii_whitespace().any(|c| c == class))
    }

    /// The elements inside this one named `tag` (see [`elements`]).
    pub fn children(&self, tag: &str) -> Vec<Element> {
        elements(&self.inner, tag)
    }

    /// The text inside, tags dropped, entities decoded, whitespace runs collapsed.
    pub fn text(&self) -> String {
        text_of(&self.inner)
    }
}

/// Every element named `tag` (case-insensitive) in `html`, in document order, including ones nested
/// in others. Enough for the markup a browser serializes (attributes double-quoted) and the markup
/// regscope writes; not a general HTML parser (no comments, CDATA or raw-text elements).
pub fn elements(html: &str, tag: &str) -> Vec<Element> {
    let tag = tag.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(offset) = html[at..].find('<') {
        let start = at + offset;
        at = start + 1;
        let Some(StartTag { name, attrs, end, self_closing }) = start_tag(html, start) else { continue };
        if name != tag {
            continue;
        }
        let inner = if self_closing || is_void(&name) { "" } else { &html[end..close_of(html, end, &name)] };
        found.push(Element { tag: name, attrs, inner: inner.to_string() });
    }
    found
}

/// The elements named `tag` with class `class`.
pub fn with_class(html: &str, tag: &str, class: &str) -> Vec<Element> {
    elements(html, tag).into_iter().filter(|e| e.has_class(class)).collect()
}

/// The one element named `tag` whose `id` is `id`; panics unless there is exactly one.
pub fn by_id(html: &str, tag: &str, id: &str) -> Element {
    let mut matches: Vec<Element> = elements(html, tag).into_iter().filter(|e| e.attr("id") == Some(id)).collect();
    assert_eq!(matches.len(), 1, "want one <{tag} id={id:?}> in:\n{html}");
    matches.remove(0)
}

/// A start tag as [`start_tag`] read it.
struct StartTag {
    /// Lower-cased.
    name: String,
    attrs: Vec<(String, String)>,
    /// The offset just past its `>`.
    end: usize,
    /// Written `<x ... />`.
    self_closing: bool,
}

/// Parses the start tag at `html[start]` (which is `<`). `None` for end tags, comments and the like.
fn start_tag(html: &str, start: usize) -> Option<StartTag> {
    let bytes = html.as_bytes();
    let mut i = start + 1;
    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'-' || bytes[i] == b':') {
        i += 1;
    }
    if i == start + 1 || !bytes[start + 1].is_ascii_alphabetic() {
        return None;
    }
    let name = html[start + 1..i].to_ascii_lowercase();
    let mut attrs = Vec::new();
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        match bytes.get(i)? {
            b'>' => return Some(StartTag { name, attrs, end: i + 1, self_closing: false }),
            b'/' if bytes.get(i + 1) == Some(&b'>') => {
                return Some(StartTag { name, attrs, end: i + 2, self_closing: true })
            }
            b'/' => i += 1,
            _ => {
                let name_start = i;
                while i < bytes.len() && !matches!(bytes[i], b'=' | b'>' | b'/') && !bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                let attr = html[name_start..i].to_ascii_lowercase();
                let value = if bytes.get(i) == Some(&b'=') {
                    i += 1;
                    match bytes.get(i)? {
                        &quote @ (b'"' | b'\'') => {
                            let value_start = i + 1;
                            let len = html[value_start..].find(quote as char)?;
                            i = value_start + len + 1;
                            decode(&html[value_start..value_start + len])
                        }
                        _ => {
                            let value_start = i;
                            while i < bytes.len() && bytes[i] != b'>' && !bytes[i].is_ascii_whitespace() {
                                i += 1;
                            }
                            decode(&html[value_start..i])
                        }
                    }
                } else {
                    String::new()
                };
                attrs.push((attr, value));
            }
        }
    }
}

/// The offset of the `</name>` that closes an element whose content starts at `from`, counting
/// nested elements of the same name; the end of the text if there is none.
fn close_of(html: &str, from: usize, name: &str) -> usize {
    let lower = html.to_ascii_lowercase();
    let open = format!("<{name}");
    let close = format!("</{name}");
    let mut depth = 0usize;
    let mut at = from;
    loop {
        let next_open = lower[at..].find(&open).map(|o| at + o);
        let next_close = lower[at..].find(&close).map(|c| at + c);
        match (next_open, next_close) {
            (_, None) => return html.len(),
            (Some(o), Some(c)) if o < c => {
                if let Some(tag) = start_tag(html, o) {
                    if tag.name == name && !tag.self_closing {
                        depth += 1;
                    }
                    at = tag.end;
                } else {
                    at = o + 1;
                }
            }
            (_, Some(c)) => {
                at = c + close.len();
                // `</tr` must not match `</track>`.
                if lower.as_bytes().get(at).is_some_and(|b| *b != b'>' && !b.is_ascii_whitespace()) {
                    continue;
                }
                if depth == 0 {
                    return c;
                }
                depth -= 1;
            }
        }
    }
}

fn is_void(name: &str) -> bool {
    matches!(
        name,
        "area" | "base" | "br" | "col" | "embed" | "hr" | "img" | "input" | "link" | "meta" | "source" | "wbr"
    )
}

/// Markup to text: tags dropped, entities decoded, whitespace collapsed.
pub fn text_of(markup: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in markup.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    decode(&text).split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Decodes the entities regscope and browsers write.
fn decode(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}
