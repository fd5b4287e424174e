//! Small helpers for building SQL shared by the data access modules.

use sqlx::{Encode, Postgres, QueryBuilder, Type};
use uuid::Uuid;

/// A `LIKE` pattern matching strings that start with `prefix` (its `%`, `_` and `\\`
/// escaped).
pub(crate) fn like_prefix(prefix: &str) -> String {
    format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

/// Writes `unnest($1::uuid[], $2::text[], …)` into a query: one bound array per column, so a
/// batch of rows is one parameter per column whatever its size.
pub(crate) struct Unnest<'q> {
    query: &'q mut QueryBuilder<Postgres>,
    columns: usize,
}

impl<'q> Unnest<'q> {
    pub(crate) fn new(query: &'q mut QueryBuilder<Postgres>) -> Self {
        query.push("unnest(");
        Self { query, columns: 0 }
    }

    /// Binds `values` as the next column, of SQL type `ty[]`.
    pub(crate) fn column<'t, T>(mut self, values: T, ty: &str) -> Self
    where
        T: Encode<'t, Postgres> + Type<Postgres>,
    {
        if self.columns > 0 {
            self.query.push(", ");
        }
        self.query.push_bind(values);
        self.query.push(format_args!("::{ty}[]"));
        self.columns += 1;
        self
    }

    /// Closes the call and names its columns: `) AS alias(names)`.
    pub(crate) fn alias(self, alias: &str) {
        self.query.push(format_args!(") AS {alias}"));
    }

    /// Closes the call as `) AS {name}({columns})`. With `only`, each row's job and the name
    /// of an earlier `WITH` clause that returns an `id` column, the rows also get their job as
    /// a last column, `job`, and only the rows of the jobs that clause returned are kept.
    pub(crate) fn alias_of_jobs(self, name: &str, columns: &str, only: Option<(&[Uuid], &str)>) {
        match only {
            None => self.alias(&format!("{name}({columns})")),
            Some((jobs, clause)) => {
                let query = self.column(jobs, "uuid").query;
                query.push(format_args!(
                    ") AS {name}({columns}, job) WHERE {name}.job IN (SELECT id FROM {clause})"
                ));
            }
        }
    }
}

/// The characters that separate whole tokens, as `hodei_search_text` splits texts (see the
/// migration that creates it).
fn separates(c: char) -> bool {
    c.is_whitespace() || "\"{}[],:;()=<>|&!'`*".contains(c)
}

/// The lexemes of one search word: lowercased tokens between separators.
fn lexemes(word: &str) -> Vec<String> {
    word.to_lowercase()
        .split(separates)
        .filter(|t| !t.is_empty())
        .map(|t| format!("'{}'", t.replace('\\', "\\\\").replace('\'', "''")))
        .collect()
}

/// A `tsquery` literal for the words a user typed, matched whole against the tokens
/// `hodei_search_text` indexes: `a b` both, `"a b"` the phrase, `a or b` either, `-a` without.
/// None when the words hold no token (only punctuation): nothing matches.
pub(crate) fn tsquery(words: &str) -> Option<String> {
    // Split on spaces outside double quotes; a quoted part is one phrase.
    let mut parts: Vec<(String, bool)> = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in words.chars() {
        match c {
            '"' => {
                if !current.is_empty() {
                    parts.push((std::mem::take(&mut current), quoted));
                }
                quoted = !quoted;
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    parts.push((std::mem::take(&mut current), false));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        parts.push((current, quoted));
    }
    // Clauses are ANDed; `or` joins a term to the clause before it.
    let mut clauses: Vec<Vec<String>> = Vec::new();
    let mut or_next = false;
    for (part, phrase) in parts {
        if !phrase && part == "-" {
            continue;
        }
        if !phrase && part.eq_ignore_ascii_case("or") {
            or_next = !clauses.is_empty();
            continue;
        }
        let (negated, text) = match part.strip_prefix('-') {
            Some(rest) if !phrase && !rest.is_empty() => (true, rest),
            _ => (false, part.as_str()),
        };
        let tokens = lexemes(text);
        if tokens.is_empty() {
            continue;
        }
        let joined = tokens.join(if phrase { " <-> " } else { " & " });
        let term = if negated {
            format!("!({joined})")
        } else {
            format!("({joined})")
        };
        match clauses.last_mut() {
            Some(last) if or_next => last.push(term),
            _ => clauses.push(vec![term]),
        }
        or_next = false;
    }
    if clauses.is_empty() {
        return None;
    }
    Some(
        clauses
            .iter()
            .map(|c| format!("({})", c.join(" | ")))
            .collect::<Vec<_>>()
            .join(" & "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_become_whole_token_queries() {
        assert_eq!(tsquery("Repo-42").as_deref(), Some("(('repo-42'))"));
        assert_eq!(tsquery("a b").as_deref(), Some("(('a')) & (('b'))"));
        assert_eq!(
            tsquery("a or b c").as_deref(),
            Some("(('a') | ('b')) & (('c'))")
        );
        assert_eq!(
            tsquery("cargo -clippy").as_deref(),
            Some("(('cargo')) & (!('clippy'))")
        );
        assert_eq!(
            tsquery("\"cargo build\"").as_deref(),
            Some("(('cargo' <-> 'build'))")
        );
        assert_eq!(tsquery("it's").as_deref(), Some("(('it' & 's'))"));
        assert_eq!(
            tsquery("back\\slash").as_deref(),
            Some("(('back\\\\slash'))")
        );
        assert_eq!(tsquery("&|!:* \"\" or -"), None);
    }
}
