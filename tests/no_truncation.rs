//! Nothing lost or corrupted: a body cut off on one side is never turned into a shorter but
//! well-formed body on the other. An upload the client abandons is never committed by the
//! registry, and a download the registry abandons never reaches the client as a complete response.
//!
//! The uploads carry `?digest=` of exactly the bytes that were sent before the cut (and, as the
//! issue asks, of the full blob): a proxy that ended the upstream body cleanly at the cut would get
//! those bytes committed under that digest, so "nothing committed" is a check that can fail.

mod support;

use std::io::ErrorKind;
use std::time::Duration;

use support::client::{digest_of, Conn, Pattern};
use support::hostile::{
    committed_blobs, registry_blob_status, start_cut_upload, wait_registry_logged, DyingOrigin, DyingResponse, Framing,
};
use support::{eventually, metric_sum, Registry, Regscope};

const REPO: &str = "regscope-test/no-truncation";
const BLOB: usize = 4 << 20;

fn blob(seed: u64) -> Vec<u8> {
    let mut pattern = Pattern::new(seed);
    let mut bytes = Vec::with_capacity(BLOB);
    while bytes.len() < BLOB {
        bytes.extend_from_slice(pattern.next_slice(BLOB - bytes.len()));
    }
    bytes
}

fn aborted(regscope: &Regscope, operation: &str, side: &str) -> f64 {
    metric_sum(&regscope.metrics_text(), "regscope_aborted_requests_total", &[("operation", operation), ("side", side)])
}

/// The registry finished with the upload's PUT without a 201, holds no blob under any digest
/// the cut body could have matched, and has no committed content at all.
fn assert_not_committed(registry: &Registry, case: &str, upload_path: &str, digests: &[String]) {
    // The registry logs a request when its handler returns: seeing the PUT means the registry is
    // done with it, so a commit, had there been one, has happened by now.
    let statuses = wait_registry_logged(registry, "PUT", upload_path, Duration::from_secs(15));
    assert!(
        !statuses.is_empty(),
        "{case}: the registry never finished the cut PUT within 15 s: the upstream request was not cut\n{}",
        registry.log_text()
    );
    assert!(!statuses.contains(&201), "{case}: the registry committed the cut upload (PUT statuses {statuses:?})");
    for digest in digests {
        assert_eq!(registry_blob_status(registry, REPO, digest), 404, "{case}: blob {digest} exists at the registry");
    }
    let stored = committed_blobs(&registry.storage_dir());
    assert!(stored.is_empty(), "{case}: the registry's storage holds blobs {stored:?}");
}

