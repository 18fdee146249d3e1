//! The cluster description (TOML).
//!
//! ```toml
//! name = "lab"                      # optional: names the control sockets (default: the file's stem)
//! kernel = "guest/out/vmlinux"     # read by node 0 only (an ELF vmlinux or a bzImage)
//! unpack_bzimage = "auto"           # who unpacks a bzImage: auto | always | never
//! initrd = "guest/out/initramfs.cpio.gz"   # optional
//! cmdline = "locktorture.shutdown_secs=20"  # appended to the VMM's defaults
//! secret_file = "/etc/dvmm/secret"  # or: secret = "..." (at least 16 characters)
//! connect_timeout_secs = 60         # how long a node waits for the others
//! acpi = true                       # ACPI tables (power-off through ACPI); false: MP table only
//! numa = true                       # one NUMA node per dvmm node (SRAT/SLIT; needs acpi)
//! disk = "disk.img"                 # optional: a virtio disk on node 0 (an image file)
//! disk_readonly = false             # the guest may not write to it
//!
//! [net]                             # optional: a virtio network device on node 0, on a
//! tap = "dvmm0"                     #   TAP the node creates (default: dvmm<its pid>)
//! host = "172.30.213.1/24"          #   the host's address on the TAP (the default)
//! guest = "172.30.213.2"            #   the guest's address, given to the guest kernel
//!
//! [[node]]                          # node 0: boot and I/O node
//! addr = "10.0.0.1:7100"
//! vcpus = 2
//! memory = "512M"                   # this node's share of guest RAM (it is the home)
//!
//! [[node]]
//! addr = "10.0.0.2:7100"
//! vcpus = 2
//! memory = "512M"
//! ```
//!
//! vCPUs are numbered in node order (node 0 has vCPUs 0..vcpus-1, and so on); guest RAM
//! is the sum of the shares, and each node is the DSM home of its share's pages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::boot::bzimage::UnpackBzImage;

/// Errors in a cluster description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot read the file.
    #[error("cannot read cluster config {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML or wrong fields.
    #[error("invalid cluster config {path}: {msg}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Semantically wrong.
    #[error("invalid cluster config: {0}")]
    Invalid(String),
    /// Cannot write the description or its secret file.
    #[error("cannot write cluster config {path}: {source}")]
    Write {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Most nodes in a cluster description.
pub const MAX_NODES: usize = 64;

/// Longest DSM hold time (`dsm_hold_us`).
pub const MAX_DSM_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a node keeps a page it just received unless `dsm_hold_us` says otherwise.
pub const DEFAULT_DSM_HOLD: std::time::Duration = dsm::DEFAULT_HOLD;

/// How long a node waits for the others unless `connect_timeout_secs` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<PathBuf>,
    #[serde(default)]
    unpack_bzimage: UnpackBzImage,
    #[serde(default)]
    cmdline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dsm_hold_us: Option<u64>,
    #[serde(default = "yes")]
    acpi: bool,
    #[serde(default = "yes")]
    numa: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<PathBuf>,
    #[serde(default)]
    disk_readonly: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    net: Option<RawNet>,
    #[serde(default)]
    node: Vec<RawNode>,
}

/// The `[net]` table: every field optional (the defaults of `dvmm run --net`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawNet {
    #[serde(skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest: Option<String>,
}

