//! Plain-text tables with columns aligned by hand: every column but the last is padded to its
//! widest cell, columns are two spaces apart, and no line ends in spaces. A cell may be
//! painted; widths count its text only, never the colour codes.

use crate::style::Paint;

/// Rows of cells, with an optional header row.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<Cell>>,
}

/// One cell: its text, kept on one line, and how to paint it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    text: String,
    paint: Option<Paint>,
}

impl Cell {
    /// A cell shown in `paint` (none for plain text). Empty text shows as "-"; line breaks
    /// and tabs are escaped so the cell stays on its line.
    pub fn painted(text: impl Into<String>, paint: Option<Paint>) -> Self {
        let text: String = text.into();
        let text = if text.is_empty() {
            EMPTY_CELL.to_owned()
        } else {
            one_line(&text)
        };
        Cell { text, paint }
    }

    /// A cell that shows nothing, for views where "-" would only be noise.
    pub fn blank() -> Self {
        Cell {
            text: String::new(),
            paint: None,
        }
    }

    fn width(&self) -> usize {
        self.text.chars().count()
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell::painted(text, None)
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell::painted(text, None)
    }
}

/// Empty cells show as this, so columns never look shifted.
const EMPTY_CELL: &str = "-";

const GAP: &str = "  ";

impl Table {
    /// A table whose first row is `header`.
    pub fn with_header(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| Cell::from(*h)).collect()],
        }
    }

    /// A table without a header, such as a key/value block.
    pub fn new() -> Self {
        Table::default()
    }

    /// Adds a row. Empty cells show as "-"; line breaks and tabs are escaped so a cell stays
    /// on its line.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<Cell>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.width());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                match cell.paint {
                    Some(paint) => line.push_str(&paint.apply(&cell.text)),
                    None => line.push_str(&cell.text),
                }
                let pad = widths[i] - cell.width();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Every line of `text` prefixed with `prefix`.
pub fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

fn one_line(s: &str) -> String {
    if !s.contains(['\n', '\r', '\t']) {
        return s.to_owned();
    }
    s.replace('\r', "\\r")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut t = Table::with_header(&["ID", "NAME", "STATE"]);
        t.row(["1", "build-everything", "running"]);
        t.row(["12345", "x", "queued"]);
        assert_eq!(
            t.render(),
            "\
ID     NAME              STATE
1      build-everything  running
12345  x                 queued
"
        );
    }

    #[test]
    fn empty_cells_show_a_dash_and_lines_have_no_trailing_spaces() {
        let mut t = Table::with_header(&["A", "B", "C"]);
        t.row(["long value", "", ""]);
        let out = t.render();
        assert_eq!(out, "A           B  C\nlong value  -  -\n");
        assert!(out.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new();
        t.row(["héllo", "1"]);
        t.row(["hi", "2"]);
        assert_eq!(t.render(), "héllo  1\nhi     2\n");
    }

    #[test]
    fn cells_stay_on_one_line() {
        let mut t = Table::new();
        t.row(["script:", "make\nmake install"]);
        assert_eq!(t.render(), "script:  make\\nmake install\n");
    }

    #[test]
    fn short_rows_and_empty_tables() {
        let mut t = Table::with_header(&["A", "B"]);
        t.row(["x"]);
        assert_eq!(t.render(), "A  B\nx\n");
        assert_eq!(Table::new().render(), "");
    }

    #[test]
    fn painted_cells_align_on_their_text() {
        let mut t = Table::with_header(&["STATE", "ID"]);
        t.row([Cell::painted("failed", Some(Paint::Red)), "1".into()]);
        t.row([Cell::painted("succeeded", Some(Paint::Green)), "2".into()]);
        assert_eq!(
            t.render(),
            "STATE      ID\n\x1b[31mfailed\x1b[0m     1\n\x1b[32msucceeded\x1b[0m  2\n"
        );
    }

    #[test]
    fn blank_cells_show_nothing() {
        let mut t = Table::new();
        t.row([Cell::from("a"), Cell::blank(), Cell::from("b")]);
        t.row([Cell::from("long"), Cell::blank(), Cell::blank()]);
        assert_eq!(t.render(), "a       b\nlong\n");
    }

    #[test]
    fn indent_prefixes_every_line() {
        assert_eq!(indent("a\nb\n", "  "), "  a\n  b\n");
    }
}
