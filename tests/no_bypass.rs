//! Every request a client makes for a push or a pull must pass through regscope, whichever `Host`
//! it forwards: the registry hands out absolute upload `Location`s built from the `Host` it sees,
//! and a client told the registry's own address would send the layer bytes around the proxy.

mod support;

use std::time::Duration;

use support::{docker, eventually, metric_sum, skopeo, LoggedRequest, Registry, Regscope, TempDir, TestImage};

#[test]
fn nothing_bypasses_regscope_when_it_preserves_the_host_header() {
    every_registry_request_goes_through_regscope("preserve");
}

#[test]
fn nothing_bypasses_regscope_when_it_sends_the_upstream_host_header() {
    every_registry_request_goes_through_regscope("upstream");
}

/// Pushes and pulls with docker and copies with skopeo through regscope, then holds the registry's
/// access log against regscope's own record of what it forwarded.
fn every_registry_request_goes_through_regscope(host_header: &str) {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--host-header", host_header]);
    let proxy = regscope.proxy_addr();

    let docker = docker();
    let reference = format!("{proxy}/regscope-test/no-bypass-docker:{host_header}");
    let image = TestImage::build(&reference, &[1 << 20, 3 << 20]);
    docker.load(&image);
    docker.push(&reference);
    docker.rmi(&reference);
    docker.pull(&reference);
    assert_eq!(docker.image_id(&reference), image.image_id);
    docker.rmi(&reference);

    let other = TestImage::build("regscope-test/no-bypass-skopeo:v1", &[1 << 20, 2 << 20]);
    let remote = format!("docker://{proxy}/regscope-test/no-bypass-skopeo:{host_header}");
    let out = TempDir::new("no-bypass");
    skopeo(&["copy", "--quiet", "--dest-tls-verify=false", &other.skopeo_source(), &remote]);
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &remote,
        &format!("dir:{}", out.path().join("copy").display()),
    ]);

    // Both sides write their line after the client has its response: wait for them to agree.
    let served = || sorted(registry.served_requests());
    let forwarded = || {
        sorted(
            regscope
                .request_log()
                .into_iter()
                .map(|r| LoggedRequest {
                    method: r.method,
                    path: r.path.split('?').next().unwrap_or_default().to_string(),
                    status: r.status,
                })
                .collect(),
        )
    };
    let counted = || metric_sum(&regscope.metrics_text(), "regscope_requests_total", &[]);
    let agree = eventually(Duration::from_secs(10), || {
        let served = served();
        served == forwarded() && counted() == served.len() as f64
    });

    let served = served();
    assert!(served.len() > 20, "a push, a pull and two copies make dozens of requests: {served:#?}");
    assert!(
        agree,
        "registry served {} requests, regscope logged {} and counted {} in regscope_requests_total\n\
         served only by the registry: {:#?}\nlogged only by regscope: {:#?}",
        served.len(),
        forwarded().len(),
        counted(),
        difference(&served, &forwarded()),
        difference(&forwarded(), &served),
    );
}

fn sorted(mut requests: Vec<LoggedRequest>) -> Vec<LoggedRequest> {
    requests.sort();
    requests
}

/// The multiset difference `a - b`: what `a` holds more often than `b`.
fn difference(a: &[LoggedRequest], b: &[LoggedRequest]) -> Vec<LoggedRequest> {
    let mut rest = b.to_vec();
    a.iter()
        .filter(|r| match rest.iter().position(|x| x == *r) {
            Some(i) => {
                rest.remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}
