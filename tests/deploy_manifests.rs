//! The deployment kit says what the binary understands. Docker cannot build or run containers on
//! the test machines, so the Dockerfile, the compose stack, the Kubernetes manifests and the systemd
//! unit are proven by parsing: every `--flag` they pass is one `regscope serve --help` lists, the
//! whole command line parses with regscope's own CLI, and every port they publish, probe, scrape or
//! route to is the one the listen flags bind. Traces likewise: regscope's OTLP endpoint is the
//! collector's OTLP/HTTP receiver, whose exporter reaches Tempo, which Grafana queries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use regscope::config::{Cli, Command as CliCommand, ServeConfig};
use serde::Deserialize;
use serde_yaml::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The long flags and environment variables (`REGSCOPE_*`, and the standard `OTEL_*` it honours)
/// `regscope serve --help` documents.
struct Help {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn serve_help() -> Help {
    let output = Command::new(env!("CARGO_BIN_EXE_regscope")).args(["serve", "--help"]).output().expect("run regscope");
    assert!(output.status.success(), "regscope serve --help: {output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let words = |prefix: &str, allowed: fn(char) -> bool| -> BTreeSet<String> {
        text.split(|c: char| !(allowed(c) || c == '-' || c == '_'))
            .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
            .map(str::to_string)
            .collect()
    };
    let mut env = words("REGSCOPE_", |c| c.is_ascii_uppercase());
    env.extend(words("OTEL_", |c| c.is_ascii_uppercase()));
    let help = Help { flags: words("--", |c| c.is_ascii_lowercase()), env };
    assert!(
        help.flags.contains("--admin-listen") && help.env.contains("REGSCOPE_LISTEN"),
        "help parsed: {:?}",
        help.flags
    );
    help
}

/// Checks `args` (what follows the program name) against the help text and parses them with
/// regscope's own CLI, so values are checked too (addresses, URLs, durations). `origin` names the
/// file for failure messages.
fn serve_config(origin: &str, args: &[String], help: &Help) -> ServeConfig {
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        assert!(help.flags.contains(flag), "{origin}: {flag} is not a flag of `regscope serve` ({:?})", help.flags);
    }
    let cli = Cli::try_parse_from(std::iter::once("regscope".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{origin}: regscope rejects {args:?}:\n{e}"));
    match cli.command {
        Some(CliCommand::Serve(config)) => config,
        None => cli.serve,
        Some(other) => panic!("{origin}: runs {other:?}, not serve"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {value:?}"))
        .iter()
        .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| panic!("expected strings: {v:?}")))
        .collect()
}

fn port_of(url: &str) -> (String, u16) {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    let host = uri.host().expect("host").to_string();
    (host, uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 }))
}

/// OTLP/HTTP's port; 4317 is gRPC, which regscope does not speak.
const OTLP_HTTP_PORT: u16 = 4318;

/// Checks an OTLP endpoint regscope is given: an http(s) URL on the OTLP/HTTP port, a base URL
/// (regscope appends `/v1/traces`) unless it is `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, which is used
/// as it is. Returns host and port.
fn otlp_endpoint(origin: &str, source: &str, url: &str) -> (String, u16) {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("{origin}: {source}={url}: {e}"));
    assert!(matches!(uri.scheme_str(), Some("http" | "https")), "{origin}: {source}={url} is not an http(s) URL");
    let want_path = if source == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" { "/v1/traces" } else { "/" };
    assert_eq!(uri.path(), want_path, "{origin}: {source}={url}");
    let (host, port) = port_of(url);
    assert_eq!(port, OTLP_HTTP_PORT, "{origin}: {source}={url} is not on the OTLP/HTTP port");
    (host, port)
}

/// The port of a `host:port` listen address.
fn listen_port(origin: &str, address: &Value) -> u16 {
    let address = address.as_str().unwrap_or_else(|| panic!("{origin}: no listen address"));
    let (host, port) = address.rsplit_once(':').unwrap_or_else(|| panic!("{origin}: {address} has no port"));
    assert_eq!(host, "0.0.0.0", "{origin}: {address} must listen beyond the container's loopback");
    port.parse().unwrap_or_else(|e| panic!("{origin}: {address}: {e}"))
}

// === Dockerfile ===

