//! One MQTT connection (5 or 3.1.1) over TLS, framed with rumqttc's packet
//! codecs through [`crate::mqtt::wire`].
//!
//! hearth drives the QoS 2 exchange itself instead of using rumqttc's
//! `EventLoop`: that event loop writes PUBREL the moment PUBREC arrives,
//! before its caller can record PUBREC, and keeps in-flight state only in
//! memory. Here every packet is written only when the publisher says so,
//! after the store has committed what the packet implies.
//!
//! Timeouts measure progress, not totals: a write fails only when no byte
//! has moved for the I/O timeout (each write call is bounded, not the whole
//! packet), so a slow link that keeps moving is never cut for being slow.
//! rustls buffers at most [`TLS_BUFFER`] bytes, so a write call returns only
//! once the socket has taken bytes, and the final flush has little to push.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::Packet;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::mqtt::incoming::kind;
use crate::mqtt::wire::{self, Aliases, ConnAck, Connect, In, Out, Protocol, WireError};
use crate::watchdog::Beat;

/// Largest packet we send: a batch of readings must fit.
pub const MAX_OUTGOING: usize = 256 * 1024;
/// Longest each closing step may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes rustls holds before a write waits for the socket.
const TLS_BUFFER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot reach broker `{addr}`: {source}")]
    Tcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with `{host}` failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("broker refused the connection: {reason} (reason code 0x{code:02X})")]
    Refused { code: u8, reason: &'static str },
    #[error("broker closed the connection after our CONNECT, without a CONNACK")]
    ClosedOnConnect,
    #[error("broker answered CONNECT with a {0} packet, not CONNACK")]
    NoConnAck(&'static str),
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("broker closed the connection")]
    Closed,
    #[error("malformed packet from broker: {0}")]
    Protocol(WireError),
    #[error("cannot encode a packet: {0}")]
    Encode(WireError),
    #[error(
        "broker closed the connection with reason code 0x{code:02X} ({}){}",
        wire::reason_name(*code),
        reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
    )]
    Disconnected { code: u8, reason: Option<String> },
    #[error("no progress for {0:?}")]
    Timeout(Duration),
}

impl ConnectionError {
    /// The I/O error inside, which may carry a rustls error: the handshake's
    /// own, or (TLS 1.3) the broker's alert about our certificate, which
    /// arrives on the first read after the client finished its handshake.
    pub fn io(&self) -> Option<&std::io::Error> {
        match self {
            ConnectionError::Tcp { source, .. } | ConnectionError::Tls { source, .. } => {
                Some(source)
            }
            ConnectionError::Io(e) => Some(e),
            _ => None,
        }
    }
}

pub struct Connection {
    stream: TlsStream<TcpStream>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    io_timeout: Duration,
    protocol: Protocol,
    /// MQTT 5 topic aliases on this connection (none until CONNACK allows).
    aliases: Aliases,
    /// The watchdog's beat of the task that owns the connection: each write
    /// call announces its bound, so a slow link that keeps taking bytes
    /// keeps the promise, and one that stops does not for longer than that.
    beat: Option<Arc<Beat>>,
}

impl Connection {
    /// TCP, TLS, then an MQTT 3.1.1 CONNECT of the caller's making and its
    /// CONNACK; each step bounded by `io_timeout`. For clients that speak
    /// 3.1.1 packets themselves ([`Connection::send_v4`],
    /// [`Connection::read_v4`]), such as the tests' receiver.
    pub async fn open_v4(
        host: &str,
        port: u16,
        tls: Arc<ClientConfig>,
        connect: rumqttc::Connect,
        io_timeout: Duration,
    ) -> Result<(Connection, rumqttc::ConnAck), ConnectionError> {
        let mut conn = Self::handshake(host, port, tls, io_timeout, Protocol::V311).await?;
        conn.send_v4(&[Packet::Connect(connect)]).await?;
        match timeout(io_timeout, conn.read_v4()).await?? {
            Packet::ConnAck(ack) if ack.code == rumqttc::ConnectReturnCode::Success => {
                Ok((conn, ack))
            }
            Packet::ConnAck(ack) => Err(ConnectionError::Refused {
                code: ack.code as u8,
                reason: "refused",
            }),
            other => Err(ConnectionError::NoConnAck(kind(&other))),
        }
    }

