//! How an exchange reaches the registry: over the client connection's own upstream
//! connection when it may (see [`crate::wire::paired`]), else the pool, and how long its
//! response head may take.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::Exchange;
use crate::protocol::BodyEnd;
use crate::wire::error::{classify_client_error, classify_pair_error, ClientFault, ProxyError};
use crate::wire::paired::{Pair, PairBody, Sent, PAIRS_UNTIL};
use crate::wire::proxy::{Proxy, UploadBody};

/// A registry response's body: from the pool's connection, or from the pair's.
pub(crate) type UpstreamBody = Either<Incoming, PairBody>;

impl Proxy {
    /// Sends the request and waits for the response head. The response timeout only starts
    /// once the request body has been fully forwarded: a 10 GiB upload is not a slow registry.
    /// `sends_body`: the request has a body to forward (as `forward` found it, once). `pair`:
    /// the client connection's own upstream connection, tried first. `on_loop`: the event loop
    /// serving the client connection, whose pools it takes.
    pub(super) async fn await_response(
        &self,
        mut req: Request<UploadBody>,
        sends_body: bool,
        pair: Option<&Arc<Pair>>,
        on_loop: usize,
        exchange: &Exchange,
        upstream: &str,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        // A request without a body has nothing left to forward once handed on, so its timeout
        // starts now (opening an upstream connection, at most the connect timeout, counts in it).
        let deadline = Instant::now() + self.response_timeout;
        let timed_out = || ProxyError::ResponseTimeout { upstream: upstream.to_owned(), after: self.response_timeout };
        if let Some(pair) = pair {
            let dial = || {
                if self.upstreams.clients_open() > PAIRS_UNTIL {
                    return None;
                }
                // The registry's root: the connector reads only its scheme and authority.
                let root = self.upstream.uri_for(None).ok()?;
                Some(self.upstreams.dial(root))
            };
            let sent = pair.send(req, dial);
            match tokio::time::timeout_at(deadline, sent).await.map_err(|_| timed_out())? {
                Sent::Answered(result) => {
                    return result.map(|response| response.map(Either::Right)).map_err(|e| {
                        let (kind, cause) = classify_pair_error(&e);
                        ProxyError::Unreachable { upstream: upstream.to_owned(), kind, cause }
                    })
                }
                Sent::Declined(mut declined) => {
                    *declined.uri_mut() = self.upstream_uri(declined.uri())?;
                    req = declined;
                }
            }
        }
        let (client, stream) = self.upstreams.pick(sends_body, on_loop);
        exchange.hold(stream);
        let response = client.request(req);
        let result = if sends_body {
            self.after_upload(response, exchange).await
        } else {
            tokio::time::timeout_at(deadline, response).await.ok()
        };
        let result = result.ok_or_else(timed_out)?;
        result.map(|response| response.map(Either::Left)).map_err(|e| match exchange.upload_end() {
            // The client's body broke first; the upstream error is only its echo.
            Some(BodyEnd::SourceStalled) => ProxyError::ClientAborted(ClientFault::Stalled),
            Some(BodyEnd::SourceError) => ProxyError::ClientAborted(ClientFault::Broken),
            _ => {
                let (kind, cause) = classify_client_error(&e);
                ProxyError::Unreachable { upstream: upstream.to_owned(), kind, cause }
            }
        })
    }

    /// A registry request's target as the pooled client takes it: in absolute form.
    pub(super) fn upstream_uri(&self, uri: &http::Uri) -> Result<http::Uri, ProxyError> {
        self.upstream
            .uri_for(uri.path_and_query())
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
    }

    /// `response`, or `None` if it has not come within the response timeout of the request
    /// body's end (a 10 GiB upload is not a slow registry).
    async fn after_upload<F: Future>(&self, response: F, exchange: &Exchange) -> Option<F::Output> {
        tokio::pin!(response);
        loop {
            let deadline = exchange.upload_ended().map(|t| t + self.response_timeout);
            tokio::select! {
                result = &mut response => return Some(result),
                _ = exchange.upload_done.notified(), if deadline.is_none() => continue,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => return None,
            }
        }
    }
}