impl RawNet {
    /// The network it describes; the TAP's default name is this process's.
    fn spec(&self) -> Result<vmm::vm::NetSpec, ConfigError> {
        let default = vmm::vm::NetSpec::default_for(std::process::id());
        let invalid = |field: &str, e: String| ConfigError::Invalid(format!("net.{field}: {e}"));
        let (host_addr, prefix_len) = match &self.host {
            Some(h) => vmm::devices::virtio::net::parse_host(h).map_err(|e| invalid("host", e))?,
            None => (default.host_addr, default.prefix_len),
        };
        let guest_addr = match &self.guest {
            Some(g) => {
                vmm::devices::virtio::net::parse_guest(g).map_err(|e| invalid("guest", e))?
            }
            None => default.guest_addr,
        };
        Ok(vmm::vm::NetSpec {
            tap: self.tap.clone().unwrap_or(default.tap),
            host_addr,
            prefix_len,
            guest_addr,
        })
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    addr: String,
    vcpus: usize,
    memory: String,
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Listen / connect address.
    pub addr: SocketAddr,
    /// vCPUs run by this node.
    pub vcpus: usize,
    /// Guest RAM this node is home of, in bytes.
    pub memory: u64,
}

/// A validated cluster description.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The cluster's name (`name`; default: the description file's stem): names its
    /// nodes' control sockets ([`crate::control`]).
    pub name: String,
    /// Kernel image (node 0).
    pub kernel: PathBuf,
    /// Initrd (node 0).
    pub initrd: Option<PathBuf>,
    /// Who unpacks a bzImage kernel (node 0; `unpack_bzimage`, see
    /// [`vmm::boot::bzimage::Unpacker::choose`]).
    pub unpack_bzimage: UnpackBzImage,
    /// Extra kernel command line.
    pub cmdline: String,
    /// The shared secret.
    pub secret: Vec<u8>,
    /// How long to wait for the other nodes.
    pub connect_timeout: std::time::Duration,
    /// How long a node keeps a page it just received before giving it away
    /// (`dsm_hold_us`; see [`dsm::DsmOptions::hold`]).
    pub dsm_hold: std::time::Duration,
    /// Whether the guest gets ACPI tables (`acpi`, default true).
    pub acpi: bool,
    /// Whether the guest sees one NUMA node per dvmm node (`numa`, default true; needs
    /// `acpi`).
    pub numa: bool,
    /// The virtio disk's image file (node 0; `disk`) and whether it is read-only
    /// (`disk_readonly`).
    pub disk: Option<vmm::vm::DiskSpec>,
    /// The virtio network device (node 0; `[net]`).
    pub net: Option<vmm::vm::NetSpec>,
    /// The nodes, node 0 first.
    pub nodes: Vec<NodeConfig>,
}

/// The default kernel.
pub const DEFAULT_KERNEL: &str = "guest/out/vmlinux";