    /// TCP and TLS only: the caller records what it must before CONNECT.
    pub async fn handshake(
        host: &str,
        port: u16,
        tls: Arc<ClientConfig>,
        io_timeout: Duration,
        protocol: Protocol,
    ) -> Result<Connection, ConnectionError> {
        let addr = format!("{host}:{port}");
        let tcp = timeout(io_timeout, TcpStream::connect(&addr))
            .await?
            .map_err(|source| ConnectionError::Tcp {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| ConnectionError::ServerName(host.to_owned()))?;
        let mut stream = timeout(io_timeout, TlsConnector::from(tls).connect(name, tcp))
            .await?
            .map_err(|source| ConnectionError::Tls {
                host: host.to_owned(),
                source,
            })?;
        stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
        Ok(Connection {
            stream,
            read_buf: BytesMut::with_capacity(4096),
            write_buf: BytesMut::with_capacity(4096),
            io_timeout,
            protocol,
            aliases: Aliases::default(),
            beat: None,
        })
    }

    /// The certificate chain the broker presented, leaf first.
    pub fn peer_chain(&self) -> Vec<CertificateDer<'static>> {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Lets writes keep `beat` (see [`crate::watchdog`]).
    pub fn set_beat(&mut self, beat: Arc<Beat>) {
        self.beat = Some(beat);
    }

    /// The MQTT version spoken.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Lets PUBLISHes use up to `max` topic aliases (the broker's Topic
    /// Alias Maximum from CONNACK).
    pub fn allow_aliases(&mut self, max: u16) {
        self.aliases = Aliases::new(max);
    }

    /// CONNECT, then waits for CONNACK.
    pub async fn connect(&mut self, connect: Connect) -> Result<ConnAck, ConnectionError> {
        self.send(&[Out::Connect(Box::new(connect))]).await?;
        self.connack().await
    }

    /// Waits (bounded by the I/O timeout) for the CONNACK to a CONNECT
    /// already written.
    pub async fn connack(&mut self) -> Result<ConnAck, ConnectionError> {
        match timeout(self.io_timeout, self.read()).await?? {
            In::ConnAck(ack) if ack.code == 0 => Ok(ack),
            In::ConnAck(ack) => Err(ConnectionError::Refused {
                code: ack.code,
                reason: ack.reason,
            }),
            other => Err(ConnectionError::NoConnAck(other.kind())),
        }
    }

    /// Next packet from the broker. Cancel-safe: bytes read so far stay in
    /// the buffer, so it may be dropped in a `select!`.
    pub async fn read(&mut self) -> Result<In, ConnectionError> {
        loop {
            // The fuzzed codec: bounded, split-independent.
            match wire::next_packet(self.protocol, &mut self.read_buf) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(ConnectionError::Protocol(e)),
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ConnectionError::Closed);
            }
        }
    }

    /// A packet already read and waiting in the buffer, without touching
    /// the socket: what arrived together with the last one.
    pub fn buffered(&mut self) -> Result<Option<In>, ConnectionError> {
        wire::next_packet(self.protocol, &mut self.read_buf).map_err(ConnectionError::Protocol)
    }

    /// Next MQTT 3.1.1 packet, whole (see [`Connection::open_v4`]).
    pub async fn read_v4(&mut self) -> Result<Packet, ConnectionError> {
        loop {
            match Packet::read(&mut self.read_buf, wire::MAX_INCOMING) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::Error::InsufficientBytes(n)) => self.read_buf.reserve(n),
                Err(e) => return Err(ConnectionError::Protocol(WireError(format!("{e:?}")))),
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ConnectionError::Closed);
            }
        }
    }

    /// Writes and flushes MQTT 3.1.1 packets (see [`Connection::open_v4`]).
    pub async fn send_v4(&mut self, packets: &[Packet]) -> Result<usize, ConnectionError> {
        self.write_buf.clear();
        for p in packets {
            p.write(&mut self.write_buf, MAX_OUTGOING)
                .map_err(|e| ConnectionError::Encode(WireError(format!("{e:?}"))))?;
        }
        self.flush_buf().await
    }

    /// Writes and flushes packets. Each write call is bounded by the I/O
    /// timeout, not the whole: a broker that stops reading stalls the
    /// gateway for at most that long, a slow link that keeps taking bytes
    /// never fails. Returns the bytes of MQTT written.
    pub async fn send(&mut self, packets: &[Out]) -> Result<usize, ConnectionError> {
        self.write_buf.clear();
        for p in packets {
            wire::write(
                self.protocol,
                p,
                &mut self.aliases,
                &mut self.write_buf,
                MAX_OUTGOING,
            )
            .map_err(ConnectionError::Encode)?;
        }
        self.flush_buf().await
    }

    /// Writes out `write_buf`, each write call bounded by the I/O timeout.
    async fn flush_buf(&mut self) -> Result<usize, ConnectionError> {
        let mut written = 0;
        while written < self.write_buf.len() {
            if let Some(beat) = &self.beat {
                beat.waiting(self.io_timeout);
            }
            let n = timeout(
                self.io_timeout,
                self.stream.write(&self.write_buf[written..]),
            )
            .await??;
            if n == 0 {
                return Err(ConnectionError::Closed);
            }
            written += n;
        }
        timeout(self.io_timeout, self.stream.flush()).await??;
        Ok(written)
    }

    /// Bytes written to the socket that the peer has not yet acknowledged
    /// (Linux `SIOCOUTQ`), or `None` where the kernel does not say. A queue
    /// that shrinks shows the link is moving even while no packet arrives,
    /// e.g. while one large PUBLISH crawls over a slow uplink.
    pub fn unsent(&self) -> Option<usize> {
        use std::os::fd::AsRawFd;
        let fd = self.stream.get_ref().0.as_raw_fd();
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one c_int through the pointer,
        // which points at a live c_int; `fd` is our open socket.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        (rc == 0).then(|| usize::try_from(queued).unwrap_or(0))
    }

    /// Sends DISCONNECT and closes TLS, within about a second; errors are
    /// irrelevant by then.
    pub async fn close(mut self) {
        self.io_timeout = self.io_timeout.min(CLOSE_TIMEOUT);
        let _ = self.send(&[Out::Disconnect]).await;
        let _ = timeout(self.io_timeout, self.stream.shutdown()).await;
    }
}

async fn timeout<T>(d: Duration, f: impl Future<Output = T>) -> Result<T, ConnectionError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| ConnectionError::Timeout(d))
}
