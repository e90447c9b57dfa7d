//! Workloads: messages to send, read from a corpus file or generated from a seed, and packed
//! into packets.
//!
//! The default workload, [`Generated::dsd_base`], is generated to have the statistics of the
//! `dsd_base` corpus that Datadog's load generator (lading) makes for the Agent's DogStatsD
//! regression cases, so a clone can run the benchmark without that file: 3,000 contexts
//! (each a name, a type and a set of tags, drawn once), messages that each pick a context
//! and carry fresh values, about 2.1 KB and 26 tags per message, the same type mix and the
//! same share of multi-value messages, sample rates and client container ids. The file
//! itself, when one has it, stays an option (`--corpus`).

/// A tiny deterministic generator (xorshift64*): reproducible workloads without a crate.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, (lo, hi): (usize, usize)) -> usize {
        lo + self.below((hi.saturating_sub(lo) + 1) as u64) as usize
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// An index picked with the given relative weights.
    pub(crate) fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut pick = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if pick < u64::from(w) {
                return i;
            }
            pick -= u64::from(w);
        }
        weights.len() - 1
    }

    /// Letters and digits.
    fn word(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize] as char)
            .collect()
    }
}

/// The metric types, in the order of [`Generated::mix`].
const TYPES: [&str; 5] = ["c", "g", "d", "s", "h"];

/// Knobs of a generated workload. Ranges are inclusive and drawn uniformly.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Distinct contexts messages pick from, uniformly.
    pub contexts: usize,
    /// Messages generated (they are replayed in a loop).
    pub messages: usize,
    pub name_len: (usize, usize),
    pub tags_per_message: (usize, usize),
    /// Tags are `key:value`, this long in all.
    pub tag_len: (usize, usize),
    /// Distinct tags the contexts draw theirs from; 0 gives every context its own tags.
    pub tag_pool: usize,
    /// Relative weights of count, gauge, distribution, set and histogram.
    pub mix: [u32; 5],
    /// Share of messages carrying several values, and how many.
    pub multi_value: f64,
    pub values: (usize, usize),
    /// Share of messages with an `@rate`; the rate is 1/n, n picked by `rate_weights`
    /// (n = 1, 2, …).
    pub sample_rate: f64,
    pub rate_weights: &'static [u32],
    /// Share of messages with a client container id (`|c:<id>`), and its length.
    pub container: f64,
    pub container_len: (usize, usize),
    /// Values are integers over the whole signed 64-bit range (`true`) or below 1000.
    pub wide_values: bool,
    pub seed: u64,
}

impl Generated {
    /// The statistics of lading's `dsd_base` corpus (7,782 messages measured: 2,155 bytes
    /// and 26.1 tags per message on average; 59.8% counts, 19.5% distributions, 18.0%
    /// gauges, 2.5% sets, 0.2% histograms; 7.7% multi-value with 17 values on average; 38.9%
    /// with a sample rate, 56% of them `@1`; 49% with a container id; 2,784 contexts used of
    /// 3,000).
    pub fn dsd_base() -> Generated {
        Generated {
            contexts: 3000,
            messages: 7782,
            name_len: (1, 200),
            tags_per_message: (2, 50),
            tag_len: (3, 150),
            tag_pool: 8500,
            mix: [208, 66, 72, 9, 1],
            multi_value: 0.08,
            values: (2, 32),
            sample_rate: 0.39,
            rate_weights: &[1689, 585, 285, 160, 97, 84, 54, 49, 22],
            container: 0.49,
            container_len: (1, 8),
            wide_values: true,
            seed: 7,
        }
    }

    /// Short messages (about 200 bytes: 10 tags of 17 characters) over `contexts` contexts,
    /// each sampled about twice: what the benchmark's cardinality sweep sends.
    pub fn small(contexts: usize) -> Generated {
        Generated {
            contexts,
            messages: (contexts * 2).max(20_000),
            name_len: (14, 20),
            tags_per_message: (10, 10),
            tag_len: (17, 17),
            tag_pool: 0,
            multi_value: 0.0,
            sample_rate: 0.0,
            container: 0.0,
            wide_values: false,
            ..Generated::dsd_base()
        }
    }