#[test]
fn a_client_that_disconnects_mid_upload_gets_nothing_committed() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let data = blob(0x7E57_0001);
    let full_digest = digest_of(&data);

    // (framing, how much is sent, which digest the PUT names, what the client does then)
    struct Case {
        name: &'static str,
        framing: Framing,
        cut: usize,
        full_digest: bool,
        half_close: bool,
    }
    let cases = [
        Case {
            name: "Content-Length, half sent, full digest, closed",
            framing: Framing::ContentLength,
            cut: BLOB / 2,
            full_digest: true,
            half_close: false,
        },
        Case {
            name: "Content-Length, half sent, digest of the half, closed",
            framing: Framing::ContentLength,
            cut: BLOB / 2,
            full_digest: false,
            half_close: false,
        },
        Case {
            name: "chunked, cut mid-chunk, full digest, closed",
            framing: Framing::Chunked,
            cut: BLOB / 2 + 1000,
            full_digest: true,
            half_close: false,
        },
        Case {
            name: "chunked, cut mid-chunk, digest of what was sent, closed",
            framing: Framing::Chunked,
            cut: BLOB / 2 + 1000,
            full_digest: false,
            half_close: false,
        },
        Case {
            name: "body one byte shorter than its Content-Length, digest of it, half-closed",
            framing: Framing::ContentLength,
            cut: BLOB - 1,
            full_digest: false,
            half_close: true,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let sent_digest = digest_of(&data[..case.cut]);
        let named = if case.full_digest { full_digest.clone() } else { sent_digest };
        let upload = start_cut_upload(regscope.proxy_addr(), REPO, &data, case.cut, &named, case.framing);
        let upload_path = upload.upload_path.clone();
        let mut digests = upload.truncated_digests.clone();
        digests.push(full_digest.clone());
        if case.half_close {
            let reply = upload.half_close_and_read(Duration::from_secs(10));
            assert!(
                !matches!(reply.status, Some(200..=299)),
                "{}: the client got a success for a body short of its Content-Length: {}",
                case.name,
                reply.text()
            );
            eprintln!("{}: the client saw {:?} (closed: {})", case.name, reply.status, reply.closed);
        } else {
            upload.close();
        }
        assert_not_committed(&registry, case.name, &upload_path, &digests);

        // regscope says who cut it off: the client.
        let want = (i + 1) as f64;
        let counted = eventually(Duration::from_secs(5), || aborted(&regscope, "upload_finish", "client") == want);
        assert!(
            counted,
            "{}: regscope_aborted_requests_total{{operation=upload_finish,side=client}} = {}, want {want}\n{}",
            case.name,
            aborted(&regscope, "upload_finish", "client"),
            regscope.metrics_text()
        );
        let events = regscope.events("request");
        let put = events
            .iter()
            .rfind(|e| {
                e["fields"]["method"] == "PUT"
                    && e["fields"]["path"].as_str().is_some_and(|p| p.starts_with(&upload_path))
            })
            .unwrap_or_else(|| {
                panic!("{}: no request event for the PUT:\n{}", case.name, regscope.log_lines().join("\n"))
            });
        assert_eq!(put["fields"]["aborted"], "client", "{}: {put}", case.name);
        assert_ne!(put["fields"]["status"], 201, "{}: {put}", case.name);
        let bytes_in = put["fields"]["bytes_in"].as_u64().unwrap();
        assert!(
            bytes_in <= case.cut as u64,
            "{}: regscope counted {bytes_in} bytes in, {} were sent",
            case.name,
            case.cut
        );
    }
    assert_eq!(aborted(&regscope, "upload_finish", "registry"), 0.0, "none of this is the registry's doing");
    assert_eq!(regscope.request_log().iter().filter(|r| r.status == 201).count(), 0, "no upload got a 201");
}

/// GETs a blob through regscope from a registry that sends `sent` bytes of the body and dies.
/// Returns the status, the data bytes the client received, and how the body read ended.
fn download_from_dying(regscope: &Regscope) -> (u16, Option<u64>, u64, std::io::Result<u64>) {
    let host = regscope.proxy_addr().to_string();
    let mut conn = Conn::connect(regscope.proxy_addr());
    // A stalled connection must fail the test quickly, not wait out the client's default.
    conn.stream().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    conn.send_head("GET", &format!("/v2/{REPO}/blobs/{digest}"), &[("Host", &host)]).unwrap();
    let head = conn.read_head().expect("a response head: the registry's 200 was under way");
    let mut received = 0u64;
    let result = conn.read_body(&head, |bytes| received += bytes.len() as u64);
    (head.status, head.content_length(), received, result)
}

