//! The binary n-gram model format: what an ARPA model becomes for fast loading
//! (memory-mapped, no parsing) and fast queries.
//!
//! Little-endian throughout; every section starts on an 8-byte boundary.
//!
//! ```text
//! header   magic "NLPNGRAM" | version u32 | order u32 | vocab_size u64 |
//!          string_bytes u64 | vocab_capacity u64 | unk, bos, eos u32 (u32::MAX: absent) |
//!          reserved u32 | count u64 per order | table capacity u64 per order
//! words    (vocab_size + 1) u64 offsets into the string bytes, then the bytes
//! vocab    vocab_capacity u32 ids: open addressing by `bytes_hash` of the word
//! 1-grams  per id: log10 prob f32, log10 backoff f32
//! n-grams  per order n >= 2, capacity entries of key u64 (0 = empty), log10 prob f32,
//!          log10 backoff f32: open addressing (linear probing) by `ngram_hash`
//! ```
//!
//! N-grams are stored by their 64-bit hash alone, like KenLM's probing model: two
//! n-grams of one order sharing a hash (about n^2 / 2^65) would be detected when
//! building and reported. A model whose ARPA file lacks `<unk>` gets one with
//! log10 probability -100, as KenLM does.

use super::arpa::Arpa;
use super::hash::{bytes_hash, ngram_hash};
use super::vocab::{BOS_WORD, EOS_WORD, UNK_WORD};
use crate::{Error, Result};

/// The first eight bytes of every binary model.
pub(crate) const MAGIC: [u8; 8] = *b"NLPNGRAM";
/// The format version this build reads and writes.
pub(crate) const VERSION: u32 = 1;
/// Marks an absent special word and an empty vocabulary slot.
pub(crate) const NONE: u32 = u32::MAX;
/// log10 probability given to `<unk>` when the ARPA file has none (as KenLM).
const MISSING_UNK_LOG10_PROB: f32 = -100.0;

/// Where everything lies in a binary model.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub order: usize,
    pub vocab_size: usize,
    pub unk: u32,
    pub bos: u32,
    pub eos: u32,
    pub counts: Vec<u64>,
    pub offsets_at: usize,
    pub strings_at: usize,
    pub vocab_at: usize,
    pub vocab_mask: usize,
    pub unigrams_at: usize,
    /// (start, capacity - 1) of the tables of orders 2..=N (index n-2).
    pub tables: Vec<(usize, usize)>,
    pub total_len: usize,
}

fn align8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

fn header_len(order: usize) -> usize {
    56 + 16 * order
}

