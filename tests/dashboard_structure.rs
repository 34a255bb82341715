//! The Grafana dashboard is well formed for any Prometheus that scrapes regscope: unique panel ids;
//! every panel says what question it answers, has a unit, and takes its datasource from the
//! `datasource` variable; queries select targets only through the `$job` and `$instance` variables.
//! (tests/dashboard_queries.rs runs every query against a real Prometheus.)

use std::collections::HashSet;
use std::path::Path;

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
        assert!(uses_datasource_variable(&panel["datasource"]), "{title:?} datasource: {}", panel["datasource"]);
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title:?} has no targets"));
        assert!(!targets.is_empty(), "{title:?} has no targets");
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
