//! Times as they are recorded: microseconds, PostgreSQL's `timestamptz` precision. Every time
//! an aggregate records (event times, and the attempt, retry and projection times folded from
//! them) is cut to it, so that an aggregate folded from its stored events equals the stored
//! projection to the last digit.

use chrono::{DateTime, SubsecRound, Utc};

/// `t` cut to whole microseconds.
pub fn recorded(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// A time in JSON as serde's default writes it (RFC 3339, UTC as `Z`, the fraction in 3, 6 or
/// 9 digits and only as long as needed), but at a fraction of the cost: written into a buffer
/// on the stack and handed over whole. The default goes through `collect_str`, which makes
/// `serde_json` escape each of the two dozen pieces `chrono` writes one by one, and
/// `chrono`'s own `to_rfc3339_opts` builds a `String` the same way; times were the largest
/// cost in an event's serialisation. Years outside 0–9999 and leap seconds, which the buffer
/// does not cover, are left to `chrono`. For `#[serde(with = "hodei_domain::time::rfc3339")]`.
pub mod rfc3339 {
    use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// The longest text written on the stack: `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
    const LONGEST: usize = 30;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0; LONGEST];
        // The buffer holds ASCII only, so the check of its text never fails.
        match write(t, &mut buf).and_then(|n| std::str::from_utf8(&buf[..n]).ok()) {
            Some(text) => s.serialize_str(text),
            None => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
    }

    /// Writes `t` into `buf` as `to_rfc3339_opts(AutoSi, true)` does and says how many bytes
    /// it took; `None` for a year outside 0–9999 or a leap second.
    fn write(t: &DateTime<Utc>, buf: &mut [u8; LONGEST]) -> Option<usize> {
        let t = t.naive_utc();
        let year = u32::try_from(t.year()).ok().filter(|year| *year <= 9999)?;
        let nanos = t.nanosecond();
        let (fraction, digits) = match nanos {
            1_000_000_000.. => return None,
            0 => (0, 0),
            n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
            n if n % 1_000 == 0 => (n / 1_000, 6),
            n => (n, 9),
        };
        digits_into(&mut buf[0..4], year);
        buf[4] = b'-';
        digits_into(&mut buf[5..7], t.month());
        buf[7] = b'-';
        digits_into(&mut buf[8..10], t.day());
        buf[10] = b'T';
        digits_into(&mut buf[11..13], t.hour());
        buf[13] = b':';
        digits_into(&mut buf[14..16], t.minute());
        buf[16] = b':';
        digits_into(&mut buf[17..19], t.second());
        let mut end = 19;
        if digits > 0 {
            buf[19] = b'.';
            digits_into(&mut buf[20..20 + digits], fraction);
            end = 20 + digits;
        }
        buf[end] = b'Z';
        Some(end + 1)
    }

    /// `n` in decimal, filling `out` and padded with zeros on the left.
    fn digits_into(out: &mut [u8], mut n: u32) {
        for digit in out.iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::deserialize(d)
    }

    /// The same for an optional time (`null` when absent).
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        /// A present time, serialised the fast way.
        struct Whole<'a>(&'a DateTime<Utc>);

        impl Serialize for Whole<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                super::serialize(self.0, s)
            }
        }

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&Whole(t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy as _;

    use super::*;

    #[test]
    fn times_are_cut_to_microseconds() {
        let t = DateTime::from_timestamp(1_796_340_955, 833_266_697).unwrap();
        assert_eq!(recorded(t).timestamp_subsec_nanos(), 833_266_000);
        assert_eq!(recorded(recorded(t)), recorded(t));
    }

    /// Writes `t` both ways and checks they agree.
    fn check(t: DateTime<Utc>) {
        #[derive(serde::Serialize)]
        struct Fast(#[serde(with = "rfc3339")] DateTime<Utc>);
        assert_eq!(
            serde_json::to_string(&Fast(t)).unwrap(),
            serde_json::to_string(&t).unwrap(),
            "{t:?}"
        );
    }

    proptest::proptest! {
        /// Any time from year 0 to 9999, with a fraction of each length.
        #[test]
        fn any_time_serialises_as_chrono_does(
            secs in -62_167_219_200_i64..=253_402_300_799,
            nanos in proptest::prop_oneof![
                proptest::strategy::Just(0_u32),
                (1_u32..1_000).prop_map(|ms| ms * 1_000_000),
                (1_u32..1_000_000).prop_map(|us| us * 1_000),
                1_u32..1_000_000_000,
            ],
        ) {
            check(DateTime::from_timestamp(secs, nanos).unwrap());
        }
    }

    /// The fast way writes the very bytes serde's default writes, and reads them back.
    #[test]
    fn times_serialise_as_chrono_does() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Fast {
            #[serde(with = "rfc3339")]
            at: DateTime<Utc>,
            #[serde(default, with = "rfc3339::option")]
            until: Option<DateTime<Utc>>,
        }
        #[derive(serde::Serialize)]
        struct Default {
            at: DateTime<Utc>,
            until: Option<DateTime<Utc>>,
        }
        for nanos in [0, 833_000_000, 833_266_000, 833_266_697] {
            let t = DateTime::from_timestamp(1_796_340_955, nanos).unwrap();
            for until in [None, Some(t)] {
                let fast = serde_json::to_string(&Fast { at: t, until }).unwrap();
                let default = serde_json::to_string(&Default { at: t, until }).unwrap();
                assert_eq!(fast, default);
                assert_eq!(
                    serde_json::from_str::<Fast>(&fast).unwrap(),
                    Fast { at: t, until }
                );
            }
        }
        // The edges of the years the stack buffer covers, and the times it leaves to chrono:
        // years past 9999 or before 0, and a leap second. (Times in between: the property
        // above.)
        let first = DateTime::parse_from_rfc3339("0000-01-01T00:00:00Z").unwrap();
        let last = DateTime::parse_from_rfc3339("9999-12-31T23:59:59.999999999Z").unwrap();
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap()
            .and_utc();
        for t in [
            first.to_utc(),
            last.to_utc(),
            chrono::NaiveDate::from_ymd_opt(10_000, 1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .unwrap()
                .and_utc(),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            leap,
        ] {
            check(t);
        }
        // A missing optional time reads as none, as a plain `Option` field does.
        let t = DateTime::from_timestamp(1_796_340_955, 0).unwrap();
        let read: Fast = serde_json::from_str(r#"{"at":"2026-12-03T23:35:55Z"}"#).unwrap();
        assert_eq!(read, Fast { at: t, until: None });
    }
}
