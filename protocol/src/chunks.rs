//! Reading the automerge chunks inside a sync message before automerge
//! applies them: split concatenated chunks by their headers, bound their
//! sizes (including what a compressed change inflates to), and parse the
//! changes they carry so their authors can be checked.
//!
//! Chunk layout (automerge binary format): 4 magic bytes `85 6f 4a 83`,
//! 4 checksum bytes, 1 type byte (0 document, 1 change, 2 compressed change,
//! 3 bundle), a ULEB128 length, then that many bytes.

use std::io::Read;

use automerge::{Change, ChangeHash};
use sha2::{Digest, Sha256};

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Largest size one compressed change may inflate to.
pub const MAX_INFLATED_CHANGE: u64 = 8 * 1024 * 1024;

/// Most changes one message may carry.
pub const MAX_CHANGES_PER_MESSAGE: usize = 200_000;

/// Why the chunks of a message were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk is truncated")]
    Truncated,
    #[error("chunk does not start with automerge's magic bytes")]
    BadMagic,
    #[error("chunk type {0} is not accepted in sync messages (only changes: 1, 2)")]
    UnexpectedType(u8),
    #[error("chunk length is malformed")]
    BadLength,
    #[error("compressed change inflates beyond {MAX_INFLATED_CHANGE} bytes")]
    InflatesTooMuch,
    #[error("compressed change does not inflate: {0}")]
    Inflate(String),
    #[error("change cannot be parsed: {0}")]
    Change(String),
    #[error("change {0}'s checksum does not match its contents")]
    BadChecksum(ChangeHash),
    #[error("message carries more than {MAX_CHANGES_PER_MESSAGE} changes")]
    TooManyChanges,
    #[error("message carries {0} 'have' summaries; at most one is accepted")]
    TooManyHaves(usize),
    #[error("bloom filter is malformed or out of bounds: {0}")]
    Bloom(&'static str),
    #[error("whole document is malformed: {0}")]
    Document(&'static str),
    #[error("whole document has compressed columns (only uncompressed ones are accepted)")]
    CompressedColumns,
}

/// Most hash probes a peer's bloom filter may ask for (automerge uses 7).
pub const MAX_BLOOM_PROBES: u32 = 32;
/// Most bits per entry a peer's bloom filter may use (automerge uses 10).
pub const MAX_BLOOM_BITS_PER_ENTRY: u32 = 32;

/// Checks a bloom filter as automerge serialises it (three ULEB128 u32s —
/// entries, bits per entry, probes — then the bits) before automerge uses
/// it: it allocates a vector of `probes` entries for every hash it tests
/// and divides by the bit length, so both must be sane.
pub fn check_bloom(bytes: &[u8]) -> Result<(), ChunkError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut rest = bytes;
    let mut fields = [0u64; 3];
    for field in &mut fields {
        let (v, used) = uleb128(rest).map_err(|_| ChunkError::Bloom("truncated header"))?;
        *field = v;
        rest = &rest[used..];
    }
    let [entries, bits_per_entry, probes] = fields;
    if probes == 0 || probes > u64::from(MAX_BLOOM_PROBES) {
        return Err(ChunkError::Bloom("probe count"));
    }
    if bits_per_entry == 0 || bits_per_entry > u64::from(MAX_BLOOM_BITS_PER_ENTRY) {
        return Err(ChunkError::Bloom("bits per entry"));
    }
    if entries > 0 && rest.is_empty() {
        return Err(ChunkError::Bloom("no bits for its entries"));
    }
    Ok(())
}

/// One chunk found in a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawChunk<'a> {
    kind: u8,
    /// The whole chunk, header included.
    bytes: &'a [u8],
    /// The data after the header.
    data: &'a [u8],
}

