//! Reading the automerge chunks inside a sync message before automerge
//! applies them: split concatenated chunks by their headers, bound their
//! sizes (including what a compressed change inflates to), and parse the
//! changes they carry so their authors can be checked.
//!
//! Chunk layout (automerge binary format): 4 magic bytes `85 6f 4a 83`,
//! 4 checksum bytes, 1 type byte (0 document, 1 change, 2 compressed change,
//! 3 bundle), a ULEB128 length, then that many bytes.

use std::io::Read as _;

use automerge::{Change, ChangeHash};
use sha2::{Digest, Sha256};

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Most changes one message may carry.
pub const MAX_CHANGES_PER_MESSAGE: usize = 200_000;

/// Most values the columns of one message's changes, or of one whole
/// document's operations, may declare: about the most operations it may
/// hold. Columns are run-length encoded, so a change of 70 bytes can
/// declare ten million operations; automerge reads every one (1.2 s) and
/// applies them (11 s; about 390 bytes of memory each at the peak, measured
/// at two and four million), and a count near 2^63 would keep it busy for
/// good. At this bound: 0.24 s, 2.4 s and 770 MiB. iq's concerns take 21
/// bytes per operation as changes and 16 as a whole document; a node cuts
/// its own messages to this bound (`change_cache`).
pub const MAX_DECLARED_VALUES: u64 = 2_000_000;

/// Most bytes the compressed columns of one whole document may inflate to,
/// all together. automerge inflates every compressed column of a document
/// it loads, without a bound, and holds them while it loads. 1,000 concerns
/// take 312 KB uncompressed (56 KB compressed), so this holds about 200,000;
/// a larger document goes as changes (`change_cache`).
pub const MAX_INFLATED_DOCUMENT: u64 = 64 << 20;

/// Most times its own size, and [`INFLATE_ALLOWANCE`] more, a whole
/// document's compressed columns may inflate to (within
/// [`MAX_INFLATED_DOCUMENT`]), so a peer makes a node inflate no more than
/// this for every byte it sends (deflate reaches about 1,000:1; automerge's
/// documents of concerns inflate about 6:1). A document beyond it goes as
/// changes, as its sender runs the same check.
pub const MAX_DOCUMENT_INFLATE_RATIO: u64 = 64;

/// Bytes a whole document's compressed columns may inflate to beyond
/// [`MAX_DOCUMENT_INFLATE_RATIO`] times its size.
pub const INFLATE_ALLOWANCE: u64 = 1 << 20;

/// Why the chunks of a message were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk is truncated")]
    Truncated,
    #[error("chunk does not start with automerge's magic bytes")]
    BadMagic,
    #[error("chunk type {0} is not accepted in sync messages (only changes: 1)")]
    UnexpectedType(u8),
    #[error("chunk length is malformed")]
    BadLength,
    #[error(
        "compressed change chunks are not accepted (automerge's sync sends changes \
         uncompressed; each would inflate in memory before any check)"
    )]
    Compressed,
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
    #[error(
        "whole document's compressed columns inflate to more than {MAX_INFLATED_DOCUMENT} \
         bytes, or more than {MAX_DOCUMENT_INFLATE_RATIO} times the document's size and \
         {INFLATE_ALLOWANCE} bytes"
    )]
    InflatesTooFar,
    #[error("chunk is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "columns declare more than {MAX_DECLARED_VALUES} values in one message (run-length \
         encoding declaring far more operations than the bytes hold)"
    )]
    TooManyValues,
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

fn sleb128(input: &[u8]) -> Result<(i64, usize), ChunkError> {
    let mut value: i64 = 0;
    for (i, byte) in input.iter().enumerate().take(10) {
        let part = i64::from(byte & 0x7f);
        if i == 9 && !matches!(part, 0 | 0x7f) {
            return Err(ChunkError::BadLength);
        }
        value |= part << (7 * i);
        if byte & 0x80 == 0 {
            let bits = 7 * (i + 1);
            if bits < 64 && byte & 0x40 != 0 {
                value |= -1i64 << bits;
            }
            return Ok((value, i + 1));
        }
    }
    Err(ChunkError::Truncated)
}

