//! The daemon's small HTTP/1.1 server: `/metrics` and the status page, on
//! `--metrics-addr`.
//!
//! A few dozen lines over `std::net` rather than a crate, because the needs are
//! tiny and every byte a client sends is bounded here: one request per
//! connection (`Connection: close`), a head of at most [`MAX_HEAD`] bytes, a
//! body of at most [`MAX_BODY`], [`IO_TIMEOUT`] for the whole request, and at
//! most [`MAX_CONNECTIONS`] connections served at once, each on its own thread,
//! so a slow client never holds up a scrape, and nothing here ever touches the
//! FUSE or I/O threads. Malformed requests are answered with a 4xx and a reason.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Request line and headers.
pub const MAX_HEAD: usize = 8192;
/// The status page's POSTs carry no data; this is generous.
pub const MAX_BODY: usize = 4096;
/// For reading the whole request, and for each write of the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 16;
const MAX_HEADERS: usize = 64;

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The target's path, without the query.
    pub path: String,
    /// The raw query, without `?`.
    pub query: String,
    /// Names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }
}

/// What the handler answers; the server adds `Content-Length` and
/// `Connection: close`.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![
                ("Content-Type".into(), content_type.into()),
                ("Cache-Control".into(), "no-store".into()),
                ("X-Content-Type-Options".into(), "nosniff".into()),
            ],
            body: body.into(),
        }
    }

    /// A plain-text answer, e.g. the reason of a refusal, on one line.
    pub fn text(status: u16, msg: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{msg}\n"))
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The standard reason phrase of the codes this server uses.
fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Bind `--metrics-addr` before anything else starts, so that a port in use
/// stops the mount with one clear line.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot serve metrics and the status page on {addr} (MEMBRIDGE_METRICS_ADDR / --metrics-addr): {e}"
        )
    })
}

/// A request handler; called on the connection's own thread.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Serve `listener` from a thread of its own, for the life of the process.
pub fn serve(listener: TcpListener, handler: Handler) -> std::io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "http: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                    let busy = Response::text(503, "too many connections; try again");
                    let _ = write_response(&conn, "GET", &busy);
                    continue;
                }
                let (handler, active) = (handler.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            if let Err(e) = handle(conn, &*handler) {
                                tracing::debug!(error = %e, "http: request failed");
                            }
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    tracing::warn!("http: cannot start a connection thread");
                }
            }
        })?;
    Ok(())
}

fn handle(
    conn: TcpStream,
    handler: &(dyn Fn(&Request) -> Response + Send + Sync),
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = conn.peer_addr()?;
    let (method, resp) = match read_request(&conn, peer) {
        Ok(None) => return Ok(()),
        Ok(Some(req)) => (req.method.clone(), handler(&req)),
        Err(refusal) => (String::new(), refusal),
    };
    write_response(&conn, &method, &resp)?;
    // Let the client read the answer even if it is still sending (a refused
    // oversized request): closing with unread input would reset the
    // connection and could discard the response.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match (&conn).read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// Reads one request within [`IO_TIMEOUT`]. `Ok(None)`: the client closed
/// without sending anything. `Err`: the 4xx to answer.
pub fn read_request(mut conn: impl Read, peer: SocketAddr) -> Result<Option<Request>, Response> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(Response::text(
                431,
                &format!("request head larger than {MAX_HEAD} bytes"),
            ));
        }
        if Instant::now() > deadline {
            return Err(Response::text(408, "request not received in time"));
        }
        match conn.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Response::text(400, "incomplete request head")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Response::text(408, "request not received in time"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    };
    if head_end.0 > MAX_HEAD {
        return Err(Response::text(
            431,
            &format!("request head larger than {MAX_HEAD} bytes"),
        ));
    }
    let head = std::str::from_utf8(&buf[..head_end.0])
        .map_err(|_| Response::text(400, "request head is not UTF-8"))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => {
            return Err(Response::text(
                400,
                "malformed request line (expected METHOD /path HTTP/1.1)",
            ))
        }
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Response::text(400, "malformed method"));
    }
    if !target.starts_with('/') {
        return Err(Response::text(400, "the request target must be a path"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Response::text(400, "only HTTP/1.0 and HTTP/1.1"));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Response::text(400, "malformed header line"));
        };
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(Response::text(400, "malformed header name"));
        }
        if headers.len() == MAX_HEADERS {
            return Err(Response::text(431, "too many headers"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    if headers.iter().any(|(k, _)| k == "transfer-encoding") {
        return Err(Response::text(
            411,
            "chunked bodies are not accepted; send Content-Length",
        ));
    }
    let mut lengths = headers.iter().filter(|(k, _)| k == "content-length");
    let len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some((_, v)), None) => v
            .parse::<usize>()
            .map_err(|_| Response::text(400, "malformed Content-Length"))?,
        (Some(_), Some(_)) => return Err(Response::text(400, "more than one Content-Length")),
    };
    if len > MAX_BODY {
        return Err(Response::text(
            413,
            &format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    let mut body = buf[head_end.1..].to_vec();
    while body.len() < len {
        if Instant::now() > deadline {
            return Err(Response::text(408, "request body not received in time"));
        }
        match conn.read(&mut chunk) {
            Ok(0) => {
                return Err(Response::text(
                    400,
                    "request body shorter than Content-Length",
                ))
            }
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Response::text(408, "request body not received in time")),
        }
    }
    body.truncate(len);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
        peer,
    }))
}

/// Where the head ends (before the blank line) and the body starts.
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn write_response(mut conn: &TcpStream, method: &str, resp: &Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        conn.write_all(&resp.body)?;
    }
    conn.flush()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Request>, Response> {
        read_request(raw, "127.0.0.1:1".parse().unwrap())
    }

    fn refused(raw: &[u8]) -> (u16, String) {
        let r = parse(raw).unwrap_err();
        (r.status, String::from_utf8(r.body).unwrap())
    }

    #[test]
    fn parses_a_request_with_query_headers_and_body() {
        let r = parse(b"POST /api/x?token=a%2Bb&n=1 HTTP/1.1\r\nHost: h\r\nX-Membridge-Token: t\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/api/x"));
        assert_eq!(r.query_param("token").as_deref(), Some("a+b"));
        assert_eq!(r.query_param("n").as_deref(), Some("1"));
        assert_eq!(r.query_param("m"), None);
        assert_eq!(r.header("x-membridge-token"), Some("t"));
        assert_eq!(r.body, b"{}");
        // Bare LF line ends, HTTP/1.0.
        let r = parse(b"GET / HTTP/1.0\nHost: h\n\n").unwrap().unwrap();
        assert_eq!(r.path, "/");
        assert!(parse(b"").unwrap().is_none());
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        for (raw, code, why) in [
            (&b"GARBAGE\r\n\r\n"[..], 400, "malformed request line"),
            (b"get / HTTP/1.1\r\n\r\n", 400, "malformed method"),
            (b"GET http://x/ HTTP/1.1\r\n\r\n", 400, "must be a path"),
            (b"GET / HTTP/2\r\n\r\n", 400, "HTTP/1.0"),
            (
                b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                400,
                "malformed header",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                400,
                "Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
                "more than one",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
                413,
                "larger than",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
                "Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
                400,
                "shorter",
            ),
            (b"GET / HTTP/1.1\r\nHost: h", 400, "incomplete"),
        ] {
            let (status, body) = refused(raw);
            assert_eq!(status, code, "{raw:?}: {body}");
            assert!(body.contains(why), "{raw:?}: {body}");
        }
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(refused(&big).0, 431);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
