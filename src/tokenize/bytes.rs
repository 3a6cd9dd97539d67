//! The GPT-2 byte-to-unicode mapping (Radford et al. 2019, "Language Models are
//! Unsupervised Multitask Learners", released `encoder.py`).
//!
//! Byte-level BPE works on bytes, but vocabularies are stored as strings. Every byte
//! gets a printable character: the 188 printable Latin-1 bytes map to themselves, and
//! the other 68 (controls, space, soft hyphen...) map to U+0100 and up, in byte order.
//! So `' '` is `'Ġ'` and `'\n'` is `'Ċ'`. This module is only the mapping, not the splitting.

/// Whether byte `b` is one of the printable bytes that map to themselves.
const fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character that stands for each byte.
pub(crate) const BYTE_TO_CHAR: [char; 256] = build_byte_to_char();

const fn build_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let code = if is_printable(b as u8) {
            b as u32
        } else {
            next_extra += 1;
            255 + next_extra
        };
        table[b] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("codes below U+0200 are valid chars"),
        };
        b += 1;
    }
    table
}

/// The byte a mapped character stands for, or `None` for characters outside the mapping.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && is_printable(code as u8) {
        return Some(code as u8);
    }
    if (256..256 + 68).contains(&code) {
        // The n-th non-printable byte (in byte order) maps to U+0100 + n.
        let nth = (code - 256) as usize;
        return (0u8..=255).filter(|&b| !is_printable(b)).nth(nth);
    }
    None
}

/// Maps raw bytes to their GPT-2 characters, appending to `out`.
pub(crate) fn push_mapped(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        out.push(BYTE_TO_CHAR[b as usize]);
    }
}

/// Maps a GPT-2 character string back to bytes; `None` when a character is outside the mapping.
pub(crate) fn unmap(mapped: &str) -> Option<Vec<u8>> {
    mapped.chars().map(char_to_byte).collect()
}

/// The 256 mapped characters in code-point order (the byte-level alphabet of `tokenizers`).
pub(crate) fn alphabet() -> Vec<char> {
    let mut chars = BYTE_TO_CHAR.to_vec();
    chars.sort_unstable();
    chars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_a_bijection_with_known_points() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        assert_eq!(BYTE_TO_CHAR[0xAD], 'Ń');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(BYTE_TO_CHAR[b as usize]), Some(b));
        }
        let mut chars = alphabet();
        chars.dedup();
        assert_eq!(chars.len(), 256);
        assert_eq!(char_to_byte('€'), None);
    }
}