/// Column types, the low three bits of a column's specification
/// (automerge's binary format).
const COLUMN_GROUP: u64 = 0;
const COLUMN_ACTOR: u64 = 1;
const COLUMN_INTEGER: u64 = 2;
const COLUMN_DELTA: u64 = 3;
const COLUMN_BOOLEAN: u64 = 4;
const COLUMN_STRING: u64 = 5;
const COLUMN_VALUE_METADATA: u64 = 6;

/// Takes one ULEB128 number off the front of `data`.
fn take_uleb(data: &mut &[u8], what: &'static str) -> Result<u64, ChunkError> {
    let (v, used) = uleb128(data).map_err(|_| ChunkError::Malformed(what))?;
    *data = &data[used..];
    Ok(v)
}

/// Takes one signed LEB128 number off the front of `data`.
fn take_sleb(data: &mut &[u8], what: &'static str) -> Result<i64, ChunkError> {
    let (v, used) = sleb128(data).map_err(|_| ChunkError::Malformed(what))?;
    *data = &data[used..];
    Ok(v)
}

/// Takes `n` bytes off the front of `data`.
fn take_bytes<'a>(data: &mut &'a [u8], n: u64, what: &'static str) -> Result<&'a [u8], ChunkError> {
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n <= data.len())
        .ok_or(ChunkError::Malformed(what))?;
    let (taken, rest) = data.split_at(n);
    *data = rest;
    Ok(taken)
}

/// How many values one uncompressed column declares, counted as automerge
/// will read them, stopping once past `limit`. Boolean columns alternate
/// counts of false and true; raw value columns declare none (their bytes
/// are read as the metadata column says, within the column); every other
/// column is run-length encoded: a positive count and one value repeated,
/// a negative count and that many literal values, or a zero and a count of
/// nulls. A column automerge could not read to its end is refused.
fn column_values(spec: u64, mut data: &[u8], limit: u64) -> Result<u64, ChunkError> {
    let kind = spec & 0b111;
    let skip_value = |data: &mut &[u8]| -> Result<(), ChunkError> {
        match kind {
            COLUMN_DELTA => {
                take_sleb(data, "truncated number in a column")?;
            }
            COLUMN_STRING => {
                let len = take_uleb(data, "truncated string in a column")?;
                take_bytes(data, len, "string longer than its column")?;
            }
            _ => {
                take_uleb(data, "truncated number in a column")?;
            }
        }
        Ok(())
    };
    let mut total: u64 = 0;
    match kind {
        COLUMN_BOOLEAN => {
            while !data.is_empty() && total <= limit {
                total = total
                    .saturating_add(take_uleb(&mut data, "truncated count in a boolean column")?);
            }
        }
        COLUMN_GROUP
        | COLUMN_ACTOR
        | COLUMN_INTEGER
        | COLUMN_DELTA
        | COLUMN_STRING
        | COLUMN_VALUE_METADATA => {
            while !data.is_empty() && total <= limit {
                let count = take_sleb(&mut data, "truncated run length")?;
                if count > 0 {
                    total = total.saturating_add(count.unsigned_abs());
                    skip_value(&mut data)?;
                } else if count < 0 {
                    // Each literal takes at least a byte: bounded by the column.
                    for _ in 0..count.unsigned_abs() {
                        skip_value(&mut data)?;
                        total += 1;
                    }
                } else {
                    total = total.saturating_add(take_uleb(&mut data, "truncated null run")?);
                }
            }
        }
        _ => {}
    }
    Ok(total)
}

/// Bit 3 of a column's specification: its data is deflated.
const COLUMN_DEFLATE: u64 = 0b1000;

/// The most values any one of `columns` (specification, length), laid out
/// one after the other at the start of `data`, declares, stopping once past
/// `limit`. A compressed column is inflated first, charged to
/// `inflate_left`; without it (in a change, which automerge refuses with
/// compressed columns) a compressed column is refused.
fn declared_values(
    columns: &[(u64, u64)],
    mut data: &[u8],
    limit: u64,
    mut inflate_left: Option<&mut u64>,
) -> Result<u64, ChunkError> {
    let mut most = 0;
    for &(spec, len) in columns {
        let column = take_bytes(&mut data, len, "column longer than the bytes that hold it")?;
        let values = if spec & COLUMN_DEFLATE == 0 {
            column_values(spec, column, limit)?
        } else {
            let left = inflate_left
                .as_deref_mut()
                .ok_or(ChunkError::Malformed("compressed column in a change"))?;
            column_values(spec, &inflate_column(column, left)?, limit)?
        };
        most = most.max(values);
    }
    Ok(most)
}

