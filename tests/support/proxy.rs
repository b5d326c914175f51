//! A fault-injecting TCP proxy: the network between two real parts, for the
//! faults this machine's kernel cannot make (no `tc netem`, see
//! `notes/crates.md`). It forwards bytes both ways without looking at them,
//! so TLS passes through as it is.
//!
//! It runs on its own thread with its own tokio runtime; the controls are
//! plain methods that the (synchronous) test thread calls at any time.
//!
//! What each fault means, precisely:
//! - **cut** ([`FaultProxy::cut_now`], [`FaultProxy::cut_after_bytes`]):
//!   both sockets of a connection are closed with a TCP RST (`SO_LINGER`
//!   0), so both ends see `ECONNRESET`, not a clean end of stream, and TLS
//!   gets no `close_notify`. Bytes the proxy had read but not yet written
//!   are lost with it.
//! - **blackhole** ([`FaultProxy::blackhole`]): the proxy stops *reading*
//!   (it discards nothing). Each end's writes fill the kernel buffers and
//!   then block, as over a dead route; nothing is lost, so when the hole
//!   closes again a connection whose ends have not given up carries on. A
//!   chunk already read when the hole opens is held back until it closes.
//!   New connections are accepted but the upstream connection is made only
//!   once the hole closes: until then the upstream sees nothing at all.
//! - **delay** ([`FaultProxy::set_delay`]): each chunk waits that long
//!   before it is written. Chunks of one direction queue behind each
//!   other, so a delay also limits throughput to one chunk per delay.
//! - **bandwidth** ([`FaultProxy::set_bandwidth`]): each direction of each
//!   connection is paced to that many bytes per second, in chunks of about
//!   1/20 s worth.
//!
//! Bounded: each direction of a connection holds at most one chunk
//! ([`CHUNK`] bytes); the kernel's socket buffers hold the rest, and
//! backpressure reaches the sender.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The most a direction of a connection reads before writing it on.
pub const CHUNK: usize = 16 * 1024;
/// How long [`FaultProxy::cut_now`] waits for the connections to be closed.
const CUT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bandwidth pacing works in chunks of this fraction of a second's worth.
const PACING_SLICES_PER_SEC: u64 = 20;

/// Settings every forwarding direction looks at before each chunk.
#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    blackhole: bool,
    delay: Duration,
    bandwidth: Option<u64>,
}

pub struct FaultProxy {
    /// The port on 127.0.0.1 that clients connect to instead of upstream.
    pub port: u16,
    control: Arc<Control>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

/// What the test thread and the proxy's tasks share.
struct Control {
    settings: watch::Sender<Settings>,
    links: Mutex<Links>,
    /// Signalled whenever a link is closed and removed.
    closed: Condvar,
    accepted: AtomicUsize,
    /// Accepted connections that reached upstream.
    forwarded: AtomicUsize,
}

impl Control {
    /// The links, also after a panic elsewhere (a failed assertion must not
    /// turn into an abort when the proxy is dropped while unwinding).
    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Links {
    next_id: u64,
    open: HashMap<u64, Link>,
}

/// One accepted connection, as the controls see it.
struct Link {
    kill: CancellationToken,
    tripwire: Option<Arc<Tripwire>>,
}

/// A byte budget shared by the links that were open when
/// [`FaultProxy::cut_after_bytes`] was called; spending it cuts them all.
struct Tripwire {
    remaining: AtomicU64,
    kills: Vec<CancellationToken>,
}

impl Tripwire {
    /// Takes up to `wanted` bytes from the budget; returns how many may be
    /// written. Concurrent directions never take more than the budget.
    fn claim(&self, wanted: usize) -> usize {
        let wanted = wanted as u64;
        let mut granted = 0;
        let _ = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                granted = left.min(wanted);
                Some(left - granted)
            });
        granted as usize
    }

    fn spent(&self) -> bool {
        self.remaining.load(Ordering::SeqCst) == 0
    }

