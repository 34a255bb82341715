//! The Grafana dashboard is well formed for any Prometheus that scrapes regscope: unique panel ids;
//! every panel says what question it answers, has a unit, and takes its datasource from the
//! `datasource` variable; queries select targets only through the `$job` and `$instance` variables.
//! (tests/dashboard_queries.rs runs every query against a real Prometheus.) The trace panels and
//! links take theirs from the `tempo` variable, and their TraceQL asks only for attributes regscope
//! puts on its traces.

use std::collections::HashSet;
use std::path::Path;

use regscope::percent_decode;
use serde_json::Value;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/regscope.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

fn exprs(panel: &Value) -> Vec<&str> {
    panel["targets"].as_array().into_iter().flatten().filter_map(|t| t["expr"].as_str()).collect()
}

fn uses_datasource_variable(ds: &Value) -> bool {
    ds["type"] == "prometheus" && (ds["uid"] == "${datasource}" || ds["uid"] == "$datasource")
}

fn uses_tempo_variable(ds: &Value) -> bool {
    ds["type"] == "tempo" && (ds["uid"] == "${tempo}" || ds["uid"] == "$tempo")
}

fn is_tempo(panel: &Value) -> bool {
    panel["datasource"]["type"] == "tempo"
}

#[test]
fn panel_ids_are_unique() {
    let dashboard = dashboard();
    let mut seen = HashSet::new();
    for panel in all_panels(&dashboard) {
        let id = panel["id"].as_u64().unwrap_or_else(|| panic!("panel without numeric id: {}", panel["title"]));
        assert!(seen.insert(id), "panel id {id} used twice (second: {})", panel["title"]);
    }
}

#[test]
fn every_panel_has_a_title_description_unit_and_the_datasource_variable() {
    let dashboard = dashboard();
    let panels: Vec<_> = all_panels(&dashboard).into_iter().filter(|p| !is_row(p)).collect();
    assert!(panels.len() >= 20, "only {} panels", panels.len());
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "panel {} has no title", panel["id"]);
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(description.trim().len() >= 20, "{title:?}: describe what question the panel answers");
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or_default();
        assert!(!unit.is_empty(), "{title:?} has no unit (fieldConfig.defaults.unit)");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title:?} has no targets"));
        assert!(!targets.is_empty(), "{title:?} has no targets");
        if is_tempo(panel) {
            assert!(uses_tempo_variable(&panel["datasource"]), "{title:?} datasource: {}", panel["datasource"]);
            for target in targets {
                assert_eq!(target["queryType"], "traceql", "{title:?}: a TraceQL search");
                assert!(target["query"].as_str().is_some_and(|q| !q.trim().is_empty()), "{title:?}: no query");
                if !target["datasource"].is_null() {
                    assert!(uses_tempo_variable(&target["datasource"]), "{title:?}: {}", target["datasource"]);
                }
            }
            continue;
        }
        assert!(uses_datasource_variable(&panel["datasource"]), "{title:?} datasource: {}", panel["datasource"]);
        for target in targets {
            assert!(target["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{title:?}: target without expr");
            if !target["datasource"].is_null() {
                assert!(
                    uses_datasource_variable(&target["datasource"]),
                    "{title:?} target datasource: {}",
                    target["datasource"]
                );
            }
        }
    }
}

/// The unit matches what the query measures, for the families whose unit is in their name.
#[test]
fn units_match_the_metrics() {
    let dashboard = dashboard();
    for panel in all_panels(&dashboard).into_iter().filter(|p| !is_row(p)) {
        let title = panel["title"].as_str().unwrap_or_default();
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or_default();
        for expr in exprs(panel) {
            if !expr.starts_with("histogram_quantile(") {
                continue;
            }
            let want = if expr.contains("_bytes_per_second_bucket") {
                "Bps"
            } else if expr.contains("_seconds_bucket") {
                "s"
            } else if expr.contains("_bytes_bucket") {
                "bytes"
            } else {
                continue;
            };
            assert_eq!(unit, want, "{title:?}: {expr}");
        }
        if exprs(panel).iter().any(|e| e.contains("regscope_body_bytes_total") && e.contains("rate(")) {
            assert_eq!(unit, "Bps", "{title:?}: a rate of bytes is bytes per second");
        }
    }
}

#[test]
fn the_datasource_job_and_instance_are_variables() {
    let dashboard = dashboard();
    let vars = dashboard["templating"]["list"].as_array().expect("templating.list");
    let var =
        |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no `{name}` template variable"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance"] {
        assert_eq!(var(name)["type"], "query", "{name}");
        assert!(uses_datasource_variable(&var(name)["datasource"]), "{name} variable datasource");
    }
    // Traces come from whichever Tempo the viewer picks, as metrics from whichever Prometheus.
    assert_eq!(var("tempo")["type"], "datasource");
    assert_eq!(var("tempo")["query"], "tempo");
}

