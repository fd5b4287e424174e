//! Small helpers for building SQL shared by the data access modules.

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
