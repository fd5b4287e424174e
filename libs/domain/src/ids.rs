//! Typed identifiers. Each is parsed once at the edge and displayed the same way everywhere;
//! all serialise as strings (attempt numbers as integers).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} '{value}': {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Declares a fieldless enum whose variants have stable names (on the wire, in PostgreSQL and
/// in subjects), written once: the serde names, `ALL`, `as_str`, `Display` and `FromStr`,
/// which refuses any other name with an [`IdError`] of kind `$kind` listing the valid ones.
macro_rules! named_enum {
    (
        $(#[$attr:meta])*
        pub enum $name:ident ($kind:literal) {
            $(#[$first_attr:meta])* $first:ident = $first_name:literal
            $(, $(#[$vattr:meta])* $variant:ident = $vname:literal)* $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $(#[$first_attr])*
            #[serde(rename = $first_name)]
            $first,
            $(
                $(#[$vattr])*
                #[serde(rename = $vname)]
                $variant,
            )*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$first_name $(, $vname)*].len()] =
                [$name::$first $(, $name::$variant)*];

            /// The value's stable name.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $name::$first => $first_name,
                    $( $name::$variant => $vname, )*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::ids::IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .into_iter()
                    .find(|value| value.as_str() == s)
                    .ok_or_else(|| $crate::ids::IdError {
                        kind: $kind,
                        value: s.to_owned(),
                        reason: concat!("not one of ", $first_name $(, ", ", $vname)*),
                    })
            }
        }
    };
}
pub(crate) use named_enum;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A new time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// The id's text (its `Display`), written into `buf`, a
            /// [`Uuid::encode_buffer`]: what subjects and serialisers take without a `String`.
            pub fn encode<'b>(&self, buf: &'b mut [u8; uuid::fmt::Urn::LENGTH]) -> &'b str {
                self.0.as_hyphenated().encode_lower(buf)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        /// As its text, handed over whole: `collect_str` would go through the formatting
        /// machinery, and a JSON writer escapes each piece it is given.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.encode(&mut Uuid::encode_buffer()))
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdError {
                    kind: $kind,
                    value: s.to_owned(),
                    reason: "not a uuid",
                })
            }
        }
    };
}

uuid_id!(
    /// Identifies a job; a UUIDv7, so ids sort by creation time.
    JobId,
    "job id"
);
uuid_id!(
    /// Identifies one run of a pipeline; a UUIDv7, so ids sort by creation time.
    PipelineRunId,
    "pipeline run id"
);
uuid_id!(
    /// Identifies one incarnation of an agent: a new one at every agent start, carried in its
    /// heartbeats, so a worker that comes back under the same id is told apart from the
    /// process that held its earlier attempts.
    IncarnationId,
    "incarnation id"
);
uuid_id!(
    /// Identifies a schedule; a UUIDv7.
    ScheduleId,
    "schedule id"
);
uuid_id!(
    /// Identifies an API token (not its secret): listed, shown in the audit log and revoked
    /// by this id.
    TokenId,
    "token id"
);