impl ClusterConfig {
    /// Reads and validates a cluster description file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut c = Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { msg, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                msg,
            },
            other => other,
        })?;
        if c.name.is_empty() {
            c.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            c.validate()?;
        }
        Ok(c)
    }

    /// Parses the text of a description; relative `secret_file` paths are taken from
    /// `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            msg: e.message().to_string(),
        })?;
        let mut nodes = Vec::new();
        for (i, n) in raw.node.iter().enumerate() {
            let addr: SocketAddr = n.addr.parse().map_err(|_| {
                ConfigError::Invalid(format!("node {i}: address '{}' is not IP:PORT", n.addr))
            })?;
            let memory = vmm::memory::parse_size(&n.memory)
                .map_err(|e| ConfigError::Invalid(format!("node {i}: {e}")))?;
            nodes.push(NodeConfig {
                addr,
                vcpus: n.vcpus,
                memory,
            });
        }
        let secret = match (raw.secret, raw.secret_file) {
            (Some(s), None) => s.into_bytes(),
            (None, Some(f)) => {
                let f = if f.is_absolute() { f } else { base.join(f) };
                let s = std::fs::read_to_string(&f).map_err(|e| {
                    ConfigError::Invalid(format!("cannot read secret_file {}: {e}", f.display()))
                })?;
                s.trim().as_bytes().to_vec()
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give either secret or secret_file, not both".into(),
                ))
            }
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "a cluster secret is required (secret or secret_file)".into(),
                ))
            }
        };
        let c = ClusterConfig {
            name: raw.name.unwrap_or_default(),
            kernel: raw.kernel.unwrap_or_else(|| PathBuf::from(DEFAULT_KERNEL)),
            initrd: raw.initrd,
            unpack_bzimage: raw.unpack_bzimage,
            cmdline: raw.cmdline,
            secret,
            connect_timeout: raw
                .connect_timeout_secs
                .map_or(DEFAULT_CONNECT_TIMEOUT, std::time::Duration::from_secs),
            dsm_hold: raw
                .dsm_hold_us
                .map_or(dsm::DEFAULT_HOLD, std::time::Duration::from_micros),
            acpi: raw.acpi,
            numa: raw.numa,
            disk: raw.disk.map(|path| vmm::vm::DiskSpec {
                path,
                read_only: raw.disk_readonly,
            }),
            net: raw.net.as_ref().map(RawNet::spec).transpose()?,
            nodes,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks a description: the one set of rules for a parsed file (`dvmm node`) and
    /// for a description built in code (`dvmm run`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::control::check_name(&self.name).map_err(ConfigError::Invalid)?;
        let nodes = &self.nodes;
        if nodes.is_empty() {
            return Err(ConfigError::Invalid("no [[node]] entries".into()));
        }
        if nodes.len() > MAX_NODES {
            return Err(ConfigError::Invalid(format!(
                "{} nodes: at most {MAX_NODES}",
                nodes.len()
            )));
        }
        for (i, n) in nodes.iter().enumerate() {
            if n.memory == 0 || n.memory % (2 << 20) != 0 {
                return Err(ConfigError::Invalid(format!(
                    "node {i}: memory share of {} KiB: must be a non-zero multiple of 2 MiB",
                    n.memory >> 10
                )));
            }
        }
        if nodes[0].vcpus == 0 {
            return Err(ConfigError::Invalid(
                "node 0 (the boot node) must run at least one vCPU".into(),
            ));
        }
        for (i, a) in nodes.iter().enumerate() {
            if nodes[..i].iter().any(|b| b.addr == a.addr) {
                return Err(ConfigError::Invalid(format!(
                    "node {i}: address {} is used twice",
                    a.addr
                )));
            }
        }
        if self.dsm_hold > MAX_DSM_HOLD {
            return Err(ConfigError::Invalid(format!(
                "dsm_hold_us must be at most {} (1 s)",
                MAX_DSM_HOLD.as_micros()
            )));
        }
        if self.numa && !self.acpi && nodes.len() > 1 {
            return Err(ConfigError::Invalid(
                "numa = true needs acpi = true (the NUMA topology is in ACPI tables); \
                 set numa = false for a guest without ACPI"
                    .into(),
            ));
        }
        if self.disk.is_some() && !self.acpi {
            return Err(ConfigError::Invalid(
                "a disk needs acpi = true (the guest finds the virtio device in the ACPI tables)"
                    .into(),
            ));
        }
        if let Some(net) = &self.net {
            if !self.acpi {
                return Err(ConfigError::Invalid(
                    "a network device needs acpi = true (the guest finds the virtio device in the ACPI tables)"
                        .into(),
                ));
            }
            net.validate()
                .map_err(|e| ConfigError::Invalid(format!("net: {e}")))?;
        }
        if self.secret.len() < 16 {
            return Err(ConfigError::Invalid(
                "the cluster secret must have at least 16 characters".into(),
            ));
        }
        vmm::vm::validate(self.total_vcpus(), self.total_memory())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The description as TOML that [`ClusterConfig::parse`] reads back, with the
    /// secret in `secret_file` (not written here; see [`ClusterConfig::save`]).
    pub fn to_toml(&self, secret_file: &Path) -> String {
        let raw = RawConfig {
            name: (!self.name.is_empty()).then(|| self.name.clone()),
            kernel: Some(self.kernel.clone()),
            initrd: self.initrd.clone(),
            unpack_bzimage: self.unpack_bzimage,
            cmdline: self.cmdline.clone(),
            secret: None,
            secret_file: Some(secret_file.to_path_buf()),
            connect_timeout_secs: Some(self.connect_timeout.as_secs()),
            dsm_hold_us: Some(u64::try_from(self.dsm_hold.as_micros()).unwrap_or(u64::MAX)),
            acpi: self.acpi,
            numa: self.numa,
            disk: self.disk.as_ref().map(|d| d.path.clone()),
            disk_readonly: self.disk.as_ref().is_some_and(|d| d.read_only),
            net: self.net.as_ref().map(|n| RawNet {
                tap: Some(n.tap.clone()),
                host: Some(format!("{}/{}", n.host_addr, n.prefix_len)),
                guest: Some(n.guest_addr.to_string()),
            }),
            node: self
                .nodes
                .iter()
                .map(|n| RawNode {
                    addr: n.addr.to_string(),
                    vcpus: n.vcpus,
                    memory: if n.memory % 1024 == 0 {
                        format!("{}K", n.memory >> 10)
                    } else {
                        n.memory.to_string()
                    },
                })
                .collect(),
        };
        // Only strings, integers, paths and tables of them: serialization cannot fail.
        toml::to_string(&raw).unwrap_or_default()
    }

    /// Validates the description and writes it to `dir/cluster.toml`, with the secret
    /// in `dir/secret` (owner-only); returns the description's path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ConfigError> {
        self.validate()?;
        let secret = dir.join("secret");
        write_private(&secret, &self.secret)?;
        let path = dir.join("cluster.toml");
        let text = self.to_toml(Path::new("secret"));
        std::fs::write(&path, text).map_err(|source| ConfigError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// All vCPUs.
    pub fn total_vcpus(&self) -> usize {
        self.nodes.iter().map(|n| n.vcpus).sum()
    }

    /// All guest RAM.
    pub fn total_memory(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory).sum()
    }

    /// The node of every vCPU.
    pub fn vcpu_nodes(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| std::iter::repeat_n(i as u16, n.vcpus))
            .collect()
    }

    /// The guest's NUMA nodes: one per dvmm node, with its vCPUs and the guest-physical
    /// ranges of its memory share (of which the DSM makes it the home). Empty without
    /// `numa` or with a single node.
    pub fn numa_nodes(&self) -> Vec<vmm::boot::acpi::NumaNode> {
        if !self.numa || self.nodes.len() < 2 {
            return Vec::new();
        }
        let total = self.total_memory();
        let (mut vcpu, mut offset) = (0usize, 0u64);
        self.nodes
            .iter()
            .map(|n| {
                let node = vmm::boot::acpi::NumaNode {
                    vcpus: vcpu..vcpu + n.vcpus,
                    memory: vmm::memory::gpa_ranges(total, offset..offset + n.memory)
                        .unwrap_or_default(),
                };
                vcpu += n.vcpus;
                offset += n.memory;
                node
            })
            .collect()
    }

    /// The first page each node is home of (plus the end).
    pub fn home_bounds(&self) -> Vec<u64> {
        let mut b = vec![0u64];
        for n in &self.nodes {
            let last = *b.last().unwrap_or(&0);
            b.push(last + n.memory / 4096);
        }
        b
    }
}

