//! Proves the fault kit before the chaos test leans on it: the
//! [`FaultProxy`] against a plain TCP echo server, the exactly-once
//! [`Receiver`] against a real mosquitto (directly and through the proxy),
//! and the receiver rules ([`Inbox`]) on their own.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hearth::certs::DevCerts;

use crate::support::mosquitto::HOST;
use crate::support::receiver::{Inbox, Verdict};
use crate::support::{FaultProxy, Mosquitto, Received, Receiver, TestDir, wait_for};

const WAIT: Duration = Duration::from_secs(10);
/// How long a read must stay empty to count as stalled.
const STALL: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// FaultProxy

/// A plain TCP echo server on 127.0.0.1, one thread per connection.
struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start() -> EchoServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind echo server");
        let addr = listener.local_addr().expect("echo server address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (Arc::clone(&accepted), Arc::clone(&stop));
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let Ok(mut back) = stream.try_clone() else {
                            return;
                        };
                        let _ = std::io::copy(&mut stream, &mut back);
                        let _ = back.shutdown(Shutdown::Write);
                    });
                }
            })
        };
        EchoServer {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream
}

/// Writes `data` and reads as much back, with the read timeout set.
fn round_trip(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(data)?;
    let mut back = vec![0; data.len()];
    stream.read_exact(&mut back)?;
    Ok(back)
}

/// Bytes that are not all alike, so a reordering would show.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Reads until end of stream or an error; returns what came and how it ended.
fn read_to_end_or_error(stream: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(err) => return (got, Err(err)),
        }
    }
}

fn is_stall(err: &std::io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn support_kit_proxy_forwards_both_ways_byte_for_byte() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    let writer = {
        let mut client = client.try_clone().expect("clone");
        std::thread::spawn(move || client.write_all(&pattern(1 << 20)))
    };
    let mut back = vec![0; 1 << 20];
    client
        .read_exact(&mut back)
        .expect("echo through the proxy");
    writer
        .join()
        .expect("writer")
        .expect("write through the proxy");
    assert!(back == pattern(1 << 20), "bytes changed on the way");
    assert_eq!((proxy.connections(), proxy.active()), (1, 1));

    // A half-close is passed on: the echo server sees the end and closes.
    client.shutdown(Shutdown::Write).expect("half-close");
    let (rest, end) = read_to_end_or_error(&mut client);
    assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
    wait_for(WAIT, "the proxy to close the link", || {
        (proxy.active() == 0).then_some(())
    });
}

#[test]
fn support_kit_proxy_cut_now_resets_the_client() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    assert_eq!(round_trip(&mut client, b"ping").expect("echo"), b"ping");

    proxy.cut_now();
    assert_eq!(proxy.active(), 0, "closed by the time cut_now returns");
    let (got, end) = read_to_end_or_error(&mut client);
    assert!(got.is_empty(), "{got:?}");
    let err = end.expect_err("a cut is a reset, not an end of stream");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);

    // The proxy itself still works.
    let mut again = connect(&proxy);
    assert_eq!(round_trip(&mut again, b"pong").expect("echo"), b"pong");
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn support_kit_proxy_cut_after_bytes_counts_both_directions() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    assert_eq!(round_trip(&mut client, b"warm").expect("echo"), b"warm");

    // 100 bytes up, then 50 of the 100 echoed ones down, then the cut.
    proxy.cut_after_bytes(150);
    client.write_all(&pattern(100)).expect("write");
    let (got, end) = read_to_end_or_error(&mut client);
    assert_eq!(got, pattern(50));
    assert_eq!(end.expect_err("reset").kind(), ErrorKind::ConnectionReset);
    wait_for(WAIT, "the link to be closed", || {
        (proxy.active() == 0).then_some(())
    });

    // A later connection is not affected.
    let mut later = connect(&proxy);
    assert_eq!(
        round_trip(&mut later, &pattern(500)).expect("echo"),
        pattern(500)
    );
}

