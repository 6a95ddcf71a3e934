//! The multi-node harness: starts real `iq-center` and `iq-node` processes on
//! loopback, each with its own data directory, and speaks in faults (`kill`,
//! `restart`, `stop`) and bounded waits (`wait_until`).
//!
//! The binaries are built once per test run (`cargo build --bins` for the
//! same profile) so `cargo test` alone is enough; `IQ_BIN_DIR` uses binaries
//! built elsewhere instead.
//!
//! # Layout
//! - [`Cluster`]: a centre plus quarter nodes, created through the CLIs.
//! - [`Node`]: one node process: CLI calls, HTTP API calls, kill/restart.
//! - [`wait_until`]: the only way tests wait.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod jepsen;
pub mod netns;

pub use netns::Netns;

/// A test failure with a readable message.
pub type Result<T> = std::result::Result<T, String>;

/// Which binary a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Center,
    Quarter,
}

/// Directory holding the built binaries (built once per test process).
/// `IQ_BIN_DIR` points at binaries built elsewhere and skips the build, so
/// a long run keeps its binaries while the tree changes.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("IQ_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let workspace = manifest.parent().map(Path::to_path_buf).unwrap_or(manifest);
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let release = cfg!(not(debug_assertions));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace).args([
            "build",
            "--quiet",
            "-p",
            "iq-node",
            "-p",
            "iq-center",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "building iq-node and iq-center failed: {status:?}"
        );
        target.join(if release { "release" } else { "debug" })
    })
}

/// Waits until `pred` returns `Ok(Some(value))`, polling every 50 ms, for at
/// most `timeout`. The last error or `None` is reported on timeout.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("condition not met");
    loop {
        match pred() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One node: its data directory and, while running, its process.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The network namespace the node runs in, if it is a test host.
    pub netns: Option<String>,
    /// Its libp2p address with `/p2p/<PeerId>`, as `init` printed it.
    pub listen: String,
}

impl Node {
    fn bin(&self) -> PathBuf {
        bin_dir().join(match self.kind {
            Kind::Center => "iq-center",
            Kind::Quarter => "iq-node",
        })
    }

