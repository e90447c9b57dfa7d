//! Compression of payloads: zstd (level 1, the default), zlib (`deflate`), or none, written
//! incrementally so a payload builder can ask, before adding an item, whether the payload
//! would still fit its compressed-size limit.

use std::io::Write;

/// `--compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Deflate,
    None,
}

impl Compression {
    pub fn parse(s: &str) -> Option<Compression> {
        Some(match s {
            "zstd" => Compression::Zstd,
            "deflate" | "zlib" => Compression::Deflate,
            "none" => Compression::None,
            _ => return None,
        })
    }

    /// The `Content-Encoding` header value, if any.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Compression::Zstd => Some("zstd"),
            Compression::Deflate => Some("deflate"),
            Compression::None => None,
        }
    }
}

enum Inner {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    None(Vec<u8>),
}

/// Input a compressor may hold back beyond what it wrote since its output last grew: zstd
/// emits whole blocks (128 KiB), zlib flushes its output buffer in smaller pieces.
const MAX_BUFFERED: usize = 128 * 1024;

/// A compressing writer that knows a bound on its final size.
pub(crate) struct Compressor {
    inner: Inner,
    /// Bytes written since the compressed output last grew.
    pending: usize,
    /// Bytes written in all: no more than these can be held back.
    written: usize,
    out_len: usize,
}

impl Compressor {
    pub fn new(c: Compression) -> Compressor {
        let inner = match c {
            Compression::Zstd => match zstd::stream::write::Encoder::new(Vec::new(), 1) {
                Ok(e) => Inner::Zstd(e),
                // Only fails on allocation failure inside zstd; fall back to no compression.
                Err(_) => Inner::None(Vec::new()),
            },
            Compression::Deflate => Inner::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
            Compression::None => Inner::None(Vec::new()),
        };
        Compressor {
            inner,
            pending: 0,
            written: 0,
            out_len: 0,
        }
    }

    fn output_len(&self) -> usize {
        match &self.inner {
            Inner::Zstd(e) => e.get_ref().len(),
            Inner::Deflate(e) => e.get_ref().len(),
            Inner::None(v) => v.len(),
        }
    }

    /// An upper bound on the compressed size if `extra` more bytes were written and the
    /// stream then finished: what is out, plus the worst case for what may be held.
    pub(crate) fn bound_with(&self, extra: usize) -> usize {
        let held = self.written.min(self.pending + MAX_BUFFERED) + extra;
        match self.inner {
            Inner::None(_) => self.out_len + extra,
            // Both formats store incompressible data with a small per-block overhead.
            _ => self.out_len + held + held / 128 + 64,
        }
    }

    pub fn write(&mut self, data: &[u8]) {
        let result = match &mut self.inner {
            Inner::Zstd(e) => e.write_all(data),
            Inner::Deflate(e) => e.write_all(data),
            Inner::None(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        };
        // Writing into a Vec cannot fail.
        debug_assert!(result.is_ok());
        self.written += data.len();
        let out = self.output_len();
        if out != self.out_len {
            self.out_len = out;
            self.pending = 0;
        } else {
            self.pending += data.len();
        }
    }

    /// The finished body, its spare capacity returned: a body waits in the forwarder's
    /// queue, which is bounded by the bodies' lengths, and a doubling buffer's capacity is up
    /// to twice its length.
    pub fn finish(self) -> Vec<u8> {
        let mut body = match self.inner {
            Inner::Zstd(e) => e.finish().unwrap_or_default(),
            Inner::Deflate(e) => e.finish().unwrap_or_default(),
            Inner::None(v) => v,
        };
        body.shrink_to_fit();
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn round_trip(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut comp = Compressor::new(c);
        for chunk in data.chunks(1000) {
            comp.write(chunk);
        }
        let bound = comp.bound_with(0);
        let out = comp.finish();
        assert!(out.len() <= bound, "{c:?}: {} > bound {bound}", out.len());
        match c {
            Compression::Zstd => zstd::decode_all(&out[..]).unwrap(),
            Compression::Deflate => {
                let mut v = Vec::new();
                flate2::read::ZlibDecoder::new(&out[..])
                    .read_to_end(&mut v)
                    .unwrap();
                v
            }
            Compression::None => out,
        }
    }

    #[test]
    fn every_compression_round_trips_within_its_bound() {
        // Incompressible bytes are the worst case for the bound.
        let mut rng = crate::blast::Rng::new(0x2545_f491_4f6c_dd1d);
        let noise: Vec<u8> = (0..300_000).map(|_| rng.next_u64() as u8).collect();
        let text = b"series page.views rate 1700000000 ".repeat(5000);
        for c in [Compression::Zstd, Compression::Deflate, Compression::None] {
            assert_eq!(round_trip(c, &noise), noise, "{c:?}");
            assert_eq!(round_trip(c, &text), text, "{c:?}");
        }
    }
}