#[test]
fn support_kit_proxy_blackhole_stalls_and_new_connections_work_after_it() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut old = connect(&proxy);
    assert_eq!(round_trip(&mut old, b"before").expect("echo"), b"before");

    proxy.blackhole(true);
    old.set_read_timeout(Some(STALL)).expect("read timeout");
    let err = round_trip(&mut old, b"held").expect_err("nothing passes");
    assert!(is_stall(&err), "{err:?}");

    // Accepted, but not passed upstream.
    let mut stalled = connect(&proxy);
    stalled.set_read_timeout(Some(STALL)).expect("read timeout");
    let err = round_trip(&mut stalled, b"new").expect_err("nothing passes");
    assert!(is_stall(&err), "{err:?}");
    assert_eq!((proxy.connections(), echo.accepted()), (2, 1));

    proxy.blackhole(false);
    let mut fresh = connect(&proxy);
    assert_eq!(round_trip(&mut fresh, b"after").expect("echo"), b"after");

    // Nothing was thrown away: what waited in the hole comes through.
    let mut held = [0; 4];
    old.set_read_timeout(Some(WAIT)).expect("read timeout");
    old.read_exact(&mut held).expect("held bytes");
    assert_eq!(&held, b"held");
    stalled.set_read_timeout(Some(WAIT)).expect("read timeout");
    stalled.read_exact(&mut held[..3]).expect("held bytes");
    assert_eq!(&held[..3], b"new");
}

#[test]
fn support_kit_proxy_delay_is_applied_per_chunk() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    assert_eq!(round_trip(&mut client, b"warm").expect("echo"), b"warm");

    proxy.set_delay(Duration::from_millis(200));
    let start = Instant::now();
    assert_eq!(round_trip(&mut client, b"slow").expect("echo"), b"slow");
    let took = start.elapsed();
    // One chunk each way.
    assert!(
        (Duration::from_millis(400)..Duration::from_millis(1500)).contains(&took),
        "{took:?}"
    );

    proxy.set_delay(Duration::ZERO);
    let start = Instant::now();
    assert_eq!(round_trip(&mut client, b"fast").expect("echo"), b"fast");
    assert!(start.elapsed() < Duration::from_millis(200));
}

#[test]
fn support_kit_proxy_bandwidth_cap_roughly_holds() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    proxy.set_bandwidth(Some(100_000));
    let mut client = connect(&proxy);
    const LEN: usize = 200_000;
    let start = Instant::now();
    let writer = {
        let mut client = client.try_clone().expect("clone");
        std::thread::spawn(move || client.write_all(&pattern(LEN)))
    };
    let mut back = vec![0; LEN];
    client.read_exact(&mut back).expect("echo");
    let took = start.elapsed();
    writer.join().expect("writer").expect("write");
    assert!(back == pattern(LEN), "bytes changed on the way");
    // Up and down are paced separately but overlap: about 2 s in all.
    assert!(
        (Duration::from_millis(1700)..Duration::from_millis(3000)).contains(&took),
        "{took:?}"
    );

    proxy.set_bandwidth(None);
    let start = Instant::now();
    assert_eq!(
        round_trip(&mut client, &pattern(LEN)).expect("echo"),
        pattern(LEN)
    );
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[test]
fn support_kit_proxy_drop_resets_its_connections() {
    let echo = EchoServer::start();
    let proxy = FaultProxy::start(echo.addr);
    let mut client = connect(&proxy);
    assert_eq!(round_trip(&mut client, b"ping").expect("echo"), b"ping");
    let addr = proxy.addr();
    drop(proxy);
    let (_, end) = read_to_end_or_error(&mut client);
    assert_eq!(end.expect_err("reset").kind(), ErrorKind::ConnectionReset);
    assert!(TcpStream::connect(addr).is_err(), "no longer listening");
}

// ---------------------------------------------------------------------------
// Inbox: the receiver rules on their own

fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

#[test]
fn support_kit_inbox_holds_a_packet_id_until_pubrel() {
    let mut inbox = Inbox::default();
    assert_eq!(inbox.publish(1, false, "t", &bytes("a")), Verdict::Deliver);
    assert_eq!(inbox.publish(1, true, "t", &bytes("a")), Verdict::Held);
    assert_eq!(inbox.held(), 1);
    assert!(inbox.release(1));
    assert!(!inbox.release(1), "a second PUBREL finds nothing held");
    assert_eq!(inbox.publish(1, false, "t", &bytes("b")), Verdict::Deliver);
}

