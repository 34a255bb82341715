//! Command line and environment: every flag has a `REGSCOPE_*` twin and a loopback default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::wire::headers::HostMode;

#[derive(Debug, Parser)]
#[command(name = "regscope", version, about = "A transparent instrumenting reverse proxy for container registries.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` is the default: its flags are accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeConfig,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
pub enum Command {
    /// Run the proxy (the default).
    Serve(ServeConfig),
    /// Print the push and pull tables of a running regscope.
    Report(ReportConfig),
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address the proxy listens on.
    #[arg(long, env = "REGSCOPE_LISTEN", default_value = "127.0.0.1:5001")]
    pub listen: SocketAddr,

    /// The registry to forward to: http:// or https://, with an optional port.
    #[arg(long, env = "REGSCOPE_UPSTREAM", default_value = "http://127.0.0.1:5000")]
    pub upstream: http::Uri,

    /// Address of the admin port: /metrics, /healthz, /readyz, /api/v1/transfers.
    #[arg(long, env = "REGSCOPE_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain: with --tls-key, the proxy listener speaks TLS (h2 and HTTP/1.1).
    #[arg(long, env = "REGSCOPE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "REGSCOPE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) to trust for an https upstream, in addition to the system roots.
    #[arg(long, env = "REGSCOPE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Which Host the registry sees: the client's (preserve) or the upstream's (upstream).
    #[arg(long, env = "REGSCOPE_HOST_HEADER", value_enum, default_value_t = HostMode::Preserve)]
    pub host_header: HostMode,

    /// How long in-flight requests may run after SIGINT/SIGTERM before regscope exits anyway.
    #[arg(long, env = "REGSCOPE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Peers trusted to say who the client is (a load balancer or ingress in front of regscope),
    /// as address blocks: `10.0.0.0/8,192.0.2.7`. A request from one of them is attributed to the
    /// client its `Forwarded` or `X-Forwarded-For` names; anyone else's such headers are ignored.
    #[arg(long, env = "REGSCOPE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::wire::identity::Cidr>,

    /// Every connection to the proxy port starts with a PROXY protocol header (v1 or v2), as an
    /// L4 balancer sends it (haproxy `send-proxy`, AWS NLB, Envoy): the client is the one it
    /// names. A connection without a valid one is closed before anything is forwarded.
    #[arg(long, env = "REGSCOPE_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Time allowed to open a connection to the registry.
    #[arg(long, env = "REGSCOPE_UPSTREAM_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Time allowed from the request being fully forwarded to the registry's response head.
    /// Generous by default: finishing a large upload makes the registry hash the whole blob.
    #[arg(long, env = "REGSCOPE_UPSTREAM_RESPONSE_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub upstream_response_timeout: Duration,

    /// Idle pooled connections to the registry are closed after this long (those that read
    /// more than 16 KiB at once after at most 2 s: they hold their read buffer).
    #[arg(long, env = "REGSCOPE_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Time a client connection may take to send a complete request head. It runs whenever the
    /// connection waits for a head, so it is also the idle keep-alive timeout.
    #[arg(long, env = "REGSCOPE_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Largest request head accepted (HTTP/1 read buffer; h2 header list), in bytes. The read
    /// buffer of an HTTP/1 client connection without a large-read slot is the larger of this and
    /// 56 KiB, rounded up to 8 KiB × (2^k − 1) (120 KiB for 64 KiB): a larger limit costs memory
    /// under many concurrent uploads.
    #[arg(long, env = "REGSCOPE_MAX_HEADER_BYTES", default_value_t = 56 * 1024)]
    pub max_header_bytes: usize,

    /// Client connections served at once; beyond this, new ones get a 503 registry error.
    #[arg(long, env = "REGSCOPE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// How many streams at a time may read about 1 MiB at once (per side: client connections
    /// and upstream exchanges), given while the side has no more streams than this (upstream: nor
    /// more than 64 client connections open). Busier, new upstream streams read up to 56 or 16 KiB.
    /// Large reads move a blob at about twice the rate; small ones keep a thousand concurrent
    /// transfers within tens of MiB. 0: none read large.
    #[arg(long, env = "REGSCOPE_LARGE_READ_STREAMS", default_value_t = 4)]
    pub large_read_streams: usize,

    /// Uploads whose bodies stream through at once (starting an upload takes a slot too); the
    /// others wait, unread, until one ends or moves nothing for a second (its slot is then taken
    /// over). Each streaming upload holds 100–200 KiB of buffers, a waiting one about 40. Bodies
    /// declaring 64 KiB or less, and the bodyless commit, need no slot. Divided among the
    /// threads (fewer slots than threads are shared by all). 0: no limit.
    #[arg(long, env = "REGSCOPE_UPLOAD_SLOTS", default_value_t = 64)]
    pub upload_slots: usize,

