//! Several "hosts" on one machine: network namespaces joined by veth pairs on a bridge.
//!
//! Used by `dvmm run --netns` and by the multi-host tests. A hub namespace `<tag>h`
//! holds a bridge; host `k` lives in namespace `<tag>n<k>` with address
//! `<subnet>.(k+1)/24` on `eth0`, whose veth peer is on the hub's bridge. Every
//! namespace is deleted when the [`NetnsLab`] is dropped (also on a panic unwinding
//! through its owner). Needs root and the `ip` tool (iproute2).

use std::process::Command;

/// Namespaces of one run, removed on drop.
#[derive(Debug)]
pub struct NetnsLab {
    /// Hub first, then the hosts.
    names: Vec<String>,
    subnet: String,
}

/// Runs `ip` with `args`; the error carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (is iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetnsLab {
    /// Creates the hub and `hosts` host namespaces named after `tag` (keep it short and
    /// unique: namespace names are global), host `k` at `<subnet>.(k+1)`, e.g. subnet
    /// `10.213.0`. On an error, what was already created is removed.
    pub fn create(tag: &str, hosts: usize, subnet: &str) -> Result<NetnsLab, String> {
        if hosts > 250 {
            return Err(format!("{hosts} hosts: at most 250 in one /24"));
        }
        let hub = format!("{tag}h");
        let mut lab = NetnsLab {
            names: Vec::new(),
            subnet: subnet.to_owned(),
        };
        ip(&["netns", "add", &hub])?;
        lab.names.push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for k in 0..hosts {
            let name = format!("{tag}n{k}");
            ip(&["netns", "add", &name])?;
            lab.names.push(name.clone());
            let peer = format!("b{k}");
            ip(&[
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
                &hub,
            ])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", lab.addr(k)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &hub, "link", "set", &peer, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &peer, "up"])?;
        }
        Ok(lab)
    }

    /// Host `k`'s address (without a port).
    pub fn addr(&self, k: usize) -> String {
        format!("{}.{}", self.subnet, k + 1)
    }

    /// Host `k`'s namespace name.
    pub fn host(&self, k: usize) -> &str {
        &self.names[k + 1]
    }

    /// Every namespace of the lab, hub first.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            if let Err(e) = ip(&["netns", "del", n]) {
                eprintln!("dvmm: cleanup: {e}");
            }
        }
    }
}