#[test]
fn support_kit_inbox_recognises_only_an_exact_dup_of_the_last_completed() {
    let mut inbox = Inbox::default();
    assert_eq!(inbox.publish(7, false, "t", &bytes("a")), Verdict::Deliver);
    inbox.release(7);
    assert_eq!(
        inbox.publish(7, true, "t", &bytes("a")),
        Verdict::BrokerRetransmission
    );
    // DUP=0 is always new, and so is any other topic or payload.
    assert_eq!(inbox.publish(7, true, "t", &bytes("b")), Verdict::Deliver);
    inbox.release(7);
    assert_eq!(inbox.publish(7, true, "u", &bytes("b")), Verdict::Deliver);
    inbox.release(7);
    assert_eq!(inbox.publish(7, false, "u", &bytes("b")), Verdict::Deliver);
    inbox.release(7);
    // Another id never matches.
    assert_eq!(inbox.publish(8, true, "u", &bytes("b")), Verdict::Deliver);
}

#[test]
fn support_kit_inbox_forgets_everything_with_the_session() {
    let mut inbox = Inbox::default();
    inbox.publish(1, false, "t", &bytes("a"));
    inbox.publish(2, false, "t", &bytes("b"));
    inbox.release(2);
    inbox.session_lost();
    assert_eq!(inbox.held(), 0);
    assert_eq!(inbox.publish(1, true, "t", &bytes("a")), Verdict::Deliver);
    assert_eq!(inbox.publish(2, true, "t", &bytes("b")), Verdict::Deliver);
}

// ---------------------------------------------------------------------------
// Receiver against mosquitto

const TOPIC: &str = "t/kit";
const SENTINEL: &str = "t/sentinel";

/// A broker with its own PKI in a fresh directory.
fn broker() -> (TestDir, DevCerts, Mosquitto) {
    let dir = TestDir::new();
    let certs = DevCerts::generate(&dir.subdir("certs"), "gw-kit").expect("dev certs");
    let broker = Mosquitto::start(&dir.join("broker"), &certs);
    (dir, certs, broker)
}

/// Publishes with mosquitto_pub (QoS 2, gateway certificate) and insists
/// that the broker took it.
#[track_caller]
fn publish(broker: &Mosquitto, certs: &DevCerts, topic: &str, payload: &str) {
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", HOST, "-p", &broker.port.to_string(), "-q", "2"])
        .arg("--cafile")
        .arg(&certs.ca_cert)
        .arg("--cert")
        .arg(&certs.gateway_cert)
        .arg("--key")
        .arg(&certs.gateway_key)
        .args(["-t", topic, "-m", payload])
        .output()
        .expect("cannot run `mosquitto_pub`");
    assert!(
        out.status.success(),
        "mosquitto_pub to `{topic}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_tail(20)
    );
}

