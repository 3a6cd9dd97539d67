//! Added tokens (special tokens such as `<|endoftext|>`): found in the raw text first,
//! leftmost-longest, and never merged with their neighbours. The text between them goes
//! to the pre-tokenizer and the model.

/// A token matched verbatim in the input before any other processing.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedToken {
    /// The exact text of the token.
    pub content: String,
    /// Its id.
    pub id: u32,
    /// Whether it is a special (control) token rather than an ordinary added word.
    pub special: bool,
    /// Whether it swallows whitespace on its left.
    pub lstrip: bool,
    /// Whether it swallows whitespace on its right.
    pub rstrip: bool,
    /// Whether `tokenizer.json` marked it as matched after normalization (kept for writing back).
    pub normalized: bool,
}

impl AddedToken {
    /// A special token with default flags.
    pub fn special(content: &str, id: u32) -> Self {
        AddedToken {
            content: content.to_string(),
            id,
            special: true,
            lstrip: false,
            rstrip: false,
            normalized: false,
        }
    }
}

/// A piece of input after added tokens are cut out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Segment<'a> {
    /// Ordinary text; the flag says whether it starts the input.
    Text(&'a [u8], bool),
    /// An added token's id.
    Token(u32),
}

/// The added tokens of a tokenizer and a matcher over them.
#[derive(Debug, Clone, Default)]
pub(crate) struct AddedVocab {
    pub(crate) tokens: Vec<AddedToken>,
    /// For each first byte, the indices of tokens starting with it, longest first.
    by_first_byte: Vec<Vec<usize>>,
}

impl AddedVocab {
    pub(crate) fn new(tokens: Vec<AddedToken>) -> Self {
        let mut by_first_byte = vec![Vec::new(); 256];
        for (i, token) in tokens.iter().enumerate() {
            if let Some(&b) = token.content.as_bytes().first() {
                by_first_byte[b as usize].push(i);
            }
        }
        for list in &mut by_first_byte {
            // Longest first, so the first match at a position is the longest one.
            list.sort_by_key(|&i| std::cmp::Reverse(tokens[i].content.len()));
        }
        AddedVocab { tokens, by_first_byte }
    }

    /// The added token with this exact content.
    pub(crate) fn find(&self, content: &str) -> Option<&AddedToken> {
        self.tokens.iter().find(|t| t.content == content)
    }

    /// The added token with this id.
    pub(crate) fn by_id(&self, id: u32) -> Option<&AddedToken> {
        self.tokens.iter().find(|t| t.id == id)
    }

    /// The longest token matching at the start of `rest`.
    fn match_at(&self, rest: &[u8]) -> Option<&AddedToken> {
        self.by_first_byte[rest[0] as usize]
            .iter()
            .map(|&i| &self.tokens[i])
            .find(|t| rest.starts_with(t.content.as_bytes()))
    }

    /// Calls `segment` with the text runs and added tokens of `text`, in order.
    pub(crate) fn split<'a>(&self, text: &'a [u8], mut segment: impl FnMut(Segment<'a>)) {
        if self.tokens.is_empty() {
            if !text.is_empty() {
                segment(Segment::Text(text, true));
            }
            return;
        }
        let mut text_start = 0;
        let mut i = 0;
        while i < text.len() {
            let Some(token) = self.match_at(&text[i..]) else {
                i += 1;
                continue;
            };
            let mut before_end = i;
            if token.lstrip {
                while before_end > text_start && text[before_end - 1].is_ascii_whitespace() {
                    before_end -= 1;
                }
            }
            if before_end > text_start {
                segment(Segment::Text(&text[text_start..before_end], text_start == 0));
            }
            segment(Segment::Token(token.id));
            i += token.content.len();
            if token.rstrip {
                while i < text.len() && text[i].is_ascii_whitespace() {
                    i += 1;
                }
            }
            text_start = i;
        }
        if text_start < text.len() {
            segment(Segment::Text(&text[text_start..], text_start == 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_token_wins_and_text_between_is_kept() {
        let vocab = AddedVocab::new(vec![AddedToken::special("<s>", 1), AddedToken::special("<s>x", 2)]);
        let mut out = Vec::new();
        vocab.split(b"a<s>xb<s>", |s| out.push(s));
        assert_eq!(
            out,
            [Segment::Text(b"a", true), Segment::Token(2), Segment::Text(b"b", false), Segment::Token(1)]
        );
    }
}
