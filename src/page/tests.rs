use super::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

/// The page's settings: a token file, if given; the default policy.
fn settings(token_file: Option<&str>) -> PageSettings {
    PageSettings {
        token_file: token_file.map(PathBuf::from),
        policy: Policy::Auto { candidate: true },
    }
}

/// A site on every address of this machine (no daemon behind it).
fn serve(cfg: &PageSettings) -> (Arc<Site>, u16) {
    let status = Status::for_tests("page-node");
    let site = Arc::new(Site::new(cfg, status).unwrap());
    let l = crate::http::bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = l.local_addr().unwrap().port();
    let h = site.clone();
    crate::http::serve(l, Arc::new(move |r| h.handle(r))).unwrap();
    (site, port)
}

/// Sends `raw` to `ip:port`; the status code and the body.
fn send(ip: IpAddr, port: u16, raw: &[u8]) -> (u16, String) {
    let mut c = TcpStream::connect(SocketAddr::new(ip, port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(raw).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    let code = s[9..12].parse().unwrap();
    let body = s
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

fn get(ip: IpAddr, port: u16, path: &str, extra: &str) -> (u16, String) {
    let host = SocketAddr::new(ip, port);
    send(
        ip,
        port,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").as_bytes(),
    )
}

fn post(port: u16, path: &str, extra: &str) -> (u16, String) {
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n{extra}\r\n"
    );
    send(LOCAL, port, raw.as_bytes())
}

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// An address of this machine that is not loopback, if it has one (a
/// client connecting to it comes from it).
fn non_loopback_v4() -> Option<IpAddr> {
    let mut found = None;
    // SAFETY: getifaddrs's list is only read, then freed once.
    unsafe {
        let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifa) != 0 {
            return None;
        }
        let mut cur = ifa;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            let up = (*cur).ifa_flags & libc::IFF_UP as u32 != 0;
            if up && !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && found.is_none() {
                    found = Some(IpAddr::V4(ip));
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifa);
    }
    found
}

fn token_of(page: &str) -> String {
    let at = page.find("name=\"membridge-token\" content=\"").unwrap();
    let rest = &page[at + "name=\"membridge-token\" content=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

#[test]
fn loopback_clients_get_the_page_state_and_metrics_and_bad_requests_a_reason() {
    let (_site, port) = serve(&settings(None));
    let (code, page) = get(LOCAL, port, "/", "");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<title>membridge</title>"), "{page}");
    let token = token_of(&page);
    assert_eq!(token.len(), 32, "{token}");
    assert!(!page.contains(TOKEN_SLOT));
    let (code, state) = get(LOCAL, port, "/api/state", "");
    assert_eq!(code, 200, "{state}");
    let v: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(v["node"]["id"], "page-node");
    assert_eq!(v["ready"], false);
    assert_eq!(v["node"]["lease"]["state"], "starting");
    let (code, metrics) = get(LOCAL, port, "/metrics", "");
    assert_eq!(code, 200);
    assert!(metrics.contains("membridge_info{"), "{metrics}");

    for (code, body, (want, why)) in [
        (get(LOCAL, port, "/", "").0, String::new(), (200, "")),
        {
            let (c, b) = send(
                LOCAL,
                port,
                b"GET / HTTP/1.1\r\nHost: rebind.example:80\r\n\r\n",
            );
            (c, b, (403, "DNS rebinding"))
        },
        {
            let (c, b) = send(LOCAL, port, b"GET / HTTP/1.0\r\n\r\n");
            (c, b, (400, "missing Host"))
        },
        {
            let (c, b) = post(port, "/api/release", "");
            (c, b, (401, "missing X-Membridge-Token"))
        },
        {
            let (c, b) = post(port, "/api/make-primary", "X-Membridge-Token: nope\r\n");
            (c, b, (403, "bad token"))
        },
        {
            let h = format!("X-Membridge-Token: {token}\r\nOrigin: http://evil.example\r\n");
            let (c, b) = post(port, "/api/make-primary", &h);
            (c, b, (403, "cross-origin"))
        },
        {
            let (c, b) = post(
                port,
                "/api/release",
                &format!("X-Membridge-Token: {token}\r\n"),
            );
            (c, b, (503, "still starting"))
        },
        {
            let (c, b) = get(LOCAL, port, "/api/release", "");
            (c, b, (405, "use POST"))
        },
        {
            let (c, b) = post(port, "/", &format!("X-Membridge-Token: {token}\r\n"));
            (c, b, (405, "use GET"))
        },
        {
            let (c, b) = get(LOCAL, port, "/nope", "");
            (c, b, (404, "status page at /"))
        },
        {
            let (c, b) = send(LOCAL, port, b"BLAH\r\n\r\n");
            (c, b, (400, "malformed request line"))
        },
        {
            let mut raw = format!("POST /api/release HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n\r\n").into_bytes();
            raw.extend(std::iter::repeat_n(b'x', 100_000));
            let (c, b) = send(LOCAL, port, &raw);
            (c, b, (413, "larger than"))
        },
    ] {
        assert_eq!(code, want, "{body}");
        assert!(body.contains(why), "{code}: {body}");
    }
}

#[test]
fn other_hosts_are_refused_unless_a_token_file_is_configured() {
    let Some(ip) = non_loopback_v4() else {
        eprintln!("skipped: this machine has no non-loopback IPv4 address to come from");
        return;
    };
    let (_site, port) = serve(&settings(None));
    let (code, body) = get(ip, port, "/", "");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("loopback clients only") && body.contains(&ip.to_string()),
        "{body}"
    );
    assert_eq!(get(ip, port, "/api/state", "").0, 403);
    // Even with the daemon's own token (as seen on this machine).
    let token = token_of(&get(LOCAL, port, "/", "").1);
    let header = format!("X-Membridge-Token: {token}\r\n");
    assert_eq!(get(ip, port, "/api/state", &header).0, 403);
    let raw = format!("POST /api/release HTTP/1.1\r\nHost: {ip}:{port}\r\n{header}\r\n");
    assert_eq!(send(ip, port, raw.as_bytes()).0, 403);
    // Metrics stay open, as they were.
    assert_eq!(get(ip, port, "/metrics", "").0, 200);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "0123456789abcdef-page\n").unwrap();
    let cfg = settings(file.to_str());
    let (_site, port) = serve(&cfg);
    let (code, body) = get(ip, port, "/", "");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("?token="), "{body}");
    assert_eq!(get(ip, port, "/?token=wrong-token-value", "").0, 403);
    let (code, page) = get(ip, port, "/?token=0123456789abcdef-page", "");
    assert_eq!(code, 200, "{page}");
    assert_eq!(token_of(&page), "0123456789abcdef-page");
    let (code, state) = get(
        ip,
        port,
        "/api/state",
        "X-Membridge-Token: 0123456789abcdef-page\r\n",
    );
    assert_eq!(code, 200, "{state}");
    // Loopback clients get the file's token in the page.
    assert_eq!(
        token_of(&get(LOCAL, port, "/", "").1),
        "0123456789abcdef-page"
    );
}

