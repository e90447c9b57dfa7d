//! Origin detection: which container sent a message (docs/behaviour.md, "Origin").
//!
//! Over a Unix socket with `--origin-detection`, the kernel tells whippet the sender's pid
//! (`SO_PASSCRED`); `<procfs>/<pid>/cgroup` names its container. Lookups are cached, both
//! finds and "no container", for [`TTL`], in at most [`MAX_PIDS`] entries. A client may also
//! name its container itself (`|c:`), which [`local_data`] reads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::telemetry::{labels, Counter, PerLabel, Readings, Snapshot};

/// How long a pid's container (or its lack of one) is trusted. A pid reused by another
/// container within this time would be tagged with the old one's tags.
pub const TTL: Duration = Duration::from_secs(10);
/// Most pids remembered; beyond it the expired ones go, and if none has, all of them.
pub const MAX_PIDS: usize = 4096;

/// What a client's `|c:` field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalData<'a> {
    pub container_id: &'a str,
    /// A cgroup v2 inode (`in-`); whippet reads it but does not resolve it.
    pub inode: &'a str,
}

/// Reads a `|c:` value: `ci-<id>` or `cid-<id>`, `in-<inode>`, both comma-separated, or a
/// bare container id from older clients.
pub fn local_data(raw: &str) -> LocalData<'_> {
    let mut out = LocalData::default();
    let mut prefixed = false;
    for item in raw.split(',') {
        if let Some(id) = item
            .strip_prefix("cid-")
            .or_else(|| item.strip_prefix("ci-"))
        {
            out.container_id = id;
            prefixed = true;
        } else if let Some(inode) = item.strip_prefix("in-") {
            out.inode = inode;
            prefixed = true;
        }
    }
    if !prefixed && !raw.contains(',') {
        out.container_id = raw;
    }
    out
}

/// The container id in a `/proc/<pid>/cgroup` file, cgroup v1 or v2: a 64-hex-digit id as
/// docker, containerd, CRI-O and podman name their cgroups (`/docker/<id>`,
/// `…/cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, `…/pod<uid>/<id>`),
/// or an ECS task's `<32 hex>-<digits>`. `None` for a process in no container.
pub fn container_of_cgroup(text: &str) -> Option<&str> {
    for line in text.lines() {
        // hierarchy-id:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for segment in path.rsplit('/') {
            let segment = segment.strip_suffix(".scope").unwrap_or(segment);
            let id = segment.rsplit_once('-').map_or(segment, |(_, id)| id);
            if is_hex(id, 64) {
                return Some(id);
            }
            if let Some((task, n)) = segment.rsplit_once('-') {
                if is_hex(task, 32) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                    return Some(segment);
                }
            }
        }
    }
    None
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

labels! {
    /// What a pid lookup found.
    pub enum PidLookup: "result" {
        /// The pid's cgroup names a container.
        Container = "container",
        /// The pid runs in no container (on the host, or in a cgroup namespace that hides it).
        NoContainer = "no_container",
        /// The sender is in another pid namespace: the kernel gave pid 0.
        NoPid = "no_pid",
        /// `<procfs>/<pid>/cgroup` could not be read (the sender exited, or procfs is not
        /// the host's).
        Unreadable = "unreadable",
    }
}

/// The origin counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Pid lookups that read procfs (or found pid 0), by result.
    pub lookups: PerLabel<PidLookup, Counter, { PidLookup::COUNT }>,
    /// Pid lookups answered from the cache.
    pub cache_hits: Counter,
}

impl Readings for Counters {
    fn read(&self, out: &mut Snapshot) {
        out.per_label("whippet_origin_lookups_total", &self.lookups);
        out.counter(
            "whippet_origin_cache_hits_total",
            &[],
            self.cache_hits.get(),
        );
    }
}

/// A pid's container, or none, and when procfs said so.
type Entry = (Option<Arc<str>>, Instant);

/// Pid → container id, through procfs, cached.
#[derive(Debug)]
pub struct PidCache {
    procfs: PathBuf,
    /// Pid → its container (or none) and when that was read.
    entries: Mutex<HashMap<u32, Entry>>,
    pub counters: Arc<Counters>,
}

impl PidCache {
    pub fn new(procfs: PathBuf, counters: Arc<Counters>) -> PidCache {
        PidCache {
            procfs,
            entries: Mutex::new(HashMap::new()),
            counters,
        }
    }

