//! Text as the state of record can keep it. PostgreSQL's `text` and `jsonb` refuse the NUL
//! character, so text that comes from outside and is stored as it came (a job's last lines of
//! output, an agent's reason, a caller's request repeated in the audit log) has each NUL
//! replaced, and is cut to a bound, before it reaches a statement shared with other rows.

/// What stands for a NUL character in stored text, as for bytes that are not UTF-8.
pub const NUL_REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Makes `text` storable: each NUL replaced by [`NUL_REPLACEMENT`], then cut at a character
/// boundary to at most `max_bytes`.
pub fn make_storable(text: &mut String, max_bytes: usize) {
    if text.contains('\0') {
        *text = text.replace('\0', NUL_REPLACEMENT.encode_utf8(&mut [0; 4]));
    }
    if text.len() > max_bytes {
        let cut = text.floor_char_boundary(max_bytes);
        text.truncate(cut);
    }
}

/// `text` made storable (see [`make_storable`]).
pub fn storable(text: &str, max_bytes: usize) -> String {
    let mut text = text[..text.floor_char_boundary(max_bytes)].to_owned();
    make_storable(&mut text, max_bytes);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_replaced_and_text_is_cut_at_a_character_boundary() {
        assert_eq!(storable("done\0", 100), "done\u{FFFD}");
        assert_eq!(storable("plain", 100), "plain");
        // "é" is two bytes: a cut inside it keeps the character out.
        assert_eq!(storable("aé", 2), "a");
        // The replacement is three bytes and counts toward the bound.
        assert_eq!(storable("\0\0", 4), "\u{FFFD}");
        assert_eq!(storable("", 0), "");
    }
}