#[test]
fn a_bad_token_file_stops_the_daemon_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [("short", "abc"), ("spaces", "0123456789 abcdef 0123")] {
        let file = dir.path().join(name);
        std::fs::write(&file, body).unwrap();
        let cfg = settings(file.to_str());
        let status = Status::for_tests("page-node");
        let e = Site::new(&cfg, status).err().unwrap().to_string();
        assert!(
            e.contains("16 to 512 printable") && !e.contains('\n'),
            "{e}"
        );
    }
    let cfg = settings(Some("/nonexistent/token"));
    let status = Status::for_tests("page-node");
    let e = format!("{:#}", Site::new(&cfg, status).err().unwrap());
    assert!(e.contains("/nonexistent/token"), "{e}");
}

#[test]
fn loopback_host_names() {
    for h in [
        "127.0.0.1:9464",
        "127.0.0.1",
        "localhost:1",
        "LOCALHOST",
        "[::1]:9464",
        "127.1.2.3:80",
    ] {
        assert!(is_loopback_host(h), "{h}");
    }
    for h in [
        "example.com",
        "192.0.2.2:9464",
        "localhost.evil.com:80",
        "[::2]:1",
        "",
    ] {
        assert!(!is_loopback_host(h), "{h}");
    }
    assert!(same_token("abc", "abc") && !same_token("abd", "abc") && !same_token("ab", "abc"));
}
