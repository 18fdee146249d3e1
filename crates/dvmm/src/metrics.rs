//! `--metrics ADDR`: the nodes' counters in the Prometheus / OpenMetrics text format
//! (the `prometheus-client` crate), served over HTTP (`tiny_http`) at `/metrics`.
//!
//! Every scrape asks the nodes' control sockets for a fresh snapshot
//! (`cluster::control`), so the endpoint holds no state of its own: `dvmm run` serves
//! every node of its cluster, `dvmm node` its own node. Every series has the labels
//! `cluster` and `node`. The names are listed in docs/OPERATIONS.md.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cluster::control::{self, NodeSnapshot};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Whose counters an endpoint serves.
#[derive(Debug, Clone)]
pub enum Source {
    /// One node (`dvmm node --metrics`).
    Node {
        /// Its cluster's name.
        cluster: String,
        /// Its id.
        id: u16,
    },
    /// Every node of a cluster on this machine (`dvmm run --metrics`).
    Cluster(String),
}

impl Source {
    fn snapshots(&self) -> Vec<NodeSnapshot> {
        let paths: Vec<std::path::PathBuf> = match self {
            Source::Node { cluster, id } => vec![control::socket_path(cluster, *id)],
            Source::Cluster(c) => control::find_cluster(Some(c))
                .map(|(_, nodes)| nodes.into_iter().map(|(_, p)| p).collect())
                .unwrap_or_default(),
        };
        paths
            .iter()
            .filter_map(|p| control::fetch_snapshot(p).ok())
            .collect()
    }
}

type Labels = Vec<(String, String)>;
/// A family of counters of events.
type Counts = Family<Labels, Counter<u64, AtomicU64>>;
/// A family of counters of seconds.
type Seconds = Family<Labels, Counter<f64, AtomicU64>>;