    fn fire(&self) {
        for kill in &self.kills {
            kill.cancel();
        }
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection
    /// to `upstream`, which need not be up yet: a connection that finds it
    /// down is reset.
    #[track_caller]
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = StdTcpListener::bind(("127.0.0.1", 0))
            .expect("cannot bind a port on 127.0.0.1 for the proxy");
        let port = listener.local_addr().expect("bound listener").port();
        listener
            .set_nonblocking(true)
            .expect("cannot make the proxy's listener non-blocking");
        let (settings, _) = watch::channel(Settings::default());
        let control = Arc::new(Control {
            settings,
            links: Mutex::new(Links::default()),
            closed: Condvar::new(),
            accepted: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
        });
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build the proxy's runtime");
        let thread = {
            let control = Arc::clone(&control);
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("proxy :{port} -> {upstream}"))
                .spawn(move || runtime.block_on(accept(listener, upstream, control, shutdown)))
                .expect("cannot start a thread")
        };
        FaultProxy {
            port,
            control,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Resets every open connection (both sides) and returns once they are
    /// closed. Connections made afterwards are not affected.
    #[track_caller]
    pub fn cut_now(&self) {
        let ids: Vec<u64> = {
            let links = self.control.links();
            for link in links.open.values() {
                link.kill.cancel();
            }
            links.open.keys().copied().collect()
        };
        self.wait_closed(&ids);
    }

    /// Resets the connections open now once `bytes` more bytes have been
    /// forwarded through them, counted together over all of them and both
    /// directions. Exactly `bytes` bytes pass: a chunk that would overrun
    /// the budget is written only in part. Replaces an earlier budget on
    /// those connections; connections made later are not affected. Returns
    /// at once; 0 cuts at once.
    #[track_caller]
    pub fn cut_after_bytes(&self, bytes: u64) {
        if bytes == 0 {
            self.cut_now();
            return;
        }
        let mut links = self.control.links();
        let tripwire = Arc::new(Tripwire {
            remaining: AtomicU64::new(bytes),
            kills: links.open.values().map(|link| link.kill.clone()).collect(),
        });
        for link in links.open.values_mut() {
            link.tripwire = Some(Arc::clone(&tripwire));
        }
    }

    /// On: nothing is read from either end of any connection, old or new,
    /// and new connections are not passed upstream (see the module
    /// comment). Off: everything held back flows again.
    pub fn blackhole(&self, on: bool) {
        self.control.settings.send_modify(|s| s.blackhole = on);
    }

    /// Holds every chunk `delay` before writing it; zero turns it off.
    pub fn set_delay(&self, delay: Duration) {
        self.control.settings.send_modify(|s| s.delay = delay);
    }

    /// Caps each direction of each connection to `bytes_per_sec`; `None`
    /// lifts the cap. `Some(0)` is taken as 1 byte per second.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        let bandwidth = bytes_per_sec.map(|bps| bps.max(1));
        self.control
            .settings
            .send_modify(|s| s.bandwidth = bandwidth);
    }

    /// Connections accepted since the start.
    pub fn connections(&self) -> usize {
        self.control.accepted.load(Ordering::SeqCst)
    }

    /// Connections that reached upstream since the start: unlike
    /// [`FaultProxy::connections`], not those reset because upstream was
    /// down, so it counts the connections a client really had.
    pub fn forwarded(&self) -> usize {
        self.control.forwarded.load(Ordering::SeqCst)
    }

    /// Connections accepted and not yet closed. A connection held in a
    /// blackhole counts until the hole closes, even if its client has gone
    /// (nothing reads from it meanwhile).
    pub fn active(&self) -> usize {
        self.control.links().open.len()
    }

