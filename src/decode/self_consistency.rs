//! Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought
//! Reasoning in Language Models"): sample several reasoning paths, extract each one's
//! final answer, and return the answer most of them agree on.
//!
//! The answer of a text is the last match of a regular expression (its first capture
//! group when it has one, else the whole match), trimmed; a text without a match casts
//! no vote. Ties go to the answer that appeared first, so the vote is deterministic.

use regex::Regex;

/// An answer and how many samples gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    /// The extracted answer.
    pub answer: String,
    /// Samples whose answer it is.
    pub votes: usize,
    /// Index of the first sample that gave it.
    pub first: usize,
}

/// The answer in `text`: the last match of `pattern`, its first group if it has one.
pub fn extract_answer(pattern: &Regex, text: &str) -> Option<String> {
    let captures = pattern.captures_iter(text).last()?;
    let found = captures.get(1).or_else(|| captures.get(0))?;
    Some(found.as_str().trim().to_string())
}

/// Tallies the answers (`None`: the sample gave none), most votes first, ties by first
/// appearance.
pub fn majority_vote(answers: &[Option<String>]) -> Vec<Vote> {
    let mut tally: Vec<Vote> = Vec::new();
    for (index, answer) in answers.iter().enumerate() {
        let Some(answer) = answer else { continue };
        match tally.iter_mut().find(|v| &v.answer == answer) {
            Some(vote) => vote.votes += 1,
            None => tally.push(Vote {
                answer: answer.clone(),
                votes: 1,
                first: index,
            }),
        }
    }
    tally.sort_by(|a, b| b.votes.cmp(&a.votes).then(a.first.cmp(&b.first)));
    tally
}