#[test]
fn dockerfile_is_multi_stage_non_root_and_exposes_the_ports_its_command_binds() {
    let help = serve_help();
    let text = read("deploy/Dockerfile");
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace).map(|(k, v)| (k.to_ascii_uppercase(), v.trim().to_string())))
        .collect();
    let all = |key: &str| instructions.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect::<Vec<_>>();

    let stages = all("FROM");
    assert!(stages.len() >= 2, "multi-stage build: {stages:?}");
    assert!(
        all("COPY").iter().any(|c| c.starts_with("--from=")),
        "the runtime stage copies the binary from the build stage"
    );
    let final_stage = text.rfind("\nFROM ").expect("FROM");
    let user = text[final_stage..]
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next()
        .or_else(|| stages.last().filter(|s| s.ends_with(":nonroot")).map(|_| "nonroot"))
        .expect("the runtime stage sets a non-root USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "runtime user {user}");

    let entrypoint: Vec<String> =
        serde_json::from_str(&all("ENTRYPOINT").pop().expect("ENTRYPOINT")).expect("exec-form ENTRYPOINT");
    assert!(entrypoint[0].ends_with("/regscope"), "{entrypoint:?}");
    let cmd: Vec<String> = serde_json::from_str(&all("CMD").pop().expect("CMD")).expect("exec-form CMD");
    let config = serve_config("deploy/Dockerfile CMD", &cmd, &help);
    let exposed: BTreeSet<u16> = all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace().map(|p| p.trim_end_matches("/tcp").parse::<u16>().unwrap()))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([config.listen.port(), config.admin_listen.port()]),
        "EXPOSE vs --listen/--admin-listen"
    );
    assert!(
        config.listen.ip().is_unspecified() && config.admin_listen.ip().is_unspecified(),
        "a container must listen beyond loopback"
    );
}

// === docker compose ===

#[test]
fn compose_wires_registry_regscope_prometheus_and_grafana_on_matching_ports() {
    let help = serve_help();
    let compose = yaml_documents("deploy/docker-compose.yml").remove(0);
    let services = compose["services"].as_mapping().expect("services");
    let service = |name: &str| &compose["services"][name];
    for name in ["registry", "regscope", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "compose has no {name} service");
    }
    // Every host path mounted exists, relative to the compose file.
    for (name, svc) in services {
        for volume in svc["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().expect("short volume syntax").split(':').next().unwrap();
            if source.starts_with('.') {
                let path = repo().join("deploy").join(source);
                assert!(path.exists(), "service {name:?} mounts {source}, which does not exist ({})", path.display());
            }
        }
    }

    // regscope: its flags, its published ports, its upstream, its build.
    let regscope = service("regscope");
    let config = serve_config("deploy/docker-compose.yml regscope.command", &strings(&regscope["command"]), &help);
    let published: BTreeSet<u16> = strings(&regscope["ports"])
        .iter()
        .map(|p| p.rsplit(':').next().unwrap().split('/').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        published,
        BTreeSet::from([config.listen.port(), config.admin_listen.port()]),
        "published container ports"
    );
    let (upstream_host, upstream_port) = port_of(&config.upstream.to_string());
    assert_eq!(upstream_host, "registry", "--upstream names the registry service");
    assert_eq!(upstream_port, 5000, "distribution's image listens on 5000");
    assert!(service("registry")["ports"].is_null(), "the registry is reachable only through regscope");
    let build = &regscope["build"];
    let context = repo().join("deploy").join(build["context"].as_str().expect("build.context"));
    assert!(
        context.join(build["dockerfile"].as_str().expect("build.dockerfile")).is_file(),
        "the Dockerfile is where build names it"
    );

    // Prometheus: the mounted config scrapes regscope's admin port by service name.
    let prometheus = service("prometheus");
    let flags = strings(&prometheus["command"]);
    let flag =
        |name: &str| flags.iter().find_map(|f| f.strip_prefix(name)).unwrap_or_else(|| panic!("prometheus {name}"));
    assert_eq!(flag("--config.file="), "/etc/prometheus/prometheus.yml");
    assert!(
        strings(&prometheus["volumes"]).iter().any(|v| v.starts_with("./prometheus:/etc/prometheus")),
        "mounts deploy/prometheus"
    );
    let scrape = yaml_documents("deploy/prometheus/prometheus.yml").remove(0);
    let job = scrape["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "regscope")
        .expect("regscope job");
    let targets: Vec<String> =
        job["static_configs"].as_sequence().unwrap().iter().flat_map(|s| strings(&s["targets"])).collect();
    assert_eq!(targets, vec![format!("regscope:{}", config.admin_listen.port())], "scrape target vs --admin-listen");
    let prometheus_port: u16 = flag("--web.listen-address=").rsplit(':').next().unwrap().parse().unwrap();

    // Grafana: provisioning mounted where Grafana reads it; the datasource is this Prometheus; the
    // dashboard file lands in the provider's folder.
    let grafana = strings(&service("grafana")["volumes"]);
    let mount = |source: &str| {
        grafana
            .iter()
            .find_map(|v| v.strip_prefix(source)?.strip_prefix(':'))
            .map(|t| t.trim_end_matches(":ro").to_string())
    };
    assert_eq!(mount("../grafana/provisioning").as_deref(), Some("/etc/grafana/provisioning"));
    let datasources = yaml_documents("grafana/provisioning/datasources/prometheus.yml").remove(0);
    let url = datasources["datasources"][0]["url"].as_str().expect("datasource url");
    assert_eq!(datasources["datasources"][0]["type"], "prometheus");
    assert_eq!(port_of(url), ("prometheus".to_string(), prometheus_port), "Grafana's datasource url {url}");
    let providers = yaml_documents("grafana/provisioning/dashboards/regscope.yml").remove(0);
    let folder = providers["providers"][0]["options"]["path"].as_str().expect("provider path");
    let dashboard = mount("../grafana/regscope.json").expect("the dashboard is mounted");
    assert_eq!(Path::new(&dashboard).parent().unwrap(), Path::new(folder), "dashboard mount vs provider path");
}

