//! A raw HTTP/1.1 client over real sockets: it can bind a chosen loopback source address,
//! send bodies slowly or partially, and speak `Expect: 100-continue`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::find_header(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Connects to `to`, from `from` when given (e.g. 127.0.0.2 to play another source).
pub async fn connect(to: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(ip) = from {
        socket
            .bind(SocketAddr::new(ip, 0))
            .expect("bind source address");
    }
    socket.connect(to).await.expect("connect")
}

/// A request to build and send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// A POST of `body` as application/json.
    pub fn post_json(path: &str, body: &[u8]) -> Request {
        Request {
            method: "POST".into(),
            path: path.into(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_vec(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn without_header(mut self, name: &str) -> Request {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self
    }

    pub fn method(mut self, method: &str) -> Request {
        self.method = method.into();
        self
    }

    /// The request head; adds Content-Length unless the headers set a length or chunking.
    pub fn head(&self, host: SocketAddr) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {host}\r\n", self.method, self.path);
        let framed = self.headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
        });
        if !framed {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    /// Sends the whole request on a new connection and reads the answer.
    pub async fn send(&self, to: SocketAddr) -> Response {
        self.send_from(to, None).await
    }

    pub async fn send_from(&self, to: SocketAddr, from: Option<IpAddr>) -> Response {
        let mut stream = connect(to, from).await;
        let mut bytes = self.head(to);
        bytes.extend_from_slice(&self.body);
        stream.write_all(&bytes).await.expect("write request");
        read_response(&mut stream).await.expect("read response")
    }
}

/// Reads one response (headers, then a Content-Length body) within 10 s.
pub async fn read_response(stream: &mut TcpStream) -> Result<Response, String> {
    tokio::time::timeout(Duration::from_secs(10), read_response_inner(stream))
        .await
        .map_err(|_| "no response within 10s".to_string())?
}

async fn read_response_inner(stream: &mut TcpStream) -> Result<Response, String> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("connection closed after {} bytes", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    if (100..200).contains(&status) {
        // An interim response: the caller reads the final one separately.
        return Ok(Response {
            status,
            headers,
            body: Vec::new(),
        });
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .ok_or("response without Content-Length")?;
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed mid-body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// GET `path` (e.g. on the admin listener).
pub async fn get(to: SocketAddr, path: &str) -> Response {
    Request {
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
    }
    .send(to)
    .await
}

/// A request with no body, for the admin API.
pub async fn call(to: SocketAddr, method: &str, path: &str) -> Response {
    Request {
        method: method.into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
    }
    .send(to)
    .await
}

/// POSTs each body to `path` over `connections` keep-alive connections; returns the statuses.
pub async fn post_many(
    to: SocketAddr,
    path: &str,
    bodies: Vec<Vec<u8>>,
    connections: usize,
) -> Vec<u16> {
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    post_stream(to, path, bodies, connections, true, answered).await
}

/// POSTs each body to `path`, `connections` at a time, counting answers in `answered` as they
/// arrive (so that a test can act at a point in the stream). With `keep_alive`, each worker
/// uses one connection throughout; without, every request has a connection of its own.
/// Returns the statuses in the order of `bodies`; 0 stands for a transport error.
pub async fn post_stream(
    to: SocketAddr,
    path: &str,
    bodies: Vec<Vec<u8>>,
    connections: usize,
    keep_alive: bool,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<u16> {
    let queue = std::sync::Arc::new(std::sync::Mutex::new(
        bodies.into_iter().enumerate().rev().collect::<Vec<_>>(),
    ));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let queue = queue.clone();
        let answered = answered.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut kept: Option<TcpStream> = None;
            let mut statuses = Vec::new();
            loop {
                let next = queue.lock().expect("lock").pop();
                let Some((i, body)) = next else { break };
                let mut request = Request::post_json(&path, &body);
                if !keep_alive {
                    request = request.header("Connection", "close");
                }
                let mut bytes = request.head(to);
                bytes.extend_from_slice(&body);
                let reused = kept.take();
                let exchange = async {
                    let mut stream = match reused {
                        Some(stream) => stream,
                        None => TcpStream::connect(to).await.map_err(|e| e.to_string())?,
                    };
                    stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
                    let response = read_response(&mut stream).await?;
                    Ok::<_, String>((response.status, stream))
                };
                let status = match exchange.await {
                    Ok((status, stream)) => {
                        if keep_alive {
                            kept = Some(stream);
                        }
                        status
                    }
                    Err(_) => 0,
                };
                statuses.push((i, status));
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            statuses
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    all.sort();
    all.into_iter().map(|(_, s)| s).collect()
}