    /// A command running this node's binary, inside its namespace if any.
    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(self.bin());
                cmd
            }
            None => Command::new(self.bin()),
        }
    }

    /// Runs `call` where the node's API is reachable (its namespace).
    fn http<T: Send>(&self, call: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        match &self.netns {
            Some(ns) => Netns::run_in(ns, call),
            None => call(),
        }
    }

    /// A handle for calling this node's API from another thread while the
    /// node itself is killed and restarted.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: self.name.clone(),
            dir: self.dir.clone(),
            netns: self.netns.clone(),
        }
    }

    /// Runs a CLI command of this node's binary with `--data` appended.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(args)
            .arg("--data")
            .arg(&self.dir)
            .env_remove("IQ_DATA")
            .stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin().display()))
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            return Err(format!(
                "{} {:?} failed: {}",
                self.name,
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a `--json` CLI command and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.cli_ok(&all)?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} {:?}: bad JSON ({e}): {text}", self.name, args))
    }

    /// Starts `run` and waits until its API answers.
    pub fn start(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .command()
            .args(["run", "--data"])
            .arg(&self.dir)
            .env(
                "IQ_LOG",
                std::env::var("IQ_NODE_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.name))?;
        self.child = Some(child);
        wait_until(
            &format!("{} to serve its API", self.name),
            Duration::from_secs(20),
            || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(format!(
                        "{} exited with {status}; log:\n{}",
                        self.name,
                        self.log_tail()
                    ));
                }
                Ok(self.api_get("/api/v1/status").ok().map(|_| ()))
            },
        )
    }

    /// The last lines of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn api_base(&self) -> Result<String> {
        let addr = std::fs::read_to_string(self.dir.join("api.addr"))
            .map_err(|e| format!("{}: no api.addr ({e})", self.name))?;
        Ok(format!("http://{}", addr.trim()))
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(20)))
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// `GET` on the node's HTTP API; non-2xx answers are errors.
    pub fn api_get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.api_base()?);
        self.http(|| Self::get_json(&url))
    }

    fn get_json(url: &str) -> Result<Value> {
        get_json_with(&Self::agent(), url)
    }

    /// `POST` JSON to the node's HTTP API; returns (status, body).
    pub fn api_post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.api_base()?);
        self.http(|| Self::post_json(&url, body))
    }

    fn post_json(url: &str, body: &Value) -> Result<(u16, Value)> {
        let mut resp = Self::agent()
            .post(url)
            .send_json(body)
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body: Value = resp
            .body_mut()
            .read_json()
            .map_err(|e| format!("POST {url}: {e}"))?;
        Ok((status, body))
    }

    /// Any call on the node's HTTP API: (status, body as text).
    pub fn api_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.api_base()?);
        self.http(|| Self::call_text(method, &url, body))
    }

    fn call_text(method: &str, url: &str, body: Option<&Value>) -> Result<(u16, String)> {
        let agent = Self::agent();
        let result = match (method, body) {
            ("get", _) => agent.get(url).call(),
            ("delete", _) => agent.delete(url).call(),
            ("post", Some(b)) => agent.post(url).send_json(b),
            ("post", None) => agent.post(url).send_empty(),
            (m, _) => return Err(format!("unsupported method {m}")),
        };
        let mut resp = result.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{method} {url}: {e}"))?;
        Ok((status, text))
    }

    /// Records a concern through the API; returns its id once acknowledged.
    pub fn add_concern(&self, description: &str) -> Result<String> {
        let (status, body) = self.api_post(
            "/api/v1/concerns",
            &serde_json::json!({"category": "litter", "description": description}),
        )?;
        if status != 201 {
            return Err(format!(
                "{}: adding a concern answered {status}: {body}",
                self.name
            ));
        }
        body["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no id in {body}"))
    }

    /// Ids of all concerns the node holds, optionally of one quarter.
    pub fn concern_ids(&self, quarter: Option<&str>) -> Result<Vec<String>> {
        let path = match quarter {
            Some(q) => format!("/api/v1/concerns?quarter={q}"),
            None => "/api/v1/concerns".into(),
        };
        let list = self.api_get(&path)?;
        Ok(list
            .as_array()
            .ok_or("concerns is not a list")?
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Heads per document id, from `status`.
    pub fn heads(&self) -> Result<Vec<(String, Vec<String>)>> {
        let status = self.api_get("/api/v1/status")?;
        let docs = status["documents"]
            .as_array()
            .ok_or("no documents in status")?;
        let mut out: Vec<(String, Vec<String>)> = docs
            .iter()
            .map(|d| {
                let id = d["id"].as_str().unwrap_or_default().to_owned();
                let mut heads: Vec<String> = d["heads"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|h| h.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                heads.sort();
                (id, heads)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// SIGKILL without reaping: usable while other threads still talk to
    /// the node (call [`Node::kill`] afterwards to reap it).
    pub fn sigkill(&self) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// SIGKILL: the process dies at once, mid-write or not.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = wait_until(
            &format!("{} to exit", self.name),
            Duration::from_secs(20),
            || child.try_wait().map_err(|e| e.to_string()),
        );
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!(
                "{} exited with {s}; log:\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Starts the node again after `kill` or `stop`.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    /// SIGSTOP: the process freezes with its connections open.
    pub fn pause(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| format!("{} is not running", self.name))?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).map_err(|e| format!("{signal} to {}: {e}", self.name))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process is still alive (it has not exited by itself).
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the running process, in KiB (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> Result<String> {
        Ok(self.cli_ok(&["id"])?.trim().to_owned())
    }

    /// The node's identity key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("identity.key")
    }
}

/// `GET` with `agent`, parsed as JSON; non-2xx answers are errors.
pub fn get_json_with(agent: &ureq::Agent, url: &str) -> Result<Value> {
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body: Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET {url}: {status}: {body}"));
    }
    Ok(body)
}

/// A node's API, callable from any thread while the node itself is killed,
/// paused and restarted by the thread that owns the [`Node`].
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    dir: PathBuf,
    netns: Option<String>,
}

impl Endpoint {
    /// Runs `call` with the API's base URL, inside the node's namespace.
    pub fn call<T: Send>(&self, call: impl FnOnce(&str) -> Result<T> + Send) -> Result<T> {
        let addr = std::fs::read_to_string(self.dir.join("api.addr"))
            .map_err(|e| format!("{}: no api.addr ({e})", self.name))?;
        let base = format!("http://{}", addr.trim());
        match &self.netns {
            Some(ns) => Netns::run_in(ns, || call(&base)),
            None => call(&base),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A centre and its quarters, initialised through the CLIs.
#[derive(Debug)]
pub struct Cluster {
    pub center: Node,
    pub quarters: Vec<Node>,
    /// The centre's libp2p address with `/p2p/<PeerId>`.
    pub center_addr: String,
    /// Runs as a libp2p private network (pre-shared key).
    pub private: bool,
    /// Kept so the directory lives as long as the cluster.
    pub root: tempfile::TempDir,
    /// The test hosts, when each node runs in a namespace of its own
    /// (declared last: dropped after the nodes are killed).
    pub net: Option<Netns>,
}

/// `--listen` and `--api` (and `--advertise`) for a node on test host `i`,
/// or on loopback without hosts. Host 0 is the centre. Loopback ports come
/// from this process, so the nodes it sets up never share one (each `init`
/// picking its own could).
fn host_addr_args(net: Option<&Netns>, i: usize) -> Result<Vec<String>> {
    let Some(net) = net else {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let port = || {
            iq_protocol::datadir::free_port(loopback)
                .map_err(|e| format!("no free loopback port: {e}"))
        };
        return Ok(vec![
            "--listen".into(),
            format!("/ip4/127.0.0.1/tcp/{}", port()?),
            "--api".into(),
            format!("127.0.0.1:{}", port()?),
        ]);
    };
    let own = format!("/ip4/{}/tcp/7000", net.addr(i));
    let mut args = vec!["--api".into(), "127.0.0.1:8000".into()];
    if net.wildcard && i > 0 {
        args.extend(["--listen".into(), "/ip4/0.0.0.0/tcp/7000".into()]);
        args.extend(["--advertise".into(), own]);
    } else {
        args.extend(["--listen".into(), own]);
    }
    Ok(args)
}

/// The PeerId printed on the `peer id:` line of `init`.
fn peer_id_line(out: &str) -> Result<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("peer id:").map(|s| s.trim().to_owned()))
        .ok_or_else(|| format!("no peer id in: {out}"))
}

fn listen_line(out: &str) -> Result<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("listen:").map(|s| s.trim().to_owned()))
        .ok_or_else(|| format!("no listen address in: {out}"))
}

impl Cluster {
    /// Inits and starts a centre and quarters with these slugs, and puts
    /// them on the roster.
    pub fn start(slugs: &[&str]) -> Result<Self> {
        Self::start_with(slugs, false)
    }

    /// Like [`Cluster::start`], as a private network: the centre generates a
    /// pre-shared key and every quarter node is initialised with it.
    pub fn start_private(slugs: &[&str]) -> Result<Self> {
        Self::start_with(slugs, true)
    }

    /// Like [`Cluster::start`], each node on its own test host (network
    /// namespace) of `net`: host 0 is the centre, host `i` quarter `i`.
    pub fn start_on_hosts(slugs: &[&str], net: Netns) -> Result<Self> {
        Self::start_on(slugs, false, Some(net))
    }

    fn start_with(slugs: &[&str], private: bool) -> Result<Self> {
        Self::start_on(slugs, private, None)
    }

    fn start_on(slugs: &[&str], private: bool, net: Option<Netns>) -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("iq-test-")
            .disable_cleanup(std::env::var_os("IQ_KEEP_DIRS").is_some())
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut center = Node {
            name: "center".into(),
            kind: Kind::Center,
            dir: root.path().join("center"),
            child: None,
            netns: net.as_ref().map(|n| n.host(0).to_owned()),
            log: root.path().join("center.log"),
            listen: String::new(),
        };
        let mut init = vec!["init".to_owned()];
        if private {
            init.push("--private-network".into());
        }
        init.extend(host_addr_args(net.as_ref(), 0)?);
        let init: Vec<&str> = init.iter().map(String::as_str).collect();
        let out = center.cli_ok(&init)?;
        let center_addr = listen_line(&out)?;
        center.listen = center_addr.clone();
        center.start()?;
        let mut cluster = Self {
            center,
            quarters: Vec::new(),
            center_addr,
            private,
            root,
            net,
        };
        for slug in slugs {
            let (node, peer) = cluster.init_quarter(slug)?;
            cluster.add_to_roster(slug, &peer)?;
            cluster.quarters.push(node);
        }
        for q in &mut cluster.quarters {
            q.start()?;
        }
        Ok(cluster)
    }

    /// Initialises a quarter node (not started, not on the roster); returns it and its PeerId.
    pub fn init_quarter(&self, slug: &str) -> Result<(Node, String)> {
        self.init_writer(slug, slug)
    }

    /// Initialises a further writer node `name` of quarter `slug` (an office
    /// PC and a laptop); not started, not on the roster.
    pub fn init_writer(&self, slug: &str, name: &str) -> Result<(Node, String)> {
        self.init_node(slug, name, self.private)
    }

    /// Initialises quarter node `name` of `slug`, with the federation's
    /// pre-shared key or (`with_psk == false`) without it.
    pub fn init_node(&self, slug: &str, name: &str, with_psk: bool) -> Result<(Node, String)> {
        self.init_node_with(slug, name, with_psk, &[])
    }

    /// [`Cluster::init_quarter`] with further `init` arguments (such as
    /// `--replicate own`).
    pub fn init_quarter_with(&self, slug: &str, extra: &[&str]) -> Result<(Node, String)> {
        self.init_node_with(slug, slug, self.private, extra)
    }

    fn init_node_with(
        &self,
        slug: &str,
        name: &str,
        with_psk: bool,
        extra: &[&str],
    ) -> Result<(Node, String)> {
        let host = self.quarters.len() + 1;
        let net = self.net.as_ref();
        let mut node = Node {
            name: name.into(),
            kind: Kind::Quarter,
            dir: self.root.path().join(name),
            child: None,
            netns: net.map(|n| n.host(host).to_owned()),
            log: self.root.path().join(format!("{name}.log")),
            listen: String::new(),
        };
        let name = slug.to_uppercase();
        let psk = self.center.dir.join("swarm.key");
        let psk = psk.to_str().ok_or("temporary path is not UTF-8")?;
        let mut args = vec![
            "init",
            "--quarter",
            slug,
            "--name",
            &name,
            "--center",
            &self.center_addr,
        ];
        if with_psk {
            args.extend(["--psk", psk]);
        }
        let addr_args = host_addr_args(net, host)?;
        args.extend(addr_args.iter().map(String::as_str));
        args.extend(extra);
        let out = node.cli_ok(&args)?;
        let peer = peer_id_line(&out)?;
        node.listen = listen_line(&out)?;
        Ok((node, peer))
    }

    /// Puts a quarter node's key on the roster through the centre's CLI.
    pub fn add_to_roster(&self, slug: &str, peer: &str) -> Result<()> {
        let name = slug.to_uppercase();
        self.center
            .cli_ok(&["quarter", "add", slug, "--name", &name, "--peer", peer])?;
        Ok(())
    }

    /// Like [`Cluster::add_to_roster`], with the address the centre dials
    /// the node at (`--addr`, here the `listen:` line `init` printed).
    pub fn add_to_roster_at(&self, slug: &str, node: &Node, peer: &str) -> Result<()> {
        let name = slug.to_uppercase();
        self.center.cli_ok(&[
            "quarter",
            "add",
            slug,
            "--name",
            &name,
            "--peer",
            peer,
            "--addr",
            &node.listen,
        ])?;
        Ok(())
    }

    /// All nodes, centre first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.center).chain(self.quarters.iter())
    }

    /// Node `i`: 0 is the centre, `i` the `i`-th quarter (start order),
    /// the same numbering as the test hosts.
    pub fn node(&mut self, i: usize) -> &mut Node {
        match i {
            0 => &mut self.center,
            i => &mut self.quarters[i - 1],
        }
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.node(i).kill();
    }

    /// Starts node `i` again; fails unless it opens cleanly and serves.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.node(i).restart()
    }

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.node(i).pause()
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.node(i).resume()
    }

    fn hosts(&mut self) -> Result<&mut Netns> {
        self.net
            .as_mut()
            .ok_or_else(|| "partitions need test hosts: start with Cluster::start_on_hosts".into())
    }

    /// Drops all packets between nodes `a` and `b`.
    pub fn cut(&mut self, a: usize, b: usize) -> Result<()> {
        self.hosts()?.cut(a, b)
    }

    /// Cuts node `i` off from every other node.
    pub fn isolate(&mut self, i: usize) -> Result<()> {
        for other in 0..=self.quarters.len() {
            if other != i {
                self.cut(i, other)?;
            }
        }
        Ok(())
    }

    /// Removes every network cut.
    pub fn heal(&mut self) -> Result<()> {
        self.hosts()?.heal()
    }

    pub fn quarter(&mut self, slug: &str) -> &mut Node {
        self.quarters
            .iter_mut()
            .find(|q| q.name == slug)
            .unwrap_or_else(|| panic!("no quarter {slug}"))
    }

    /// Waits until every running node holds the same heads for the same
    /// documents, and there is a document for each quarter plus `city`.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Vec<(String, Vec<String>)>> {
        let expected_docs = self.quarters.len() + 1;
        wait_until("all nodes to hold identical heads", timeout, || {
            let mut first: Option<Vec<(String, Vec<String>)>> = None;
            for node in self.nodes().filter(|n| n.is_running()) {
                let heads = node.heads()?;
                if heads.len() != expected_docs {
                    return Err(format!(
                        "{} holds {} documents, expected {expected_docs}",
                        node.name,
                        heads.len()
                    ));
                }
                match &first {
                    None => first = Some(heads),
                    Some(f) if *f == heads => {}
                    Some(_) => return Err(format!("{} differs", node.name)),
                }
            }
            Ok(first)
        })
    }
}