    /// Blob downloads whose bodies stream through at once; the others wait before being
    /// forwarded, until one ends or sends its client nothing for a second (its slot is then
    /// taken over). A streaming download holds an upstream connection's buffers, a waiting one
    /// only its client connection's. HEADs and manifests never wait. Divided among the threads
    /// as upload slots are. 0: no limit.
    #[arg(long, env = "REGSCOPE_DOWNLOAD_SLOTS", default_value_t = 64)]
    pub download_slots: usize,

    /// Threads serving connections, each an event loop with the connections dealt to it in
    /// turn; default one per CPU. A connection stays on one thread for its whole life.
    #[arg(long, env = "REGSCOPE_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// A body whose source sends nothing for this long is aborted (never finished) and counted.
    /// Bodies have no size limit: layers are large. 0 turns stall detection off.
    #[arg(long, env = "REGSCOPE_BODY_STALL_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub body_stall_timeout: Duration,

    /// Opt into a `repository` label on per-repository counters, capped at this many distinct
    /// repositories (later ones count as `other`). 0 disables it.
    #[arg(long, env = "REGSCOPE_LABEL_REPOSITORY", default_value_t = 0)]
    pub label_repository: usize,

    /// A push or pull with no request for this long is closed (as incomplete, or failed if a
    /// request was cut off); an upload never finished is closed as abandoned.
    #[arg(long, env = "REGSCOPE_TRANSFER_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub transfer_idle_timeout: Duration,

    /// A pull whose manifest is resolved ends once no request of it came for this long: clients
    /// fetch only the blobs they lack, and the last one they need ends the pull.
    #[arg(long, env = "REGSCOPE_PULL_SETTLE", default_value = "1s", value_parser = parse_duration)]
    pub pull_settle: Duration,

    /// What to do with a registry's redirects to other hosts (object storage, CDNs): `capture`
    /// routes them through regscope, which forwards and times the bytes (it then needs to reach
    /// those hosts); `pass` hands them to the client untouched and only counts them.
    #[arg(long, env = "REGSCOPE_REDIRECTS", value_enum, default_value_t = RedirectMode::Capture)]
    pub redirects: RedirectMode,

    /// What to do with a registry's token realms (`WWW-Authenticate: Bearer realm=…`): `capture`
    /// routes the client's token requests through regscope, which forwards and times them as the
    /// auth party's (it then needs to reach the token service); `pass` leaves them untouched.
    #[arg(long, env = "REGSCOPE_AUTH_REALMS", value_enum, default_value_t = RedirectMode::Capture)]
    pub auth_realms: RedirectMode,

    /// Send each finished push and pull as an OpenTelemetry trace to this OTLP/HTTP (protobuf)
    /// collector, e.g. `http://otel-collector:4318`; traces go to its `/v1/traces`. Unset, the
    /// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is used;
    /// none of them set, nothing is exported. `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`
    /// and `OTEL_RESOURCE_ATTRIBUTES` are honoured too.
    #[arg(long, env = "REGSCOPE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<http::Uri>,

    /// How many finished pushes and pulls to keep for the transfers API and `report`.
    #[arg(long, env = "REGSCOPE_KEEP_TRANSFERS", default_value_t = 1000)]
    pub keep_transfers: usize,

    /// Turn off `/api/v1/transfers` (it shows repository names, tags and client addresses).
    #[arg(long, env = "REGSCOPE_DISABLE_TRANSFERS_API")]
    pub disable_transfers_api: bool,

    /// Turn off the web UI on the admin port (`/` and `/transfers/<id>`).
    #[arg(long, env = "REGSCOPE_NO_UI")]
    pub no_ui: bool,

    /// Log format.
    #[arg(long, env = "REGSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--redirects`: whether redirects to other hosts go through regscope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedirectMode {
    Capture,
    Pass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ReportConfig {
    /// The admin address of the regscope to ask.
    #[arg(long, env = "REGSCOPE_ADMIN", default_value = "http://127.0.0.1:9464")]
    pub admin: http::Uri,

    /// How many transfers, newest first.
    #[arg(long, default_value_t = 10)]
    pub last: usize,

    /// Print the transfers as JSON instead of tables.
    #[arg(long)]
    pub json: bool,

    /// Which transfer `--svg`/`--html` draw (default: the newest).
    #[arg(long)]
    pub id: Option<u64>,

    /// Write the transfer's waterfall as an SVG file, to attach to a bug report.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// Write the transfer's page (waterfall, layers, requests) as a standalone HTML file.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

/// Parses `250ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("invalid duration {text:?}: expected e.g. 30s, 500ms, 5m"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {text:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("30s", Duration::from_secs(30)),
            ("30", Duration::from_secs(30)),
            ("250ms", Duration::from_millis(250)),
            ("1.5s", Duration::from_millis(1500)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text).unwrap(), *want, "{text}");
        }
        for bad in ["", "s", "10x", "-1s", "1e9999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default() {
        let cli = Cli::try_parse_from(["regscope", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.port(), 0);
        let cli = Cli::try_parse_from(["regscope", "serve", "--host-header", "upstream"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(c)) if c.host_header == HostMode::Upstream));
    }
}
