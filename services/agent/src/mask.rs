//! Masking secret values in a job's output. The job's secret env values (see
//! `JobSpec::secret_values`) are replaced by [`SECRET_MASK`] in every line before it leaves the
//! agent, in the published logs and in the tail of the `Finished` report alike.
//!
//! What is masked: every occurrence of a secret value; overlapping or adjacent occurrences
//! become a single mask. A value that spans several lines cannot occur whole in one output
//! line, so each of its lines (trimmed) of at least [`MIN_PIECE_BYTES`] bytes is masked on its
//! own as well. Output the agent has to send before its line is complete (a partial line, or a
//! piece of an over-long line) is cut so that no secret is split between two pieces: see
//! [`Masker::safe_cut`].

use std::borrow::Cow;

use hodei_domain::JobSpec;
use hodei_domain::spec::SECRET_MASK;

/// Shortest line of a multi-line secret masked on its own: shorter ones (a lone `{`) would
/// mask ordinary output and give little away.
pub(crate) const MIN_PIECE_BYTES: usize = 4;

/// Replaces a job's secret values in its output.
#[derive(Debug, Clone, Default)]
pub(crate) struct Masker {
    /// What to mask, longest first.
    patterns: Vec<Vec<u8>>,
    /// Whether some pattern starts with this byte: most bytes are skipped at this check.
    starts: Box<[bool]>,
    /// Length of the longest pattern.
    longest: usize,
}

impl Masker {
    /// A masker for `spec`'s secret values.
    pub fn for_spec(spec: &JobSpec) -> Self {
        Self::new(spec.secret_values())
    }

    /// A masker for `secrets`; empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            patterns.push(secret.as_bytes().to_vec());
            if secret.contains(['\n', '\r']) {
                patterns.extend(
                    secret
                        .split(['\n', '\r'])
                        .map(str::trim)
                        .filter(|piece| piece.len() >= MIN_PIECE_BYTES)
                        .map(|piece| piece.as_bytes().to_vec()),
                );
            }
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        let mut starts = vec![false; 256].into_boxed_slice();
        for pattern in &patterns {
            if let Some(first) = pattern.first() {
                starts[usize::from(*first)] = true;
            }
        }
        let longest = patterns.first().map_or(0, Vec::len);
        Self {
            patterns,
            starts,
            longest,
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The end of the pattern occurrence that starts at `at` and reaches furthest, if any.
    fn match_end(&self, text: &[u8], at: usize) -> Option<usize> {
        let first = *text.get(at)?;
        if !self.starts[usize::from(first)] {
            return None;
        }
        // Longest first: the first match reaches furthest.
        self.patterns
            .iter()
            .find(|p| text[at..].starts_with(p))
            .map(|p| at + p.len())
    }

    /// `text` with every run of bytes covered by a secret replaced by one [`SECRET_MASK`].
    pub fn mask<'t>(&self, text: &'t [u8]) -> Cow<'t, [u8]> {
        if self.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut out: Option<Vec<u8>> = None;
        // End of the masked run the current byte is in (the run goes on while `at < run_end`).
        let mut run_end = 0;
        for at in 0..text.len() {
            if let Some(end) = self.match_end(text, at) {
                // A new run, unless this one goes on (overlapping) or one just ended (adjacent).
                if at > run_end || run_end == 0 {
                    let out = out.get_or_insert_with(|| {
                        let mut v = Vec::with_capacity(text.len());
                        v.extend_from_slice(&text[..at]);
                        v
                    });
                    out.extend_from_slice(SECRET_MASK.as_bytes());
                }
                run_end = run_end.max(end);
            }
            if at >= run_end
                && let Some(out) = out.as_mut()
            {
                out.push(text[at]);
            }
        }
        match out {
            Some(masked) => Cow::Owned(masked),
            None => Cow::Borrowed(text),
        }
    }

    /// Where unfinished output `text` can be cut so that the part before the cut can be sent
    /// now without revealing a secret that the rest, or output still to come, would complete:
    /// before the longest end of `text` that could be the start of a secret, and before any
    /// secret that would straddle the cut. `text.len()` when nothing needs holding back.
    pub fn safe_cut(&self, text: &[u8]) -> usize {
        if self.is_empty() {
            return text.len();
        }
        // A tail shorter than some pattern that the pattern starts with.
        let lowest = text.len().saturating_sub(self.longest.saturating_sub(1));
        let mut cut = (lowest..text.len())
            .find(|&at| {
                let tail = &text[at..];
                self.patterns
                    .iter()
                    .any(|p| p.len() > tail.len() && p.starts_with(tail))
            })
            .unwrap_or(text.len());
        // A whole secret across the cut (it ends at the end of `text`, being a tail not kept).
        while let Some(start) = (cut.saturating_sub(self.longest)..cut)
            .find(|&at| self.match_end(text, at).is_some_and(|end| end > cut))
        {
            cut = start;
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(masker: &Masker, text: &str) -> String {
        String::from_utf8(masker.mask(text.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn secrets_are_masked_wherever_they_occur() {
        let masker = Masker::new(["hunter2", "s3cr3t", ""]);
        assert_eq!(masked(&masker, "token is hunter2"), "token is ********");
        assert_eq!(
            masked(&masker, "hunter2:s3cr3t;hunter2"),
            "********:********;********"
        );
        assert_eq!(masked(&masker, "hunter2hunter2"), "********");
        assert_eq!(masked(&masker, "nothing here"), "nothing here");
        assert!(matches!(masker.mask(b"hunter"), Cow::Borrowed(_)));
        assert_eq!(masked(&Masker::default(), "hunter2"), "hunter2");
    }

    #[test]
    fn overlapping_secrets_become_one_mask() {
        let masker = Masker::new(["abcd", "cdef"]);
        assert_eq!(masked(&masker, "xabcdefy"), "x********y");
    }

    #[test]
    fn lines_of_multi_line_secrets_are_masked_on_their_own() {
        let masker = Masker::new(["{\n  \"key\": \"private-value\"\r\n}"]);
        assert_eq!(
            masked(&masker, "  \"key\": \"private-value\""),
            "  ********"
        );
        // Short lines ("{", "}") are left alone.
        assert_eq!(masked(&masker, "{}"), "{}");
    }

    #[test]
    fn safe_cut_holds_back_what_could_start_a_secret() {
        let masker = Masker::new(["hunter2"]);
        assert_eq!(masker.safe_cut(b"token is hun"), 9);
        assert_eq!(masker.safe_cut(b"token is h"), 9);
        assert_eq!(masker.safe_cut(b"token is hunter2"), 16);
        assert_eq!(masker.safe_cut(b"token is hug"), 12);
        assert_eq!(Masker::default().safe_cut(b"hun"), 3);
    }

    #[test]
    fn safe_cut_never_splits_a_secret() {
        // "ter2" could start "ter2x"; the whole "hunter2" before it must not be cut.
        let masker = Masker::new(["hunter2", "ter2x"]);
        assert_eq!(masker.safe_cut(b"a hunter2"), 2);
        let text = b"a hunter2";
        let cut = masker.safe_cut(text);
        assert_eq!(masked(&masker, "a "), "a ");
        assert_eq!(&text[cut..], b"hunter2");
    }
}