#[test]
fn a_registry_that_dies_mid_download_never_yields_a_complete_response() {
    const DECLARED: u64 = 10 << 20;
    const SENT: u64 = 1 << 20;

    // Content-Length framing: 10 MiB promised, 1 MiB sent, then the connection closes.
    let origin = DyingOrigin::start(DyingResponse { declared: Some(DECLARED), sent: SENT });
    let regscope = Regscope::start(&["--upstream", &origin.url()]);
    let (status, length, received, result) = download_from_dying(&regscope);
    assert_eq!(status, 200, "the registry's status goes through");
    assert_eq!(length, Some(DECLARED), "the declared length goes through, so the client can tell it was cut");
    let error = result.expect_err("a body cut off at the registry reached the client as a complete response");
    assert_eq!(error.kind(), ErrorKind::UnexpectedEof, "the client sees the connection close early: {error}");
    assert!(received <= SENT, "the client got {received} bytes, the registry sent {SENT}");
    eprintln!("Content-Length {DECLARED}: client got {received} bytes, then: {error}");
    let counted = eventually(Duration::from_secs(5), || aborted(&regscope, "blob_get", "registry") == 1.0);
    assert!(
        counted,
        "regscope_aborted_requests_total{{blob_get,registry}} after the cut:\n{}",
        regscope.metrics_text()
    );
    assert_eq!(aborted(&regscope, "blob_get", "client"), 0.0);

    // Chunked: the registry's stream ends without its terminating chunk; neither may the client's.
    let origin = DyingOrigin::start(DyingResponse { declared: None, sent: SENT });
    let regscope = Regscope::start(&["--upstream", &origin.url()]);
    let (status, length, received, result) = download_from_dying(&regscope);
    assert_eq!((status, length), (200, None), "a chunked 200 goes through as chunked");
    let error = result.expect_err("the client got a terminating 0-chunk for a body the registry never finished");
    assert!(
        matches!(error.kind(), ErrorKind::UnexpectedEof | ErrorKind::InvalidData),
        "the client sees the connection close inside the chunked body, not a timeout: {error:?}"
    );
    assert!(received <= SENT, "the client got {received} bytes, the registry sent {SENT}");
    eprintln!("chunked: client got {received} bytes, then: {error}");
    let counted = eventually(Duration::from_secs(5), || aborted(&regscope, "blob_get", "registry") == 1.0);
    assert!(
        counted,
        "regscope_aborted_requests_total{{blob_get,registry}} after the cut:\n{}",
        regscope.metrics_text()
    );
    // The event is logged as the metric is counted, but read from regscope's stderr by a thread.
    assert!(
        eventually(Duration::from_secs(5), || !regscope.events("request").is_empty()),
        "a request event for the GET"
    );
    let event = regscope.events("request").pop().expect("a request event for the GET");
    assert_eq!(event["fields"]["aborted"], "registry", "{event}");
}

/// A body the client cut short, or stopped sending, is the client's doing: regscope must not
/// count it, log it, or answer it as a registry failure (`regscope_upstream_errors_total`,
/// "upstream failure", 502 "unreachable"), or every client that loses its network pages whoever
/// watches the registry, and the client is told to blame the registry.
#[test]
fn a_client_abort_is_not_blamed_on_the_registry() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--body-stall-timeout", "1s"]);
    let data = blob(0x7E57_0002);

    // 1. Closed mid-chunk.
    let upload = start_cut_upload(regscope.proxy_addr(), REPO, &data, BLOB / 2, &digest_of(&data), Framing::Chunked);
    let path = upload.upload_path.clone();
    upload.close();
    wait_registry_logged(&registry, "PUT", &path, Duration::from_secs(15));

    // 2. One byte short of its Content-Length, then half-closed: the client waits for the answer.
    let cut = BLOB - 1;
    let upload =
        start_cut_upload(regscope.proxy_addr(), REPO, &data, cut, &digest_of(&data[..cut]), Framing::ContentLength);
    let short = upload.half_close_and_read(Duration::from_secs(10));

    // 3. Stopped sending mid-body, cut off by the stall timeout; the client is still listening.
    let cut = BLOB / 2;
    let upload =
        start_cut_upload(regscope.proxy_addr(), REPO, &data, cut, &digest_of(&data[..cut]), Framing::ContentLength);
    let mut stream = upload.conn.stream().try_clone().unwrap();
    let stalled = support::hostile::read_until_closed(&mut stream, Duration::from_secs(8));

    assert!(eventually(Duration::from_secs(5), || aborted(&regscope, "upload_finish", "client") == 3.0));
    let metrics = regscope.metrics_text();
    let upstream_errors = metric_sum(&metrics, "regscope_upstream_errors_total", &[]);
    let warnings: Vec<String> = regscope.log_lines().into_iter().filter(|l| l.contains("upstream failure")).collect();
    let blamed: Vec<String> = regscope
        .events("request")
        .iter()
        .filter(|e| !e["fields"]["upstream_error"].is_null())
        .map(|e| e.to_string())
        .collect();
    let client_error = |reply: &support::hostile::RawReply| reply.status.is_some_and(|s| (400..500).contains(&s));
    assert!(
        upstream_errors == 0.0
            && warnings.is_empty()
            && blamed.is_empty()
            && client_error(&short)
            && client_error(&stalled),
        "client aborts were blamed on the registry: regscope_upstream_errors_total = {upstream_errors}\n\
         short body answered: {}\nstalled body answered: {}\n\
         warnings:\n{}\nrequest events with upstream_error:\n{}",
        short.text(),
        stalled.text(),
        warnings.join("\n"),
        blamed.join("\n")
    );
}