#[test]
fn compose_publishes_on_loopback_only_and_pins_every_image() {
    let compose = yaml_documents("deploy/docker-compose.yml").remove(0);
    for (name, svc) in compose["services"].as_mapping().expect("services") {
        let name = name.as_str().unwrap();
        for port in svc["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().expect("short port syntax");
            assert!(port.starts_with("127.0.0.1:"), "service {name} publishes {port} beyond loopback");
        }
        if !svc["build"].is_null() {
            continue;
        }
        let image = svc["image"].as_str().unwrap_or_else(|| panic!("service {name} has no image"));
        let tag = image.rsplit('/').next().unwrap().split_once(':').map(|(_, tag)| tag);
        assert!(tag.is_some_and(|t| t != "latest"), "service {name}: image {image} is not pinned to a version");
    }
}

#[test]
fn compose_sends_traces_through_the_collector_to_tempo_and_grafana() {
    let help = serve_help();
    let compose = yaml_documents("deploy/docker-compose.yml").remove(0);
    let service = |name: &str| {
        let svc = &compose["services"][name];
        assert!(!svc.is_null(), "compose has no {name} service");
        svc
    };
    // The file in this repository that a bind mount of `name` puts at `path` in the container.
    let host_file = |name: &str, path: &str| -> String {
        strings(&service(name)["volumes"])
            .iter()
            .find_map(|v| {
                let mut parts = v.split(':');
                let (source, target) = (parts.next()?, parts.next()?);
                let rest = path.strip_prefix(target)?;
                source.starts_with('.').then(|| format!("deploy/{source}{rest}"))
            })
            .unwrap_or_else(|| panic!("service {name} mounts nothing from here at {path}"))
    };
    // The flag value `name` (as `name=value`) of a service's command.
    let flag = |svc: &str, name: &str| -> String {
        strings(&service(svc)["command"])
            .iter()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('=').map(str::to_string))
            .unwrap_or_else(|| panic!("service {svc} has no {name}="))
    };

    // regscope exports to the collector's OTLP/HTTP receiver, by service name.
    let config =
        serve_config("deploy/docker-compose.yml regscope.command", &strings(&service("regscope")["command"]), &help);
    let endpoint =
        config.otlp_endpoint.as_ref().expect("regscope has --otlp-endpoint in the compose stack").to_string();
    let (collector, port) = otlp_endpoint("deploy/docker-compose.yml regscope", "--otlp-endpoint", &endpoint);
    assert!(
        service(&collector)["image"].as_str().is_some_and(|i| i.contains("otel/opentelemetry-collector")),
        "--otlp-endpoint {endpoint} names no OpenTelemetry Collector service"
    );
    let collector_file = host_file(&collector, &flag(&collector, "--config"));
    let collector_config = yaml_documents(&collector_file).remove(0);
    let receiver = &collector_config["receivers"]["otlp"]["protocols"]["http"]["endpoint"];
    assert_eq!(listen_port(&collector_file, receiver), port, "{collector_file}: OTLP/HTTP receiver vs --otlp-endpoint");

    // Its traces pipeline takes OTLP in, batches, and exports to Tempo's receiver.
    let pipeline = &collector_config["service"]["pipelines"]["traces"];
    assert!(strings(&pipeline["receivers"]).contains(&"otlp".to_string()), "{collector_file}: traces from otlp");
    assert!(strings(&pipeline["processors"]).contains(&"batch".to_string()), "{collector_file}: batched");
    let exporters = strings(&pipeline["exporters"]);
    assert!(!exporters.is_empty(), "{collector_file}: the traces pipeline exports nowhere");
    let tempo = "tempo";
    let tempo_file = host_file(tempo, &flag(tempo, "-config.file"));
    let tempo_config = yaml_documents(&tempo_file).remove(0);
    let tempo_receiver = |protocol: &str| {
        let address = &tempo_config["distributor"]["receivers"]["otlp"]["protocols"][protocol]["endpoint"];
        (!address.is_null()).then(|| listen_port(&tempo_file, address))
    };
    for exporter in &exporters {
        let settings = &collector_config["exporters"][exporter.as_str()];
        assert!(!settings.is_null(), "{collector_file}: exporter {exporter} is not defined");
        let url = settings["endpoint"].as_str().unwrap_or_else(|| panic!("{collector_file}: {exporter} endpoint"));
        let protocol = match exporter.split('/').next().unwrap() {
            "otlp_http" | "otlphttp" => "http",
            "otlp_grpc" | "otlp" => "grpc",
            other => panic!("{collector_file}: exporter type {other} is not OTLP"),
        };
        let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        let (host, port) = port_of(&url);
        assert_eq!(host, tempo, "{collector_file}: {exporter} exports to {url}, not the {tempo} service");
        assert_eq!(
            Some(port),
            tempo_receiver(protocol),
            "{collector_file}: {exporter} vs {tempo_file}'s {protocol} receiver"
        );
    }

    // Tempo keeps its blocks and WAL on a named volume.
    let trace_storage = &tempo_config["storage"]["trace"];
    assert_eq!(trace_storage["backend"], "local", "{tempo_file}: local storage");
    let named_volumes: Vec<(String, String)> = strings(&service(tempo)["volumes"])
        .iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            (!source.starts_with('.') && !source.starts_with('/')).then(|| (source.to_string(), target.to_string()))
        })
        .collect();
    for path in [&trace_storage["wal"]["path"], &trace_storage["local"]["path"]] {
        let path = path.as_str().unwrap_or_else(|| panic!("{tempo_file}: storage path"));
        let (volume, _) = named_volumes
            .iter()
            .find(|(_, target)| Path::new(path).starts_with(target))
            .unwrap_or_else(|| panic!("{tempo_file}: {path} is on no named volume of the {tempo} service"));
        assert!(
            compose["volumes"].as_mapping().is_some_and(|v| v.contains_key(volume.as_str())),
            "volume {volume} is not declared"
        );
    }

    // Grafana: a Tempo datasource with a stable uid, on Tempo's HTTP port; Prometheus stays the default.
    let tempo_http: u16 = tempo_config["server"]["http_listen_port"].as_u64().expect("http_listen_port") as u16;
    let dir = repo().join("grafana/provisioning/datasources");
    let mut datasources = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().path().strip_prefix(repo()).unwrap().display().to_string();
        for doc in yaml_documents(&file) {
            datasources.extend(doc["datasources"].as_sequence().cloned().unwrap_or_default());
        }
    }
    let tempo_sources: Vec<&Value> = datasources.iter().filter(|d| d["type"] == "tempo").collect();
    assert_eq!(tempo_sources.len(), 1, "one Tempo datasource is provisioned");
    let source = tempo_sources[0];
    assert_eq!(source["uid"], "tempo", "the Tempo datasource keeps a stable uid");
    assert_ne!(source["isDefault"], Value::Bool(true), "Prometheus stays the default datasource");
    let url = source["url"].as_str().expect("Tempo datasource url");
    assert_eq!(port_of(url), (tempo.to_string(), tempo_http), "Grafana's Tempo datasource url {url}");
    assert_eq!(datasources.iter().filter(|d| d["isDefault"] == Value::Bool(true)).count(), 1, "one default datasource");
}