/// A compressed column's data inflated, as automerge inflates it (raw
/// deflate, read to the end of its stream), reading no more than `left`
/// bytes of output, which are taken off it.
fn inflate_column(column: &[u8], left: &mut u64) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(column)
        .take(left.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|_| ChunkError::Document("a compressed column does not inflate"))?;
    *left = left
        .checked_sub(out.len() as u64)
        .ok_or(ChunkError::InflatesTooFar)?;
    Ok(out)
}

/// Reads a list of column specifications and lengths: a count, then each
/// pair.
fn column_list(data: &mut &[u8]) -> Result<Vec<(u64, u64)>, ChunkError> {
    let what = "truncated column list";
    let count = take_uleb(data, what)?;
    let mut columns = Vec::new();
    for _ in 0..count {
        // Each pair takes at least two bytes: bounded by the chunk.
        let spec = take_uleb(data, what)?;
        let len = take_uleb(data, what)?;
        columns.push((spec, len));
    }
    Ok(columns)
}

/// Charges the values the op columns of one change declare to
/// `values_left`; `data` is the change after its chunk header (inflated if
/// it came compressed): dependencies, actor, sequence number, first
/// operation, time, message, other actors, then the columns.
fn charge_change(mut data: &[u8], values_left: &mut u64) -> Result<(), ChunkError> {
    let what = "truncated change header";
    let data = &mut data;
    let deps = take_uleb(data, what)?;
    take_bytes(data, deps.saturating_mul(32), what)?;
    let actor = take_uleb(data, what)?;
    take_bytes(data, actor, what)?;
    take_uleb(data, what)?;
    take_uleb(data, what)?;
    take_sleb(data, what)?;
    let message = take_uleb(data, what)?;
    take_bytes(data, message, what)?;
    let others = take_uleb(data, what)?;
    for _ in 0..others {
        // Each takes at least a byte: bounded by the change.
        let len = take_uleb(data, what)?;
        take_bytes(data, len, what)?;
    }
    let columns = column_list(data)?;
    let declared = declared_values(&columns, data, *values_left, None)?;
    *values_left = values_left
        .checked_sub(declared)
        .ok_or(ChunkError::TooManyValues)?;
    Ok(())
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
/// change chunks. Compressed change chunks (type 2) are refused, and so are
/// whole documents (chunk type 0) here: automerge would inflate compressed
/// changes and compressed columns without a bound, and iq nodes send
/// neither here (whole documents go alone in their message, and are
/// checked by [`check_document`]).
/// The values each change's columns declare are charged to `values_left`
/// (start it at [`MAX_DECLARED_VALUES`] for each message) before automerge
/// reads them.
pub fn changes_in(
    element: &[u8],
    out: &mut Vec<Change>,
    values_left: &mut u64,
) -> Result<(), ChunkError> {
    for chunk in split(element)? {
        match chunk.kind {
            1 => {
                charge_change(chunk.data, values_left)?;
                out.push(
                    Change::try_from(chunk.bytes).map_err(|e| ChunkError::Change(e.to_string()))?,
                );
            }
            // automerge's sync sends changes uncompressed (`raw_bytes`), and
            // so does iq; automerge would inflate a compressed one without a
            // bound, and keep it inflated in the change: thousands of them
            // fit in one request.
            2 => return Err(ChunkError::Compressed),
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
/// `Automerge::save` and `save_nocompress` write) whose header automerge can read
/// with bounded work, before automerge loads it: every count in its header
/// fits the bytes that follow, its compressed columns inflate to at most
/// [`MAX_INFLATED_DOCUMENT`] bytes together, and to at most
/// [`MAX_DOCUMENT_INFLATE_RATIO`] times the document's size and
/// [`INFLATE_ALLOWANCE`] (automerge inflates them without a bound), no change column declares more than
/// [`MAX_CHANGES_PER_MESSAGE`] values and no operation column more than
/// [`MAX_DECLARED_VALUES`] (run-length encoding declares far more values
/// than its bytes hold).
///
/// Layout after the chunk header: actors (a count, then each a length and
/// its bytes), heads (a count, then 32 bytes each), then the change
/// columns and the operation columns, each a count of (specification,
/// length) pairs; bit 3 of a specification marks a compressed column.
pub fn check_document(element: &[u8]) -> Result<(), ChunkError> {
    let (_, mut rest) = document_header(element)?;
    let change_columns = column_list(&mut rest)?;
    let op_columns = column_list(&mut rest)?;
    let mut inflate_left = (element.len() as u64)
        .saturating_mul(MAX_DOCUMENT_INFLATE_RATIO)
        .saturating_add(INFLATE_ALLOWANCE)
        .min(MAX_INFLATED_DOCUMENT);
    // The change columns' data, then the operation columns'. automerge
    // sets up a builder for every change before it reads their operations,
    // so the changes are bounded as in a message of changes.
    let change_bytes = change_columns
        .iter()
        .fold(0u64, |sum, (_, len)| sum.saturating_add(*len));
    let changes = declared_values(
        &change_columns,
        rest,
        MAX_CHANGES_PER_MESSAGE as u64,
        Some(&mut inflate_left),
    )?;
    if changes > MAX_CHANGES_PER_MESSAGE as u64 {
        return Err(ChunkError::TooManyChanges);
    }
    take_bytes(
        &mut rest,
        change_bytes,
        "column longer than the bytes that hold it",
    )?;
    let ops = declared_values(
        &op_columns,
        rest,
        MAX_DECLARED_VALUES,
        Some(&mut inflate_left),
    )?;
    if ops > MAX_DECLARED_VALUES {
        return Err(ChunkError::TooManyValues);
    }
    Ok(())
}

/// The values the columns of the changes in `element` declare, as
/// [`changes_in`] charges them: for this node's own messages, so that one
/// stays within [`MAX_DECLARED_VALUES`]. `None` if they cannot be read.
pub fn values_declared(element: &[u8]) -> Option<u64> {
    let mut left = u64::MAX;
    for chunk in split(element).ok()? {
        if chunk.kind != 1 {
            return None;
        }
        charge_change(chunk.data, &mut left).ok()?;
    }
    Some(u64::MAX - left)
}

/// The heads the whole-document chunk at the start of `element` names in
/// its header, read without loading it: the changes a document stored
/// whole must bring when it loads. automerge saves changes it holds queued
/// for missing dependencies after the document chunk; they are not among
/// these.
pub fn document_heads(element: &[u8]) -> Result<Vec<ChangeHash>, ChunkError> {
    let first = split(element)?
        .first()
        .map(|chunk| chunk.bytes)
        .ok_or(ChunkError::Truncated)?;
    document_header(first).map(|(heads, _)| heads)
}

/// Reads a whole-document chunk's header up to its column lists: its
/// heads, and the bytes after them.
fn document_header(element: &[u8]) -> Result<(Vec<ChangeHash>, &[u8]), ChunkError> {
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
    let (head_bytes, rest) = rest.split_at(head_bytes);
    let heads = head_bytes
        .chunks_exact(32)
        .map(|h| {
            let mut hash = [0; 32];
            hash.copy_from_slice(h);
            ChangeHash(hash)
        })
        .collect();
    Ok((heads, rest))
}

/// Whether `element` is one whole-document chunk with at least one
/// compressed column, as `Automerge::save` writes a document whose
/// columns are long enough to deflate; false for anything else, including
/// what does not parse.
pub fn compressed_document(element: &[u8]) -> bool {
    let Ok((_, mut rest)) = document_header(element) else {
        return false;
    };
    let (Ok(changes), Ok(ops)) = (column_list(&mut rest), column_list(&mut rest)) else {
        return false;
    };
    changes
        .iter()
        .chain(&ops)
        .any(|(spec, _)| spec & COLUMN_DEFLATE != 0)
}

/// Whether `bytes` start with a whole-document chunk (what
/// `Automerge::save` writes), as a compacted document's snapshot does.
pub fn is_document(bytes: &[u8]) -> bool {
    bytes.len() > 8 && bytes[..4] == MAGIC && bytes[8] == 0
}

/// Hand-built chunks for tests and the attack tool (`iq-attack`), which
/// send what no automerge writes.
#[doc(hidden)]
pub mod forge {
    use sha2::{Digest, Sha256};

    pub fn uleb(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    pub fn sleb(mut v: i64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0) {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A change chunk by `actor` (sequence number 1, no dependencies)
    /// whose columns are single runs of `n` values each: `n` times "set
    /// key k of the root to null". `key` is the key column's run length,
    /// for columns that disagree.
    pub fn run_length_change(actor: &[u8], n: i64, key: i64) -> Vec<u8> {
        let run = |count: i64, value: &[u8]| {
            let mut column = Vec::new();
            sleb(count, &mut column);
            column.extend_from_slice(value);
            column
        };
        let mut insert = Vec::new();
        uleb(n.unsigned_abs(), &mut insert);
        let columns: [(u64, Vec<u8>); 5] = [
            (0x15, run(key, &[1, b'k'])), // key strings
            (0x34, insert),               // insert flags, all false
            (0x42, run(n, &[1])),         // actions: set
            (0x56, run(n, &[0])),         // value metadata: null
            (0x70, run(n, &[0])),         // predecessor counts: none
        ];
        let mut body = Vec::new();
        uleb(0, &mut body); // dependencies
        uleb(actor.len() as u64, &mut body);
        body.extend_from_slice(actor);
        uleb(1, &mut body); // sequence number
        uleb(1, &mut body); // first operation
        sleb(0, &mut body); // time
        uleb(0, &mut body); // message
        uleb(0, &mut body); // other actors
        uleb(columns.len() as u64, &mut body);
        for (spec, data) in &columns {
            uleb(*spec, &mut body);
            uleb(data.len() as u64, &mut body);
        }
        for (_, data) in &columns {
            body.extend_from_slice(data);
        }
        let mut hashed = vec![1];
        uleb(body.len() as u64, &mut hashed);
        hashed.extend_from_slice(&body);
        let mut chunk = super::MAGIC.to_vec();
        chunk.extend_from_slice(&Sha256::digest(&hashed)[..4]);
        chunk.extend_from_slice(&hashed);
        chunk
    }

    /// A whole-document chunk by `actor`, without heads, whose one change
    /// column is compressed and inflates to `inflated` zero bytes (null
    /// runs of no values): what automerge would inflate whole before it
    /// read anything else.
    pub fn inflating_document(actor: &[u8], inflated: usize) -> Vec<u8> {
        use std::io::Write as _;
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        let mut left = inflated;
        while left > 0 {
            let n = left.min(zeros.len());
            let _ = deflate.write_all(&zeros[..n]);
            left -= n;
        }
        let column = deflate.finish().unwrap_or_default();
        let mut body = Vec::new();
        uleb(1, &mut body); // actors
        uleb(actor.len() as u64, &mut body);
        body.extend_from_slice(actor);
        uleb(0, &mut body); // heads
        uleb(1, &mut body); // change columns: the actors, compressed
        uleb(0x19, &mut body);
        uleb(column.len() as u64, &mut body);
        uleb(0, &mut body); // operation columns
        body.extend_from_slice(&column);
        let mut chunk = super::MAGIC.to_vec();
        chunk.extend_from_slice(&[0; 4]);
        chunk.push(0);
        uleb(body.len() as u64, &mut chunk);
        chunk.extend_from_slice(&body);
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};
    use forge::{sleb, uleb};

    fn run_length_change(n: i64, key: i64) -> Vec<u8> {
        forge::run_length_change(&[7; 16], n, key)
    }

    fn all_values() -> u64 {
        MAX_DECLARED_VALUES
    }

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
        changes_in(&bytes, &mut out, &mut all_values()).expect("the change as built");
        bytes[5] ^= 0x01;
        let mut out = Vec::new();
        assert_eq!(
            changes_in(&bytes, &mut out, &mut all_values()),
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
        changes_in(&concatenated, &mut out, &mut all_values()).expect("changes");
        assert_eq!(
            out.iter().map(|c| c.hash()).collect::<Vec<_>>(),
            changes.iter().map(|c| c.hash()).collect::<Vec<_>>()
        );
        let mut out = Vec::new();
        assert_eq!(
            changes_in(&doc.save(), &mut out, &mut all_values()),
            Err(ChunkError::UnexpectedType(0))
        );
        assert_eq!(count(&concatenated), 3);
        assert_eq!(count(&concatenated[..concatenated.len() - 1]), 0);
    }

    #[test]
    fn only_well_formed_documents_pass_the_document_check() {
        // Enough changes that automerge compresses some columns.
        let doc = doc_with_changes(300);
        let plain = doc.save_nocompress();
        assert_eq!(check_document(&plain), Ok(()));
        let compressed = doc.save();
        assert!(compressed.len() < plain.len());
        assert_eq!(check_document(&compressed), Ok(()));
        // Compressed columns inflate, together, up to 64 times the
        // document's size and 1 MiB, and never past 64 MiB.
        let within = |inflated: usize| {
            let document = forge::inflating_document(&[7; 16], inflated);
            let bound = (document.len() as u64 * MAX_DOCUMENT_INFLATE_RATIO + INFLATE_ALLOWANCE)
                .min(MAX_INFLATED_DOCUMENT);
            (check_document(&document), bound)
        };
        let (checked, bound) = within(INFLATE_ALLOWANCE as usize);
        assert_eq!(checked, Ok(()));
        assert!(bound > INFLATE_ALLOWANCE);
        // 16 MiB of zeros deflate to about 16 KB: within 64 MiB, not 64:1.
        let (checked, bound) = within(16 << 20);
        assert!(bound < 16 << 20, "{bound}");
        assert_eq!(checked, Err(ChunkError::InflatesTooFar));
        let max = MAX_INFLATED_DOCUMENT as usize;
        assert_eq!(within(max + 2).0, Err(ChunkError::InflatesTooFar));
        // A compressed column that does not inflate: its data (from byte
        // 33, after the 9-byte chunk header, the length, one 16-byte actor,
        // no heads and the two column lists) is not a deflate stream.
        let mut broken = forge::inflating_document(&[7; 16], 1024);
        broken[33..].iter_mut().for_each(|b| *b = 0xff);
        assert_eq!(
            check_document(&broken),
            Err(ChunkError::Document("a compressed column does not inflate"))
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
    fn a_documents_heads_are_read_from_its_header() {
        let doc = doc_with_changes(3);
        let mut forked = doc.fork();
        let mut tx = forked.transaction();
        tx.put(ROOT, "other", 1).expect("put");
        tx.commit();
        let mut merged = doc.clone();
        let mut tx = merged.transaction();
        tx.put(ROOT, "mine", 2).expect("put");
        tx.commit();
        merged.merge(&mut forked).expect("merge");
        assert_eq!(merged.get_heads().len(), 2);
        for am in [&doc, &merged] {
            assert_eq!(document_heads(&am.save()), Ok(am.get_heads()));
            assert_eq!(document_heads(&am.save_nocompress()), Ok(am.get_heads()));
        }
        assert_eq!(
            document_heads(doc.get_changes(&[])[0].raw_bytes()),
            Err(ChunkError::UnexpectedType(1))
        );
    }

    #[test]
    fn a_document_saved_with_compressed_columns_is_told_apart() {
        // Long enough for automerge to deflate some columns.
        let doc = doc_with_changes(300);
        let compressed = doc.save();
        let plain = doc.save_nocompress();
        assert!(compressed.len() < plain.len());
        assert!(compressed_document(&compressed));
        assert!(!compressed_document(&plain));
        // Too short to deflate anything: saved the same either way.
        let small = doc_with_changes(1);
        assert!(!compressed_document(&small.save()));
        assert!(!compressed_document(small.get_changes(&[])[0].raw_bytes()));
        assert!(!compressed_document(&compressed[..compressed.len() / 2]));
        assert!(!compressed_document(b"not a chunk at all"));
    }

    #[test]
    fn garbage_is_refused_without_reaching_automerge() {
        let mut out = Vec::new();
        assert_eq!(
            changes_in(b"\x00\x01", &mut out, &mut all_values()),
            Err(ChunkError::Truncated)
        );
        assert_eq!(
            changes_in(&[0u8; 16], &mut out, &mut all_values()),
            Err(ChunkError::BadMagic)
        );
        let mut huge_len = MAGIC.to_vec();
        huge_len.extend_from_slice(&[0, 0, 0, 0, 1]);
        huge_len.extend_from_slice(&[0xff; 9]);
        huge_len.push(0x01);
        assert!(changes_in(&huge_len, &mut out, &mut all_values()).is_err());
        let mut bundle = MAGIC.to_vec();
        bundle.extend_from_slice(&[0, 0, 0, 0, 3, 0]);
        assert_eq!(
            changes_in(&bundle, &mut out, &mut all_values()),
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
        forge::uleb(body.len() as u64, &mut chunk);
        chunk.extend_from_slice(&body);
        assert!(
            chunk.len() < 64 * 1024,
            "the bomb should be small: {}",
            chunk.len()
        );
        let mut out = Vec::new();
        assert_eq!(
            changes_in(&chunk, &mut out, &mut all_values()),
            Err(ChunkError::Compressed)
        );
        // automerge's own compressed form of a large change: refused too
        // (automerge's sync never sends it).
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "long", "x".repeat(4096)).expect("put");
        tx.commit();
        let mut change = doc.get_changes(&[])[0].clone();
        assert_eq!(change.bytes()[8], 2, "automerge compresses it");
        assert_eq!(
            changes_in(change.bytes().as_ref(), &mut out, &mut all_values()),
            Err(ChunkError::Compressed)
        );
        changes_in(change.raw_bytes(), &mut out, &mut all_values()).expect("uncompressed");
    }

    /// A few bytes of run-length encoding can declare millions of
    /// operations, which automerge would read and apply one by one.
    #[test]
    fn run_length_bombs_are_refused_before_automerge_reads_them() {
        // The hand-built change is one automerge reads: three operations.
        let three = run_length_change(3, 3);
        let mut out = Vec::new();
        let mut left = all_values();
        changes_in(&three, &mut out, &mut left).expect("a well-formed change");
        assert_eq!(out[0].len(), 3);
        assert_eq!(left, MAX_DECLARED_VALUES - 3);

        // The same 70 bytes declaring more than a message may hold.
        let bomb = run_length_change(MAX_DECLARED_VALUES as i64 + 1, 1);
        assert!(bomb.len() < 80, "{} bytes", bomb.len());
        assert_eq!(
            changes_in(&bomb, &mut Vec::new(), &mut all_values()),
            Err(ChunkError::TooManyValues)
        );
        // One column is enough, and so is the largest count there is.
        let one_column = run_length_change(1, i64::MAX);
        assert_eq!(
            changes_in(&one_column, &mut Vec::new(), &mut all_values()),
            Err(ChunkError::TooManyValues)
        );
        // Within the bound one change at a time, beyond it in one message.
        let six = run_length_change(6, 6);
        let mut left = 10;
        let mut out = Vec::new();
        changes_in(&six, &mut out, &mut left).expect("the first six");
        assert_eq!(left, 4);
        assert_eq!(
            changes_in(&six, &mut out, &mut left),
            Err(ChunkError::TooManyValues)
        );
    }

    /// Null runs and boolean counts declare values too; a literal run
    /// claiming more values than its column holds is malformed.
    #[test]
    fn every_kind_of_run_is_counted() {
        let mut nulls = Vec::new();
        sleb(0, &mut nulls);
        uleb(u64::MAX, &mut nulls);
        assert!(column_values(0x56, &nulls, 10).expect("counted") > 10);
        let mut flags = Vec::new();
        uleb(5, &mut flags);
        uleb(7, &mut flags);
        assert_eq!(column_values(0x34, &flags, 100), Ok(12));
        let mut literals = Vec::new();
        sleb(-3, &mut literals);
        for s in ["a", "bc", "def"] {
            uleb(s.len() as u64, &mut literals);
            literals.extend_from_slice(s.as_bytes());
        }
        assert_eq!(column_values(0x15, &literals, 100), Ok(3));
        let mut claims = Vec::new();
        sleb(i64::MIN, &mut claims);
        claims.push(1);
        assert!(matches!(
            column_values(0x42, &claims, u64::MAX),
            Err(ChunkError::Malformed(_))
        ));
        // Raw value bytes declare nothing.
        assert_eq!(column_values(0x57, &[0xff; 16], 10), Ok(0));
    }

    /// automerge's own changes and documents of every kind of object pass
    /// the count, and each change is charged at least its operations.
    #[test]
    fn automerges_own_changes_and_documents_pass_the_count() {
        use automerge::{ObjType, ScalarValue};
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let list = tx.put_object(ROOT, "list", ObjType::List).expect("list");
        let text = tx.put_object(ROOT, "text", ObjType::Text).expect("text");
        let map = tx.put_object(ROOT, "map", ObjType::Map).expect("map");
        tx.commit();
        for i in 0..200i64 {
            let mut tx = doc.transaction();
            tx.insert(&list, 0, i).expect("insert");
            tx.splice_text(&text, 0, 0, "Bürgerbeteiligung ")
                .expect("text");
            tx.put(&map, format!("k{}", i % 7), format!("v{i}"))
                .expect("put");
            tx.put(&map, "n", ScalarValue::counter(i)).expect("counter");
            tx.put(&map, "f", 0.5 * i as f64).expect("float");
            tx.put(&map, "b", i % 2 == 0).expect("bool");
            tx.put(&map, "null", ScalarValue::Null).expect("null");
            if i % 3 == 0 {
                tx.delete(&list, 0).expect("delete");
                tx.splice_text(&text, 2, 4, "").expect("delete text");
                tx.increment(&map, "n", 1).expect("increment");
            }
            tx.commit();
        }
        let mut charged = 0;
        for change in doc.get_changes(&[]) {
            let mut left = all_values();
            changes_in(change.raw_bytes(), &mut Vec::new(), &mut left)
                .expect("automerge's own change");
            assert!(MAX_DECLARED_VALUES - left >= change.len() as u64);
            assert_eq!(
                values_declared(change.raw_bytes()),
                Some(MAX_DECLARED_VALUES - left)
            );
            charged += MAX_DECLARED_VALUES - left;
        }
        assert!(charged >= 201);
        assert_eq!(check_document(&doc.save_nocompress()), Ok(()));
    }

    /// A whole-document chunk built by hand: one actor, no heads, and the
    /// given change and operation columns (specification, data).
    fn hand_built_document(changes: &[(u64, Vec<u8>)], ops: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        uleb(1, &mut body); // actors
        uleb(16, &mut body);
        body.extend_from_slice(&[7; 16]);
        uleb(0, &mut body); // heads
        for columns in [changes, ops] {
            uleb(columns.len() as u64, &mut body);
            for (spec, data) in columns {
                uleb(*spec, &mut body);
                uleb(data.len() as u64, &mut body);
            }
        }
        for (_, data) in changes.iter().chain(ops) {
            body.extend_from_slice(data);
        }
        let mut chunk = MAGIC.to_vec();
        chunk.extend_from_slice(&[0, 0, 0, 0, 0]);
        uleb(body.len() as u64, &mut chunk);
        chunk.extend_from_slice(&body);
        chunk
    }

    #[test]
    fn a_document_whose_columns_declare_too_many_values_is_refused() {
        let run = |count: i64, value: u64| {
            let mut column = Vec::new();
            sleb(count, &mut column);
            uleb(value, &mut column);
            column
        };
        // The actions alone.
        let bomb = hand_built_document(&[], &[(0x42, run(i64::MAX, 1))]);
        assert_eq!(check_document(&bomb), Err(ChunkError::TooManyValues));
        // The change columns (the actors alone): automerge sets up each
        // change before it reads an operation.
        let changes = run(MAX_CHANGES_PER_MESSAGE as i64 + 1, 0);
        let bomb = hand_built_document(&[(0x01, changes)], &[]);
        assert_eq!(check_document(&bomb), Err(ChunkError::TooManyChanges));
    }
}