/// Publishes a sentinel, waits for it and returns all payloads delivered on
/// [`TOPIC`]. The broker keeps a session's order, so a duplicate of an
/// earlier message would show before the sentinel.
#[track_caller]
fn until_sentinel(broker: &Mosquitto, certs: &DevCerts, receiver: &Receiver) -> Vec<String> {
    static SENTINELS: AtomicU32 = AtomicU32::new(0);
    let sentinel = format!("sentinel {}", SENTINELS.fetch_add(1, Ordering::Relaxed));
    publish(broker, certs, SENTINEL, &sentinel);
    let arrived = receiver.wait_until(WAIT, |got| {
        got.iter().any(|r| r.payload == sentinel.as_bytes())
    });
    assert!(
        arrived,
        "no `{sentinel}`\n{}\n{}",
        receiver.transcript(),
        broker.log_tail(30)
    );
    let got: Vec<Received> = receiver.deliveries();
    assert!(got.iter().all(|r| r.qos == 2 && !r.retain), "{got:?}");
    got.iter()
        .filter(|r| r.topic == TOPIC)
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

#[test]
fn support_kit_receiver_gets_each_message_once() {
    let (_dir, certs, broker) = broker();
    let receiver = Receiver::start(HOST, broker.port, &certs, "kit-once", &["t/#"]);
    for n in 0..5 {
        publish(&broker, &certs, TOPIC, &format!("m{n}"));
    }
    assert_eq!(
        until_sentinel(&broker, &certs, &receiver),
        ["m0", "m1", "m2", "m3", "m4"]
    );
    assert_eq!(receiver.connects(), 1);
    assert_eq!(receiver.broker_retransmissions(), 0);
    assert_eq!(receiver.held_redeliveries(), 0);
}

#[test]
fn support_kit_receiver_keeps_receiving_after_a_broker_restart() {
    let (_dir, certs, mut broker) = broker();
    let receiver = Receiver::start(HOST, broker.port, &certs, "kit-restart", &["t/#"]);
    publish(&broker, &certs, TOPIC, "m1");
    assert!(receiver.wait_until(WAIT, |got| got.len() == 1));

    broker.restart();
    assert!(receiver.wait_connects(2, WAIT), "{}", receiver.transcript());
    publish(&broker, &certs, TOPIC, "m2");
    assert_eq!(until_sentinel(&broker, &certs, &receiver), ["m1", "m2"]);
    assert_eq!(receiver.session_present_false_count(), 0);
    assert_eq!(
        receiver.subscribed_count(),
        1,
        "the session kept the subscription"
    );
}

/// Sets up mosquitto's resend (module comment of `support::receiver`): a
/// slow link holds the PUBCOMP back while the broker restarts, so the
/// broker saved the message as waiting for PUBCOMP.
#[test]
fn support_kit_receiver_does_not_deliver_mosquittos_resend_after_a_restart() {
    let (_dir, certs, mut broker) = broker();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], broker.port)));
    let receiver = Receiver::start(HOST, proxy.port, &certs, "kit-resend", &["t/#"]);
    proxy.set_delay(Duration::from_millis(300));

    publish(&broker, &certs, TOPIC, "m1");
    // PUBREL is on its way; the PUBCOMP is at least 300 ms away.
    broker.wait_log("Sending PUBREL to kit-resend (m1)", WAIT);
    broker.restart();
    proxy.set_delay(Duration::ZERO);

    assert!(receiver.wait_connects(2, WAIT), "{}", receiver.transcript());
    assert_eq!(
        until_sentinel(&broker, &certs, &receiver),
        ["m1"],
        "{}",
        receiver.transcript()
    );
    assert_eq!(
        (
            receiver.broker_retransmissions(),
            receiver.held_redeliveries()
        ),
        (1, 0),
        "{}",
        receiver.transcript()
    );
}

#[test]
fn support_kit_receiver_does_not_deliver_again_when_its_pubrec_was_lost() {
    let (_dir, certs, broker) = broker();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], broker.port)));
    let receiver = Receiver::start(HOST, proxy.port, &certs, "kit-pubrec", &["t/#"]);
    proxy.set_delay(Duration::from_millis(300));

    publish(&broker, &certs, TOPIC, "m1");
    assert!(receiver.wait_until(WAIT, |got| got.len() == 1));
    // The PUBREC is still in the proxy: the broker never gets it.
    proxy.cut_now();
    proxy.set_delay(Duration::ZERO);

    assert!(receiver.wait_connects(2, WAIT), "{}", receiver.transcript());
    assert_eq!(until_sentinel(&broker, &certs, &receiver), ["m1"]);
    assert_eq!(
        (
            receiver.held_redeliveries(),
            receiver.broker_retransmissions()
        ),
        (1, 0),
        "{}",
        receiver.transcript()
    );
}

#[test]
fn support_kit_receiver_gets_what_was_published_while_its_link_was_cut() {
    let (_dir, certs, broker) = broker();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], broker.port)));
    let receiver = Receiver::start(HOST, proxy.port, &certs, "kit-cut", &["t/#"]);
    publish(&broker, &certs, TOPIC, "m1");
    assert!(receiver.wait_until(WAIT, |got| got.len() == 1));

    proxy.blackhole(true);
    proxy.cut_now();
    for n in 2..=4 {
        publish(&broker, &certs, TOPIC, &format!("m{n}"));
    }
    assert_eq!(receiver.deliveries().len(), 1, "the link is down");
    proxy.blackhole(false);

    assert_eq!(
        until_sentinel(&broker, &certs, &receiver),
        ["m1", "m2", "m3", "m4"],
        "{}",
        receiver.transcript()
    );
    assert!(receiver.connects() >= 2);
    assert_eq!(receiver.session_present_false_count(), 0);
}
