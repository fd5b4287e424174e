//! `hodei-probe ADDR PATH...`: GETs each PATH (`/healthz`, `/readyz`) from the service's
//! metrics server at ADDR and exits 0 only if every answer is `200`. It is the health check of
//! the container images, which have no shell or HTTP client (see `scripts/build-images.sh`).
//! Exit codes: 0 healthy, 1 unhealthy or unreachable, 2 usage.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// How long one probe may take to connect, and then to be answered.
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((addr, paths)) = args.split_first().filter(|(_, paths)| !paths.is_empty()) else {
        eprintln!("usage: hodei-probe HOST:PORT PATH... (e.g. 127.0.0.1:9090 /healthz /readyz)");
        return ExitCode::from(2);
    };
    let Some(addr) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        eprintln!("hodei-probe: {addr} is not an address");
        return ExitCode::from(2);
    };
    for path in paths {
        match status(addr, path) {
            Ok(200) => {}
            Ok(code) => {
                eprintln!("hodei-probe: {path} answered {code}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("hodei-probe: {path}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// The HTTP status code of `GET path` (HTTP/1.0: the server closes after answering).
fn status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut read = 0;
    // The status line, `HTTP/1.x NNN ...`, is in the first bytes of the answer.
    while read < 12 {
        match stream.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    std::str::from_utf8(&head[..read])
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line in the answer"))
}
