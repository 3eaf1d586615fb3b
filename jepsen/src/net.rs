//! The test network: one network namespace per node, each with its own address on a bridge in the
//! root namespace, where the harness and its clients live.
//!
//! ```text
//!   root namespace: harness, SDK clients, bridge hj<pid>b = 10.231.K.1/24
//!        |            |            |
//!     veth         veth         veth            (host ends hj<pid>v<id>, on the bridge)
//!        |            |            |
//!   hj-<pid>-n1   hj-<pid>-n2   hj-<pid>-n3      (namespaces; eth0 = 10.231.K.(10+id))
//! ```
//!
//! Everything is named with a prefix holding the harness's pid, so concurrent runs never touch
//! each other and a later run can tell leftovers of a crashed one (whose pid is gone) from a live
//! run's, and remove them ([`cleanup_stale`]). Nothing else on the machine is touched.
//!
//! Partitions are `iptables` rules in a chain `HJ` of each node's namespace that drop packets
//! from the addresses of the nodes it must not hear (inbound only, on both sides, as Jepsen
//! does). Traffic from the harness (the bridge address) is never dropped: clients can still reach
//! a node in a minority partition, where writes cannot commit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context};

/// Prefix of every namespace and interface the suite creates.
pub const PREFIX: &str = "hj";

/// Runs `ip`/`iptables`/... and fails with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One node's place in the network.
#[derive(Debug, Clone)]
pub struct NodeNet {
    pub id: u64,
    /// Namespace name.
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The veth end in the root namespace (on the bridge).
    pub host_if: String,
}

/// The namespaces, veths and bridge of one run. Dropping it tears everything down.
#[derive(Debug)]
pub struct Net {
    pub bridge: String,
    pub bridge_ip: Ipv4Addr,
    pub nodes: BTreeMap<u64, NodeNet>,
    pid: u32,
    subnet: u8,
    torn_down: bool,
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid encoded in a name made by this module (`hj-<pid>-n1`, `hj<pid>b`, `hj<pid>v1`).
fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

/// Removes namespaces and interfaces of runs whose harness is gone (crashed or killed): kills the
/// processes still in those namespaces (left-over nodes and proxies of that run), deletes the
/// namespaces and the bridge. Returns what it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let me = std::process::id();
    let list = run("ip", &["netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = pid_of(name) else { continue };
        if !name.starts_with("hj-") || pid == me || pid_alive(pid) {
            continue;
        }
        if let Ok(pids) = run("ip", &["netns", "pids", name]) {
            for p in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if run("ip", &["netns", "del", name]).is_ok() {
            removed.push(name.to_string());
        }
    }
    let links = run("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "12: hj1234b: <...>" or "13: hj1234v1@if2: <...>"
        let Some(name) = line
            .split(':')
            .nth(1)
            .map(|s| s.trim().split('@').next().unwrap_or(""))
        else {
            continue;
        };
        let Some(pid) = pid_of(name) else { continue };
        if name.starts_with("hj-") || pid == me || pid_alive(pid) {
            continue;
        }
        if run("ip", &["link", "del", name]).is_ok() {
            removed.push(name.to_string());
        }
    }
    removed
}

impl Net {
    /// Creates the bridge and a namespace per node id.
    pub fn create(ids: &[u64]) -> anyhow::Result<Net> {
        let pid = std::process::id();
        let used = run("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default();
        let mut subnet = None;
        for k in 0..200u32 {
            let cand = (20 + (pid + k) % 200) as u8;
            if !used.contains(&format!("10.231.{cand}.")) {
                subnet = Some(cand);
                break;
            }
        }
        let subnet = subnet.context("no free 10.231.x.0/24 subnet")?;
        let bridge = format!("{PREFIX}{pid}b");
        let mut net = Net {
            bridge: bridge.clone(),
            bridge_ip: Ipv4Addr::new(10, 231, subnet, 1),
            nodes: BTreeMap::new(),
            pid,
            subnet,
            torn_down: false,
        };
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{}/24", net.bridge_ip), "dev", &bridge],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for &id in ids {
            net.add_node(id)?;
        }
        Ok(net)
    }

    /// Adds a namespace for node `id` (also used for nodes that join later).
    pub fn add_node(&mut self, id: u64) -> anyhow::Result<&NodeNet> {
        let ns = format!("{PREFIX}-{}-n{id}", self.pid);
        let host_if = format!("{PREFIX}{}v{id}", self.pid);
        let peer_if = format!("{PREFIX}{}p{id}", self.pid);
        let ip = Ipv4Addr::new(10, 231, self.subnet, (10 + id) as u8);
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if],
        )?;
        run("ip", &["link", "set", &peer_if, "netns", &ns])?;
        run("ip", &["-n", &ns, "link", "set", &peer_if, "name", "eth0"])?;
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["link", "set", &host_if, "master", &self.bridge, "up"])?;
        run("ip", &["netns", "exec", &ns, "iptables", "-N", "HJ"])?;
        run(
            "ip",
            &["netns", "exec", &ns, "iptables", "-I", "INPUT", "-j", "HJ"],
        )?;
        self.nodes.insert(id, NodeNet { id, ns, ip, host_if });
        Ok(&self.nodes[&id])
    }

    pub fn node(&self, id: u64) -> &NodeNet {
        &self.nodes[&id]
    }

    /// Installs a partition: `grudge[a]` are the nodes whose packets `a` drops. Replaces any
    /// earlier partition.
    pub fn partition(&self, grudge: &BTreeMap<u64, BTreeSet<u64>>) -> anyhow::Result<()> {
        self.heal()?;
        for (a, drops) in grudge {
            let ns = &self.node(*a).ns;
            for b in drops {
                let ip = self.node(*b).ip.to_string();
                run(
                    "ip",
                    &[
                        "netns", "exec", ns, "iptables", "-A", "HJ", "-s", &ip, "-j", "DROP",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> anyhow::Result<()> {
        for n in self.nodes.values() {
            run("ip", &["netns", "exec", &n.ns, "iptables", "-F", "HJ"])?;
        }
        Ok(())
    }

    /// The partition rules in force, as `node -> dropped sources` (read back from iptables).
    pub fn rules(&self) -> BTreeMap<u64, Vec<String>> {
        let mut out = BTreeMap::new();
        for n in self.nodes.values() {
            let s = run("ip", &["netns", "exec", &n.ns, "iptables", "-S", "HJ"]).unwrap_or_default();
            let drops: Vec<String> = s
                .lines()
                .filter(|l| l.contains("DROP"))
                .map(|l| l.to_string())
                .collect();
            out.insert(n.id, drops);
        }
        out
    }

    /// Deletes the namespaces and the bridge. Processes still inside must be stopped first (the
    /// cluster does that); anything left is killed.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for n in self.nodes.values() {
            if let Ok(pids) = run("ip", &["netns", "pids", &n.ns]) {
                for p in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = run("ip", &["netns", "del", &n.ns]);
            let _ = run("ip", &["link", "del", &n.host_if]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_pid() {
        assert_eq!(pid_of("hj-1234-n1"), Some(1234));
        assert_eq!(pid_of("hj1234b"), Some(1234));
        assert_eq!(pid_of("hj1234v3"), Some(1234));
        assert_eq!(pid_of("hjx"), None);
        assert_eq!(pid_of("eth0"), None);
    }
}