    /// Generates the messages.
    pub fn generate(&self) -> Vec<Vec<u8>> {
        let mut rng = Rng::new(self.seed);
        let pool: Vec<String> = (0..self.tag_pool).map(|_| self.tag(&mut rng)).collect();
        let kinds = self.kinds(&mut rng);
        let contexts: Vec<(String, &str, String)> = kinds
            .into_iter()
            .map(|kind| {
                let len = rng.between(self.name_len);
                let name = rng.word(len);
                let tags: Vec<String> = (0..rng.between(self.tags_per_message))
                    .map(|_| match pool.len() {
                        0 => self.tag(&mut rng),
                        n => pool[rng.below(n as u64) as usize].clone(),
                    })
                    .collect();
                (name, kind, tags.join(","))
            })
            .collect();
        (0..self.messages)
            .map(|_| {
                let (name, kind, tags) = &contexts[rng.below(contexts.len() as u64) as usize];
                self.message(&mut rng, name, kind, tags).into_bytes()
            })
            .collect()
    }

    /// Each context's type, in the proportions of `mix` exactly (largest remainders), in a
    /// random order: the mix of the messages then differs from `mix` only by which contexts
    /// they pick.
    fn kinds(&self, rng: &mut Rng) -> Vec<&'static str> {
        let n = self.contexts.max(1);
        let total: u64 = self.mix.iter().map(|&w| u64::from(w)).sum::<u64>().max(1);
        let exact: Vec<u64> = self.mix.iter().map(|&w| u64::from(w) * n as u64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|e| (e / total) as usize).collect();
        let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
        by_remainder.sort_by_key(|&i| std::cmp::Reverse(exact[i] % total));
        let short = n - counts.iter().sum::<usize>();
        for &i in by_remainder.iter().take(short) {
            counts[i] += 1;
        }
        let mut kinds: Vec<&str> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::repeat_n(TYPES[i], c))
            .collect();
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i as u64 + 1) as usize);
        }
        kinds
    }

    /// `key:value`, `tag_len` long, the colon anywhere but at either end.
    fn tag(&self, rng: &mut Rng) -> String {
        let len = rng.between(self.tag_len).max(3);
        let key = rng.between((1, len - 2));
        format!("{}:{}", rng.word(key), rng.word(len - key - 1))
    }

    fn message(&self, rng: &mut Rng, name: &str, kind: &str, tags: &str) -> String {
        let count = if kind != "s" && rng.chance(self.multi_value) {
            rng.between(self.values)
        } else {
            1
        };
        let values: Vec<String> = (0..count)
            .map(|_| match self.wide_values {
                true => (rng.next_u64() as i64).to_string(),
                false => rng.below(1000).to_string(),
            })
            .collect();
        let mut m = format!("{name}:{}|{kind}", values.join(":"));
        if self.sample_rate > 0.0 && rng.chance(self.sample_rate) {
            let n = rng.weighted(self.rate_weights) + 1;
            m.push_str(&format!("|@{}", 1.0 / n as f64));
        }
        m.push_str("|#");
        m.push_str(tags);
        if self.container > 0.0 && rng.chance(self.container) {
            let len = rng.between(self.container_len);
            let id = rng.word(len);
            m.push_str(&format!("|c:{id}"));
        }
        m
    }
}

/// Reads a corpus: one message per line, empty lines skipped.
pub fn corpus(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read corpus {} (--corpus): {e}", path.display()))?;
    let messages: Vec<Vec<u8>> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    if messages.is_empty() {
        return Err(format!("corpus {} has no messages", path.display()));
    }
    Ok(messages)
}

