//! Upstream servers started by the tests: real HTTP/1.1 on loopback, answering by script and
//! recording every request they receive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request had fully arrived.
    pub at: std::time::Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::find_header(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("upstream body is JSON")
    }
}

/// How to answer a request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// Status, extra headers, body.
    Full(u16, Vec<(String, String)>, String),
    /// Read the request, then never answer.
    Hang,
    /// Answer with this status after a pause.
    Delayed(Duration, u16),
    /// Send a status line and part of the promised body, then close.
    CloseMidResponse,
}

type Script = dyn Fn(usize, &Received) -> Reply + Send + Sync;

pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Answers every request with 200.
    pub async fn ok() -> Upstream {
        Upstream::start(|_, _| Reply::Status(200)).await
    }

    /// Answers the n-th request (0-based, across connections) as `script` says.
    pub async fn start(
        script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Upstream::serve(listener, Arc::new(script))
    }

    /// Like `start`, on a given address (to bring an upstream back where it was).
    pub async fn start_on(
        addr: SocketAddr,
        script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        Upstream::serve(listener, Arc::new(script))
    }

    /// Like `start`, speaking HTTPS with `tls`.
    pub async fn start_tls(
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Upstream::serve_with(
            listener,
            Arc::new(script),
            Some(tokio_rustls::TlsAcceptor::from(tls)),
        )
    }

    fn serve(listener: TcpListener, script: Arc<Script>) -> Upstream {
        Upstream::serve_with(listener, script, None)
    }

    fn serve_with(
        listener: TcpListener,
        script: Arc<Script>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (r, a) = (received.clone(), arrived.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, r, a) = (script.clone(), r.clone(), a.clone());
                match tls.clone() {
                    None => {
                        tokio::spawn(connection(stream, script, r, a));
                    }
                    Some(acceptor) => {
                        tokio::spawn(async move {
                            // A failed handshake (e.g. the client refused our certificate) is
                            // the client's business; the test sees it in the gateway.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                connection(stream, script, r, a).await;
                            }
                        });
                    }
                }
            }
        });
        Upstream {
            addr,
            received,
            arrived,
            task,
        }
    }

    /// A URL on this upstream.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until at least `n` requests have arrived (panics after `limit`).
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!(
                    "upstream got {} requests, wanted {n}, within {limit:?}",
                    self.received().len()
                );
            }
        }
    }

    /// The distinct Idempotency-Keys received.
    pub fn idempotency_keys(&self) -> std::collections::BTreeSet<String> {
        self.received()
            .iter()
            .filter_map(|r| r.header("idempotency-key").map(str::to_string))
            .collect()
    }

    /// Stops accepting and closes the listening socket (open connections die with their tasks).
    pub async fn stop(self) {
        self.task.abort();
        // Awaiting the aborted task guarantees the listener is dropped before we return.
        let _ = self.task.await;
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    script: Arc<Script>,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let n = {
            let mut all = received.lock().expect("lock");
            all.push(request.clone());
            all.len() - 1
        };
        arrived.notify_waiters();
        let reply = script(n, &request);
        let bytes = match reply {
            Reply::Status(status) => format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n"),
            Reply::Full(status, headers, body) => {
                let mut text = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                for (k, v) in headers {
                    text.push_str(&format!("{k}: {v}\r\n"));
                }
                text.push_str("\r\n");
                text.push_str(&body);
                text
            }
            Reply::Delayed(pause, status) => {
                tokio::time::sleep(pause).await;
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n")
            }
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Reply::CloseMidResponse => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                    .await;
                return;
            }
        };
        if stream.write_all(bytes.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Received> {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let total = head_end + 4 + length;
    while buf.len() < total {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end + 4..total].to_vec();
    buf.drain(..total);
    Some(Received {
        method,
        path,
        headers,
        body,
        at: std::time::Instant::now(),
    })
}
