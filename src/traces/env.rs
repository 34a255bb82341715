//! Where and how traces are exported: `--otlp-endpoint` and the standard `OTEL_*` environment.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use crate::protocol::percent_decode;
use crate::wire::error::SetupError;

/// The exporter's settings, resolved once at start-up.
#[derive(Debug, Clone)]
pub(crate) struct ExportConfig {
    /// The full URL traces are POSTed to (`…/v1/traces`).
    pub url: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Resource attributes, `service.name` among them.
    pub resource: Vec<(String, String)>,
    /// One export request may take this long before it is given up (its spans dropped).
    pub timeout: Duration,
    /// Queued spans are sent at least this often.
    pub schedule_delay: Duration,
    /// Spans waiting to be sent, at most; beyond it finished transfers are dropped and counted.
    pub max_queue_spans: usize,
    /// Spans per export request, about (a transfer is never split).
    pub max_batch_spans: usize,
}

const TRACES_PATH: &str = "/v1/traces";

/// Resolves the export settings from the flag and the environment (`env` looks a variable up).
/// `None`: no endpoint anywhere, or `OTEL_SDK_DISABLED=true` without the flag: nothing exported.
pub(crate) fn export_config(
    flag: Option<&Uri>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ExportConfig>, SetupError> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let url = match (flag, set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), set("OTEL_EXPORTER_OTLP_ENDPOINT")) {
        (Some(base), _, _) => with_traces_path(&base.to_string())?,
        _ if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) => return Ok(None),
        (None, Some(full), _) => endpoint(full.trim())?,
        (None, None, Some(base)) => with_traces_path(base.trim())?,
        (None, None, None) => return Ok(None),
    };
    let mut headers = Vec::new();
    for name in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"] {
        for (key, value) in pairs(name, set(name).as_deref())? {
            let key = HeaderName::from_bytes(key.as_bytes()).map_err(|_| bad(name, &key))?;
            let value = HeaderValue::from_str(&value).map_err(|_| bad(name, key.as_str()))?;
            headers.retain(|(k, _)| *k != key);
            headers.push((key, value));
        }
    }
    let mut resource = vec![("service.name".to_owned(), "regscope".to_owned())];
    for (key, value) in pairs("OTEL_RESOURCE_ATTRIBUTES", set("OTEL_RESOURCE_ATTRIBUTES").as_deref())? {
        resource.retain(|(k, _)| *k != key);
        resource.push((key, value));
    }
    if let Some(name) = set("OTEL_SERVICE_NAME") {
        resource.retain(|(k, _)| k != "service.name");
        resource.push(("service.name".to_owned(), name.trim().to_owned()));
    }
    if !resource.iter().any(|(k, _)| k == "service.version") {
        resource.push(("service.version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()));
    }
    let millis = |name: &str, default: u64| -> Result<Duration, SetupError> {
        match set(name) {
            None => Ok(Duration::from_millis(default)),
            Some(v) => v.trim().parse().map(Duration::from_millis).map_err(|_| bad(name, &v)),
        }
    };
    let count = |name: &str, default: usize| -> Result<usize, SetupError> {
        match set(name) {
            None => Ok(default),
            Some(v) => v.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| bad(name, &v)),
        }
    };
    let timeout = match set("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
        Some(_) => millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 10_000)?,
        None => millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
    };
    Ok(Some(ExportConfig {
        url,
        headers,
        resource,
        timeout,
        schedule_delay: millis("OTEL_BSP_SCHEDULE_DELAY", 5_000)?,
        max_queue_spans: count("OTEL_BSP_MAX_QUEUE_SIZE", 2_048)?,
        max_batch_spans: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?,
    }))
}

fn bad(name: &str, value: &str) -> SetupError {
    SetupError::Otlp(format!("{name}: cannot use {value:?}"))
}

/// An endpoint used as given: http or https, with a host.
fn endpoint(text: &str) -> Result<Uri, SetupError> {
    let uri: Uri = text.parse().map_err(|_| bad("endpoint", text))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(SetupError::Otlp(format!("endpoint {text:?} must be an http:// or https:// URL with a host"))),
    }
}

/// A base endpoint with the signal's path appended, as the OTLP exporter specification says
/// (a base that already ends in it is taken as the full URL).
fn with_traces_path(base: &str) -> Result<Uri, SetupError> {
    let base = endpoint(base)?.to_string();
    let trimmed = base.trim_end_matches('/');
    if trimmed.ends_with(TRACES_PATH) {
        return endpoint(trimmed);
    }
    endpoint(&format!("{trimmed}{TRACES_PATH}"))
}

/// `key=value,key2=value2`, percent-encoded values, as the `OTEL_*` list variables are written.
fn pairs(name: &str, text: Option<&str>) -> Result<Vec<(String, String)>, SetupError> {
    let Some(text) = text else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(|| bad(name, item))?;
        let key = percent_decode(key.trim()).trim().to_owned();
        if key.is_empty() {
            return Err(bad(name, item));
        }
        out.push((key, percent_decode(value.trim()).into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Option<ExportConfig>, SetupError> {
        let flag = flag.map(|f| f.parse::<Uri>().unwrap());
        export_config(flag.as_ref(), |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn endpoints() {
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            (None, &[], None),
            (Some("http://c:4318"), &[], Some("http://c:4318/v1/traces")),
            (Some("http://c:4318/"), &[], Some("http://c:4318/v1/traces")),
            (Some("https://c/otlp"), &[], Some("https://c/otlp/v1/traces")),
            (Some("http://c:4318/v1/traces"), &[], Some("http://c:4318/v1/traces")),
            (None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://e:4318")], Some("http://e:4318/v1/traces")),
            (
                None,
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://e:4318"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t/x"),
                ],
                Some("http://t/x"),
            ),
            (
                Some("http://flag:1"),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://e:4318")],
                Some("http://flag:1/v1/traces"),
            ),
            (None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://e:4318"), ("OTEL_SDK_DISABLED", "true")], None),
            (Some("http://flag:1"), &[("OTEL_SDK_DISABLED", "true")], Some("http://flag:1/v1/traces")),
            (None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")], None),
        ];
        for (flag, vars, want) in cases {
            let got = config(*flag, vars).unwrap().map(|c| c.url.to_string());
            assert_eq!(got.as_deref(), *want, "{flag:?} {vars:?}");
        }
        for bad in ["ftp://c", "c:4318", "http://"] {
            assert!(config(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_resource_and_limits() {
        let c = config(
            Some("http://c:4318"),
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b, x-team = infra"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=c"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=ignored"),
                ("OTEL_SERVICE_NAME", "regscope-eu"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
            ],
        )
        .unwrap()
        .unwrap();
        let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(headers, [("x-team", "infra"), ("api-key", "c")]);
        let get = |key: &str| c.resource.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("service.name"), Some("regscope-eu"));
        assert_eq!(get("deployment.environment"), Some("prod"));
        assert_eq!(get("service.version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!((c.max_queue_spans, c.max_batch_spans, c.timeout), (64, 512, Duration::from_millis(1500)));
        let default = config(Some("http://c"), &[]).unwrap().unwrap();
        assert_eq!(default.resource[0], ("service.name".to_owned(), "regscope".to_owned()));
        for (name, value) in [
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "bad key=1"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ] {
            assert!(config(Some("http://c"), &[(name, value)]).is_err(), "{name}={value}");
        }
    }
}