/// Messages packed into packets of at most `size` bytes (a longer message gets a packet of
/// its own), with the number of messages in each.
pub fn pack(messages: &[Vec<u8>], size: usize) -> Vec<(Vec<u8>, u64)> {
    let mut packets = Vec::new();
    let mut cur = Vec::with_capacity(size);
    let mut n = 0;
    for m in messages {
        if !cur.is_empty() && cur.len() + 1 + m.len() > size {
            packets.push((std::mem::take(&mut cur), n));
            n = 0;
        }
        if !cur.is_empty() {
            cur.push(b'\n');
        }
        cur.extend_from_slice(m);
        n += 1;
    }
    if !cur.is_empty() {
        packets.push((cur, n));
    }
    packets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::{self, Message, MetricKind};

    #[test]
    fn messages_pack_into_packets_without_splitting_any() {
        let messages: Vec<Vec<u8>> = ["aaaa", "bbbb", "cccc", "dddddddddddd"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let packets = pack(&messages, 10);
        let got: Vec<(&[u8], u64)> = packets.iter().map(|(p, n)| (&p[..], *n)).collect();
        assert_eq!(
            got,
            [(&b"aaaa\nbbbb"[..], 2), (b"cccc", 1), (b"dddddddddddd", 1)]
        );
    }

    #[test]
    fn a_seed_gives_one_workload_and_another_seed_another() {
        let g = Generated {
            contexts: 50,
            messages: 500,
            ..Generated::dsd_base()
        };
        assert_eq!(g.generate(), g.generate());
        let other = Generated {
            seed: 8,
            ..g.clone()
        };
        assert_ne!(g.generate(), other.generate());
    }

    /// What a workload looks like, measured as the corpus was.
    struct Shape {
        bytes: f64,
        tags: f64,
        /// Shares of c, g, d, s, h.
        mix: [f64; 5],
        multi_value: f64,
        sampled: f64,
        container: f64,
        contexts: usize,
    }

    fn shape(messages: &[Vec<u8>]) -> Shape {
        let n = messages.len() as f64;
        let (mut tags, mut mix, mut multi, mut sampled, mut container) = (0, [0; 5], 0, 0, 0);
        let mut contexts = std::collections::HashSet::new();
        for m in messages {
            let Ok(Message::Metric(metric)) = parser::parse(m) else {
                panic!("{} does not parse", String::from_utf8_lossy(m));
            };
            let kind = match metric.kind {
                MetricKind::Count => 0,
                MetricKind::Gauge => 1,
                MetricKind::Distribution => 2,
                MetricKind::Set => 3,
                _ => 4,
            };
            mix[kind] += 1;
            tags += metric.tags.split(',').count();
            multi += usize::from(metric.values.iter().count() > 1);
            let text = std::str::from_utf8(m).unwrap();
            sampled += usize::from(text.contains("|@"));
            container += usize::from(text.contains("|c:"));
            contexts.insert((metric.name, metric.tags, kind));
        }
        Shape {
            bytes: messages.iter().map(|m| m.len()).sum::<usize>() as f64 / n,
            tags: tags as f64 / n,
            mix: mix.map(|k| k as f64 / n),
            multi_value: multi as f64 / n,
            sampled: sampled as f64 / n,
            container: container as f64 / n,
            contexts: contexts.len(),
        }
    }

    #[test]
    fn the_default_workload_has_the_statistics_of_the_dsd_base_corpus() {
        // The corpus's measured statistics (see `Generated::dsd_base`), each within the
        // sampling error of 7,782 messages; the type mix against the weights both draw from.
        let s = shape(&Generated::dsd_base().generate());
        let near = |got: f64, want: f64, within: f64| (got - want).abs() <= within;
        assert!(near(s.bytes, 2155.0, 100.0), "{} bytes", s.bytes);
        assert!(near(s.tags, 26.1, 1.0), "{} tags", s.tags);
        let weights = Generated::dsd_base().mix;
        let total: u32 = weights.iter().sum();
        for (i, (got, w)) in s.mix.iter().zip(weights).enumerate() {
            let want = f64::from(w) / f64::from(total);
            assert!(
                near(*got, want, 0.015),
                "{}: {got} against {want}",
                TYPES[i]
            );
        }
        assert!(
            near(s.multi_value, 0.077, 0.01),
            "{} multi-value",
            s.multi_value
        );
        assert!(near(s.sampled, 0.389, 0.02), "{} sampled", s.sampled);
        assert!(
            near(s.container, 0.49, 0.02),
            "{} with a container id",
            s.container
        );
        assert!(
            (2_700..=2_850).contains(&s.contexts),
            "{} contexts",
            s.contexts
        );
    }

    #[test]
    fn the_small_workload_is_short_messages_over_the_contexts_asked_for() {
        let s = shape(&Generated::small(300).generate());
        assert!((190.0..=220.0).contains(&s.bytes), "{} bytes", s.bytes);
        assert_eq!(s.tags, 10.0);
        assert_eq!((s.multi_value, s.sampled, s.container), (0.0, 0.0, 0.0));
        assert_eq!(s.contexts, 300);
    }
}