fn uleb128(input: &[u8]) -> Result<(u64, usize), ChunkError> {
    let mut value: u64 = 0;
    for (i, byte) in input.iter().enumerate().take(10) {
        let part = u64::from(byte & 0x7f);
        if i == 9 && part > 1 {
            return Err(ChunkError::BadLength);
        }
        value |= part << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(ChunkError::Truncated)
}

/// Splits `input` into the chunks it concatenates.
fn split(mut input: &[u8]) -> Result<Vec<RawChunk<'_>>, ChunkError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        if input.len() < 9 {
            return Err(ChunkError::Truncated);
        }
        if input[..4] != MAGIC {
            return Err(ChunkError::BadMagic);
        }
        let kind = input[8];
        let (len, used) = uleb128(&input[9..])?;
        let start = 9 + used;
        let len = usize::try_from(len).map_err(|_| ChunkError::BadLength)?;
        let end = start.checked_add(len).ok_or(ChunkError::BadLength)?;
        if end > input.len() {
            return Err(ChunkError::Truncated);
        }
        out.push(RawChunk {
            kind,
            bytes: &input[..end],
            data: &input[start..end],
        });
        input = &input[end..];
    }
    Ok(out)
}

/// The changes carried by one element of a sync message's change list:
/// change chunks or compressed change chunks. Whole documents (chunk type 0)
/// are refused: automerge would inflate their compressed columns without a
/// bound, and iq nodes never send them (they advertise no v2 capability).
pub fn changes_in(element: &[u8], out: &mut Vec<Change>) -> Result<(), ChunkError> {
    for chunk in split(element)? {
        match chunk.kind {
            1 => out.push(
                Change::try_from(chunk.bytes).map_err(|e| ChunkError::Change(e.to_string()))?,
            ),
            2 => {
                // Inflate with a bound first: automerge would inflate without one.
                let mut sink = Vec::new();
                let mut decoder =
                    flate2::read::DeflateDecoder::new(chunk.data).take(MAX_INFLATED_CHANGE + 1);
                decoder
                    .read_to_end(&mut sink)
                    .map_err(|e| ChunkError::Inflate(e.to_string()))?;
                if sink.len() as u64 > MAX_INFLATED_CHANGE {
                    return Err(ChunkError::InflatesTooMuch);
                }
                out.push(
                    Change::try_from(chunk.bytes).map_err(|e| ChunkError::Change(e.to_string()))?,
                );
            }
            other => return Err(ChunkError::UnexpectedType(other)),
        }
        // automerge's parser does not compare a change's checksum (header
        // bytes 4..8) with its hash, which covers everything but those
        // bytes; automerge's loader does, and drops the change and every
        // one stored after it. A change whose checksum was altered on its
        // way would pass its signature check, be stored as it came, and be
        // lost with its successors at the next start: refused here.
        if let Some(change) = out.last() {
            let hash = change.hash();
            if chunk.bytes[4..8] != hash.0[..4] {
                return Err(ChunkError::BadChecksum(hash));
            }
        }
        if out.len() > MAX_CHANGES_PER_MESSAGE {
            return Err(ChunkError::TooManyChanges);
        }
    }
    Ok(())
}

/// The hashes of the changes in one element of a sync message's change
/// list, for this node's own messages (to attach signatures): an
/// uncompressed change's hash is the SHA-256 of its chunk after magic and
/// checksum, so it is read without parsing the change; a compressed one is
/// parsed.
pub fn hashes_in(element: &[u8], out: &mut Vec<ChangeHash>) -> Result<(), ChunkError> {
    for chunk in split(element)? {
        match chunk.kind {
            1 => out.push(ChangeHash(Sha256::digest(&chunk.bytes[8..]).into())),
            2 => out.push(
                Change::try_from(chunk.bytes)
                    .map_err(|e| ChunkError::Change(e.to_string()))?
                    .hash(),
            ),
            other => return Err(ChunkError::UnexpectedType(other)),
        }
    }
    Ok(())
}

/// How many chunks `bytes` concatenates (0 if they cannot be split), e.g.
/// the changes in one stored entry.
pub fn count(bytes: &[u8]) -> usize {
    split(bytes).map_or(0, |chunks| chunks.len())
}

