//! Tests over real sockets on 127.0.0.1. They live inside the crate so fake peers can
//! use the private handshake to impersonate nodes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::frame::{self, FrameHeader, Kind};
use crate::handshake::{self, HandshakeError, Params};
use crate::{Event, LostReason, Mesh, MeshConfig, PageBuf, TransportError, PAGE_SIZE};

const SECRET: &[u8] = b"dvmm test cluster secret";
const WAIT: Duration = Duration::from_secs(10);

// ---- log capture -------------------------------------------------------------------

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .try_init();
    });
}

/// Waits until some log line contains all of `needles`; returns that line.
fn wait_log(needles: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        {
            let log = LOG.lock().unwrap_or_else(|p| p.into_inner());
            let text = String::from_utf8_lossy(&log);
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no log line containing {needles:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---- helpers -----------------------------------------------------------------------

fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

fn cfg(me: u16, addrs: &[SocketAddr]) -> MeshConfig {
    let mut c = MeshConfig::new(me, addrs.to_vec(), SECRET.to_vec());
    c.connect_timeout = WAIT;
    c
}

/// Starts the nodes `ids` (with their listeners) in threads after random delays, in a
/// random order; returns the meshes in the order of `ids`.
fn start(
    ids: &[u16],
    ls: Vec<TcpListener>,
    addrs: &[SocketAddr],
    tweak: impl Fn(&mut MeshConfig),
) -> Vec<Mesh> {
    let mut rng = rand::thread_rng();
    let mut jobs: Vec<(u16, TcpListener, MeshConfig, Duration)> = ids
        .iter()
        .zip(ls)
        .map(|(&id, l)| {
            let mut c = cfg(id, addrs);
            tweak(&mut c);
            (id, l, c, Duration::from_millis(rng.gen_range(0..200)))
        })
        .collect();
    jobs.shuffle(&mut rng);
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(id, l, c, delay)| {
            (
                id,
                thread::spawn(move || {
                    thread::sleep(delay);
                    Mesh::builder(c).listener(l).establish()
                }),
            )
        })
        .collect();
    let mut out: HashMap<u16, Mesh> = HashMap::new();
    for (id, h) in handles {
        out.insert(id, h.join().unwrap().unwrap());
    }
    ids.iter().map(|id| out.remove(id).unwrap()).collect()
}

fn mesh(n: usize) -> Vec<Mesh> {
    let (ls, addrs) = listeners(n);
    let ids: Vec<u16> = (0..n as u16).collect();
    start(&ids, ls, &addrs, |_| {})
}

fn next(rx: &Receiver<Event>) -> Event {
    rx.recv_timeout(WAIT).expect("event within timeout")
}

fn next_frame(rx: &Receiver<Event>) -> (u16, u8, Vec<u8>, Option<PageBuf>) {
    match next(rx) {
        Event::Frame {
            from,
            channel,
            header,
            payload,
            ..
        } => (from, channel, header, payload),
        other => panic!("expected a frame, got {other:?}"),
    }
}

fn next_lost(rx: &Receiver<Event>) -> (u16, LostReason) {
    loop {
        match next(rx) {
            Event::PeerLost { node, reason } => return (node, reason),
            Event::Frame { .. } => continue,
        }
    }
}

/// Every node sends one frame to every other; every node receives them all.
fn assert_all_pairs_work(meshes: &[&Mesh]) {
    for m in meshes {
        for other in meshes {
            if other.me() != m.me() {
                m.sender()
                    .send(other.me(), 1, &[m.me() as u8], None)
                    .unwrap();
            }
        }
    }
    for m in meshes {
        let rx = m.events();
        let mut from: Vec<u16> = (1..meshes.len()).map(|_| next_frame(&rx).0).collect();
        from.sort();
        let mut want: Vec<u16> = meshes
            .iter()
            .map(|o| o.me())
            .filter(|&i| i != m.me())
            .collect();
        want.sort();
        assert_eq!(from, want, "node {}", m.me());
    }
}

/// A fake node `me` of an `n`-node cluster that authenticates to `target` and then
/// speaks raw bytes.
fn fake_dial(
    me: u16,
    n: u16,
    secret: &[u8],
    target: u16,
    addr: SocketAddr,
) -> Result<TcpStream, HandshakeError> {
    let deadline = Instant::now() + WAIT;
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    handshake::dial(
        &mut s,
        &Params {
            me,
            nodes: n,
            secret,
        },
        target,
    )?;
    Ok(s)
}

// ---- tests -------------------------------------------------------------------------

#[test]
fn three_nodes_establish_in_random_order() {
    init_logs();
    for _round in 0..3 {
        let ms = mesh(3);
        assert_all_pairs_work(&[&ms[0], &ms[1], &ms[2]]);
        for m in &ms {
            assert_eq!(m.nodes(), 3);
            assert!((0..3).filter(|&i| i != m.me()).all(|i| m.is_alive(i)));
        }
    }
}

#[test]
fn establish_binds_configured_addresses() {
    init_logs();
    // Free ports: bind to port 0, note the port, release it (a small race with other
    // processes is acceptable in a test).
    let (ls, addrs) = listeners(3);
    drop(ls);
    let mut order = [0u16, 1, 2];
    order.shuffle(&mut rand::thread_rng());
    let hs: Vec<_> = order
        .iter()
        .map(|&id| {
            let c = cfg(id, &addrs);
            (id, thread::spawn(move || Mesh::establish(c)))
        })
        .collect();
    let mut ms: Vec<(u16, Mesh)> = hs
        .into_iter()
        .map(|(id, h)| (id, h.join().unwrap().unwrap()))
        .collect();
    ms.sort_by_key(|(id, _)| *id);
    for (id, m) in &ms {
        assert_eq!(m.local_addr(), addrs[usize::from(*id)]);
    }
    assert_all_pairs_work(&[&ms[0].1, &ms[1].1, &ms[2].1]);
}

#[test]
fn single_node_mesh_is_immediately_established() {
    let (ls, addrs) = listeners(1);
    let m = Mesh::builder(cfg(0, &addrs))
        .listener(ls.into_iter().next().unwrap())
        .establish()
        .unwrap();
    assert!(matches!(
        m.sender().send(0, 0, b"x", None),
        Err(TransportError::NoSuchPeer(0))
    ));
}

#[test]
fn send_receive_header_and_page() {
    init_logs();
    let ms = mesh(3);
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    ms[0]
        .sender()
        .send(1, 42, b"read-reply gpa=0x1000", Some(&page))
        .unwrap();
    ms[2].sender().send(1, 9, b"", None).unwrap();
    let rx = ms[1].events();
    let mut got = [next_frame(&rx), next_frame(&rx)];
    got.sort_by_key(|f| f.0);
    let (from, channel, header, payload) = &got[0];
    assert_eq!(
        (*from, *channel, &header[..]),
        (0, 42, &b"read-reply gpa=0x1000"[..])
    );
    let p = payload.as_ref().expect("page payload");
    assert_eq!(
        p.as_ptr() as usize % 4096,
        0,
        "payload buffer is page-aligned"
    );
    assert_eq!(&p[..], &page[..]);
    let (from, channel, header, payload) = &got[1];
    assert_eq!(
        (*from, *channel, header.len(), payload.is_none()),
        (2, 9, 0, true)
    );

    // Local argument errors, nothing sent.
    let s = ms[0].sender();
    assert!(matches!(
        s.send(0, 0, b"", None),
        Err(TransportError::NoSuchPeer(0))
    ));
    assert!(matches!(
        s.send(3, 0, b"", None),
        Err(TransportError::NoSuchPeer(3))
    ));
    assert!(matches!(
        s.send(1, 0, b"", Some(&page[..100])),
        Err(TransportError::BadPayload(100))
    ));
    let big = vec![0u8; crate::MAX_HEADER_LEN + 1];
    assert!(matches!(
        s.send(1, 0, &big, None),
        Err(TransportError::HeaderTooLong(_))
    ));
    // Largest header still goes through.
    s.send(1, 1, &big[1..], Some(&page)).unwrap();
    let (_, _, h, p) = next_frame(&rx);
    assert_eq!(h.len(), crate::MAX_HEADER_LEN);
    assert!(p.is_some());
}

#[test]
fn many_concurrent_senders() {
    init_logs();
    const THREADS: u8 = 4;
    const MSGS: u32 = 300;
    let ms = mesh(3);
    let fill = |from: u16, t: u8, seq: u32| (from as u32 * 31 + t as u32 * 7 + seq) as u8;
    let mut senders = Vec::new();
    for m in &ms {
        for t in 0..THREADS {
            let s = m.sender();
            senders.push(thread::spawn(move || {
                let mut page = PageBuf::new();
                for seq in 0..MSGS {
                    for to in (0..3).filter(|&i| i != s.me()) {
                        let mut h = vec![t];
                        h.extend_from_slice(&seq.to_le_bytes());
                        page.fill(fill(s.me(), t, seq));
                        let payload = (seq % 2 == 0).then_some(&page[..]);
                        s.send(to, t, &h, payload).unwrap();
                    }
                }
            }));
        }
    }
    let receivers: Vec<_> = ms
        .iter()
        .map(|m| {
            let rx = m.events();
            thread::spawn(move || {
                let mut next_seq: HashMap<(u16, u8), u32> = HashMap::new();
                for _ in 0..(2 * THREADS as u32 * MSGS) {
                    let (from, ch, h, p) = next_frame(&rx);
                    let t = h[0];
                    assert_eq!(ch, t);
                    let seq = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
                    let want = next_seq.entry((from, t)).or_insert(0);
                    assert_eq!(seq, *want, "per-sender order from node {from} thread {t}");
                    *want += 1;
                    match p {
                        Some(p) => {
                            assert_eq!(seq % 2, 0);
                            assert!(p.iter().all(|&b| b == fill(from, t, seq)));
                        }
                        None => assert_eq!(seq % 2, 1),
                    }
                }
                assert!(next_seq.values().all(|&v| v == MSGS));
            })
        })
        .collect();
    for h in senders.into_iter().chain(receivers) {
        h.join().unwrap();
    }
}

#[test]
fn wrong_secret_refused_and_logged_while_others_keep_working() {
    init_logs();
    // During establishment: an intruder claiming to be node 1 is refused; the real
    // node 1 still gets in.
    let (ls, addrs) = listeners(2);
    let a0 = addrs[0];
    let intruder = thread::spawn(move || {
        let r = fake_dial(1, 2, b"not the secret", 0, a0);
        assert!(
            matches!(
                r,
                Err(HandshakeError::Auth) | Err(HandshakeError::Rejected(_))
            ),
            "{r:?}"
        );
    });
    let ms = start(&[0, 1], ls, &addrs, |_| {});
    intruder.join().unwrap();
    assert_all_pairs_work(&[&ms[0], &ms[1]]);

    // After establishment: a late intruder with a wrong secret is refused and logged
    // with its address; the mesh keeps working.
    let ms = mesh(3);
    let mut s = TcpStream::connect(ms[0].local_addr()).unwrap();
    let local = s.local_addr().unwrap().to_string();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let r = handshake::dial(
        &mut s,
        &Params {
            me: 2,
            nodes: 3,
            secret: b"wrong",
        },
        0,
    );
    assert!(matches!(r, Err(HandshakeError::Auth)), "{r:?}");
    let line = wait_log(&["refused connection", "authentication failed", &local]);
    assert!(line.contains("WARN"), "{line}");
    assert_all_pairs_work(&[&ms[0], &ms[1], &ms[2]]);
}

#[test]
fn wrong_secret_node_never_joins() {
    init_logs();
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
    let mut c0 = cfg(0, &addrs);
    let mut c1 = cfg(1, &addrs);
    c0.connect_timeout = Duration::from_millis(1500);
    c1.connect_timeout = Duration::from_millis(1500);
    c1.secret = b"another cluster".to_vec();
    let h1 = thread::spawn(move || Mesh::builder(c1).listener(l1).establish());
    let e0 = Mesh::builder(c0).listener(l0).establish().unwrap_err();
    let e1 = h1.join().unwrap().unwrap_err();
    assert_eq!(e0.to_string(), "timed out after 1.5s waiting for node 1");
    assert_eq!(e1.to_string(), "timed out after 1.5s waiting for node 0");
    wait_log(&["handshake with node 0 failed", "authentication failed"]);
}

#[test]
fn garbage_connections_refused_while_serving_others() {
    init_logs();
    let ms = mesh(3);
    let target = ms[0].local_addr();
    let connect = || {
        let s = TcpStream::connect(target).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let local = s.local_addr().unwrap().to_string();
        (s, local)
    };
    let expect_closed = |s: &mut TcpStream| {
        let mut buf = [0u8; 512];
        // Reads a possible Reject frame, then EOF.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    };

    // 1. Not our protocol at all.
    let (mut s, local) = connect();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expect_closed(&mut s);
    wait_log(&["refused connection", "bad magic", &local]);

    // 2. Right magic, wrong version.
    let (mut s, local) = connect();
    let mut h = FrameHeader {
        kind: Kind::Hello,
        channel: 0,
        header_len: 38,
        payload_len: 0,
    }
    .encode();
    h[4] = 77;
    s.write_all(&h).unwrap();
    expect_closed(&mut s);
    wait_log(&[
        "refused connection",
        "unsupported protocol version 77",
        &local,
    ]);

    // 3. Well-formed hello from a node id out of range.
    let (mut s, local) = connect();
    let r = handshake::dial(
        &mut s,
        &Params {
            me: 9,
            nodes: 3,
            secret: SECRET,
        },
        0,
    );
    assert!(matches!(r, Err(HandshakeError::Rejected(_))), "{r:?}");
    wait_log(&["refused connection", "node id 9 out of range", &local]);

    // 4. Authenticated, but node 2 is already connected.
    let (mut s, local) = connect();
    let r = handshake::dial(
        &mut s,
        &Params {
            me: 2,
            nodes: 3,
            secret: SECRET,
        },
        0,
    );
    assert!(
        matches!(&r, Err(HandshakeError::Rejected(m)) if m.contains("already connected")),
        "{r:?}"
    );
    wait_log(&["refused connection", "already connected", &local]);

    // 5. An oversized length in the very first frame.
    let (mut s, local) = connect();
    let h = FrameHeader {
        kind: Kind::Hello,
        channel: 0,
        header_len: 38,
        payload_len: 0,
    }
    .encode();
    let mut h2 = h;
    h2[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&h2).unwrap();
    expect_closed(&mut s);
    wait_log(&["refused connection", "exceeds the limit", &local]);

    // The established mesh is untouched and the listener still serves.
    assert_all_pairs_work(&[&ms[0], &ms[1], &ms[2]]);
    let (mut s, local) = connect();
    s.write_all(&[0xffu8; 64]).unwrap();
    expect_closed(&mut s);
    wait_log(&["refused connection", "bad magic", &local]);
    for m in &ms {
        assert!(m.events().try_recv().is_err(), "no spurious events");
    }
}

/// Nodes 0 and 1 are real; node 2 is a fake that authenticates to both.
fn two_real_one_fake(peer_timeout: Duration) -> (Vec<Mesh>, TcpStream, TcpStream) {
    let (ls, addrs) = listeners(3);
    let ls: Vec<TcpListener> = ls.into_iter().take(2).collect();
    let (a0, a1) = (addrs[0], addrs[1]);
    let fake = thread::spawn(move || {
        let s0 = fake_dial(2, 3, SECRET, 0, a0).unwrap();
        let s1 = fake_dial(2, 3, SECRET, 1, a1).unwrap();
        (s0, s1)
    });
    let ms = start(&[0, 1], ls, &addrs, |c| c.peer_timeout = peer_timeout);
    let (s0, s1) = fake.join().unwrap();
    (ms, s0, s1)
}

#[test]
fn garbage_frame_on_authenticated_connection_closes_only_that_peer() {
    init_logs();
    let (ms, mut to0, mut to1) = two_real_one_fake(Duration::from_secs(3));
    // A valid data frame first: it is delivered.
    frame::write_frame(&mut to0, Kind::Data, 5, b"fake hello", &[]).unwrap();
    let (from, ch, h, _) = next_frame(&ms[0].events());
    assert_eq!((from, ch, &h[..]), (2, 5, &b"fake hello"[..]));
    // Then garbage: bad magic to node 0, an invalid payload length to node 1.
    to0.write_all(b"\x00garbage garbage garbage").unwrap();
    let mut bad = FrameHeader {
        kind: Kind::Data,
        channel: 0,
        header_len: 0,
        payload_len: 0,
    }
    .encode();
    bad[12..16].copy_from_slice(&5000u32.to_le_bytes());
    to1.write_all(&bad).unwrap();

    let (node, reason) = next_lost(&ms[0].events());
    assert_eq!(node, 2);
    assert!(
        matches!(&reason, LostReason::Protocol(m) if m.contains("bad magic")),
        "{reason}"
    );
    let (node, reason) = next_lost(&ms[1].events());
    assert_eq!(node, 2);
    assert!(
        matches!(&reason, LostReason::Protocol(m) if m.contains("payload length 5000")),
        "{reason}"
    );
    wait_log(&["peer lost", "peer=2", "protocol violation", "bad magic"]);
    // The fake's connections were closed.
    let mut buf = [0u8; 16];
    assert!(matches!(to0.read(&mut buf), Ok(0) | Err(_)));
    // Sends to the lost node fail; the real nodes keep working.
    assert!(matches!(
        ms[0].sender().send(2, 0, b"x", None),
        Err(TransportError::PeerLost { node: 2, .. })
    ));
    assert!(!ms[0].is_alive(2));
    assert_all_pairs_work(&[&ms[0], &ms[1]]);
}

#[test]
fn establish_timeout_names_missing_nodes() {
    init_logs();
    let (ls, addrs) = listeners(4);
    let ls: Vec<TcpListener> = ls.into_iter().take(2).collect();
    let t0 = Instant::now();
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut c = cfg(i as u16, &addrs);
            c.connect_timeout = Duration::from_secs(1);
            thread::spawn(move || Mesh::builder(c).listener(l).establish())
        })
        .collect();
    for h in hs {
        match h.join().unwrap() {
            Err(e @ TransportError::Timeout { .. }) => {
                assert_eq!(e.to_string(), "timed out after 1s waiting for nodes 2, 3");
                assert!(
                    matches!(e, TransportError::Timeout { ref missing, .. } if missing == &[2, 3])
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "establish returned promptly"
    );
}

#[test]
fn killed_peer_detected_as_peer_lost() {
    init_logs();
    // Orderly: node 2's Mesh is dropped.
    let mut ms = mesh(3);
    let t0 = Instant::now();
    drop(ms.pop());
    for m in &ms {
        let (node, reason) = next_lost(&m.events());
        assert_eq!(node, 2);
        assert!(
            matches!(
                reason,
                LostReason::Goodbye | LostReason::Closed | LostReason::Io(_)
            ),
            "{reason}"
        );
        assert!(matches!(
            m.sender().send(2, 0, b"", None),
            Err(TransportError::PeerLost { node: 2, .. })
        ));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "detected immediately"
    );
    assert_all_pairs_work(&[&ms[0], &ms[1]]);

    // Abrupt: the fake node 2's sockets are closed without a goodbye.
    let (ms, to0, to1) = two_real_one_fake(Duration::from_secs(3));
    let t0 = Instant::now();
    drop(to0);
    drop(to1);
    for m in &ms {
        let (node, reason) = next_lost(&m.events());
        assert_eq!(node, 2);
        assert_eq!(reason, LostReason::Closed);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "detected immediately"
    );
}

#[test]
fn silent_peer_detected_by_heartbeat_timeout() {
    init_logs();
    let timeout = Duration::from_millis(600);
    let (ms, _to0, _to1) = two_real_one_fake(timeout);
    let t0 = Instant::now();
    // The fake keeps its sockets open but never sends (a frozen node).
    for m in &ms {
        let (node, reason) = next_lost(&m.events());
        assert_eq!(node, 2);
        assert_eq!(reason, LostReason::Timeout(timeout));
    }
    let waited = t0.elapsed();
    println!("silent peer declared lost after {waited:?} (peer_timeout {timeout:?})");
    assert!(waited < Duration::from_secs(5));
    // Meanwhile the real nodes kept each other alive with heartbeats only.
    thread::sleep(timeout * 3);
    assert!(ms[0].is_alive(1) && ms[1].is_alive(0));
    for m in &ms {
        assert!(m.events().try_recv().is_err(), "no loss between live nodes");
    }
    assert!(matches!(
        ms[1].sender().send(2, 0, b"", None),
        Err(TransportError::PeerLost {
            node: 2,
            reason: LostReason::Timeout(_)
        })
    ));
}

#[test]
fn shutdown_is_prompt_idempotent_and_disconnects_events() {
    init_logs();
    let ms = mesh(3);
    let rx = ms[0].events();
    let s = ms[0].sender();
    let t0 = Instant::now();
    ms[0].shutdown();
    ms[0].shutdown();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(matches!(
        s.send(1, 0, b"", None),
        Err(TransportError::Shutdown)
    ));
    // Only nodes 1 and 2 see node 0 go.
    for m in &ms[1..] {
        assert_eq!(next_lost(&m.events()), (0, LostReason::Goodbye));
    }
    assert!(rx.recv_timeout(WAIT).is_err(), "event channel disconnected");
    let t0 = Instant::now();
    drop(ms);
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// Node 1 echoes every frame back from its reader thread (handler mode).
fn echo_pair(tweak0: impl Fn(&mut MeshConfig)) -> (Mesh, Mesh) {
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
    let echo: Arc<OnceLock<crate::Sender>> = Arc::new(OnceLock::new());
    let e = echo.clone();
    let c1 = cfg(1, &addrs);
    let h1 = thread::spawn(move || {
        Mesh::builder(c1)
            .listener(l1)
            .handler(move |ev| {
                if let (
                    Event::Frame {
                        from,
                        channel,
                        header,
                        payload,
                        ..
                    },
                    Some(s),
                ) = (ev, e.get())
                {
                    let _ = s.send(from, channel, &header, payload.as_deref());
                }
            })
            .establish()
    });
    let mut c0 = cfg(0, &addrs);
    tweak0(&mut c0);
    let m0 = Mesh::builder(c0).listener(l0).establish().unwrap();
    let m1 = h1.join().unwrap().unwrap();
    let _ = echo.set(m1.sender());
    (m0, m1)
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.5), at(0.9), at(0.99))
}

#[test]
fn ping_pong_latency() {
    init_logs();
    let (m0, _m1) = echo_pair(|_| {});
    let rx = m0.events();
    let s = m0.sender();
    let page = PageBuf::from_slice(&[0x5a; PAGE_SIZE]).unwrap();
    for (name, payload) in [("header only", None), ("4 KiB page", Some(&page[..]))] {
        let mut rtts = Vec::new();
        for i in 0..2200u32 {
            let t = Instant::now();
            s.send(1, 7, &i.to_le_bytes(), payload).unwrap();
            let (_, _, h, p) = next_frame(&rx);
            let rtt = t.elapsed();
            assert_eq!(h, i.to_le_bytes());
            assert_eq!(p.is_some(), payload.is_some());
            if i >= 200 {
                rtts.push(rtt);
            }
        }
        let (p50, p90, p99) = percentiles(rtts);
        println!("loopback round trip, {name} both ways: p50 {p50:?}  p90 {p90:?}  p99 {p99:?}");
    }
}

#[test]
fn inject_delay_delays_outgoing_frames() {
    init_logs();
    let delay = Duration::from_millis(30);
    let (m0, _m1) = echo_pair(|c| c.inject_delay = Some(delay));
    let rx = m0.events();
    for _ in 0..3 {
        let t = Instant::now();
        m0.sender().send(1, 0, b"ping", None).unwrap();
        next_frame(&rx);
        assert!(t.elapsed() >= delay);
    }
}

#[test]
fn send_to_frozen_peer_fails_instead_of_blocking() {
    init_logs();
    let timeout = Duration::from_millis(600);
    // The fake node 2 neither reads nor writes: socket buffers fill up.
    let (ms, _to0, _to1) = two_real_one_fake(timeout);
    let s = ms[0].sender();
    let page = PageBuf::new();
    let t0 = Instant::now();
    let err = loop {
        if let Err(e) = s.send(2, 0, b"flood", Some(&page)) {
            break e;
        }
        assert!(t0.elapsed() < WAIT, "send never failed");
    };
    assert!(
        matches!(
            err,
            TransportError::PeerLost { node: 2, .. } | TransportError::Io { node: 2, .. }
        ),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(next_lost(&ms[0].events()).0, 2);
    assert!(matches!(
        s.send(2, 0, b"", None),
        Err(TransportError::PeerLost { node: 2, .. })
    ));
    assert!(matches!(
        s.send(1, 0, b"", Some(&[])),
        Err(TransportError::BadPayload(0))
    ));
}