/// No query pins a target: every `job` and `instance` matcher is the variable, and every query has both.
#[test]
fn queries_select_targets_only_through_variables() {
    let dashboard = dashboard();
    for panel in all_panels(&dashboard).into_iter().filter(|p| !is_row(p)) {
        for expr in exprs(panel) {
            for label in ["job", "instance"] {
                let values = matcher_values(expr, label);
                assert!(!values.is_empty(), "{:?}: query does not select by ${label}: {expr}", panel["title"]);
                for value in values {
                    assert!(
                        value == format!("${label}") || value == format!("${{{label}}}"),
                        "{:?}: hard-coded {label}=\"{value}\" in {expr}",
                        panel["title"]
                    );
                }
            }
        }
    }
}

/// The rows the dashboard promises, and the families they are built from.
#[test]
fn the_promised_rows_and_families_are_there() {
    let dashboard = dashboard();
    let panels = all_panels(&dashboard);
    let rows: Vec<String> =
        panels.iter().filter(|p| is_row(p)).map(|p| p["title"].as_str().unwrap_or_default().to_lowercase()).collect();
    for want in [
        "overview",
        "push and pull time",
        "durations",
        "upload phases",
        "throughput",
        "stalls",
        "upstream",
        "bytes moved",
    ] {
        assert!(rows.iter().any(|r| r.contains(want)), "no row about {want:?}; rows: {rows:?}");
    }
    let all: String = panels.iter().flat_map(|p| exprs(p)).collect::<Vec<_>>().join("\n");
    for family in [
        "regscope_requests_total",
        "regscope_in_flight_requests",
        "regscope_uploads_waiting",
        "regscope_upstream_errors_total",
        "regscope_image_time_seconds_total",
        "regscope_image_transfer_seconds_bucket",
        "regscope_upload_phase_seconds_bucket",
        "regscope_transfer_throughput_bytes_per_second_bucket",
        "regscope_body_stall_seconds_total",
        "regscope_upstream_connect_seconds_bucket",
        "regscope_upstream_response_seconds_bucket",
        "regscope_body_bytes_total",
    ] {
        assert!(all.contains(family), "no panel uses {family}");
    }
}

// === traces ===

/// The attributes regscope puts on a push's or pull's root span, and the values of the enumerated
/// ones: what a TraceQL query of the dashboard may ask for.
const SPAN_ATTRIBUTES: [&str; 10] = [
    "regscope.direction",
    "regscope.outcome",
    "regscope.repository",
    "regscope.tag",
    "regscope.bytes",
    "regscope.transfer.id",
    "client.address",
    "regscope.seconds.client",
    "regscope.seconds.registry",
    "regscope.seconds.transfer",
];
const DIRECTIONS: [&str; 2] = ["push", "pull"];
const OUTCOMES: [&str; 3] = ["complete", "failed", "incomplete"];

/// Every TraceQL query of the dashboard: Tempo panels' targets and Explore links, with where each is.
fn traceql_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in all_panels(dashboard).into_iter().filter(|p| is_tempo(p)) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((format!("panel {}", panel["title"]), target["query"].as_str().unwrap_or_default().to_string()));
        }
    }
    for (origin, url) in links(dashboard) {
        for pane in explore_panes(&origin, &url) {
            for query in pane["queries"].as_array().into_iter().flatten() {
                out.push((origin.clone(), query["query"].as_str().unwrap_or_default().to_string()));
            }
        }
    }
    out
}

/// `(where, url)` of every dashboard link and panel link.
fn links(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let urls = |owner: &str, links: &Value| -> Vec<(String, String)> {
        links
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| (format!("{owner} link {}", l["title"]), l["url"].as_str().unwrap_or_default().to_string()))
            .collect()
    };
    out.extend(urls("dashboard", &dashboard["links"]));
    for panel in all_panels(dashboard) {
        out.extend(urls(&format!("panel {}", panel["title"]), &panel["links"]));
    }
    out
}

/// The panes of an Explore link (`/explore?…&panes=<percent-encoded JSON>`); none for other links.
fn explore_panes(origin: &str, url: &str) -> Vec<Value> {
    let Some(query) = url.strip_prefix("/explore?") else {
        return Vec::new();
    };
    // Only Grafana's `${variable}`s stay unencoded; anything else (`&&` in TraceQL above all)
    // would cut the URL short.
    let outside_variables = url.split("${").map(|part| part.split_once('}').map_or(part, |(_, rest)| rest));
    for part in outside_variables {
        assert!(
            part.chars().all(|c| c.is_ascii_alphanumeric() || "-._~%/?=&".contains(c)),
            "{origin}: unencoded characters in {part:?}"
        );
    }
    let panes = query
        .split('&')
        .find_map(|p| p.strip_prefix("panes="))
        .unwrap_or_else(|| panic!("{origin}: an Explore link without panes: {url}"));
    let panes: Value = serde_json::from_str(&percent_decode(panes))
        .unwrap_or_else(|e| panic!("{origin}: panes are not JSON ({e}): {}", percent_decode(panes)));
    let panes: Vec<Value> = panes.as_object().expect("panes by id").values().cloned().collect();
    assert!(!panes.is_empty(), "{origin}: no pane");
    panes
}

