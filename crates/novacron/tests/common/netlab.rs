//! Hosts as network namespaces on one underlay: a bridge in the root
//! namespace (`ncul<I>`, 10.201.I.1/24, where the server listens) and per
//! host a namespace (`nc<I>h<N>`, 10.201.I.(10+N)) joined to it by a veth.
//! Each lab takes a free index I under a file lock, so tests running at once
//! never share addresses or names; dropping the lab deletes its namespaces
//! and bridge (and a lab that finds leftovers of a crashed run removes them).

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

pub struct Underlay {
    pub index: u8,
    _lock: Flock<File>,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
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

fn must(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

impl Underlay {
    pub fn new() -> Underlay {
        for index in 0u8..200 {
            let path = format!("/tmp/nc-underlay-{index}.lock");
            let Ok(file) = File::options().create(true).truncate(false).write(true).open(&path) else {
                continue;
            };
            // Held for the lab's life; the kernel drops it if the test dies.
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            let lab = Underlay {
                index,
                _lock: lock,
                namespaces: Vec::new(),
            };
            lab.remove_leftovers();
            let bridge = lab.bridge();
            must(&["link", "add", "name", &bridge, "type", "bridge"]);
            must(&["addr", "add", &format!("{}/24", lab.server_ip()), "dev", &bridge]);
            must(&["link", "set", "dev", &bridge, "up"]);
            return lab;
        }
        panic!("no free underlay index (200 labs in use?)");
    }

    fn bridge(&self) -> String {
        format!("ncul{}", self.index)
    }

    /// The root namespace's address on the underlay (the server's).
    pub fn server_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.index, 1)
    }

    pub fn host_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.index, 10 + n)
    }

    pub fn netns(&self, n: u8) -> String {
        format!("nc{}h{n}", self.index)
    }

    fn remove_leftovers(&self) {
        let prefix = format!("nc{}h", self.index);
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&prefix) {
                    let _ = ip(&["netns", "del", name]);
                }
            }
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }

    /// Host `n`: a namespace with its underlay address; returns its name.
    pub fn add_host(&mut self, n: u8) -> String {
        let ns = self.netns(n);
        must(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let outer = format!("nc{}v{n}", self.index);
        must(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "ul0", "netns", &ns,
        ]);
        must(&["link", "set", "dev", &outer, "master", &self.bridge(), "up"]);
        let addr = format!("{}/24", self.host_ip(n));
        must(&["-n", &ns, "addr", "add", &addr, "dev", "ul0"]);
        must(&["-n", &ns, "link", "set", "dev", "ul0", "up"]);
        must(&["-n", &ns, "link", "set", "dev", "lo", "up"]);
        ns
    }

    /// A command run inside host `ns`.
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}
