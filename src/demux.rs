//! The demux: `--shards` mutex-guarded [`Shard`]s, the hasher that routes a context to its
//! shard, and the backlog of events and service checks waiting for the next flush.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use crate::context::{ContextHasher, ContextKey};
use crate::sample::{EventRecord, ServiceCheckRecord, ShardBatch};
use crate::shard::{Closed, ContextBudget, Expiry, InsertStats, Shard};

/// Events and service checks received since the last flush.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    pub events: Vec<EventRecord>,
    pub service_checks: Vec<ServiceCheckRecord>,
}

pub struct Demux {
    shards: Box<[Mutex<Shard>]>,
    hasher: ContextHasher,
    backlog: Mutex<Backlog>,
    /// Most events plus service checks held between flushes.
    backlog_limit: usize,
    /// Contexts and bytes, shared by the shards.
    budget: Arc<ContextBudget>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere aborts the process (see Cargo.toml); a poisoned lock cannot outlive it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Demux {
    /// A demux without a context limit.
    pub fn new(shards: usize, backlog_limit: usize) -> Demux {
        Demux::with_context_limit(shards, backlog_limit, usize::MAX)
    }

    /// A demux holding at most `context_limit` live contexts across its shards.
    pub(crate) fn with_context_limit(
        shards: usize,
        backlog_limit: usize,
        context_limit: usize,
    ) -> Demux {
        Demux::with_limits(shards, backlog_limit, context_limit, usize::MAX)
    }

    /// A demux holding at most `context_limit` live contexts and `memory` bytes of contexts
    /// and samples (`--aggregation-memory`) across its shards.
    pub(crate) fn with_limits(
        shards: usize,
        backlog_limit: usize,
        context_limit: usize,
        memory: usize,
    ) -> Demux {
        let hasher = ContextHasher::default();
        let budget = Arc::new(ContextBudget::new(context_limit, memory));
        Demux {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Shard::with_budget(hasher.clone(), budget.clone())))
                .collect(),
            budget,
            hasher,
            backlog: Mutex::new(Backlog::default()),
            backlog_limit,
        }
    }

    /// Bytes of contexts and samples held in the shards now.
    pub fn memory_bytes(&self) -> usize {
        self.budget.bytes()
    }

    /// The context hasher every worker must use.
    pub fn hasher(&self) -> &ContextHasher {
        &self.hasher
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard owning a context hash: multiply-shift on the high bits (the hash table uses
    /// the low ones).
    pub(crate) fn shard_of(&self, hash: u64) -> usize {
        (((hash >> 32) * self.shards.len() as u64) >> 32) as usize
    }

    /// Aggregates a batch of samples that all belong to `shard`: one lock for the batch.
    /// See [`Shard::insert`] for the samples it sends back.
    pub fn insert(&self, shard: usize, batch: &mut ShardBatch<'_>, tags: &[&str]) -> InsertStats {
        lock(&self.shards[shard]).insert(batch, tags)
    }

    /// As [`Demux::insert`], but only if no one else holds the shard's lock.
    pub(crate) fn try_insert(
        &self,
        shard: usize,
        batch: &mut ShardBatch<'_>,
        tags: &[&str],
    ) -> Option<InsertStats> {
        let mut guard = match self.shards[shard].try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(guard.insert(batch, tags))
    }

    /// As [`Demux::insert`]; also says whether the lock was held by another, so that this
    /// waited for it.
    pub(crate) fn insert_waiting(
        &self,
        shard: usize,
        batch: &mut ShardBatch<'_>,
        tags: &[&str],
    ) -> (InsertStats, bool) {
        match self.try_insert(shard, batch, tags) {
            Some(stats) => (stats, false),
            None => (self.insert(shard, batch, tags), true),
        }
    }

    /// Adds events and service checks to the backlog (emptying the vectors). Returns how many
    /// were dropped because the backlog was full.
    pub(crate) fn push_backlog(
        &self,
        events: &mut Vec<EventRecord>,
        checks: &mut Vec<ServiceCheckRecord>,
    ) -> u64 {
        let mut backlog = lock(&self.backlog);
        let room = self
            .backlog_limit
            .saturating_sub(backlog.events.len() + backlog.service_checks.len());
        let offered = events.len() + checks.len();
        let take_events = events.len().min(room);
        backlog.events.extend(events.drain(..take_events));
        let take_checks = checks.len().min(room - take_events);
        backlog.service_checks.extend(checks.drain(..take_checks));
        events.clear();
        checks.clear();
        (offered - take_events - take_checks) as u64
    }

    /// A shard's lock, held as another worker would hold it.
    #[cfg(test)]
    pub(crate) fn hold(&self, shard: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard])
    }

    pub(crate) fn take_backlog(&self) -> Backlog {
        std::mem::take(&mut *lock(&self.backlog))
    }

    /// The `n` busiest contexts across shards (most samples since created), busiest first.
    /// Locks one shard at a time, as a flush does.
    pub(crate) fn busiest(&self, n: usize) -> Vec<(u64, ContextKey)> {
        let mut top = Vec::with_capacity(n + 1);
        if n > 0 {
            for shard in self.shards.iter() {
                lock(shard).busiest(n, &mut top);
            }
        }
        top
    }

    /// Closes buckets before `boundary` in every shard, one shard lock at a time. Returns
    /// (contexts freed, contexts live).
    pub fn flush(&self, boundary: i64, expiry: &Expiry, out: &mut Vec<Closed>) -> (usize, usize) {
        let mut freed = 0;
        let mut live = 0;
        for shard in 0..self.shards.len() {
            let (f, l) = self.flush_shard(shard, boundary, expiry, 0, out);
            freed += f;
            live += l;
        }
        (freed, live)
    }

    /// [`Demux::flush`] for one shard, so a flush can be emitted a few shards at a time,
    /// stamping buckets `offset` seconds from their start ([`Shard::flush_stamped`]).
    pub(crate) fn flush_shard(
        &self,
        shard: usize,
        boundary: i64,
        expiry: &Expiry,
        offset: i64,
        out: &mut Vec<Closed>,
    ) -> (usize, usize) {
        let mut shard = lock(&self.shards[shard]);
        let freed = shard.flush_stamped(boundary, expiry, offset, out);
        (freed, shard.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::{AlertType, Priority};

    fn event(title: &str) -> EventRecord {
        EventRecord {
            title: title.into(),
            text: String::new(),
            timestamp: 1,
            host: String::new(),
            aggregation_key: String::new(),
            priority: Priority::Normal,
            source_type: String::new(),
            alert_type: AlertType::Info,
            tags: vec![],
        }
    }

    #[test]
    fn every_hash_maps_to_a_shard_in_range_and_all_shards_are_used() {
        let d = Demux::new(7, 10);
        let mut used = [false; 7];
        for i in 0..10_000u64 {
            let s = d.shard_of(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            used[s] = true;
        }
        assert_eq!(used, [true; 7]);
        assert_eq!(d.shard_of(u64::MAX), 6);
    }

    #[test]
    fn the_backlog_keeps_what_fits_and_reports_the_rest() {
        let d = Demux::new(1, 3);
        let mut events = vec![event("a"), event("b")];
        assert_eq!(d.push_backlog(&mut events, &mut vec![]), 0);
        let mut more = vec![event("c"), event("d"), event("e")];
        assert_eq!(d.push_backlog(&mut more, &mut vec![]), 2);
        assert!(more.is_empty());
        let backlog = d.take_backlog();
        let titles: Vec<_> = backlog.events.iter().map(|e| e.title.as_str()).collect();
        assert_eq!(titles, ["a", "b", "c"]);
        assert!(d.take_backlog().events.is_empty());
    }
}
