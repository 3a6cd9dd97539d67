//! Plain-text tables for the terminal: the reports of `nlp eval`, and the side-by-side
//! comparison of several models on one text.

use super::Perplexity;

/// A table of text cells; the first column is left-aligned, the others right-aligned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with a header row.
    pub fn new<S: ToString>(header: &[S]) -> Table {
        Table {
            rows: vec![header.iter().map(ToString::to_string).collect()],
        }
    }

    /// Appends a row.
    pub fn row<S: ToString>(&mut self, cells: &[S]) {
        self.rows
            .push(cells.iter().map(ToString::to_string).collect());
    }

    /// The table as aligned lines, the header underlined.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| match c {
                    0 => format!("{cell:<width$}", width = widths[c]),
                    _ => format!("{cell:>width$}", width = widths[c]),
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
            if i == 0 && self.rows.len() > 1 {
                let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
                out.push_str(&rule.join("  "));
                out.push('\n');
            }
        }
        out
    }
}

/// Several models' perplexity figures on the same text, one row per model. Token-level
/// figures depend on each model's tokenizer; bits per byte and word-level perplexity
/// compare across tokenizers.
pub fn compare(models: &[(String, Perplexity)]) -> Table {
    let mut table = Table::new(&[
        "model",
        "tokens",
        "mean_nll",
        "perplexity",
        "word_ppl",
        "bits_per_byte",
    ]);
    for (name, ppl) in models {
        table.row(&[
            name.clone(),
            ppl.tokens.to_string(),
            format!("{:.4}", ppl.mean_nll),
            format!("{:.3}", ppl.perplexity),
            format!("{:.3}", ppl.word_perplexity),
            format!("{:.4}", ppl.bits_per_byte),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut table = Table::new(&["model", "ppl"]);
        table.row(&["a", "10.5"]);
        table.row(&["longer", "3"]);
        assert_eq!(
            table.render(),
            "model    ppl\n------  ----\na       10.5\nlonger     3\n"
        );
    }
}