    /// The container of `pid`, from the cache while it is fresh.
    pub fn container(&self, pid: u32) -> Option<Arc<str>> {
        let lookups = &self.counters.lookups;
        if pid == 0 {
            lookups[PidLookup::NoPid].add(1);
            return None;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, at)) = entries.get(&pid) {
            if now.duration_since(*at) < TTL {
                self.counters.cache_hits.add(1);
                return id.clone();
            }
        }
        let path = self.procfs.join(pid.to_string()).join("cgroup");
        let id = match std::fs::read_to_string(path) {
            Ok(text) => {
                let id: Option<Arc<str>> = container_of_cgroup(&text).map(Arc::from);
                let result = match id {
                    Some(_) => PidLookup::Container,
                    None => PidLookup::NoContainer,
                };
                lookups[result].add(1);
                id
            }
            Err(_) => {
                // Not cached: the next packet from it tries again.
                lookups[PidLookup::Unreadable].add(1);
                return None;
            }
        };
        if entries.len() >= MAX_PIDS {
            entries.retain(|_, (_, at)| now.duration_since(*at) < TTL);
            if entries.len() >= MAX_PIDS {
                entries.clear();
            }
        }
        entries.insert(pid, (id.clone(), now));
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3c5f7b9d1e2a4c6b8d0f1a3c5e7b9d1f2a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b";

    #[test]
    fn local_data_is_read_as_the_agent_reads_it() {
        let cases = [
            ("ci-abc", ("abc", "")),
            ("cid-abc", ("abc", "")),
            ("in-42", ("", "42")),
            ("ci-abc,in-42", ("abc", "42")),
            ("in-42,cid-abc", ("abc", "42")),
            ("abc", ("abc", "")),
            ("", ("", "")),
        ];
        for (raw, (id, inode)) in cases {
            let got = local_data(raw);
            assert_eq!((got.container_id, got.inode), (id, inode), "{raw}");
        }
    }

    #[test]
    fn container_ids_come_out_of_every_runtimes_cgroup_names() {
        let cases = [
            (format!("12:memory:/docker/{ID}\n"), Some(ID.to_string())),
            (format!("0::/system.slice/docker-{ID}.scope\n"), Some(ID.to_string())),
            (
                format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-{ID}.scope\n"),
                Some(ID.to_string()),
            ),
            (format!("0::/kubepods/besteffort/pod1234-5678/{ID}\n"), Some(ID.to_string())),
            (format!("0::/machine.slice/crio-{ID}.scope\n"), Some(ID.to_string())),
            (
                format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"),
                Some(ID.to_string()),
            ),
            (
                "0::/ecs/task/0123456789abcdef0123456789abcdef-1234567890\n".to_string(),
                Some("0123456789abcdef0123456789abcdef-1234567890".to_string()),
            ),
            ("0::/user.slice/user-1000.slice/session-2.scope\n".to_string(), None),
            ("0::/\n".to_string(), None),
            (format!("0::/docker/{}\n", ID.to_uppercase()), None),
            ("garbage".to_string(), None),
        ];
        for (text, want) in cases {
            assert_eq!(
                container_of_cgroup(&text).map(str::to_string),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn pids_are_looked_up_once_and_pid_0_is_counted() {
        let root = std::env::temp_dir().join(format!("whippet-procfs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("7")).unwrap();
        std::fs::create_dir_all(root.join("8")).unwrap();
        std::fs::write(root.join("7/cgroup"), format!("0::/docker/{ID}\n")).unwrap();
        std::fs::write(root.join("8/cgroup"), "0::/init.scope\n").unwrap();
        let cache = PidCache::new(root.clone(), Arc::default());
        assert_eq!(cache.container(7).as_deref(), Some(ID));
        assert_eq!(cache.container(7).as_deref(), Some(ID));
        assert_eq!(cache.container(8), None);
        assert_eq!(cache.container(8), None);
        assert_eq!(cache.container(0), None);
        assert_eq!(cache.container(9), None);
        let c = &cache.counters;
        assert_eq!(c.cache_hits.get(), 2);
        assert_eq!(c.lookups[PidLookup::Container].get(), 1);
        assert_eq!(c.lookups[PidLookup::NoContainer].get(), 1);
        assert_eq!(c.lookups[PidLookup::NoPid].get(), 1);
        assert_eq!(c.lookups[PidLookup::Unreadable].get(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }
}