    #[track_caller]
    fn wait_closed(&self, ids: &[u64]) {
        let deadline = Instant::now() + CUT_TIMEOUT;
        let mut links = self.control.links();
        while ids.iter().any(|id| links.open.contains_key(id)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "proxy :{} did not close its connections within {CUT_TIMEOUT:?}",
                self.port
            );
            links = self
                .control
                .closed
                .wait_timeout(links, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for FaultProxy {
    /// Stops listening and resets every connection.
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(
    listener: StdTcpListener,
    upstream: SocketAddr,
    control: Arc<Control>,
    shutdown: CancellationToken,
) {
    let listener = TcpListener::from_std(listener).expect("a non-blocking std listener");
    let tracker = TaskTracker::new();
    loop {
        let client = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                // Out of file descriptors and the like: try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = client.set_nodelay(true);
        control.accepted.fetch_add(1, Ordering::SeqCst);
        let kill = shutdown.child_token();
        let id = {
            let mut links = control.links();
            let id = links.next_id;
            links.next_id += 1;
            let link = Link {
                kill: kill.clone(),
                tripwire: None,
            };
            links.open.insert(id, link);
            id
        };
        let registered = Registered {
            id,
            control: Arc::clone(&control),
        };
        tracker.spawn(relay(client, upstream, kill, registered));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// A link's entry in [`Links`], removed (and [`FaultProxy::cut_now`] told)
/// when the link's task ends, whichever way it ends.
struct Registered {
    id: u64,
    control: Arc<Control>,
}

impl Registered {
    fn tripwire(&self) -> Option<Arc<Tripwire>> {
        let links = self.control.links();
        links
            .open
            .get(&self.id)
            .and_then(|link| link.tripwire.clone())
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.control.links().open.remove(&self.id);
        self.control.closed.notify_all();
    }
}

/// How a link ended.
enum End {
    /// Both directions reached end of stream: close normally.
    Clean,
    /// Cut, or one side failed: reset both sides.
    Abort,
}

/// One connection: waits out a blackhole, connects upstream, forwards
/// until both directions end or the link is cut. Sockets are dropped
/// before `registered`, so a returned `cut_now` means closed.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    kill: CancellationToken,
    registered: Registered,
) {
    let mut settings = registered.control.settings.subscribe();
    let connected = tokio::select! {
        _ = kill.cancelled() => None,
        upstream = async {
            open_path(&mut settings).await;
            TcpStream::connect(upstream).await.ok()
        } => upstream,
    };
    let Some(mut server) = connected else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    registered.control.forwarded.fetch_add(1, Ordering::SeqCst);
    let end = tokio::select! {
        _ = kill.cancelled() => End::Abort,
        end = forward(&mut client, &mut server, &registered) => end,
    };
    if let End::Abort = end {
        reset(&client);
        reset(&server);
    }
    drop((client, server));
    drop(registered);
}

/// Makes the coming close send RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn forward(client: &mut TcpStream, server: &mut TcpStream, registered: &Registered) -> End {
    let settings = registered.control.settings.subscribe();
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    let up = pump(client_read, server_write, settings.clone(), registered);
    let down = pump(server_read, client_write, settings, registered);
    match tokio::try_join!(up, down) {
        Ok(_) => End::Clean,
        Err(_) => End::Abort,
    }
}

/// Why a direction stopped early.
enum Stop {
    Io,
    Tripped,
}

/// One direction: read a chunk, apply the faults, write it on; pass the
/// end of stream on as a half-close.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut settings: watch::Receiver<Settings>,
    registered: &Registered,
) -> Result<(), Stop> {
    let mut buf = vec![0; CHUNK];
    let mut next_free = tokio::time::Instant::now();
    loop {
        open_path(&mut settings).await;
        let limit = match settings.borrow().bandwidth {
            Some(bps) => usize::try_from(bps / PACING_SLICES_PER_SEC)
                .unwrap_or(CHUNK)
                .clamp(1, CHUNK),
            None => CHUNK,
        };
        let n = from.read(&mut buf[..limit]).await.map_err(|_| Stop::Io)?;
        if n == 0 {
            return to.shutdown().await.map_err(|_| Stop::Io);
        }
        let delay = settings.borrow().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        open_path(&mut settings).await;
        let bandwidth = settings.borrow().bandwidth;
        if let Some(bps) = bandwidth {
            let start = next_free.max(tokio::time::Instant::now());
            tokio::time::sleep_until(start).await;
            next_free = start + Duration::from_secs_f64(n as f64 / bps as f64);
        }
        let tripwire = registered.tripwire();
        let allowed = tripwire.as_ref().map_or(n, |t| t.claim(n));
        to.write_all(&buf[..allowed]).await.map_err(|_| Stop::Io)?;
        if let Some(tripwire) = tripwire
            && tripwire.spent()
        {
            tripwire.fire();
            return Err(Stop::Tripped);
        }
    }
}

/// Returns once no blackhole is on. If the proxy is going away meanwhile
/// it never returns: the link's kill token ends it.
async fn open_path(settings: &mut watch::Receiver<Settings>) {
    if settings.wait_for(|s| !s.blackhole).await.is_err() {
        std::future::pending::<()>().await;
    }
}