// === Kubernetes ===

/// A regscope container found in a Deployment, with what the test needs of its pod.
struct RegscopeContainer {
    origin: String,
    config: ServeConfig,
    container: Value,
    pod_labels: Value,
    pod_annotations: Value,
    pod_security: Value,
    replicas: u64,
}

fn kubernetes_files() -> Vec<String> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .map(|p| p.strip_prefix(repo()).unwrap().display().to_string())
        .collect();
    files.sort();
    files
}

fn all_kubernetes_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for file in kubernetes_files() {
        for doc in yaml_documents(&file) {
            assert!(doc["apiVersion"].is_string() && doc["kind"].is_string(), "{file}: object without apiVersion/kind");
            assert!(doc["metadata"]["name"].is_string(), "{file}: object without a name");
            out.push((file.clone(), doc));
        }
    }
    out
}

fn regscope_containers(objects: &[(String, Value)], help: &Help) -> Vec<RegscopeContainer> {
    let mut out = Vec::new();
    for (file, object) in objects.iter().filter(|(_, o)| o["kind"] == "Deployment") {
        let pod = &object["spec"]["template"];
        for container in pod["spec"]["containers"].as_sequence().expect("containers") {
            if container["name"] != "regscope" {
                continue;
            }
            let origin = format!("{file} Deployment/{}", object["metadata"]["name"].as_str().unwrap());
            let args = strings(&container["args"]);
            for env in container["env"].as_sequence().into_iter().flatten() {
                let name = env["name"].as_str().unwrap();
                assert!(help.env.contains(name), "{origin}: {name} is not an environment variable of regscope");
            }
            out.push(RegscopeContainer {
                config: serve_config(&origin, &args, help),
                origin,
                container: container.clone(),
                pod_labels: pod["metadata"]["labels"].clone(),
                pod_annotations: pod["metadata"]["annotations"].clone(),
                pod_security: pod["spec"]["securityContext"].clone(),
                replicas: object["spec"]["replicas"].as_u64().unwrap_or(1),
            });
        }
    }
    out
}

