//! A deliberately small HTTP/1.1 client over std streams: the tests need to send malformed,
//! oversized and slow requests and see exactly what comes back, which real clients hide.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a client waits for the worker to answer before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lower-cased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, by `content-length`, or up to the end of the stream without one.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `x-sdcluster-worker` header: which worker answered.
    pub fn worker(&self) -> Option<&str> {
        self.header(sdcluster_worker::WORKER_HEADER.as_str())
    }

    /// Whether the server announced that it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a connection showed while the client waited: see [`Connection::peer_state`].
#[derive(Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Nothing arrived and the connection is still open.
    Silent,
    /// The server closed or reset it.
    Closed,
    /// These bytes arrived.
    Sent(Vec<u8>),
}

/// One client connection (TCP or Unix) that can send anything and read responses.
pub struct Connection<S: Read + Write> {
    stream: BufReader<S>,
}

impl Connection<TcpStream> {
    /// Connects to `addr` with [`IO_TIMEOUT`] on reads and writes.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self::new(stream))
    }

    /// Changes how long reads wait (for checks that nothing arrives).
    pub fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream.get_ref().set_read_timeout(Some(timeout))
    }
}

impl Connection<UnixStream> {
    /// Connects to the Unix socket at `path` with [`IO_TIMEOUT`] on reads and writes.
    pub fn connect_unix(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self::new(stream))
    }
}

impl<S: Read + Write> Connection<S> {
    /// Wraps a connected stream; set its timeouts first.
    pub fn new(stream: S) -> Self {
        Self { stream: BufReader::new(stream) }
    }

    /// Writes `raw` as is.
    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        let stream = self.stream.get_mut();
        stream.write_all(raw)?;
        stream.flush()
    }

    /// Sends `GET path`, keeping the connection open, without waiting for the answer.
    pub fn send_get(&mut self, path: &str) -> io::Result<()> {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
    }

    /// Sends `GET path` and reads the response; the connection stays open for more.
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.send_get(path)?;
        self.read_response()
    }

    /// Reads one response.
    pub fn read_response(&mut self) -> io::Result<Response> {
        let status_line = self.read_line()?;
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad header {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = Response { status, headers, body: Vec::new() };
        match response.header("content-length").map(str::parse::<usize>) {
            Some(Ok(length)) => {
                response.body.resize(length, 0);
                self.stream.read_exact(&mut response.body)?;
            }
            Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            None => {
                self.stream.read_to_end(&mut response.body)?;
            }
        }
        Ok(response)
    }

    /// What the server did with this connection within the stream's read timeout, for
    /// connections that should get no answer (yet).
    pub fn peer_state(&mut self) -> PeerState {
        let mut buf = [0; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => PeerState::Closed,
            Ok(n) => PeerState::Sent(buf[..n].to_vec()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => PeerState::Silent,
            Err(_) => PeerState::Closed,
        }
    }

    /// One CRLF-terminated line without its terminator; end of stream is an error.
    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a full response"));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// Sends `GET path` on a new connection with `Connection: close`; panics on I/O errors.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// Opens `n` connections to `addr` before sending anything on them: they are all accepted
/// side by side, so which worker serves each shows how the balance spreads a burst (one
/// request after another on fresh connections would mostly reach whichever worker is idle).
pub fn connect_burst(addr: SocketAddr, n: usize) -> Vec<Connection<TcpStream>> {
    (0..n).map(|_| Connection::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))).collect()
}

/// Sends `raw` on a new connection and reads one response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    let mut connection = Connection::connect(addr)?;
    connection.send(raw)?;
    connection.read_response()
}
