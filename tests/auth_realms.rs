//! A registry with token auth (distribution's `auth: token`) sends clients to a token service,
//! its realm. regscope routes those token requests through itself, so each token round trip is
//! timed as the auth party's; no credential or token shows in anything regscope outputs.

mod support;

use std::time::Duration;

use regscope::{Operation, Outcome, Transfer, TransferDirection};
use support::client::Conn;
use support::replay::{assert_shares_add_up, pretty, report_text, transfers, wait_for_transfer};
use support::{docker, http_get, metric_sum, Registry, RegistryOptions, Regscope, TestImage, TokenService};

const DELAY: Duration = Duration::from_millis(300);

fn token_requests(t: &Transfer) -> usize {
    t.requests.iter().filter(|r| r.operation == Operation::AuthToken).count()
}

#[test]
fn docker_push_and_pull_fetch_every_token_through_regscope_and_it_is_auth_time() {
    let tokens = TokenService::start(DELAY);
    let registry = Registry::start_with(RegistryOptions {
        token: Some((tokens.realm(), tokens.root_cert())),
        ..RegistryOptions::default()
    });
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let admin = regscope.admin_addr();
    let repository = "regscope-test/token-auth";
    let reference = format!("{}/{repository}:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[2 << 20]);
    let docker = docker();
    docker.load(&image);
    docker.push(&reference);
    docker.rmi(&reference);
    docker.pull(&reference);

    let push = wait_for_transfer(admin, TransferDirection::Push, repository, Duration::from_secs(10));
    let pull = wait_for_transfer(admin, TransferDirection::Pull, repository, Duration::from_secs(10));
    for t in [&push, &pull] {
        eprintln!("{}", pretty(t));
        assert_eq!(t.outcome, Outcome::Complete, "{}", pretty(t));
        assert_shares_add_up(t);
        let n = token_requests(t);
        assert!(n >= 1, "the {} fetched its token through regscope", t.direction.as_str());
        let want = n as f64 * DELAY.as_secs_f64();
        assert!(
            (t.parties.auth - want).abs() <= 0.10 * want,
            "{}: auth {:.3} s for {n} tokens of {:.3} s",
            t.direction.as_str(),
            t.parties.auth,
            DELAY.as_secs_f64()
        );
    }
    let metrics = regscope.metrics_text();
    let proxied = metric_sum(&metrics, "regscope_requests_total", &[("operation", "auth_token")]);
    assert_eq!(proxied as usize, tokens.requests(), "every token request the service saw came through regscope");
    let text = report_text(admin, 2);
    assert!(text.contains("% in auth (tokens)"), "the verdict names auth:\n{text}");

    // No token leaks into anything regscope says.
    let api = String::from_utf8_lossy(&http_get(admin, "/api/v1/transfers").body).into_owned();
    let live = String::from_utf8_lossy(&http_get(admin, "/api/v1/live").body).into_owned();
    let log = regscope.log_lines().join("\n");
    let issued = tokens.tokens();
    assert!(!issued.is_empty());
    for token in &issued {
        let signature = token.rsplit('.').next().unwrap();
        for (what, text) in [("log", &log), ("metrics", &metrics), ("API", &api), ("live", &live), ("report", &text)] {
            assert!(!text.contains(signature), "a token's signature is in the {what}");
        }
    }
    assert!(transfers(admin).len() >= 2);
    docker.rmi(&reference);
}

#[test]
fn realms_are_rewritten_only_when_captured_and_unknown_realm_handles_reach_no_host() {
    let tokens = TokenService::start(Duration::ZERO);
    let registry = Registry::start_with(RegistryOptions {
        token: Some((tokens.realm(), tokens.root_cert())),
        ..RegistryOptions::default()
    });
    let challenge = |regscope: &Regscope| {
        let host = regscope.proxy_addr().to_string();
        let response = Conn::connect(regscope.proxy_addr()).request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
        assert_eq!(response.status(), 401);
        response.header("www-authenticate").expect("a challenge").to_string()
    };

    let capturing = Regscope::start(&["--upstream", &registry.url()]);
    let rewritten = challenge(&capturing);
    let prefix = format!("Bearer realm=\"http://{}/_regscope/auth/", capturing.proxy_addr());
    assert!(rewritten.starts_with(&prefix), "{rewritten}");
    assert!(rewritten.contains(&format!("service=\"{}\"", support::TOKEN_SERVICE)), "{rewritten}");
    let host = capturing.proxy_addr().to_string();
    for bad in ["/_regscope/auth/00000000000000000000000000000000?service=x", "/_regscope/auth/short"] {
        let refused = Conn::connect(capturing.proxy_addr()).request("GET", bad, &[("Host", &host)], b"").unwrap();
        assert_eq!(refused.status(), 404, "{bad}");
    }
    // A storage handle path does not take an auth handle either.
    let handle = rewritten[prefix.len()..].split('"').next().unwrap();
    let crossed = Conn::connect(capturing.proxy_addr())
        .request("GET", &format!("/_regscope/storage/{handle}"), &[("Host", &host)], b"")
        .unwrap();
    assert_eq!(crossed.status(), 404);
    assert_eq!(tokens.requests(), 0, "nothing reached the token service");

    let passing = Regscope::start(&["--upstream", &registry.url(), "--auth-realms", "pass"]);
    let untouched = challenge(&passing);
    assert!(untouched.starts_with(&format!("Bearer realm=\"{}\"", tokens.realm())), "{untouched}");
    let metrics = passing.metrics_text();
    assert_eq!(metric_sum(&metrics, "regscope_redirects_total", &[("party", "auth"), ("handling", "passed")]), 1.0);
}