/// The container port a probe or Service names, by name or number.
fn resolve_port(container: &Value, port: &Value) -> Option<u16> {
    let ports = container["ports"].as_sequence()?;
    match port {
        Value::Number(n) => ports.iter().find(|p| p["containerPort"].as_u64() == n.as_u64()),
        Value::String(name) => ports.iter().find(|p| p["name"].as_str() == Some(name)),
        _ => None,
    }
    .and_then(|p| p["containerPort"].as_u64())
    .map(|p| p as u16)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|s| s.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v))
}

#[test]
fn kubernetes_manifests_use_real_flags_and_the_ports_they_bind() {
    let help = serve_help();
    let objects = all_kubernetes_objects();
    let containers = regscope_containers(&objects, &help);
    let origins: Vec<&str> = containers.iter().map(|c| c.origin.as_str()).collect();
    assert!(containers.len() >= 2, "a standalone Deployment and a sidecar: {origins:?}");

    for c in &containers {
        let origin = &c.origin;
        let declared: BTreeMap<String, u16> = c.container["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap() as u16))
            .collect();
        assert_eq!(declared.get("proxy"), Some(&c.config.listen.port()), "{origin}: port `proxy` vs --listen");
        assert_eq!(
            declared.get("admin"),
            Some(&c.config.admin_listen.port()),
            "{origin}: port `admin` vs --admin-listen"
        );
        assert!(
            c.config.listen.ip().is_unspecified() && c.config.admin_listen.ip().is_unspecified(),
            "{origin}: pod IP reachable"
        );

        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c.container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{origin}: {probe} path");
            assert_eq!(
                resolve_port(&c.container, &get["port"]),
                Some(c.config.admin_listen.port()),
                "{origin}: {probe} on the admin port"
            );
        }

        let resources = &c.container["resources"];
        for (key, want) in [("requests", ("50m", "64Mi")), ("limits", ("2", "256Mi"))] {
            let cpu = match &resources[key]["cpu"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("{origin}: resources.{key}.cpu {other:?}"),
            };
            assert_eq!(
                (cpu.as_str(), resources[key]["memory"].as_str().unwrap_or("")),
                want,
                "{origin}: resources.{key}"
            );
        }

        let security = &c.container["securityContext"];
        let non_root = security["runAsNonRoot"].as_bool().or(c.pod_security["runAsNonRoot"].as_bool());
        assert_eq!(non_root, Some(true), "{origin}: runAsNonRoot");
        assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false), "{origin}");
        assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true), "{origin}");

        // Services in front of this pod route to ports the container declares. A Service with
        // several replicas behind it needs ClientIP affinity for pushes to group into transfers.
        for (file, service) in objects.iter().filter(|(_, o)| o["kind"] == "Service") {
            if !labels_match(&service["spec"]["selector"], &c.pod_labels) {
                continue;
            }
            for port in service["spec"]["ports"].as_sequence().expect("service ports") {
                let target = if port["targetPort"].is_null() { &port["port"] } else { &port["targetPort"] };
                let resolved = resolve_port(&c.container, target);
                assert!(
                    resolved.is_some(),
                    "{file} Service {:?}: targetPort {target:?} is no port of {origin}",
                    service["metadata"]["name"]
                );
                if resolved == Some(c.config.listen.port()) && c.replicas > 1 {
                    assert_eq!(
                        service["spec"]["sessionAffinity"], "ClientIP",
                        "{file}: {} replicas need client affinity",
                        c.replicas
                    );
                }
            }
        }
    }

    // The sidecar's upstream is the registry container beside it, on the address it listens on.
    let sidecar = containers.iter().find(|c| c.origin.contains("sidecar")).expect("a sidecar variant");
    let (host, port) = port_of(&sidecar.config.upstream.to_string());
    let registry_addr = objects
        .iter()
        .filter(|(_, o)| o["kind"] == "Deployment")
        .flat_map(|(_, o)| o["spec"]["template"]["spec"]["containers"].as_sequence().unwrap().clone())
        .filter(|c| c["name"] == "registry")
        .flat_map(|c| c["env"].as_sequence().cloned().unwrap_or_default())
        .find(|e| e["name"] == "REGISTRY_HTTP_ADDR")
        .and_then(|e| e["value"].as_str().map(str::to_string))
        .expect("the sidecar's registry sets REGISTRY_HTTP_ADDR");
    let registry_addr: SocketAddr = registry_addr.parse().unwrap();
    assert_eq!(
        (host.as_str(), port),
        (registry_addr.ip().to_string().as_str(), registry_addr.port()),
        "sidecar --upstream"
    );
    assert!(registry_addr.ip().is_loopback(), "the registry beside regscope must not be reachable around it");
}

