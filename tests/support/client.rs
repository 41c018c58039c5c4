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
    let bodies = std::sync::Arc::new(bodies);
    let stream = Stream::new(to, path, connections, bodies.len());
    stream.run(move |i| bodies[i].clone()).await
}

/// A stream of POSTs that a test can watch (`answered`) and stop (`stop`) while it runs.
pub struct Stream {
    pub to: SocketAddr,
    pub path: String,
    pub connections: usize,
    /// Each worker keeps one connection throughout; otherwise every request has its own.
    pub keep_alive: bool,
    /// At most this many requests.
    pub limit: usize,
    /// Answers (or transport errors) so far.
    pub answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Set to end the stream early; the requests sent are then a prefix of `0..limit`.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What went wrong with the requests answered 0, for the failure message.
    pub errors: std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>,
    /// The longest exchange, connect to answer, in microseconds (reported, never asserted).
    pub slowest_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Stream {
    pub fn new(to: SocketAddr, path: &str, connections: usize, limit: usize) -> Stream {
        Stream {
            to,
            path: path.to_string(),
            connections,
            keep_alive: true,
            limit,
            answered: Default::default(),
            stop: Default::default(),
            errors: Default::default(),
            slowest_us: Default::default(),
        }
    }

    /// Sends `body(i)` for i in 0.., until `limit` or `stop`; returns the statuses in order of
    /// `i`, 0 standing for a transport error.
    pub async fn run(self, body: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static) -> Vec<u16> {
        use std::sync::atomic::Ordering;
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = std::sync::Arc::new(body);
        let mut tasks = Vec::new();
        for _ in 0..self.connections {
            let (next, body) = (next.clone(), body.clone());
            let (answered, stop) = (self.answered.clone(), self.stop.clone());
            let (errors, slowest_us) = (self.errors.clone(), self.slowest_us.clone());
            let (to, path, keep_alive, limit) =
                (self.to, self.path.clone(), self.keep_alive, self.limit);
            tasks.push(tokio::spawn(async move {
                let mut kept: Option<TcpStream> = None;
                let mut statuses = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= limit {
                        break;
                    }
                    let body = body(i);
                    let mut request = Request::post_json(&path, &body);
                    if !keep_alive {
                        request = request.header("Connection", "close");
                    }
                    let mut bytes = request.head(to);
                    bytes.extend_from_slice(&body);
                    let reused = kept.take();
                    let started = std::time::Instant::now();
                    let exchange = async {
                        let mut stream = match reused {
                            Some(stream) => stream,
                            None => TcpStream::connect(to).await.map_err(|e| e.to_string())?,
                        };
                        stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
                        let response = read_response(&mut stream).await?;
                        Ok::<_, String>((response.status, stream))
                    };
                    let result = exchange.await;
                    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    slowest_us.fetch_max(took, Ordering::SeqCst);
                    let status = match result {
                        Ok((status, stream)) => {
                            if keep_alive {
                                kept = Some(stream);
                            }
                            status
                        }
                        Err(e) => {
                            errors.lock().expect("lock").push((i, e));
                            0
                        }
                    };
                    statuses.push((i, status));
                    answered.fetch_add(1, Ordering::SeqCst);
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
}