impl Layout {
    /// Lays out the sections; `capacities[n-1]` for n >= 2 are powers of two.
    #[allow(clippy::too_many_arguments)]
    fn compute(
        order: usize,
        vocab_size: usize,
        string_bytes: usize,
        vocab_capacity: usize,
        specials: [u32; 3],
        counts: Vec<u64>,
        capacities: &[usize],
    ) -> Layout {
        let offsets_at = header_len(order);
        let strings_at = offsets_at + 8 * (vocab_size + 1);
        let vocab_at = align8(strings_at + string_bytes);
        let unigrams_at = align8(vocab_at + 4 * vocab_capacity);
        let mut at = unigrams_at + 8 * vocab_size;
        let mut tables = Vec::new();
        for &capacity in &capacities[1..] {
            tables.push((at, capacity - 1));
            at += 16 * capacity;
        }
        Layout {
            order,
            vocab_size,
            unk: specials[0],
            bos: specials[1],
            eos: specials[2],
            counts,
            offsets_at,
            strings_at,
            vocab_at,
            vocab_mask: vocab_capacity - 1,
            unigrams_at,
            tables,
            total_len: at,
        }
    }
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn read_f32(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

/// Table capacity for `count` entries: a power of two, at most two thirds full.
fn capacity_for(count: usize) -> usize {
    (count + count / 2 + 1).max(4).next_power_of_two()
}

/// The key an n-gram hash is stored under (0 marks an empty slot).
#[inline]
pub(crate) fn slot_key(hash: u64) -> u64 {
    if hash == 0 {
        1
    } else {
        hash
    }
}

/// Encodes an ARPA model in the binary format.
pub(crate) fn encode(arpa: &Arpa) -> Result<Vec<u8>> {
    let order = arpa.order();
    if order == 0 {
        return Err(Error::Invalid(
            "an n-gram model needs at least one order".into(),
        ));
    }
    let mut words: Vec<&str> = arpa.vocab.iter().map(String::as_str).collect();
    let find = |w: &str| {
        words
            .iter()
            .position(|&x| x == w)
            .map_or(NONE, |i| i as u32)
    };
    let mut unk = find(UNK_WORD);
    let (bos, eos) = (find(BOS_WORD), find(EOS_WORD));
    let mut unigram_probs = arpa.orders[0].log10_prob.clone();
    let mut unigram_backoffs = arpa.orders[0].log10_backoff.clone();
    if unk == NONE {
        unk = words.len() as u32;
        words.push(UNK_WORD);
        unigram_probs.push(MISSING_UNK_LOG10_PROB);
        unigram_backoffs.push(0.0);
    }
    let vocab_size = words.len();
    let string_bytes: usize = words.iter().map(|w| w.len()).sum();
    let vocab_capacity = (2 * vocab_size).max(4).next_power_of_two();
    let mut counts: Vec<u64> = arpa.orders.iter().map(|o| o.len() as u64).collect();
    counts[0] = vocab_size as u64;
    let capacities: Vec<usize> = std::iter::once(vocab_size)
        .chain(arpa.orders[1..].iter().map(|o| capacity_for(o.len())))
        .collect();
    let layout = Layout::compute(
        order,
        vocab_size,
        string_bytes,
        vocab_capacity,
        [unk, bos, eos],
        counts,
        &capacities,
    );

    let mut bytes = vec![0_u8; layout.total_len];
    put(&mut bytes, 0, &MAGIC);
    put(&mut bytes, 8, &VERSION.to_le_bytes());
    put(&mut bytes, 12, &(order as u32).to_le_bytes());
    put(&mut bytes, 16, &(vocab_size as u64).to_le_bytes());
    put(&mut bytes, 24, &(string_bytes as u64).to_le_bytes());
    put(&mut bytes, 32, &(vocab_capacity as u64).to_le_bytes());
    put(&mut bytes, 40, &unk.to_le_bytes());
    put(&mut bytes, 44, &bos.to_le_bytes());
    put(&mut bytes, 48, &eos.to_le_bytes());
    for (n, (count, &capacity)) in layout.counts.iter().zip(&capacities).enumerate() {
        put(&mut bytes, 56 + 8 * n, &count.to_le_bytes());
        put(
            &mut bytes,
            56 + 8 * order + 8 * n,
            &(capacity as u64).to_le_bytes(),
        );
    }

    let mut offset = 0_usize;
    for (id, word) in words.iter().enumerate() {
        put(
            &mut bytes,
            layout.offsets_at + 8 * id,
            &(offset as u64).to_le_bytes(),
        );
        put(&mut bytes, layout.strings_at + offset, word.as_bytes());
        offset += word.len();
    }
    put(
        &mut bytes,
        layout.offsets_at + 8 * vocab_size,
        &(offset as u64).to_le_bytes(),
    );

    for slot in 0..vocab_capacity {
        put(&mut bytes, layout.vocab_at + 4 * slot, &NONE.to_le_bytes());
    }
    for (id, word) in words.iter().enumerate() {
        let mut slot = bytes_hash(word.as_bytes()) as usize & layout.vocab_mask;
        while read_u32(&bytes, layout.vocab_at + 4 * slot) != NONE {
            slot = (slot + 1) & layout.vocab_mask;
        }
        put(
            &mut bytes,
            layout.vocab_at + 4 * slot,
            &(id as u32).to_le_bytes(),
        );
    }

    for id in 0..vocab_size {
        put(
            &mut bytes,
            layout.unigrams_at + 8 * id,
            &unigram_probs[id].to_le_bytes(),
        );
        put(
            &mut bytes,
            layout.unigrams_at + 8 * id + 4,
            &unigram_backoffs[id].to_le_bytes(),
        );
    }

    for n in 2..=order {
        let table = &arpa.orders[n - 1];
        let (start, mask) = layout.tables[n - 2];
        for row in 0..table.len() {
            let ngram = table.ngram(row);
            let key = slot_key(ngram_hash(ngram));
            let mut slot = key as usize & mask;
            loop {
                let at = start + 16 * slot;
                let existing = read_u64(&bytes, at);
                if existing == 0 {
                    put(&mut bytes, at, &key.to_le_bytes());
                    put(&mut bytes, at + 8, &table.log10_prob[row].to_le_bytes());
                    put(&mut bytes, at + 12, &table.log10_backoff[row].to_le_bytes());
                    break;
                }
                if existing == key {
                    return Err(Error::Invalid(format!(
                        "the {n}-gram `{}` is listed twice or shares its 64-bit hash with another {n}-gram",
                        arpa.ngram_text(ngram)
                    )));
                }
                slot = (slot + 1) & mask;
            }
        }
    }
    Ok(bytes)
}

/// Whether the file at `path` starts with [`MAGIC`].
pub(crate) fn has_magic(path: &std::path::Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0_u8; MAGIC.len()];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut filled = 0;
    while filled < head.len() {
        let read = file
            .read(&mut head[filled..])
            .map_err(|e| Error::io(path, e))?;
        if read == 0 {
            return Ok(false);
        }
        filled += read;
    }
    Ok(head == MAGIC)
}

/// Checks the header and sizes of a binary model and returns its layout;
/// `source` names the file in errors.
pub(crate) fn parse_layout(bytes: &[u8], source: &str) -> Result<Layout> {
    let invalid = |message: String| Error::Invalid(format!("{source}: {message}"));
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(invalid(format!(
            "not an nlp binary n-gram model (it does not start with the magic bytes `{}`)",
            String::from_utf8_lossy(&MAGIC)
        )));
    }
    if bytes.len() < header_len(0) {
        return Err(invalid("truncated binary n-gram model header".into()));
    }
    let version = read_u32(bytes, 8);
    if version != VERSION {
        return Err(invalid(format!(
            "binary n-gram model format version {version}, but this build reads version {VERSION}; \
             rebuild the binary from the ARPA file"
        )));
    }
    let order = read_u32(bytes, 12) as usize;
    if order == 0 || order > 64 || bytes.len() < header_len(order) {
        return Err(invalid(format!("corrupt header: order {order}")));
    }
    let vocab_size = read_u64(bytes, 16) as usize;
    let string_bytes = read_u64(bytes, 24) as usize;
    let vocab_capacity = read_u64(bytes, 32) as usize;
    let specials = [
        read_u32(bytes, 40),
        read_u32(bytes, 44),
        read_u32(bytes, 48),
    ];
    let counts: Vec<u64> = (0..order).map(|n| read_u64(bytes, 56 + 8 * n)).collect();
    let capacities: Vec<usize> = (0..order)
        .map(|n| read_u64(bytes, 56 + 8 * order + 8 * n) as usize)
        .collect();
    let sane = vocab_size > 0
        && vocab_size < (1 << 32)
        && string_bytes <= bytes.len()
        && vocab_capacity.is_power_of_two()
        && vocab_capacity > vocab_size
        && vocab_capacity <= bytes.len()
        && specials[0] < vocab_size as u32
        && specials[1..]
            .iter()
            .all(|&id| id == NONE || (id as usize) < vocab_size)
        && capacities[1..]
            .iter()
            .zip(&counts[1..])
            .all(|(&c, &n)| c.is_power_of_two() && c as u64 > n && c <= bytes.len());
    if !sane {
        return Err(invalid("corrupt header: sizes out of range".into()));
    }
    let layout = Layout::compute(
        order,
        vocab_size,
        string_bytes,
        vocab_capacity,
        specials,
        counts,
        &capacities,
    );
    if layout.total_len != bytes.len() {
        return Err(invalid(format!(
            "the header describes {} bytes but the file holds {} (truncated?)",
            layout.total_len,
            bytes.len()
        )));
    }
    // Word offsets must be monotone, end at string_bytes, and cut valid UTF-8.
    let mut previous = 0;
    for id in 0..=vocab_size {
        let offset = read_u64(bytes, layout.offsets_at + 8 * id) as usize;
        if offset < previous
            || offset > string_bytes
            || (id == 0 && offset != 0)
            || (id == vocab_size && offset != string_bytes)
        {
            return Err(invalid("corrupt vocabulary offsets".into()));
        }
        if id > 0
            && std::str::from_utf8(&bytes[layout.strings_at + previous..layout.strings_at + offset])
                .is_err()
        {
            return Err(invalid(format!("word {} is not valid UTF-8", id - 1)));
        }
        previous = offset;
    }
    for slot in 0..vocab_capacity {
        let id = read_u32(bytes, layout.vocab_at + 4 * slot);
        if id != NONE && id as usize >= vocab_size {
            return Err(invalid("corrupt vocabulary table".into()));
        }
    }
    Ok(layout)
}