/// Validates a name-like id: used in NATS subject tokens, so no dots, wildcards or spaces.
pub(crate) fn parse_name(kind: &'static str, s: &str) -> Result<String, IdError> {
    let err = |reason| IdError {
        kind,
        value: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(err("must not be empty"));
    }
    if s.len() > 64 {
        return Err(err("must be at most 64 characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err("may contain only ascii letters, digits, '-' and '_'"));
    }
    Ok(s.to_owned())
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// As its text, handed over whole.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_name($kind, s).map(Self)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

name_id!(
    /// Identifies a worker (an agent host). Chosen by the agent; stable across restarts.
    WorkerId,
    "worker id"
);
name_id!(
    /// Identifies a tenant. Single-tenant deployments use `default`.
    TenantId,
    "tenant id"
);

impl Default for TenantId {
    fn default() -> Self {
        Self("default".to_owned())
    }
}

/// The number of an attempt at a job, starting at 1. It is also the fencing token: an agent's
/// report about any attempt but the job's current one is stale and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttemptNumber(u32);

impl AttemptNumber {
    /// The attempt number of a job that was never assigned.
    pub const NONE: AttemptNumber = AttemptNumber(0);

    pub fn new(n: u32) -> Self {
        Self(n)
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The number of the attempt after this one.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for AttemptNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One attempt of one job: `<job id>#<attempt number>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId {
    pub job_id: JobId,
    pub attempt: AttemptNumber,
}

impl AttemptId {
    pub fn new(job_id: JobId, attempt: AttemptNumber) -> Self {
        Self { job_id, attempt }
    }
}

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.job_id, self.attempt)
    }
}

impl FromStr for AttemptId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| IdError {
            kind: "attempt id",
            value: s.to_owned(),
            reason,
        };
        let (job, n) = s.split_once('#').ok_or(err("expected '<job id>#<n>'"))?;
        let job_id = job.parse().map_err(|_| err("job id is not a uuid"))?;
        let n: u32 = n.parse().map_err(|_| err("attempt is not a number"))?;
        if n == 0 {
            return Err(err("attempt numbers start at 1"));
        }
        Ok(Self::new(job_id, AttemptNumber(n)))
    }
}

/// As its text, `<job id>#<n>`, formatted (it is not on the hot path).
impl Serialize for AttemptId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Every id deserialises from its text.
macro_rules! string_deserialize {
    ($($name:ident),*) => {$(
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

string_deserialize!(
    JobId,
    PipelineRunId,
    ScheduleId,
    IncarnationId,
    TokenId,
    WorkerId,
    TenantId,
    AttemptId
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every named enum: its serde name, `as_str`, `Display` and `FromStr` agree, and an
    /// unknown name is refused listing the valid ones.
    #[test]
    fn named_enums_agree_on_their_names_everywhere() {
        fn check<T>(all: &[T], kind: &str)
        where
            T: Copy
                + PartialEq
                + std::fmt::Debug
                + std::fmt::Display
                + std::str::FromStr<Err = IdError>
                + serde::Serialize,
        {
            for value in all {
                let name = value.to_string();
                assert_eq!(serde_json::to_string(value).unwrap(), format!("\"{name}\""));
                assert_eq!(name.parse::<T>().unwrap(), *value);
            }
            let err = "nope".parse::<T>().unwrap_err();
            assert_eq!(err.kind, kind);
            let names: Vec<String> = all.iter().map(ToString::to_string).collect();
            assert_eq!(err.reason, format!("not one of {}", names.join(", ")));
        }
        check(&crate::JobState::ALL, "job state");
        check(&crate::PipelineState::ALL, "pipeline state");
        check(&crate::StepState::ALL, "step state");
        check(&crate::WorkerStatus::ALL, "worker status");
        check(&crate::Role::ALL, "role");
        check(&crate::Action::ALL, "action");
        assert_eq!(crate::JobState::TimedOut.as_str(), "timed_out");
    }

    #[test]
    fn ids_round_trip_through_strings_and_json() {
        let job = JobId::new();
        assert_eq!(job.to_string().parse::<JobId>().unwrap(), job);
        let attempt = AttemptId::new(job, AttemptNumber::new(3));
        assert_eq!(attempt.to_string().parse::<AttemptId>().unwrap(), attempt);
        let json = serde_json::to_string(&attempt).unwrap();
        assert_eq!(serde_json::from_str::<AttemptId>(&json).unwrap(), attempt);
        let w: WorkerId = "agent-1".parse().unwrap();
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"agent-1\"");
    }

    /// Every id serialises as its `Display` text, which is what it deserialises from.
    #[test]
    fn ids_serialise_as_their_text() {
        fn check<
            T: Serialize + for<'de> Deserialize<'de> + fmt::Display + PartialEq + fmt::Debug,
        >(
            id: T,
        ) {
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(json, format!("\"{id}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), id);
        }
        let job = JobId::new();
        check(job);
        check(PipelineRunId::new());
        check(ScheduleId::new());
        check(IncarnationId::new());
        check(TokenId::new());
        check("agent-1".parse::<WorkerId>().unwrap());
        check(TenantId::default());
        check(AttemptId::new(job, AttemptNumber::new(3)));
    }

    #[test]
    fn worker_ids_refuse_subject_syntax() {
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<WorkerId>().is_err(), "{bad:?} accepted");
        }
        assert!("x#0".parse::<AttemptId>().is_err());
        assert!("not-a-uuid".parse::<JobId>().is_err());
    }
}
