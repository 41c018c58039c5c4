//! The load benchmark's "bare Pingora" peer: a Pingora proxy service whose request filter
//! drains the body and answers 200 without looking at it. It is the ceiling for anything built
//! on Pingora, actiongate included. Run: `bare_responder 127.0.0.1:18444 [threads]`.

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};

struct Responder;

const BODY: &[u8] = br#"{"status":"accepted"}"#;

#[async_trait]
impl ProxyHttp for Responder {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(
        &self,
        session: &mut Session,
        _: &mut (),
    ) -> pingora_core::Result<bool> {
        // Reading the body (and dropping it) keeps the connection reusable, as for actiongate.
        session.as_downstream_mut().drain_request_body().await?;
        let mut header = ResponseHeader::build(200, Some(2))?;
        header.insert_header("Content-Type", "application/json")?;
        header.insert_header("Content-Length", BODY.len())?;
        let downstream = session.as_downstream_mut();
        downstream.write_response_header(Box::new(header)).await?;
        downstream
            .write_response_body(Bytes::from_static(BODY), true)
            .await?;
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

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18444".into());
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(2);
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(&server.configuration, Responder);
    service.add_tcp(&addr);
    server.add_service(service);
    server.run_forever();
}