/// Checks that `element` is one whole-document chunk (chunk type 0, what
/// `Automerge::save_nocompress` writes) whose header automerge can read
/// with bounded work, before automerge loads it: every count in its header
/// fits the bytes that follow, and no column is compressed. automerge
/// inflates compressed columns without a bound; uncompressed, a document
/// takes no more memory to read than the bytes it came in (the transport
/// bounds those, inflated: `wire::MAX_REQUEST_BYTES`).
///
/// Layout after the chunk header: actors (a count, then each a length and
/// its bytes), heads (a count, then 32 bytes each), then the change
/// columns and the operation columns, each a count of (specification,
/// length) pairs; bit 3 of a specification marks a compressed column.
pub fn check_document(element: &[u8]) -> Result<(), ChunkError> {
    let chunks = split(element)?;
    let [chunk] = chunks[..] else {
        return Err(ChunkError::Document("not exactly one chunk"));
    };
    if chunk.kind != 0 {
        return Err(ChunkError::UnexpectedType(chunk.kind));
    }
    let mut rest = chunk.data;
    let next = |rest: &mut &[u8]| -> Result<u64, ChunkError> {
        let (v, used) = uleb128(rest).map_err(|_| ChunkError::Document("truncated header"))?;
        *rest = &rest[used..];
        Ok(v)
    };
    let actors = next(&mut rest)?;
    if actors > rest.len() as u64 {
        return Err(ChunkError::Document("more actors than bytes"));
    }
    for _ in 0..actors {
        let len = next(&mut rest)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= rest.len())
            .ok_or(ChunkError::Document("actor longer than the document"))?;
        rest = &rest[len..];
    }
    let heads = next(&mut rest)?;
    let head_bytes = heads
        .checked_mul(32)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= rest.len())
        .ok_or(ChunkError::Document("more heads than bytes"))?;
    rest = &rest[head_bytes..];
    let mut column_bytes: u64 = 0;
    for _ in 0..2 {
        let columns = next(&mut rest)?;
        if columns > rest.len() as u64 / 2 {
            return Err(ChunkError::Document("more columns than bytes"));
        }
        for _ in 0..columns {
            let spec = next(&mut rest)?;
            if spec & 0b1000 != 0 {
                return Err(ChunkError::CompressedColumns);
            }
            column_bytes = column_bytes.saturating_add(next(&mut rest)?);
        }
    }
    if column_bytes > rest.len() as u64 {
        return Err(ChunkError::Document("columns longer than the document"));
    }
    Ok(())
}

