//! One MQTT 3.1.1 connection over TLS, framed with rumqttc's packet codec.
//!
//! hearth drives the QoS 2 exchange itself instead of using rumqttc's
//! `EventLoop`: that event loop writes PUBREL the moment PUBREC arrives,
//! before its caller can record PUBREC, and keeps in-flight state only in
//! memory. Here every packet is written only when the publisher says so,
//! after the store has committed what the packet implies.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Largest packet we accept from the broker (we only get small acks).
const MAX_INCOMING: usize = 64 * 1024;
/// Largest packet we send: a batch of readings must fit.
pub const MAX_OUTGOING: usize = 256 * 1024;
/// Longest each closing step may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

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
    #[error("broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("broker answered CONNECT with {0:?}, not CONNACK")]
    NoConnAck(Box<Packet>),
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("broker closed the connection")]
    Closed,
    #[error("malformed packet from broker: {0:?}")]
    Protocol(rumqttc::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

pub struct Connection {
    stream: TlsStream<TcpStream>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    io_timeout: Duration,
}

impl Connection {
    /// TCP, TLS, CONNECT, CONNACK; each step bounded by `io_timeout`.
    pub async fn open(
        host: &str,
        port: u16,
        tls: Arc<ClientConfig>,
        connect: Connect,
        io_timeout: Duration,
    ) -> Result<(Connection, ConnAck), ConnectionError> {
        let mut conn = Self::handshake(host, port, tls, io_timeout).await?;
        let ack = conn.connect(connect).await?;
        Ok((conn, ack))
    }

    /// TCP and TLS only: the caller records what it must before CONNECT.
    pub async fn handshake(
        host: &str,
        port: u16,
        tls: Arc<ClientConfig>,
        io_timeout: Duration,
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
        let stream = timeout(io_timeout, TlsConnector::from(tls).connect(name, tcp))
            .await?
            .map_err(|source| ConnectionError::Tls {
                host: host.to_owned(),
                source,
            })?;
        Ok(Connection {
            stream,
            read_buf: BytesMut::with_capacity(4096),
            write_buf: BytesMut::with_capacity(4096),
            io_timeout,
        })
    }

    /// CONNECT, then waits for CONNACK.
    pub async fn connect(&mut self, connect: Connect) -> Result<ConnAck, ConnectionError> {
        self.send(&[Packet::Connect(connect)]).await?;
        match timeout(self.io_timeout, self.read()).await?? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(ack),
            Packet::ConnAck(ack) => Err(ConnectionError::Refused(ack.code)),
            other => Err(ConnectionError::NoConnAck(Box::new(other))),
        }
    }

    /// Next packet from the broker. Cancel-safe: bytes read so far stay in
    /// the buffer, so it may be dropped in a `select!`.
    pub async fn read(&mut self) -> Result<Packet, ConnectionError> {
        loop {
            match Packet::read(&mut self.read_buf, MAX_INCOMING) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::Error::InsufficientBytes(n)) => self.read_buf.reserve(n),
                Err(e) => return Err(ConnectionError::Protocol(e)),
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ConnectionError::Closed);
            }
        }
    }

    /// Writes and flushes packets, bounded by the I/O timeout (a broker that
    /// stops reading must not stall the gateway).
    pub async fn send(&mut self, packets: &[Packet]) -> Result<(), ConnectionError> {
        self.write_buf.clear();
        for p in packets {
            p.write(&mut self.write_buf, MAX_OUTGOING)
                .map_err(ConnectionError::Protocol)?;
        }
        let io = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        };
        timeout(self.io_timeout, io).await??;
        Ok(())
    }

    /// Sends DISCONNECT and closes TLS, within about a second; errors are
    /// irrelevant by then.
    pub async fn close(mut self) {
        self.io_timeout = self.io_timeout.min(CLOSE_TIMEOUT);
        let _ = self.send(&[Packet::Disconnect]).await;
        let _ = timeout(self.io_timeout, self.stream.shutdown()).await;
    }
}

async fn timeout<T>(d: Duration, f: impl Future<Output = T>) -> Result<T, ConnectionError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| ConnectionError::Timeout(d))
}
