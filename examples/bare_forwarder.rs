//! The load benchmark's "bare forwarder" peer (#16): the least CPU any gateway can spend on
//! actiongate's job here. Pingora receives the POST, keeps the body in memory, answers 200, and
//! one thread with a plain hyper client delivers each body to the upstream over keep-alive, 32
//! in flight. No validation, no disk, no retries: what is lost to a crash or a failed delivery
//! is simply lost. `GET /count` answers `{"received":N,"delivered":N,"failed":N}`, so the
//! benchmark can wait for every delivery as it does for actiongate's.
//!
//! Run: `bare_forwarder 127.0.0.1:18445 http://127.0.0.1:18446/sink [threads]`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};
use tokio::sync::{mpsc, Semaphore};

/// Deliveries in flight at once, as actiongate's default lane concurrency.
const IN_FLIGHT: usize = 32;
const ACCEPTED: &[u8] = br#"{"status":"accepted"}"#;

#[derive(Default)]
struct Counts {
    received: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
}

struct Forwarder {
    queue: mpsc::UnboundedSender<Bytes>,
    counts: Arc<Counts>,
}

#[async_trait]
impl ProxyHttp for Forwarder {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(
        &self,
        session: &mut Session,
        _: &mut (),
    ) -> pingora_core::Result<bool> {
        let body = if session.req_header().method == http::Method::GET {
            let c = &self.counts;
            Bytes::from(format!(
                r#"{{"received":{},"delivered":{},"failed":{}}}"#,
                c.received.load(Ordering::Relaxed),
                c.delivered.load(Ordering::Relaxed),
                c.failed.load(Ordering::Relaxed)
            ))
        } else {
            let downstream = session.as_downstream_mut();
            let mut payload = BytesMut::new();
            while let Some(chunk) = downstream.read_request_body().await? {
                payload.extend_from_slice(&chunk);
            }
            self.counts.received.fetch_add(1, Ordering::Relaxed);
            // The receiver lives as long as the process; a send cannot fail before exit.
            let _ = self.queue.send(payload.freeze());
            Bytes::from_static(ACCEPTED)
        };
        let mut header = ResponseHeader::build(200, Some(2))?;
        header.insert_header("Content-Type", "application/json")?;
        header.insert_header("Content-Length", body.len())?;
        let downstream = session.as_downstream_mut();
        downstream.write_response_header(Box::new(header)).await?;
        downstream.write_response_body(body, true).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _: &mut Session,
        _: &mut (),
    ) -> pingora_core::Result<Box<HttpPeer>> {
        Err(pingora_error::Error::new(
            pingora_error::ErrorType::InternalError,
        ))
    }
}

/// Delivers every queued body, at most [`IN_FLIGHT`] at once, on a thread of its own.
fn deliver(upstream: http::Uri, mut queue: mpsc::UnboundedReceiver<Bytes>, counts: Arc<Counts>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        while let Some(body) = queue.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let request = http::Request::post(upstream.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .expect("a request from a valid URI");
            let client = client.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                let delivered = match client.request(request).await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        // Read the answer to the end so the connection is reused.
                        ok && response.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                let count = if delivered {
                    &counts.delivered
                } else {
                    &counts.failed
                };
                count.fetch_add(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    });
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18445".into());
    let upstream: http::Uri = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:18446/sink".into())
        .parse()
        .expect("the upstream URL");
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(2);
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let (queue, receiver) = mpsc::unbounded_channel();
    let counts = Arc::new(Counts::default());
    let delivery_counts = counts.clone();
    std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(move || deliver(upstream, receiver, delivery_counts))
        .expect("the delivery thread");
    let mut service =
        pingora_proxy::http_proxy_service(&server.configuration, Forwarder { queue, counts });
    service.add_tcp(&addr);
    server.add_service(service);
    server.run_forever();
}
