//! Times as they are recorded: microseconds, PostgreSQL's `timestamptz` precision. Every time
//! an aggregate records (event times, and the attempt, retry and projection times folded from
//! them) is cut to it, so that an aggregate folded from its stored events equals the stored
//! projection to the last digit.

use chrono::{DateTime, SubsecRound, Utc};

/// `t` cut to whole microseconds.
pub fn recorded(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// A time in JSON as serde's default writes it (RFC 3339, UTC as `Z`, the fraction only as
/// long as needed), but at a fraction of the cost: written to a string first and handed over
/// whole. The default goes through `collect_str`, which makes `serde_json` escape each of the
/// two dozen pieces `chrono` writes one by one, the largest single cost in an event's
/// serialisation. For `#[serde(with = "hodei_domain::time::rfc3339")]`.
pub mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
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
    use super::*;

    #[test]
    fn times_are_cut_to_microseconds() {
        let t = DateTime::from_timestamp(1_796_340_955, 833_266_697).unwrap();
        assert_eq!(recorded(t).timestamp_subsec_nanos(), 833_266_000);
        assert_eq!(recorded(recorded(t)), recorded(t));
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
        // A missing optional time reads as none, as a plain `Option` field does.
        let t = DateTime::from_timestamp(1_796_340_955, 0).unwrap();
        let read: Fast = serde_json::from_str(r#"{"at":"2026-12-03T23:35:55Z"}"#).unwrap();
        assert_eq!(read, Fast { at: t, until: None });
    }
}