/// Families of one scrape, by name.
struct Scrape {
    registry: Registry,
    counters: Vec<(&'static str, Counts)>,
    seconds: Vec<(&'static str, Seconds)>,
    gauges: Vec<(&'static str, Family<Labels, Gauge<i64>>)>,
}

/// Counters: (name without `_total`, help).
const COUNTERS: &[(&str, &str)] = &[
    ("dvmm_vcpu_exits", "vCPU exits by kind"),
    (
        "dvmm_vcpu_interrupts_injected",
        "Interrupts injected into a vCPU",
    ),
    ("dvmm_vcpu_ipis_sent", "IPIs sent by a vCPU"),
    (
        "dvmm_link_irqs",
        "Interrupts between nodes, by direction (sent, received)",
    ),
    (
        "dvmm_link_io",
        "Device accesses forwarded to node 0 (forwarded) or served for other nodes (served)",
    ),
    (
        "dvmm_shadow_flushes",
        "Shadow page-table flushes (software-KVM hosts)",
    ),
    (
        "dvmm_dsm_faults",
        "DSM fault events by kind (read, write, upgrade, merged, spurious, zero_fill)",
    ),
    (
        "dvmm_dsm_messages",
        "DSM messages by direction (sent, received)",
    ),
    ("dvmm_dsm_bytes", "DSM bytes by direction (sent, received)"),
    (
        "dvmm_dsm_pages",
        "Guest pages carried by the DSM, by direction (sent, received)",
    ),
    (
        "dvmm_dsm_invalidations",
        "DSM invalidations by direction (sent, received)",
    ),
    (
        "dvmm_dsm_forwards",
        "DSM requests forwarded by this node's directory",
    ),
    (
        "dvmm_dsm_requests_served",
        "DSM requests served by this node's directory",
    ),
    (
        "dvmm_dsm_prefetches",
        "Pages requested ahead of a fault (read-ahead, write-ahead)",
    ),
    (
        "dvmm_dsm_errors",
        "DSM frames refused, by kind (bad_frame, protocol)",
    ),
    (
        "dvmm_device_events",
        "Device counters by device and counter (disk: requests, read_bytes, written_bytes, errors; net: rx_packets, tx_packets, rx_bytes, tx_bytes, dropped, errors)",
    ),
];
/// Counters in seconds.
const SECONDS: &[(&str, &str)] = &[(
    "dvmm_vcpu_state_seconds",
    "Time a vCPU spent in each state (guest, halted, device, vmm, waiting, stopped)",
)];
/// Gauges.
const GAUGES: &[(&str, &str)] = &[
    ("dvmm_node_up", "1 for a node that answered this scrape"),
    (
        "dvmm_node_uptime_seconds",
        "Seconds since the node process started",
    ),
    ("dvmm_vcpu_state", "1 for the state a vCPU is in now"),
    (
        "dvmm_dsm_hot_page_faults",
        "Fault events on the DSM's hottest pages (label gpa)",
    ),
];

impl Scrape {
    fn new() -> Scrape {
        let mut registry = Registry::default();
        let counters = COUNTERS
            .iter()
            .map(|(n, h)| {
                let f = Family::<Labels, Counter<u64, AtomicU64>>::default();
                registry.register(*n, *h, f.clone());
                (*n, f)
            })
            .collect();
        let seconds = SECONDS
            .iter()
            .map(|(n, h)| {
                let f = Family::<Labels, Counter<f64, AtomicU64>>::default();
                registry.register(*n, *h, f.clone());
                (*n, f)
            })
            .collect();
        let gauges = GAUGES
            .iter()
            .map(|(n, h)| {
                let f = Family::<Labels, Gauge<i64>>::default();
                registry.register(*n, *h, f.clone());
                (*n, f)
            })
            .collect();
        Scrape {
            registry,
            counters,
            seconds,
            gauges,
        }
    }

    fn count(&self, name: &str, labels: &Labels, v: u64) {
        if let Some((_, f)) = self.counters.iter().find(|(n, _)| *n == name) {
            f.get_or_create(labels).inc_by(v);
        }
    }

    fn gauge(&self, name: &str, labels: &Labels, v: i64) {
        if let Some((_, f)) = self.gauges.iter().find(|(n, _)| *n == name) {
            f.get_or_create(labels).set(v);
        }
    }

    fn add(&self, s: &NodeSnapshot) {
        let base: Labels = vec![
            ("cluster".into(), s.cluster.clone()),
            ("node".into(), s.node.to_string()),
        ];
        let with = |extra: &[(&str, &str)]| -> Labels {
            let mut l = base.clone();
            l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            l
        };
        self.gauge("dvmm_node_up", &base, 1);
        self.gauge(
            "dvmm_node_uptime_seconds",
            &base,
            (s.uptime_us / 1_000_000) as i64,
        );
        for v in &s.vcpus {
            let id = v.vcpu.to_string();
            for (kind, n) in &v.exits {
                self.count(
                    "dvmm_vcpu_exits",
                    &with(&[("vcpu", &id), ("kind", kind)]),
                    *n,
                );
            }
            self.count(
                "dvmm_vcpu_interrupts_injected",
                &with(&[("vcpu", &id)]),
                v.injected,
            );
            self.count("dvmm_vcpu_ipis_sent", &with(&[("vcpu", &id)]), v.ipis_sent);
            for (state, us) in &v.state_us {
                let l = with(&[("vcpu", &id), ("state", state)]);
                if let Some((_, f)) = self.seconds.first() {
                    f.get_or_create(&l).inc_by(*us as f64 / 1e6);
                }
                self.gauge("dvmm_vcpu_state", &l, i64::from(*state == v.state));
            }
            if v.state == "page" {
                let l = with(&[("vcpu", &id), ("state", "page")]);
                self.gauge("dvmm_vcpu_state", &l, 1);
            }
        }
        let l = &s.link;
        self.count(
            "dvmm_link_irqs",
            &with(&[("direction", "sent")]),
            l.irqs_sent,
        );
        self.count(
            "dvmm_link_irqs",
            &with(&[("direction", "received")]),
            l.irqs_received,
        );
        self.count(
            "dvmm_link_io",
            &with(&[("direction", "forwarded")]),
            l.io_forwarded,
        );
        self.count(
            "dvmm_link_io",
            &with(&[("direction", "served")]),
            l.io_served,
        );
        self.count("dvmm_shadow_flushes", &base, l.shadow_flushes);
        if let Some(d) = &s.dsm {
            for (kind, n) in [
                ("read", d.read_faults),
                ("write", d.write_faults),
                ("upgrade", d.upgrade_faults),
                ("merged", d.merged_faults),
                ("spurious", d.spurious_faults),
                ("zero_fill", d.zero_fills),
            ] {
                self.count("dvmm_dsm_faults", &with(&[("kind", kind)]), n);
            }
            for (name, sent, received) in [
                ("dvmm_dsm_messages", d.messages_sent, d.messages_received),
                ("dvmm_dsm_bytes", d.bytes_out, d.bytes_in),
                ("dvmm_dsm_pages", d.pages_sent, d.pages_received),
                (
                    "dvmm_dsm_invalidations",
                    d.invalidations_sent,
                    d.invalidations_received,
                ),
            ] {
                self.count(name, &with(&[("direction", "sent")]), sent);
                self.count(name, &with(&[("direction", "received")]), received);
            }
            self.count("dvmm_dsm_forwards", &base, d.forwards_sent);
            self.count("dvmm_dsm_requests_served", &base, d.requests_served);
            self.count(
                "dvmm_dsm_prefetches",
                &base,
                d.prefetches + d.write_prefetches,
            );
            self.count(
                "dvmm_dsm_errors",
                &with(&[("kind", "bad_frame")]),
                d.bad_frames,
            );
            self.count(
                "dvmm_dsm_errors",
                &with(&[("kind", "protocol")]),
                d.protocol_errors,
            );
        }
        for h in &s.hot_pages {
            let gpa = format!("{:#x}", h.gpa);
            self.gauge(
                "dvmm_dsm_hot_page_faults",
                &with(&[("gpa", &gpa)]),
                h.faults as i64,
            );
        }
        for dev in &s.devices {
            for (counter, n) in &dev.counters {
                self.count(
                    "dvmm_device_events",
                    &with(&[("device", &dev.device), ("counter", counter)]),
                    *n,
                );
            }
        }
    }
}

/// The text of one scrape of `snapshots`.
pub fn render(snapshots: &[NodeSnapshot]) -> String {
    let s = Scrape::new();
    for n in snapshots {
        s.add(n);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &s.registry);
    out
}

/// A running metrics endpoint; dropping it stops it.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (refused with one line if it is in use) and serves `source`.
    pub fn start(addr: SocketAddr, source: Source) -> Result<MetricsServer, String> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    let path = req.url().split('?').next().unwrap_or("");
                    let resp = if *req.method() != tiny_http::Method::Get {
                        tiny_http::Response::from_string("only GET\n").with_status_code(405)
                    } else if path == "/metrics" {
                        let body = render(&source.snapshots());
                        let ct = tiny_http::Header::from_bytes(
                            "Content-Type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .ok();
                        let r = tiny_http::Response::from_string(body);
                        match ct {
                            Some(h) => r.with_header(h),
                            None => r,
                        }
                    } else {
                        tiny_http::Response::from_string("dvmm: the metrics are at /metrics\n")
                            .with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })
            .map_err(|e| format!("--metrics: cannot start its thread: {e}"))?;
        Ok(MetricsServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::stats::VcpuSnapshot;

    fn snap(node: u16, faults: u64) -> NodeSnapshot {
        NodeSnapshot {
            cluster: "c".into(),
            node,
            nodes: 2,
            uptime_us: 5_000_000,
            phase: "running".into(),
            vcpus: vec![VcpuSnapshot {
                vcpu: usize::from(node),
                state: "halted".into(),
                state_us: vec![("guest".into(), 1_500_000), ("halted".into(), 0)],
                exits: vec![("hlt".into(), 7)],
                injected: 3,
                ipis_sent: 1,
                tid: 0,
            }],
            dsm: Some(dsm::DsmStats {
                read_faults: faults,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn renders_labelled_series() {
        let t = render(&[snap(0, 11), snap(1, 22)]);
        for want in [
            "dvmm_dsm_faults_total{cluster=\"c\",node=\"0\",kind=\"read\"} 11",
            "dvmm_dsm_faults_total{cluster=\"c\",node=\"1\",kind=\"read\"} 22",
            "dvmm_vcpu_exits_total{cluster=\"c\",node=\"1\",vcpu=\"1\",kind=\"hlt\"} 7",
            "dvmm_vcpu_state_seconds_total{cluster=\"c\",node=\"0\",vcpu=\"0\",state=\"guest\"} 1.5",
            "dvmm_vcpu_state{cluster=\"c\",node=\"0\",vcpu=\"0\",state=\"halted\"} 1",
            "dvmm_vcpu_state{cluster=\"c\",node=\"0\",vcpu=\"0\",state=\"guest\"} 0",
            "dvmm_node_up{cluster=\"c\",node=\"1\"} 1",
            "# TYPE dvmm_dsm_faults counter",
            "# EOF",
        ] {
            assert!(t.contains(want), "missing {want} in\n{t}");
        }
    }

    /// A real endpoint: an address in use is refused in one line; /metrics answers (no
    /// node behind it: an empty exposition), anything else is 404.
    #[test]
    fn serves_and_refuses_a_taken_address() {
        use std::io::{Read, Write};
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = MetricsServer::start(addr, Source::Cluster("none".into()))
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("cannot listen") && e.lines().count() == 1, "{e}");
        drop(taken);
        let server = MetricsServer::start(addr, Source::Cluster("none".into())).unwrap();
        let get = |path: &str| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut r = String::new();
            c.read_to_string(&mut r).unwrap();
            r
        };
        let r = get("/metrics");
        assert!(
            r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"),
            "{r}"
        );
        assert!(r.contains("# EOF"), "{r}");
        assert!(get("/").contains(" 404 "));
        drop(server);
    }
}