/// Whether `bytes` start with a whole-document chunk (what
/// `Automerge::save` writes), as a compacted document's snapshot does.
pub fn is_document(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[..4] == MAGIC && bytes[8] == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};

    fn doc_with_changes(n: usize) -> Automerge {
        let mut doc = Automerge::new();
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(ROOT, format!("k{i}"), i as i64).expect("put");
            tx.commit();
        }
        doc
    }

    #[test]
    fn hashes_are_read_without_parsing_and_match_automerges() {
        let doc = doc_with_changes(5);
        let changes = doc.get_changes(&[]);
        let mut concatenated = Vec::new();
        for c in &changes {
            concatenated.extend_from_slice(c.raw_bytes());
        }
        let mut out = Vec::new();
        hashes_in(&concatenated, &mut out).expect("hashes");
        let expected: Vec<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
        assert_eq!(out, expected);
        assert_eq!(
            hashes_in(&doc.save(), &mut Vec::new()),
            Err(ChunkError::UnexpectedType(0))
        );
    }

    /// A change whose checksum bytes were altered keeps its hash (and so
    /// its signature), but automerge's loader would drop it and every
    /// change stored after it at the next start: it is refused on receipt.
    #[test]
    fn a_change_with_a_wrong_checksum_is_refused() {
        let doc = doc_with_changes(2);
        let changes = doc.get_changes(&[]);
        let mut bytes = changes[1].raw_bytes().to_vec();
        let mut out = Vec::new();
        changes_in(&bytes, &mut out).expect("the change as built");
        bytes[5] ^= 0x01;
        let mut out = Vec::new();
        assert_eq!(
            changes_in(&bytes, &mut out),
            Err(ChunkError::BadChecksum(changes[1].hash()))
        );
        // What automerge's loader does with it, as the store's next start would.
        let mut loaded = Automerge::new();
        let mut stored = changes[0].raw_bytes().to_vec();
        stored.extend_from_slice(&bytes);
        let _ = loaded.load_incremental(&stored);
        assert!(loaded.get_change_meta_by_hash(&changes[1].hash()).is_none());
    }

    #[test]
    fn concatenated_changes_are_read_and_whole_documents_refused() {
        let doc = doc_with_changes(3);
        let changes = doc.get_changes(&[]);
        let mut concatenated = Vec::new();
        for c in &changes {
            concatenated.extend_from_slice(c.raw_bytes());
        }
        let mut out = Vec::new();
        changes_in(&concatenated, &mut out).expect("changes");
        assert_eq!(
            out.iter().map(|c| c.hash()).collect::<Vec<_>>(),
            changes.iter().map(|c| c.hash()).collect::<Vec<_>>()
        );
        let mut out = Vec::new();
        assert_eq!(
            changes_in(&doc.save(), &mut out),
            Err(ChunkError::UnexpectedType(0))
        );
        assert_eq!(count(&concatenated), 3);
        assert_eq!(count(&concatenated[..concatenated.len() - 1]), 0);
    }

    #[test]
    fn only_well_formed_uncompressed_documents_pass_the_document_check() {
        // Enough changes that automerge compresses some columns when asked.
        let doc = doc_with_changes(300);
        let plain = doc.save_nocompress();
        assert_eq!(check_document(&plain), Ok(()));
        assert_eq!(
            check_document(&doc.save()),
            Err(ChunkError::CompressedColumns)
        );
        let change = doc.get_changes(&[])[0].raw_bytes().to_vec();
        assert_eq!(check_document(&change), Err(ChunkError::UnexpectedType(1)));
        let mut two = plain.clone();
        two.extend_from_slice(&plain);
        assert!(matches!(check_document(&two), Err(ChunkError::Document(_))));
        // Every cut of the document is refused, and none panics.
        for cut in 0..plain.len() {
            assert!(check_document(&plain[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_is_refused_without_reaching_automerge() {
        let mut out = Vec::new();
        assert_eq!(
            changes_in(b"\x00\x01", &mut out),
            Err(ChunkError::Truncated)
        );
        assert_eq!(changes_in(&[0u8; 16], &mut out), Err(ChunkError::BadMagic));
        let mut huge_len = MAGIC.to_vec();
        huge_len.extend_from_slice(&[0, 0, 0, 0, 1]);
        huge_len.extend_from_slice(&[0xff; 9]);
        huge_len.push(0x01);
        assert!(changes_in(&huge_len, &mut out).is_err());
        let mut bundle = MAGIC.to_vec();
        bundle.extend_from_slice(&[0, 0, 0, 0, 3, 0]);
        assert_eq!(
            changes_in(&bundle, &mut out),
            Err(ChunkError::UnexpectedType(3))
        );
    }

    #[test]
    fn hostile_bloom_filters_are_refused() {
        // entries 1, bits/entry 10, probes 7, one byte of bits: automerge's shape.
        assert_eq!(check_bloom(&[1, 10, 7, 0xff]), Ok(()));
        assert_eq!(check_bloom(&[]), Ok(()));
        // 2^32-1 probes would make automerge allocate 16 GiB per hash tested.
        assert!(check_bloom(&[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0]).is_err());
        // No bits at all: automerge would divide by zero.
        assert!(check_bloom(&[1, 10, 7]).is_err());
        assert!(check_bloom(&[1, 0, 7, 0]).is_err());
        assert!(check_bloom(&[0x80]).is_err());
    }

    #[test]
    fn a_compression_bomb_is_refused_before_automerge_inflates_it() {
        use std::io::Write;
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..16 {
            enc.write_all(&zeros).expect("deflate");
        }
        let body = enc.finish().expect("deflate");
        let mut chunk = MAGIC.to_vec();
        chunk.extend_from_slice(&[0, 0, 0, 0, 2]);
        let mut len = body.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                chunk.push(byte);
                break;
            }
            chunk.push(byte | 0x80);
        }
        chunk.extend_from_slice(&body);
        assert!(
            chunk.len() < 64 * 1024,
            "the bomb should be small: {}",
            chunk.len()
        );
        let mut out = Vec::new();
        assert_eq!(
            changes_in(&chunk, &mut out),
            Err(ChunkError::InflatesTooMuch)
        );
    }
}