/// The push and pull panels lead to their traces: Explore, on the `tempo` variable's datasource,
/// over the dashboard's time range.
#[test]
fn push_and_pull_panels_link_to_their_traces_in_explore() {
    let dashboard = dashboard();
    let mut explore_links = 0;
    for (origin, url) in links(&dashboard) {
        for pane in explore_panes(&origin, &url) {
            explore_links += 1;
            assert_eq!(pane["datasource"], "${tempo}", "{origin}: the pane's datasource");
            assert_eq!(pane["range"]["from"], "${__from}", "{origin}: the dashboard's time range");
            assert_eq!(pane["range"]["to"], "${__to}", "{origin}: the dashboard's time range");
            let queries = pane["queries"].as_array().expect("queries");
            assert!(!queries.is_empty(), "{origin}: no query");
            for query in queries {
                assert!(uses_tempo_variable(&query["datasource"]), "{origin}: {}", query["datasource"]);
                assert_eq!(query["queryType"], "traceql", "{origin}");
            }
        }
    }
    assert!(explore_links > 0, "no link to traces");

    // Each direction's panels link to that direction's traces.
    for panel in all_panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default().to_lowercase();
        let direction = match title.split_whitespace().take(2).collect::<Vec<_>>()[..] {
            ["push", next] if next != "and" => "push",
            ["pull", next] if next != "and" => "pull",
            _ => continue,
        };
        let queries: Vec<String> = panel["links"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| explore_panes(&title, l["url"].as_str().unwrap_or_default()))
            .flat_map(|pane| pane["queries"].as_array().cloned().unwrap_or_default())
            .filter_map(|q| q["query"].as_str().map(str::to_string))
            .collect();
        let want = format!("span.regscope.direction=\"{direction}\"");
        assert!(queries.iter().any(|q| q.contains(&want)), "{title:?} has no link to {direction} traces: {queries:?}");
    }
}

/// TraceQL asks for regscope's service and only for attributes (and values) that regscope's spans carry.
#[test]
fn traceql_asks_for_regscope_attributes_only() {
    let dashboard = dashboard();
    let queries = traceql_queries(&dashboard);
    assert!(queries.iter().any(|(origin, _)| origin.starts_with("panel")), "no Tempo panel");
    for (origin, query) in queries {
        assert!(query.starts_with('{') && query.ends_with('}'), "{origin}: {query}");
        assert!(query.contains("resource.service.name=\"regscope\""), "{origin}: not limited to regscope: {query}");
        for (at, _) in query.match_indices("span.") {
            let rest = &query[at + "span.".len()..];
            let name: String =
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_').collect();
            assert!(
                SPAN_ATTRIBUTES.contains(&name.as_str()),
                "{origin}: regscope sets no span attribute {name}: {query}"
            );
            let allowed: &[&str] = match name.as_str() {
                "regscope.direction" => &DIRECTIONS,
                "regscope.outcome" => &OUTCOMES,
                _ => continue,
            };
            let value = rest[name.len()..]
                .trim_start_matches(['=', '!', '~', ' '])
                .strip_prefix('"')
                .and_then(|v| v.split_once('"'))
                .map(|(v, _)| v)
                .unwrap_or_else(|| panic!("{origin}: {name} compared with no string: {query}"));
            for alternative in value.split('|') {
                assert!(allowed.contains(&alternative), "{origin}: {name} is never {alternative:?}: {query}");
            }
        }
    }
}

/// The values of every `label="…"`, `label=~"…"`, `label!="…"` and `label!~"…"` matcher in `expr`.
fn matcher_values(expr: &str, label: &str) -> Vec<String> {
    let mut values = Vec::new();
    let bytes = expr.as_bytes();
    let mut from = 0;
    while let Some(at) = expr[from..].find(label) {
        let start = from + at;
        from = start + label.len();
        let before_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let rest = expr[from..].trim_start();
        let Some(op) = ["=~", "!~", "!=", "="].into_iter().find(|op| rest.starts_with(op)) else {
            continue;
        };
        let rest = rest[op.len()..].trim_start();
        if !before_ok || !rest.starts_with('"') {
            continue;
        }
        let end = rest[1..].find('"').expect("unterminated label value");
        values.push(rest[1..1 + end].to_string());
    }
    values
}