/// Trace export, where a manifest shows it, goes to a collector's OTLP/HTTP port, whichever way it is set.
#[test]
fn kubernetes_trace_export_points_at_an_otlp_http_collector() {
    let help = serve_help();
    let objects = all_kubernetes_objects();
    let containers = regscope_containers(&objects, &help);
    let mut shown = 0;
    for c in &containers {
        let mut endpoints: Vec<(String, String)> = c.container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e["name"].as_str()?;
                let is_endpoint = matches!(
                    name,
                    "REGSCOPE_OTLP_ENDPOINT" | "OTEL_EXPORTER_OTLP_ENDPOINT" | "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                );
                is_endpoint.then(|| (name.to_string(), e["value"].as_str().expect("a literal endpoint").to_string()))
            })
            .collect();
        if let Some(flag) = &c.config.otlp_endpoint {
            endpoints.push(("--otlp-endpoint".to_string(), flag.to_string()));
        }
        for (source, url) in &endpoints {
            otlp_endpoint(&c.origin, source, url);
            shown += 1;
        }
    }
    assert!(shown > 0, "no manifest shows where traces go");
}

#[test]
fn kubernetes_scraping_reaches_the_admin_port_both_ways() {
    let help = serve_help();
    let objects = all_kubernetes_objects();
    let containers = regscope_containers(&objects, &help);

    // Prometheus Operator: the ServiceMonitor selects a Service whose named port routes to the
    // admin port of a regscope pod.
    let monitors: Vec<_> = objects.iter().filter(|(_, o)| o["kind"] == "ServiceMonitor").collect();
    assert!(!monitors.is_empty(), "a ServiceMonitor");
    for (file, monitor) in monitors {
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1", "{file}");
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        let services: Vec<_> = objects
            .iter()
            .filter(|(_, o)| o["kind"] == "Service" && labels_match(selector, &o["metadata"]["labels"]))
            .map(|(_, o)| o)
            .collect();
        assert!(!services.is_empty(), "{file}: the ServiceMonitor selects no Service");
        for endpoint in monitor["spec"]["endpoints"].as_sequence().expect("endpoints") {
            assert_eq!(endpoint["path"].as_str().unwrap_or("/metrics"), "/metrics", "{file}");
            let name = &endpoint["port"];
            for service in &services {
                let port =
                    service["spec"]["ports"].as_sequence().unwrap().iter().find(|p| &p["name"] == name).unwrap_or_else(
                        || panic!("{file}: Service {:?} has no port named {name:?}", service["metadata"]["name"]),
                    );
                let reaches_admin = containers.iter().any(|c| {
                    labels_match(&service["spec"]["selector"], &c.pod_labels)
                        && resolve_port(&c.container, &port["targetPort"]) == Some(c.config.admin_listen.port())
                });
                assert!(reaches_admin, "{file}: endpoint {name:?} does not reach regscope's admin port");
            }
        }
        // job="regscope", which the alerts select.
        let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
        for service in services {
            assert_eq!(service["metadata"]["labels"][job_label], "regscope", "{file}: job label");
        }
    }

    // Plain annotations: the pod says where its metrics are, and that is the admin port.
    let annotated: Vec<_> = containers.iter().filter(|c| c.pod_annotations["prometheus.io/scrape"] == "true").collect();
    assert!(!annotated.is_empty(), "a variant scraped through prometheus.io annotations");
    for c in annotated {
        let port: u16 = c.pod_annotations["prometheus.io/port"].as_str().expect("prometheus.io/port").parse().unwrap();
        assert_eq!(port, c.config.admin_listen.port(), "{}: prometheus.io/port vs --admin-listen", c.origin);
        assert_eq!(c.pod_annotations["prometheus.io/path"].as_str().unwrap_or("/metrics"), "/metrics", "{}", c.origin);
    }
}

