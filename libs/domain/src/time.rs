//! Times as they are recorded: microseconds, PostgreSQL's `timestamptz` precision. Every time
//! an aggregate records (event times, and the attempt, retry and projection times folded from
//! them) is cut to it, so that an aggregate folded from its stored events equals the stored
//! projection to the last digit.

use chrono::{DateTime, SubsecRound, Utc};

/// `t` cut to whole microseconds.
pub fn recorded(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_cut_to_microseconds() {
        let t = DateTime::from_timestamp(1_796_340_955, 833_266_697).unwrap();
        assert_eq!(recorded(t).timestamp_subsec_nanos(), 833_266_000);
        assert_eq!(recorded(recorded(t)), recorded(t));
    }
}
