//! A minimal protobuf writer: just the wire types the Datadog payloads use. Writing directly
//! into a reused buffer avoids building message structs per series.

/// Wire type 0 (varint) key.
fn key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, ((field as u64) << 3) | wire as u64);
}

pub(crate) fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// An `int64`/`uint32`/enum field (skipped when zero, as proto3 does).
pub(crate) fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(buf, field, 0);
        varint(buf, v);
    }
}

/// An `int64` field; negative values take ten bytes, as the spec says.
pub(crate) fn int64(buf: &mut Vec<u8>, field: u32, v: i64) {
    uint(buf, field, v as u64);
}

/// A `double` field (wire type 1).
pub(crate) fn double(buf: &mut Vec<u8>, field: u32, v: f64) {
    if v.to_bits() != 0 {
        key(buf, field, 1);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// A `string` or `bytes` field (wire type 2), written even when empty.
pub fn bytes(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(buf, field, 2);
    varint(buf, v.len() as u64);
    buf.extend_from_slice(v);
}

/// Writes an embedded message: `fill` writes its fields into `scratch`, which is then
/// copied behind a length prefix. `scratch` is reused by the caller.
pub fn message(
    buf: &mut Vec<u8>,
    field: u32,
    scratch: &mut Vec<u8>,
    fill: impl FnOnce(&mut Vec<u8>),
) {
    scratch.clear();
    fill(scratch);
    bytes(buf, field, scratch);
}

/// Packed `sint32` (zigzag) values.
pub(crate) fn packed_sint32(
    buf: &mut Vec<u8>,
    field: u32,
    values: impl Iterator<Item = i32>,
    scratch: &mut Vec<u8>,
) {
    scratch.clear();
    for v in values {
        varint(scratch, ((v << 1) ^ (v >> 31)) as u32 as u64);
    }
    if !scratch.is_empty() {
        bytes(buf, field, scratch);
    }
}

/// Packed `uint32` values.
pub(crate) fn packed_uint32(
    buf: &mut Vec<u8>,
    field: u32,
    values: impl Iterator<Item = u32>,
    scratch: &mut Vec<u8>,
) {
    scratch.clear();
    for v in values {
        varint(scratch, v as u64);
    }
    if !scratch.is_empty() {
        bytes(buf, field, scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let cases: [(u64, &[u8]); 5] = [
            (0, &[0]),
            (1, &[1]),
            (150, &[0x96, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (v, want) in cases {
            let mut buf = Vec::new();
            varint(&mut buf, v);
            assert_eq!(buf, want, "{v}");
        }
    }

    #[test]
    fn fields_carry_their_number_and_wire_type() {
        let mut buf = Vec::new();
        uint(&mut buf, 1, 150);
        bytes(&mut buf, 2, b"testing");
        double(&mut buf, 3, 1.0);
        int64(&mut buf, 4, -1);
        let mut want = vec![0x08, 0x96, 0x01, 0x12, 7];
        want.extend_from_slice(b"testing");
        want.push(0x19);
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[
            0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        assert_eq!(buf, want);
    }

    #[test]
    fn packed_sint32_uses_zigzag() {
        let mut buf = Vec::new();
        packed_sint32(
            &mut buf,
            7,
            [0, -1, 1, -2, 1338].into_iter(),
            &mut Vec::new(),
        );
        assert_eq!(buf, [0x3a, 6, 0, 1, 2, 3, 0xf4, 0x14]);
    }
}
