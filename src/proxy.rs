//! The stand-alone gateway's proxy: actions answered by the module, everything else proxied
//! to the `fallback`, or `404 unknown_action` when there is none.

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_proxy::{ProxyHttp, Session};

use crate::config::Fallback;
use crate::ActionGate;

pub struct EdgeProxy {
    pub gate: ActionGate,
}

impl EdgeProxy {
    /// The fallback in force (a reload may change it).
    fn fallback(&self) -> Option<Fallback> {
        self.gate.config().fallback.clone()
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<bool> {
        if self.gate.handle(session.as_downstream_mut()).await? {
            return Ok(true);
        }
        if self.fallback().is_none() {
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
        let Some(fallback) = self.fallback() else {
            // request_filter answered every request when there is no fallback.
            return Err(Error::explain(
                ErrorType::InternalError,
                "no fallback configured",
            ));
        };
        Ok(Box::new(HttpPeer::new(
            fallback.addr,
            fallback.tls,
            fallback.host,
        )))
    }
}
