//! `--no-ui` turns the web UI off and nothing else: `/` and `/transfers/<id>` answer 404,
//! while `/metrics`, `/healthz` and the transfers API keep working.

mod support;

use support::{http_get, Registry, Regscope};

#[test]
fn no_ui_turns_the_pages_off_and_leaves_metrics_and_the_api() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--no-ui"]);
    let admin = regscope.admin_addr();
    for path in ["/", "/transfers/1", "/transfers/1.svg"] {
        let response = http_get(admin, path);
        assert_eq!(response.status, 404, "GET {path} with --no-ui: {}", response.text());
        assert!(!response.text().contains("<html"), "GET {path} with --no-ui served a page: {}", response.text());
    }
    let metrics = http_get(admin, "/metrics");
    assert_eq!(metrics.status, 200, "GET /metrics: {}", metrics.text());
    assert!(metrics.text().contains("regscope_build_info"), "{}", metrics.text());
    assert_eq!(http_get(admin, "/healthz").status, 200);
    let api = http_get(admin, "/api/v1/transfers");
    assert_eq!(api.status, 200, "GET /api/v1/transfers with --no-ui: {}", api.text());
    assert_eq!(http_get(admin, "/api/v1/live").status, 200);
}

#[test]
fn the_ui_is_on_by_default() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let response = http_get(regscope.admin_addr(), "/");
    assert_eq!(response.status, 200, "GET /: {}", response.text());
    assert!(response.header("content-type").is_some_and(|c| c.starts_with("text/html")), "{:?}", response.headers);
    assert!(response.text().contains("<h1>regscope</h1>"), "{}", response.text());
}