/// Writes `data` to a new file only its owner may read.
fn write_private(path: &Path, data: &[u8]) -> Result<(), ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
        secret = "0123456789abcdef0123"
        [[node]]
        addr = "127.0.0.1:7100"
        vcpus = 2
        memory = "512M"
        [[node]]
        addr = "127.0.0.1:7101"
        vcpus = 1
        memory = "256M"
    "#;

    #[test]
    fn parses_and_derives() {
        let c = ClusterConfig::parse(OK, Path::new(".")).unwrap();
        assert_eq!(c.total_vcpus(), 3);
        assert_eq!(c.total_memory(), 768 << 20);
        assert_eq!(c.vcpu_nodes(), vec![0, 0, 1]);
        assert_eq!(c.home_bounds(), vec![0, 131072, 196608]);
        assert_eq!(c.kernel, PathBuf::from(DEFAULT_KERNEL));
        assert_eq!(c.dsm_hold, dsm::DEFAULT_HOLD);
        assert_eq!(c.unpack_bzimage, UnpackBzImage::Auto);
        let always = format!("unpack_bzimage = \"always\"\n{OK}");
        let c = ClusterConfig::parse(&always, Path::new(".")).unwrap();
        assert_eq!(c.unpack_bzimage, UnpackBzImage::Always);
        // ACPI and NUMA by default, no disk; and as written.
        assert!(c.acpi && c.numa && c.disk.is_none());
        let off = format!("numa = false\ndisk = \"/d.img\"\ndisk_readonly = true\n{OK}");
        let c = ClusterConfig::parse(&off, Path::new(".")).unwrap();
        assert!(c.acpi && !c.numa);
        let no_acpi = format!("acpi = false\nnuma = false\n{OK}");
        assert!(!ClusterConfig::parse(&no_acpi, Path::new(".")).unwrap().acpi);
        let disk_no_acpi = format!("acpi = false\nnuma = false\ndisk = \"/d.img\"\n{OK}");
        assert!(ClusterConfig::parse(&disk_no_acpi, Path::new("."))
            .unwrap_err()
            .to_string()
            .contains("a disk needs acpi"));
        assert_eq!(
            c.disk,
            Some(vmm::vm::DiskSpec {
                path: "/d.img".into(),
                read_only: true
            })
        );
        let back = ClusterConfig::parse(
            &c.to_toml(Path::new("s"))
                .replace("secret_file = \"s\"", "secret = \"0123456789abcdef\""),
            Path::new("."),
        )
        .unwrap();
        assert_eq!((back.acpi, back.numa, back.disk), (c.acpi, c.numa, c.disk));
    }

    #[test]
    fn parses_the_network_table() {
        let spec = |text: &str| ClusterConfig::parse(&format!("{OK}\n{text}"), Path::new("."));
        assert_eq!(spec("").unwrap().net, None);
        // Every field defaults: the TAP is named after this process.
        let defaults = spec("[net]").unwrap().net.unwrap();
        assert_eq!(defaults, vmm::vm::NetSpec::default_for(std::process::id()));
        assert_eq!(defaults.tap, format!("dvmm{}", std::process::id()));
        assert_eq!(
            (defaults.host_addr, defaults.prefix_len, defaults.guest_addr),
            ([172, 30, 213, 1].into(), 24, [172, 30, 213, 2].into())
        );
        let c =
            spec("[net]\ntap = \"tap7\"\nhost = \"10.9.0.1/16\"\nguest = \"10.9.200.7\"").unwrap();
        let n = c.net.clone().unwrap();
        assert_eq!(
            (n.tap.as_str(), n.host_addr, n.prefix_len, n.guest_addr),
            ("tap7", [10, 9, 0, 1].into(), 16, [10, 9, 200, 7].into())
        );
        // Written back and read again: the same.
        let back = ClusterConfig::parse(
            &c.to_toml(Path::new("s"))
                .replace("secret_file = \"s\"", "secret = \"0123456789abcdef\""),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(back.net, c.net);
        let bad = [
            ("[net]\nhost = \"172.30.213.1\"", "invalid cluster config: net.host: '172.30.213.1' is not an IPv4 address with a prefix length (e.g. 172.30.213.1/24)"),
            ("[net]\nguest = \"guest\"", "invalid cluster config: net.guest: 'guest' is not an IPv4 address (e.g. 172.30.213.2)"),
            ("[net]\nguest = \"172.30.213.1\"", "invalid cluster config: net: the host and the guest have the same address 172.30.213.1"),
            ("[net]\nhost = \"10.0.0.1/24\"", "invalid cluster config: net: the guest address 172.30.213.2 is not in the host's subnet 10.0.0.0/24"),
            ("[net]\nhost = \"172.30.213.1/4\"", "invalid cluster config: net: prefix length /4 is out of range: use 8 to 30"),
            ("[net]\nguest = \"172.30.213.255\"", "invalid cluster config: net: the guest address 172.30.213.255 is the broadcast address of 172.30.213.0/24"),
            ("[net]\ntap = \"way-too-long-a-name\"", "invalid cluster config: net: invalid TAP name \"way-too-long-a-name\": use 1 to 15 bytes, without '/', ':' or white space"),
            ("[net]\nmac = \"x\"", "unknown field"),
            ("[net]\nhost = 5", "invalid type"),
        ];
        for (text, want) in bad {
            let e = spec(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let no_acpi = format!("acpi = false\nnuma = false\n{OK}\n[net]");
        assert_eq!(
            ClusterConfig::parse(&no_acpi, Path::new("."))
                .unwrap_err()
                .to_string(),
            "invalid cluster config: a network device needs acpi = true (the guest finds the virtio device in the ACPI tables)"
        );
    }

    #[test]
    fn rejects_bad_descriptions() {
        let bad = [
            ("secret = \"0123456789abcdef\"", "no [[node]]"),
            ("secret = \"0123456789abcdef\"\n[[node]]\naddr = \"x\"\nvcpus = 1\nmemory = \"512M\"", "not IP:PORT"),
            ("[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"", "secret is required"),
            ("secret = \"short\"\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"", "at least 16"),
            ("secret = \"0123456789abcdef\"\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 0\nmemory = \"512M\"", "at least one vCPU"),
            ("secret = \"0123456789abcdef\"\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"1K\"", "multiple of 2 MiB"),
            ("secret = \"0123456789abcdef\"\nbogus = 1\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"", "unknown field"),
            ("secret = \"0123456789abcdef\"\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"", "used twice"),
            ("secret = \"0123456789abcdef\"\ndsm_hold_us = 2000000\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"", "dsm_hold_us"),
            ("secret = \"0123456789abcdef\"\nunpack_bzimage = \"sometimes\"\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"", "unknown variant"),
            ("secret = \"0123456789abcdef\"\nacpi = false\n[[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"512M\"\n[[node]]\naddr = \"127.0.0.1:2\"\nvcpus = 1\nmemory = \"512M\"", "numa = true needs acpi"),
            ("not toml at all [", ""),
        ];
        for (text, want) in bad {
            let e = ClusterConfig::parse(text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    fn built(nodes: &[(usize, u64)]) -> ClusterConfig {
        ClusterConfig {
            name: "t".into(),
            kernel: "/k".into(),
            initrd: None,
            unpack_bzimage: UnpackBzImage::Never,
            cmdline: "a=\"b\"".into(),
            secret: b"0123456789abcdef".to_vec(),
            connect_timeout: std::time::Duration::from_secs(30),
            dsm_hold: dsm::DEFAULT_HOLD,
            acpi: true,
            numa: true,
            disk: None,
            net: None,
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, &(vcpus, memory))| NodeConfig {
                    addr: SocketAddr::from(([127, 0, 0, 1], 7100 + i as u16)),
                    vcpus,
                    memory,
                })
                .collect(),
        }
    }

    #[test]
    fn built_and_parsed_descriptions_are_checked_alike() {
        let dir = std::env::temp_dir().join(format!("dvmm-cfg-alike-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), "0123456789abcdef").unwrap();
        let mib = 1u64 << 20;
        let mut dup = built(&[(1, 512 * mib), (1, 512 * mib)]);
        dup.nodes[1].addr = dup.nodes[0].addr;
        let mut hold = built(&[(1, 512 * mib)]);
        hold.dsm_hold = std::time::Duration::from_secs(2);
        let net = |f: &dyn Fn(&mut vmm::vm::NetSpec)| {
            let mut c = built(&[(1, 512 * mib)]);
            let mut spec = vmm::vm::NetSpec::default_for(42);
            f(&mut spec);
            c.net = Some(spec);
            c
        };
        let mut net_no_acpi = net(&|_| {});
        (net_no_acpi.acpi, net_no_acpi.numa) = (false, false);
        let bad = [
            (built(&[]), "no [[node]]"),
            (built(&vec![(1, 2 * mib); MAX_NODES + 1]), "at most 64"),
            (
                built(&[(0, 512 * mib), (2, 512 * mib)]),
                "at least one vCPU",
            ),
            (
                built(&[(1, 512 * mib), (1, 0)]),
                "node 1: memory share of 0 KiB",
            ),
            (built(&[(1, 3 * mib)]), "multiple of 2 MiB"),
            (built(&[(40, 512 * mib)]), "vCPU"),
            (dup, "used twice"),
            (hold, "dsm_hold_us"),
            (
                net(&|n| n.guest_addr = [10, 0, 0, 2].into()),
                "net: the guest address 10.0.0.2 is not in the host's subnet 172.30.213.0/24",
            ),
            (net(&|n| n.prefix_len = 31), "net: prefix length /31"),
            (net(&|n| n.tap = "a/b".into()), "net: invalid TAP name"),
            (net_no_acpi, "a network device needs acpi = true"),
        ];
        for (c, want) in bad {
            let built_err = c.validate().unwrap_err().to_string();
            assert!(built_err.contains(want), "{want}: {built_err}");
            assert_eq!(built_err.lines().count(), 1, "{built_err}");
            let text = c.to_toml(Path::new("secret"));
            let parsed_err = ClusterConfig::parse(&text, &dir).unwrap_err().to_string();
            assert_eq!(built_err, parsed_err, "{text}");
            assert!(c.save(&dir).is_err());
        }
        let good = built(&[(2, 512 * mib), (0, 256 * mib)]);
        let path = good.save(&dir).unwrap();
        let back = ClusterConfig::load(&path).unwrap();
        assert_eq!(back.vcpu_nodes(), vec![0, 0]);
        assert_eq!(back.total_memory(), 768 * mib);
        assert_eq!(back.cmdline, good.cmdline);
        assert_eq!(back.secret, good.secret);
        assert_eq!(back.connect_timeout, good.connect_timeout);
        assert_eq!(back.net, None);
        let with_net = net(&|n| n.tap = "dvmmtest".into());
        let back = ClusterConfig::load(&with_net.save(&dir).unwrap()).unwrap();
        assert_eq!(back.net, with_net.net);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
