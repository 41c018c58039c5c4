//! The stand-alone gateway's proxy: actions answered by the module, everything else proxied
//! to the `fallback`, or `404 unknown_action` when there is none.

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_proxy::{ProxyHttp, Session};

use crate::ingress::watchdog;
use crate::ActionGate;

pub struct EdgeProxy {
    pub gate: ActionGate,
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn early_request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<()> {
        watchdog::head_arrived();
        Ok(())
    }

    async fn logging(
        &self,
        _session: &mut Session,
        _e: Option<&pingora_error::Error>,
        _ctx: &mut (),
    ) {
        watchdog::response_sent();
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<bool> {
        if self.gate.handle(session.as_downstream_mut()).await? {
            return Ok(true);
        }
        // The fallback in force: a reload may change it.
        if self.gate.config().fallback.is_none() {
            self.gate
                .answer_unknown(session.as_downstream_mut())
                .await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<Box<HttpPeer>> {
        let config = self.gate.config();
        let Some(fallback) = &config.fallback else {
            // request_filter answered every request when there is no fallback.
            return Err(Error::explain(
                ErrorType::InternalError,
                "no fallback configured",
            ));
        };
        Ok(Box::new(HttpPeer::new(
            fallback.addr,
            fallback.tls,
            fallback.host.clone(),
        )))
    }
}
