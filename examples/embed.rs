//! Embedding actiongate in your own Pingora proxy.
//!
//! The module answers Flashduty action paths from your `request_filter` and declines
//! everything else, which your proxy then handles as it always did (here: proxied to a
//! backend). The admin listener and the delivery dispatcher are added to your server.
//!
//! Run: `cargo run --example embed -- conf/actiongate.yaml 127.0.0.1:8000`
//! (listens on the config's first `listen` address; other paths go to 127.0.0.1:8000).

use std::net::SocketAddr;

use actiongate::lifecycle::set_shutdown_timing;
use actiongate::{ActionGate, Config};
use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

/// Your proxy, with actiongate inside.
pub struct MyProxy {
    pub gate: ActionGate,
    pub backend: SocketAddr,
}

#[async_trait]
impl ProxyHttp for MyProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<bool> {
        // actiongate first: it answers its action paths and returns false for anything else.
        if self.gate.handle(session.as_downstream_mut()).await? {
            return Ok(true);
        }
        // ... your own request filtering goes here ...
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }
}

/// Builds your server: your proxy on the config's first listen address, plus actiongate's
/// admin listener and dispatcher.
pub fn build(config: Config, backend: SocketAddr) -> Result<(Server, ActionGate), String> {
    let listen = config.listen.first().ok_or("no listen address")?.addr;
    let mut conf = ServerConf::default();
    // Without this, Pingora's defaults keep a drained process alive for 5 minutes.
    set_shutdown_timing(&mut conf, config.server.grace_period);
    let gate = ActionGate::new(config)?;
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        MyProxy {
            gate: gate.clone(),
            backend,
        },
    );
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    gate.add_services(&mut server)?;
    Ok((server, gate))
}

#[allow(dead_code)] // the integration test includes this file for `build` only
fn main() {
    env_logger::init();
    let mut args = std::env::args().skip(1);
    let (Some(conf), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: embed CONFIG.yaml BACKEND_ADDR");
        std::process::exit(2);
    };
    let config = Config::load(conf.as_ref()).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    let backend = backend.parse().unwrap_or_else(|e| {
        eprintln!("{backend}: {e}");
        std::process::exit(2);
    });
    let (server, gate) = build(config, backend).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    // Let SIGTERM/SIGINT drain actiongate's in-flight work before Pingora stops, and SIGHUP
    // reload actiongate's part of the config.
    let reload = ReloadActions {
        gate: gate.clone(),
        conf: conf.into(),
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(gate.drain_on_signal().on_hangup(reload)),
    });
}

/// SIGHUP: re-read the file and put its actions in force; keep the old ones if it is wrong.
struct ReloadActions {
    gate: ActionGate,
    conf: std::path::PathBuf,
}

#[async_trait]
impl actiongate::lifecycle::OnHangup for ReloadActions {
    async fn hangup(&self) {
        let result = match Config::load(&self.conf) {
            Ok(config) => self.gate.reload(config).await,
            Err(problems) => Err(problems.to_string()),
        };
        if let Err(why) = result {
            log::error!("reload refused: {why}");
        }
    }
}
