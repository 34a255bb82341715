//! The Prometheus files in deploy/prometheus are what Prometheus itself accepts: `promtool` checks
//! the configuration and the rules, and runs the rules' unit tests. Every alert has a unit test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

/// Runs `promtool ARGS` in deploy/prometheus and panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
        .unwrap_or_else(|e| panic!("run promtool (Debian package `prometheus`; script/test installs it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {} failed ({}):\n{text}", args.join(" "), output.status);
    text
}

fn yaml(name: &str) -> serde_yaml::Value {
    let path = prometheus_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_rule_files_it_names() {
    let text = promtool(&["check", "config", "prometheus.yml"]);
    assert!(text.contains("1 rule files found"), "prometheus.yml loads regscope-rules.yml: {text}");
}

#[test]
fn promtool_accepts_the_rules() {
    promtool(&["check", "rules", "regscope-rules.yml"]);
}

#[test]
fn the_rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "regscope-rules.test.yml"]);
}

#[test]
fn every_alert_is_unit_tested_both_firing_and_quiet() {
    let rules = yaml("regscope-rules.yml");
    let alerts: BTreeSet<String> = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    assert!(alerts.len() >= 4, "alerts: {alerts:?}");

    let tests = yaml("regscope-rules.test.yml");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected > 0 { &mut firing } else { &mut quiet }.insert(name);
        }
    }
    let untested_firing: Vec<_> = alerts.difference(&firing).collect();
    let untested_quiet: Vec<_> = alerts.difference(&quiet).collect();
    assert!(untested_firing.is_empty(), "alerts never tested firing: {untested_firing:?}");
    assert!(untested_quiet.is_empty(), "alerts never tested staying quiet: {untested_quiet:?}");
}
