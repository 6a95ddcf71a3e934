//! Test hosts in network namespaces: one namespace per node, each with a
//! veth link to a bridge in a hub namespace, so partitions are real packet
//! loss between hosts (blackhole routes), not a simulation.
//!
//! Everything lives in namespaces this harness creates and deletes; the
//! addresses (`10.211.0.0/24`) exist only inside them. Needs root and
//! iproute2's `ip`; [`Netns::available`] says why not when it cannot run.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Numbers the namespaces this process makes, so their names never clash.
static SEQ: AtomicU32 = AtomicU32::new(0);

use crate::Result;

/// The hosts' subnet; only ever routed inside the test's namespaces.
const SUBNET: [u8; 3] = [10, 211, 0];

/// One set of test hosts joined by a bridge.
#[derive(Debug)]
pub struct Netns {
    hub: String,
    hosts: Vec<String>,
    /// Directed pairs (from, to) whose packets are currently dropped.
    cut: BTreeSet<(usize, usize)>,
    /// Quarter nodes listen on 0.0.0.0 and advertise their host address.
    pub wildcard: bool,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    /// Whether namespaces can be made here: `Err` says why not.
    pub fn available() -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not running as root".into());
        }
        // Unique per call: tests in one process probe at the same time.
        let probe = format!(
            "iqprobe{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &probe]).map_err(|e| format!("cannot add a namespace: {e}"))?;
        ip(&["netns", "del", &probe])
    }

    /// Creates `n` hosts, numbered from 0, all reachable from each other.
    pub fn create(n: usize) -> Result<Self> {
        let tag = format!(
            "iqj{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Self {
            hub: format!("{tag}h"),
            hosts: Vec::new(),
            cut: BTreeSet::new(),
            wildcard: false,
        };
        ip(&["netns", "add", &net.hub])?;
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.hub, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let host = format!("{tag}n{i}");
            ip(&["netns", "add", &host])?;
            net.hosts.push(host.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &net.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ])?;
            ip(&["-n", &net.hub, "link", "set", &port, "master", "br0", "up"])?;
            let cidr = format!("{}/24", net.addr(i));
            ip(&["-n", &host, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &host, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The namespace name of host `i` (for `ip netns exec`).
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Host `i`'s address on the test network.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let last = u8::try_from(i + 1).unwrap_or(u8::MAX);
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], last)
    }

    /// Drops every packet between `a` and `b`, both directions.
    pub fn cut(&mut self, a: usize, b: usize) -> Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            if self.cut.insert((from, to)) {
                let dst = format!("{}/32", self.addr(to));
                ip(&["-n", &self.hosts[from], "route", "add", "blackhole", &dst])?;
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&mut self) -> Result<()> {
        for (from, to) in std::mem::take(&mut self.cut) {
            let dst = format!("{}/32", self.addr(to));
            ip(&["-n", &self.hosts[from], "route", "del", "blackhole", &dst])?;
        }
        Ok(())
    }

    /// Runs `f` on a thread inside host `ns`'s network namespace, so its
    /// sockets (e.g. HTTP calls to the node's API on 127.0.0.1) are there.
    pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = format!("/run/netns/{ns}");
        let file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("cannot enter namespace {ns}: {e}"))?;
                f()
            })
            .join()
            .map_err(|_| format!("a call inside namespace {ns} panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of every veth pair with it.
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