// === systemd ===

#[test]
fn systemd_unit_runs_real_flags_hardened_with_admin_on_loopback() {
    let help = serve_help();
    let text = read("deploy/systemd/regscope.service");
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('[')) {
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
        settings.entry(key.trim().to_string()).or_default().push(value.trim().to_string());
    }
    let one = |key: &str| settings.get(key).and_then(|v| v.last()).map(String::as_str);

    let exec = one("ExecStart").expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert!(words.next().unwrap().ends_with("/regscope"), "{exec}");
    let args: Vec<String> = words.map(str::to_string).collect();
    let config = serve_config("deploy/systemd/regscope.service ExecStart", &args, &help);
    assert!(config.admin_listen.ip().is_loopback(), "on a host, the admin port stays on loopback");

    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(key), Some(want), "{key}");
    }
    assert!(one("RestrictAddressFamilies").is_some_and(|v| v.contains("AF_INET")), "RestrictAddressFamilies");
    assert!(
        settings.get("SystemCallFilter").is_some_and(|v| v.iter().any(|f| f == "@system-service")),
        "SystemCallFilter"
    );

    // systemd must wait out the graceful drain before it kills.
    let stop = one("TimeoutStopSec").expect("TimeoutStopSec");
    let stop = regscope::config::parse_duration(stop).unwrap();
    assert!(stop > config.shutdown_grace, "TimeoutStopSec {stop:?} <= --shutdown-grace {:?}", config.shutdown_grace);
    for name in settings.get("Environment").into_iter().flatten().flat_map(|e| e.split_whitespace()) {
        let name = name.split('=').next().unwrap();
        assert!(help.env.contains(name), "Environment {name} is not a regscope variable");
    }
}
