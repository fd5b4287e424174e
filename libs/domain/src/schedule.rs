//! Schedules: a job or pipeline template started on a cron expression in a time zone.
//!
//! A [`Schedule`] knows its next tick. A scheduler replica that finds it due asks it for a
//! [`Round`]: the ticks to fire now (those inside the catch-up window, oldest first, a bounded
//! number per round) and the ticks missed (older than the window, skipped with one event
//! saying how many). Firing a tick, the decision the overlap policy makes and moving the
//! schedule on are recorded in one transaction by the adapter, which is what makes a tick
//! fire once across replicas and restarts; this module only decides.

use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{DomainError, FieldError, ValidationErrors};
use crate::ids::{JobId, PipelineRunId, ScheduleId, TenantId, named_enum};
use crate::pipeline::{PipelineSpec, PipelineSpecDraft};
use crate::spec::{JobSpec, JobSpecDraft};

/// The start of the idempotency key of every job and run a tick starts; clients' own keys
/// may not start with it.
pub const TICK_KEY_PREFIX: &str = "schedule-";

/// Whether a client may use `key` as its own idempotency key (it is not a tick's).
pub fn is_client_key(key: &str) -> bool {
    !key.starts_with(TICK_KEY_PREFIX)
}

/// Most ticks one round fires; the rest fire in the next rounds.
pub const MAX_FIRES_PER_ROUND: usize = 100;
/// The shortest catch-up window: a tick is always handled a little after its time (the
/// replicas look for due schedules every second), and that must not count as missing it.
pub const MIN_CATCH_UP_WINDOW_MS: u64 = 1_000;
/// The longest catch-up window.
pub const MAX_CATCH_UP_WINDOW_MS: u64 = 7 * 86_400_000;
/// The longest jitter.
pub const MAX_JITTER_MS: u64 = 3_600_000;
/// The most ticks a schedule's history keeps.
pub const MAX_HISTORY_LIMIT: u32 = 1_000;
/// Longest cron expression, in bytes (the longest useful ones list a few dozen values).
pub const MAX_CRON_BYTES: usize = 256;
/// Longest time zone name, in bytes (IANA names are at most 30 or so).
pub const MAX_TIME_ZONE_BYTES: usize = 64;
/// How many consecutive ticks the shortest interval of an expression is looked for in.
const INTERVAL_SAMPLE: usize = 64;
/// Missed ticks counted one by one before the rest are jumped over.
const MAX_MISSED_COUNTED: u64 = 10_000;

named_enum! {
    /// What a tick does while the schedule's previous job or run is still going, as the
    /// Kubernetes CronJob's concurrencyPolicy.
    pub enum OverlapPolicy ("overlap policy") {
        /// Start it anyway.
        Allow = "allow",
        /// Skip this tick, with an event saying which run was still going.
        Skip = "skip",
        /// Cancel the previous ones, then start this one.
        CancelPrevious = "cancel_previous",
    }
}

named_enum! {
    /// What became of one tick.
    pub enum TickOutcome ("tick outcome") {
        /// It started a job or a run.
        Fired = "fired",
        /// A trigger by hand started a job or a run.
        Triggered = "triggered",
        /// The overlap policy skipped it, or (a job's tick) its tenant's queue quota did.
        Skipped = "skipped",
        /// It was older than the catch-up window (one record for a run of them, at the last).
        Missed = "missed",
    }
}

/// One tick in a schedule's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickRecord {
    pub tick: DateTime<Utc>,
    pub outcome: TickOutcome,
    pub handled_at: DateTime<Utc>,
    pub job_id: Option<JobId>,
    pub run_id: Option<PipelineRunId>,
    pub detail: String,
}

/// A fired tick's `detail`: what it cancelled first (overlap policy `cancel_previous`), or
/// nothing.
pub fn cancelled_detail(cancelled: &[String]) -> String {
    if cancelled.is_empty() {
        String::new()
    } else {
        format!("cancelled {}", cancelled.join(", "))
    }
}

/// What a schedule starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleTarget {
    Job { spec: Box<JobSpec> },
    Pipeline { spec: PipelineSpec },
}

/// A schedule's settings, as given by its creator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// Unique within the tenant; ascii letters, digits, `-` and `_`, at most 64.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six with seconds first;
    /// `@hourly`, `@daily` and the like; `L`, `W` and `#` as Vixie and Quartz cron read them.
    pub cron: String,
    /// An IANA time zone (`Europe/Madrid`); the cron expression is read in it, so a daily
    /// tick stays at its wall-clock time across daylight saving changes.
    pub time_zone: String,
    pub target: ScheduleTarget,
    pub overlap: OverlapPolicy,
    /// Ticks missed by at most this (the schedulers were down) still fire, once each; older
    /// ones are skipped, with an event.
    pub catch_up_window_ms: u64,
    /// Each tick fires up to this much after its time, at random, so that many schedules on
    /// the same expression do not all start at once.
    pub jitter_ms: u64,
    /// The newest ticks kept in the schedule's history (those whose job or run has not ended
    /// are kept besides).
    pub history_limit: u32,
}

/// A parsed cron expression and its time zone.
#[derive(Debug, Clone)]
pub struct Cadence {
    cron: croner::Cron,
    zone: Tz,
}

impl Cadence {
    /// Parses `expression` in `time_zone`.
    pub fn parse(expression: &str, time_zone: &str) -> Result<Self, ValidationErrors> {
        let mut errors = Vec::new();
        let cron = croner::Cron::from_str(expression)
            .map_err(|e| errors.push(FieldError::new("cron", format!("{expression:?}: {e}"))))
            .ok();
        let zone = Tz::from_str(time_zone)
            .map_err(|_| {
                errors.push(FieldError::new(
                    "time_zone",
                    format!(
                        "{time_zone:?} is not an IANA time zone (such as UTC or Europe/Madrid)"
                    ),
                ))
            })
            .ok();
        match (cron, zone) {
            (Some(cron), Some(zone)) => Ok(Self { cron, zone }),
            _ => Err(ValidationErrors(errors)),
        }
    }

    /// The shortest time between two consecutive ticks among the first [`INTERVAL_SAMPLE`]
    /// after the start of 2026 (a fixed point, so validation is deterministic); `None` for an
    /// expression with fewer than two. Measured by the wall clock, as the search walks.
    pub fn shortest_interval(&self) -> Option<std::time::Duration> {
        let mut at = self.next_by_wall_clock(DateTime::from_timestamp(1_767_225_600, 0)?)?;
        let mut shortest: Option<chrono::Duration> = None;
        for _ in 1..INTERVAL_SAMPLE {
            let Some(next) = self.next_by_wall_clock(at) else {
                break;
            };
            let gap = next - at;
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            at = next;
        }
        shortest.and_then(|s| s.to_std().ok())
    }

    /// The first tick strictly after `t`, or `None` when the expression has no more. Ticks
    /// fall on whole seconds (the search keeps the fraction of a second it starts from, so
    /// it starts from `t`'s whole second).
    ///
    /// When clocks go back, an hour of wall-clock times happens twice; the search gives the
    /// first instance of such a time, which lies before `t` when `t` is in the second pass.
    /// The second instance is taken then, so the answer is always after `t`. An expression
    /// with a wildcard, a step, a range or a list in its time fields that ticks at least as
    /// often as the clocks go back by (every 15 minutes, hourly) fires in both passes, as time
    /// goes on; one at a fixed time of day (02:30), or a few times a day (`0 2,14 * * *`),
    /// fires once, in the first (the Open Cron Pattern Specification's rule for fixed times).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let found = self.next_by_wall_clock(t)?;
        if self.cron.determine_job_type() == croner::JobType::IntervalWildcard
            && let Some(second_pass) = self.in_second_pass(t, found)
        {
            return Some(second_pass);
        }
        Some(found)
    }

    /// The first tick after `t` by the wall clock: the search walks local times, and passes
    /// over the second pass of a repeated hour that `t` is before.
    fn next_by_wall_clock(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::TimeZone;
        let mut from = DateTime::from_timestamp(t.timestamp(), 0)?.with_timezone(&self.zone);
        for _ in 0..4 {
            let found = self.cron.find_next_occurrence(&from, false).ok()?;
            if found.with_timezone(&Utc) > t {
                return Some(found.with_timezone(&Utc));
            }
            let later = self
                .zone
                .from_local_datetime(&found.naive_local())
                .latest()?;
            if later.with_timezone(&Utc) > t {
                return Some(later.with_timezone(&Utc));
            }
            from = later;
        }
        None
    }

    /// A tick in the second pass of an hour that clocks went back over between `t` and
    /// `found` (both excluded), the first one, if any.
    fn in_second_pass(&self, t: DateTime<Utc>, found: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::{Offset, TimeZone};
        let offset = |at: DateTime<Utc>| {
            self.zone
                .offset_from_utc_datetime(&at.naive_utc())
                .fix()
                .local_minus_utc()
        };
        let (before, after) = (offset(t), offset(found));
        if after >= before {
            return None;
        }
        // The instant the clocks went back: the first second with the later offset.
        let (mut low, mut high) = (t.timestamp(), found.timestamp());
        while high - low > 1 {
            let mid = low + (high - low) / 2;
            if offset(DateTime::from_timestamp(mid, 0)?) == before {
                low = mid;
            } else {
                high = mid;
            }
        }
        // Only an expression that ticks within every such hour keeps ticking through it. (Read
        // here, on the one night a year this path runs, not at each parse.)
        let shift = std::time::Duration::from_secs(u64::try_from(before - after).ok()?);
        if self
            .shortest_interval()
            .is_none_or(|shortest| shortest > shift)
        {
            return None;
        }
        let back = DateTime::from_timestamp(high, 0)?;
        // The repeated wall-clock times, as the second pass shows them.
        let first = back.with_timezone(&self.zone);
        let last = first.naive_local() + Duration::seconds(i64::from(before - after));
        let tick = self.cron.find_next_occurrence(&first, true).ok()?;
        if tick.naive_local() >= last {
            return None;
        }
        let tick = self
            .zone
            .from_local_datetime(&tick.naive_local())
            .latest()?
            .with_timezone(&Utc);
        (tick > t && tick < found).then_some(tick)
    }
}

impl ScheduleSpec {
    /// Checks every field (all errors at once) and returns the parsed cadence.
    pub fn validate(&self) -> Result<Cadence, ValidationErrors> {
        let mut errors = Vec::new();
        if let Err(e) = crate::ids::parse_name("schedule name", &self.name) {
            errors.push(FieldError::new("name", e.reason));
        } else if Uuid::parse_str(&self.name).is_ok() {
            errors.push(FieldError::new(
                "name",
                "must not be a uuid: schedules are named by id or by name",
            ));
        }
        if !(MIN_CATCH_UP_WINDOW_MS..=MAX_CATCH_UP_WINDOW_MS).contains(&self.catch_up_window_ms) {
            errors.push(FieldError::new(
                "catch_up_window_ms",
                format!(
                    "must be {MIN_CATCH_UP_WINDOW_MS} to {MAX_CATCH_UP_WINDOW_MS} (1 second to 7 days)"
                ),
            ));
        }
        if self.jitter_ms > MAX_JITTER_MS {
            errors.push(FieldError::new(
                "jitter_ms",
                format!("must be at most {MAX_JITTER_MS} (1 hour)"),
            ));
        }
        if !(1..=MAX_HISTORY_LIMIT).contains(&self.history_limit) {
            errors.push(FieldError::new(
                "history_limit",
                format!("must be 1 to {MAX_HISTORY_LIMIT}"),
            ));
        }
        let keyed = match &self.target {
            ScheduleTarget::Job { spec } => spec.idempotency_key.is_some(),
            ScheduleTarget::Pipeline { spec } => spec.idempotency_key.is_some(),
        };
        if keyed {
            errors.push(FieldError::new(
                "target.idempotency_key",
                "must be empty: each tick's job or run gets the key schedule-<id>-<tick>",
            ));
        }
        let mut too_long = false;
        for (field, value, max) in [
            ("cron", &self.cron, MAX_CRON_BYTES),
            ("time_zone", &self.time_zone, MAX_TIME_ZONE_BYTES),
        ] {
            if value.len() > max {
                too_long = true;
                errors.push(FieldError::new(
                    field,
                    format!("must be at most {max} bytes, not {}", value.len()),
                ));
            }
        }
        if too_long {
            return Err(ValidationErrors(errors));
        }
        let cadence = Cadence::parse(&self.cron, &self.time_zone);
        // A jitter as long as the time between two ticks would fire them together (a round
        // fires every tick due by then) and, with `skip`, make the later one an overlap.
        if let Ok(cadence) = &cadence
            && self.jitter_ms > 0
            && let Some(shortest) = cadence.shortest_interval()
            && u128::from(self.jitter_ms) >= shortest.as_millis()
        {
            errors.push(FieldError::new(
                "jitter_ms",
                format!(
                    "must be less than the {} ms between two ticks of {:?}",
                    shortest.as_millis(),
                    self.cron
                ),
            ));
        }
        match cadence {
            Ok(cadence) if errors.is_empty() => Ok(cadence),
            Ok(_) => Err(ValidationErrors(errors)),
            Err(ValidationErrors(more)) => {
                errors.extend(more);
                Err(ValidationErrors(errors))
            }
        }
    }
}

/// One firing of a schedule's target: the tick's job spec or pipeline spec, keyed by the tick.
#[derive(Debug, Clone)]
pub enum Firing {
    Job(Box<JobSpec>),
    Pipeline(PipelineSpec),
}

/// The ticks a due schedule fires now, and those it skips as too old.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// Oldest first.
    pub fire: Vec<DateTime<Utc>>,
    pub missed: Option<Missed>,
    /// The first tick not handled by this round (`None`: the expression has no more).
    pub next_tick: Option<DateTime<Utc>>,
}

/// Ticks older than the catch-up window, skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// How many (at least this many when `more` is set).
    pub count: u64,
    pub more: bool,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
}

/// A schedule and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    id: ScheduleId,
    tenant: TenantId,
    spec: ScheduleSpec,
    paused: bool,
    /// The next tick to handle; `None` when the expression has no more.
    next_tick: Option<DateTime<Utc>>,
    /// When the next tick fires: its time plus its jitter.
    fire_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: u64,
}

/// Something that happened to a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleEvent {
    pub event_id: Uuid,
    pub schedule_id: ScheduleId,
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: ScheduleEventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleEventKind {
    Created {
        name: String,
        cron: String,
        time_zone: String,
        next_tick: Option<DateTime<Utc>>,
    },
    Paused,
    Resumed {
        next_tick: Option<DateTime<Utc>>,
    },
    Deleted,
    /// A tick (or a trigger, `manual`) started a job or a run, after cancelling `cancelled`.
    Fired {
        tick: DateTime<Utc>,
        manual: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        job_id: Option<JobId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        run_id: Option<PipelineRunId>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        cancelled: Vec<String>,
    },
    /// A tick did not fire: its previous job or run was still going (`skip` policy).
    Skipped {
        tick: DateTime<Utc>,
        reason: String,
    },
    /// Ticks older than the catch-up window did not fire.
    Missed(Missed),
}

impl ScheduleEventKind {
    /// The event's name, in subjects.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "created",
            Self::Paused => "paused",
            Self::Resumed { .. } => "resumed",
            Self::Deleted => "deleted",
            Self::Fired { .. } => "fired",
            Self::Skipped { .. } => "skipped",
            Self::Missed(_) => "missed",
        }
    }
}

impl ScheduleEvent {
    pub fn new(schedule_id: ScheduleId, at: DateTime<Utc>, kind: ScheduleEventKind) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            schedule_id,
            at,
            kind,
        }
    }
}

/// A delay in `[0, jitter_ms)` from a number in `[0, 1)`.
fn jitter(jitter_ms: u64, unit: f64) -> Duration {
    let ms = (jitter_ms as f64 * unit.clamp(0.0, 1.0)) as i64;
    Duration::milliseconds(ms.clamp(0, jitter_ms as i64))
}

impl Schedule {
    /// A new schedule whose first tick is the first after `now`; paused if `paused`.
    /// `jitter_unit` is a number in `[0, 1)` that places the first tick's jitter.
    pub fn create(
        id: ScheduleId,
        tenant: TenantId,
        spec: ScheduleSpec,
        cadence: &Cadence,
        paused: bool,
        now: DateTime<Utc>,
        jitter_unit: f64,
    ) -> (Self, ScheduleEvent) {
        let next_tick = cadence.next_after(now);
        let fire_at = next_tick.map(|t| t + jitter(spec.jitter_ms, jitter_unit));
        let event = ScheduleEvent::new(
            id,
            now,
            ScheduleEventKind::Created {
                name: spec.name.clone(),
                cron: spec.cron.clone(),
                time_zone: spec.time_zone.clone(),
                next_tick,
            },
        );
        let schedule = Self {
            id,
            tenant,
            spec,
            paused,
            next_tick,
            fire_at,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        (schedule, event)
    }

    /// A schedule as stored.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        id: ScheduleId,
        tenant: TenantId,
        spec: ScheduleSpec,
        paused: bool,
        next_tick: Option<DateTime<Utc>>,
        fire_at: Option<DateTime<Utc>>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        version: u64,
    ) -> Self {
        Self {
            id,
            tenant,
            spec,
            paused,
            next_tick,
            fire_at,
            created_at,
            updated_at,
            version,
        }
    }

    pub fn id(&self) -> ScheduleId {
        self.id
    }
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
    pub fn spec(&self) -> &ScheduleSpec {
        &self.spec
    }
    pub fn paused(&self) -> bool {
        self.paused
    }
    pub fn next_tick(&self) -> Option<DateTime<Utc>> {
        self.next_tick
    }
    pub fn fire_at(&self) -> Option<DateTime<Utc>> {
        self.fire_at
    }
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    pub fn updated_at(&self) -> DateTime<Utc> {
        self.updated_at
    }
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The cadence of the stored expression (checked when the schedule was created).
    pub fn cadence(&self) -> Result<Cadence, ValidationErrors> {
        Cadence::parse(&self.spec.cron, &self.spec.time_zone)
    }

    /// Pauses it: no tick fires until it is resumed. `None` when it was paused already.
    pub fn pause(&mut self, now: DateTime<Utc>) -> Option<ScheduleEvent> {
        if self.paused {
            return None;
        }
        self.paused = true;
        self.touch(now);
        Some(ScheduleEvent::new(self.id, now, ScheduleEventKind::Paused))
    }

    /// Resumes it from the first tick after `now`: ticks that fell while it was paused never
    /// fire. Never from before the tick it was to fire next when paused (every earlier tick
    /// was handled): a caller whose clock is behind the one that fired them cannot make a
    /// tick fire twice. `None` when it was not paused.
    pub fn resume(
        &mut self,
        cadence: &Cadence,
        now: DateTime<Utc>,
        jitter_unit: f64,
    ) -> Option<ScheduleEvent> {
        if !self.paused {
            return None;
        }
        self.paused = false;
        let next = match (cadence.next_after(now), self.next_tick) {
            (Some(after_now), Some(stored)) => Some(after_now.max(stored)),
            (after_now, _) => after_now,
        };
        self.set_next(next, jitter_unit);
        self.touch(now);
        Some(ScheduleEvent::new(
            self.id,
            now,
            ScheduleEventKind::Resumed {
                next_tick: self.next_tick,
            },
        ))
    }

    /// The tick that was due when it was paused but had not fired (its jitter, or the next
    /// poll, was still to come): a paused schedule's last change is its pause, so its next
    /// tick at or before then is that one.
    pub fn unfired_at_pause(&self) -> Option<DateTime<Utc>> {
        self.next_tick
            .filter(|tick| self.paused && *tick <= self.updated_at)
    }

    /// Whether a tick is due at `now`.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        !self.paused && self.fire_at.is_some_and(|at| at <= now)
    }

    /// The ticks to handle at `now`: every tick from the next one up to `now`; those older
    /// than the catch-up window are missed, the others fire (at most
    /// [`MAX_FIRES_PER_ROUND`]; the rest are left for the next round).
    ///
    /// A tick counts as missed only when it is older than the window plus the schedule's
    /// jitter (its firing may have been put off that much on purpose) plus `grace` (how late
    /// the caller may look: its polling interval).
    pub fn round(&self, cadence: &Cadence, now: DateTime<Utc>, grace: Duration) -> Round {
        let mut round = Round {
            fire: Vec::new(),
            missed: None,
            next_tick: self.next_tick,
        };
        if !self.is_due(now) {
            return round;
        }
        let window = Duration::milliseconds(self.spec.catch_up_window_ms as i64)
            + Duration::milliseconds(self.spec.jitter_ms as i64)
            + grace;
        let oldest_fired = now - window;
        let mut tick = self.next_tick;
        while let Some(t) = tick {
            if t > now || round.fire.len() >= MAX_FIRES_PER_ROUND {
                break;
            }
            if t < oldest_fired {
                let missed = round.missed.get_or_insert(Missed {
                    count: 0,
                    more: false,
                    first: t,
                    last: t,
                });
                missed.count += 1;
                missed.last = t;
                if missed.count >= MAX_MISSED_COUNTED {
                    // Jump: the first tick inside the window (or after now).
                    missed.more = true;
                    let before_window = oldest_fired - Duration::milliseconds(1);
                    tick = cadence
                        .next_after(before_window.max(t))
                        .filter(|next| *next > t);
                    continue;
                }
            } else {
                round.fire.push(t);
            }
            tick = cadence.next_after(t).filter(|next| *next > t);
        }
        round.next_tick = tick;
        round
    }

    /// Moves the schedule past a round: its next tick is `next_tick`, firing after a new
    /// jitter placed by `jitter_unit`.
    pub fn advance(
        &mut self,
        next_tick: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        jitter_unit: f64,
    ) {
        self.set_next(next_tick, jitter_unit);
        self.touch(now);
    }

    fn set_next(&mut self, next_tick: Option<DateTime<Utc>>, jitter_unit: f64) {
        self.next_tick = next_tick;
        self.fire_at = next_tick.map(|t| t + jitter(self.spec.jitter_ms, jitter_unit));
    }

    fn touch(&mut self, now: DateTime<Utc>) {
        self.updated_at = now;
        self.version += 1;
    }

    /// The idempotency key of the job or run that `tick` starts.
    pub fn tick_key(&self, tick: DateTime<Utc>) -> String {
        format!("{TICK_KEY_PREFIX}{}-{}", self.id, tick.timestamp_micros())
    }

    /// The spec of the job or run that `tick` starts: the template, keyed by the tick.
    pub fn firing(&self, tick: DateTime<Utc>) -> Result<Firing, DomainError> {
        let key = Some(self.tick_key(tick));
        Ok(match &self.spec.target {
            ScheduleTarget::Job { spec } => {
                let mut draft = JobSpecDraft::from(JobSpec::clone(spec));
                draft.idempotency_key = key;
                Firing::Job(Box::new(JobSpec::try_from(draft)?))
            }
            ScheduleTarget::Pipeline { spec } => {
                let mut draft = PipelineSpecDraft::from(spec.clone());
                draft.idempotency_key = key;
                Firing::Pipeline(PipelineSpec::try_from(draft)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn spec(cron: &str, zone: &str) -> ScheduleSpec {
        ScheduleSpec {
            name: "nightly".to_owned(),
            cron: cron.to_owned(),
            time_zone: zone.to_owned(),
            target: ScheduleTarget::Job {
                spec: Box::new(JobSpec::try_from(JobSpecDraft::exec("backup", &["true"])).unwrap()),
            },
            overlap: OverlapPolicy::Allow,
            catch_up_window_ms: 1_000,
            jitter_ms: 0,
            history_limit: 10,
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn a_bad_expression_and_zone_are_both_named() {
        let errors = spec("61 * * * *", "Mars/Olympus").validate().unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["cron", "time_zone"], "{errors}");
    }

    #[test]
    fn a_template_with_its_own_idempotency_key_is_refused() {
        let mut draft = JobSpecDraft::exec("backup", &["true"]);
        draft.idempotency_key = Some("mine".to_owned());
        let mut s = spec("0 3 * * *", "UTC");
        s.target = ScheduleTarget::Job {
            spec: Box::new(JobSpec::try_from(draft).unwrap()),
        };
        let errors = s.validate().unwrap_err();
        assert_eq!(errors.0[0].field, "target.idempotency_key");
    }

    #[test]
    fn ticks_fall_on_whole_seconds() {
        let cadence = spec("* * * * * *", "UTC").validate().unwrap();
        let t = utc(2026, 1, 1, 0, 0, 0) + Duration::milliseconds(1_250);
        assert_eq!(cadence.next_after(t), Some(utc(2026, 1, 1, 0, 0, 2)));
        let cadence = spec("*/5 * * * *", "UTC").validate().unwrap();
        let t = utc(2026, 1, 1, 0, 4, 59) + Duration::milliseconds(999);
        assert_eq!(cadence.next_after(t), Some(utc(2026, 1, 1, 0, 5, 0)));
    }

    #[test]
    fn when_clocks_go_back_the_next_tick_is_never_before_now() {
        // Europe/Madrid, 2026-10-25: 03:00 CEST (01:00 UTC) becomes 02:00 CET; 02:00–03:00
        // local happens twice, from 00:00 to 02:00 UTC.
        let cadence = spec("*/15 * * * *", "Europe/Madrid").validate().unwrap();
        let mut t = utc(2026, 10, 24, 23, 50, 0);
        let mut ticks = Vec::new();
        while t < utc(2026, 10, 25, 3, 0, 0) {
            t = cadence.next_after(t).unwrap();
            ticks.push(t);
        }
        assert!(ticks.windows(2).all(|w| w[1] > w[0]), "{ticks:?}");
        // From inside the second pass, the next tick is after it.
        let second_pass = utc(2026, 10, 25, 1, 20, 0);
        let next = cadence.next_after(second_pass).unwrap();
        assert_eq!(next, utc(2026, 10, 25, 1, 30, 0));
        let daily = spec("30 2 * * *", "Europe/Madrid").validate().unwrap();
        let next = daily.next_after(utc(2026, 10, 25, 1, 10, 0)).unwrap();
        assert!(next > utc(2026, 10, 25, 1, 10, 0), "{next}");
    }

    #[test]
    fn jitter_and_grace_do_not_make_a_tick_missed() {
        let mut s = spec("0 * * * *", "UTC");
        s.catch_up_window_ms = 1_000;
        s.jitter_ms = 120_000;
        let cadence = s.validate().unwrap();
        let (schedule, _) = Schedule::create(
            ScheduleId::new(),
            TenantId::default(),
            s,
            &cadence,
            false,
            utc(2026, 1, 1, 0, 30, 0),
            0.99,
        );
        // Fired 119 s late by its jitter, looked at 1.5 s after that.
        let now = utc(2026, 1, 1, 1, 1, 59) + Duration::milliseconds(1_500);
        let round = schedule.round(&cadence, now, Duration::seconds(1));
        assert_eq!(round.fire, [utc(2026, 1, 1, 1, 0, 0)]);
        assert!(round.missed.is_none());
    }

    #[test]
    fn when_clocks_go_back_an_interval_fires_through_the_repeated_hour_a_fixed_time_once() {
        // Europe/Madrid, 2026-10-25: at 01:00 UTC (03:00 CEST) clocks go back to 02:00 CET.
        let quarter = spec("*/15 * * * *", "Europe/Madrid").validate().unwrap();
        let mut at = utc(2026, 10, 25, 0, 30, 0);
        let mut ticks = Vec::new();
        for _ in 0..7 {
            at = quarter.next_after(at).unwrap();
            ticks.push(at);
        }
        let expected: Vec<_> = (0..7)
            .map(|i| utc(2026, 10, 25, 0, 45, 0) + Duration::minutes(15 * i))
            .collect();
        assert_eq!(ticks, expected, "every quarter of an hour, as time goes on");
        let hourly = spec("0 * * * *", "Europe/Madrid").validate().unwrap();
        assert_eq!(
            hourly.next_after(utc(2026, 10, 25, 0, 0, 0)),
            Some(utc(2026, 10, 25, 1, 0, 0))
        );
        // 02:30 happens twice that night; a daily 02:30 fires at the first only.
        let daily = spec("30 2 * * *", "Europe/Madrid").validate().unwrap();
        assert_eq!(
            daily.next_after(utc(2026, 10, 25, 0, 30, 0)),
            Some(utc(2026, 10, 26, 1, 30, 0))
        );
        // A few fixed hours a day count as fixed times: 02:00 fires once.
        let twice_a_day = spec("0 2,14 * * *", "Europe/Madrid").validate().unwrap();
        assert_eq!(
            twice_a_day.next_after(utc(2026, 10, 25, 0, 0, 0)),
            Some(utc(2026, 10, 25, 13, 0, 0))
        );
        // Spring forward (2026-03-29, 02:00 CET → 03:00 CEST) is unchanged.
        assert_eq!(
            quarter.next_after(utc(2026, 3, 29, 0, 45, 0)),
            Some(utc(2026, 3, 29, 1, 0, 0))
        );
    }

    #[test]
    fn a_jitter_must_be_shorter_than_the_time_between_ticks() {
        let mut s = spec("*/5 * * * *", "UTC");
        s.jitter_ms = 300_000;
        let errors = s.validate().unwrap_err();
        assert_eq!(errors.0[0].field, "jitter_ms", "{errors}");
        assert!(errors.0[0].reason.contains("300000 ms"), "{errors}");
        s.jitter_ms = 299_999;
        s.validate().unwrap();
        // The shortest gap counts: 09:00 and 10:00 are an hour apart, then 23 hours.
        let mut s = spec("0 9,10 * * *", "UTC");
        s.jitter_ms = 3_600_000;
        assert_eq!(s.validate().unwrap_err().0[0].field, "jitter_ms");
    }

    #[test]
    fn a_cron_expression_or_zone_too_long_is_refused_before_it_is_read() {
        let s = spec(&format!("0 * * * *{}", " ".repeat(1_000_000)), "UTC");
        let errors = s.validate().unwrap_err();
        assert_eq!(errors.0[0].field, "cron", "{errors}");
        assert!(errors.0[0].reason.contains("at most 256 bytes"), "{errors}");
        let s = spec("0 * * * *", &"Europe/".repeat(20));
        assert_eq!(s.validate().unwrap_err().0[0].field, "time_zone");
    }

    #[test]
    fn a_uuid_is_not_a_name() {
        let mut s = spec("0 * * * *", "UTC");
        s.name = uuid::Uuid::now_v7().to_string();
        assert_eq!(s.validate().unwrap_err().0[0].field, "name");
    }

    #[test]
    fn a_daily_tick_keeps_its_wall_clock_time_across_daylight_saving() {
        let cadence = spec("0 3 * * *", "Europe/Madrid").validate().unwrap();
        // CET (UTC+1) before 2026-03-29, CEST (UTC+2) after.
        let before = cadence.next_after(utc(2026, 3, 27, 12, 0, 0)).unwrap();
        assert_eq!(before, utc(2026, 3, 28, 2, 0, 0));
        let after = cadence.next_after(utc(2026, 3, 29, 12, 0, 0)).unwrap();
        assert_eq!(after, utc(2026, 3, 30, 1, 0, 0));
    }

    #[test]
    fn a_round_fires_the_ticks_inside_the_window_and_counts_the_older_ones_missed() {
        let mut s = spec("0 * * * *", "UTC");
        s.catch_up_window_ms = 3 * 3_600_000;
        let cadence = s.validate().unwrap();
        let (schedule, _) = Schedule::create(
            ScheduleId::new(),
            TenantId::default(),
            s,
            &cadence,
            false,
            utc(2026, 1, 1, 0, 30, 0),
            0.0,
        );
        assert_eq!(schedule.next_tick(), Some(utc(2026, 1, 1, 1, 0, 0)));
        // Down from 00:30 to 05:10 with 3 h of catch-up: 01:00 and 02:00 are too old; 03:00,
        // 04:00 and 05:00 fire.
        let round = schedule.round(&cadence, utc(2026, 1, 1, 5, 10, 0), Duration::zero());
        assert_eq!(
            round.fire,
            [
                utc(2026, 1, 1, 3, 0, 0),
                utc(2026, 1, 1, 4, 0, 0),
                utc(2026, 1, 1, 5, 0, 0)
            ]
        );
        let missed = round.missed.unwrap();
        assert_eq!((missed.count, missed.more), (2, false));
        assert_eq!(missed.first, utc(2026, 1, 1, 1, 0, 0));
        assert_eq!(missed.last, utc(2026, 1, 1, 2, 0, 0));
        assert_eq!(round.next_tick, Some(utc(2026, 1, 1, 6, 0, 0)));
    }

    #[test]
    fn a_long_outage_on_a_fast_expression_is_jumped_over_not_walked() {
        let s = spec("* * * * * *", "UTC");
        let cadence = s.validate().unwrap();
        let start = utc(2026, 1, 1, 0, 0, 0);
        let (schedule, _) = Schedule::create(
            ScheduleId::new(),
            TenantId::default(),
            s,
            &cadence,
            false,
            start,
            0.0,
        );
        let now = start + Duration::days(3);
        let round = schedule.round(&cadence, now, Duration::zero());
        let missed = round.missed.unwrap();
        assert!(missed.more);
        assert_eq!(missed.count, MAX_MISSED_COUNTED);
        // With a one-second window only the last second's ticks still fire.
        assert_eq!(round.fire, [now - Duration::seconds(1), now]);
        assert!(round.next_tick.unwrap() > now);
    }

    #[test]
    fn a_paused_schedule_is_never_due_and_resumes_from_now() {
        let s = spec("*/10 * * * * *", "UTC");
        let cadence = s.validate().unwrap();
        let start = utc(2026, 1, 1, 0, 0, 0);
        let (mut schedule, _) = Schedule::create(
            ScheduleId::new(),
            TenantId::default(),
            s,
            &cadence,
            false,
            start,
            0.0,
        );
        assert!(schedule.pause(start).is_some());
        assert!(schedule.pause(start).is_none());
        let later = start + Duration::minutes(5);
        assert!(!schedule.is_due(later));
        assert!(
            schedule
                .round(&cadence, later, Duration::zero())
                .fire
                .is_empty()
        );
        schedule.resume(&cadence, later, 0.0).unwrap();
        assert_eq!(schedule.next_tick(), Some(later + Duration::seconds(10)));
        // Resumed by a caller whose clock is a minute behind: not from a tick already handled.
        assert!(schedule.pause(later).is_some());
        schedule
            .resume(&cadence, later - Duration::minutes(1), 0.0)
            .unwrap();
        assert_eq!(schedule.next_tick(), Some(later + Duration::seconds(10)));
    }

    #[test]
    fn jitter_delays_the_firing_not_the_tick() {
        let mut s = spec("0 * * * *", "UTC");
        s.jitter_ms = 60_000;
        let cadence = s.validate().unwrap();
        let (schedule, _) = Schedule::create(
            ScheduleId::new(),
            TenantId::default(),
            s,
            &cadence,
            false,
            utc(2026, 1, 1, 0, 30, 0),
            0.5,
        );
        assert_eq!(schedule.next_tick(), Some(utc(2026, 1, 1, 1, 0, 0)));
        assert_eq!(schedule.fire_at(), Some(utc(2026, 1, 1, 1, 0, 30)));
        assert!(!schedule.is_due(utc(2026, 1, 1, 1, 0, 10)));
    }

    #[test]
    fn each_tick_gets_its_own_idempotency_key() {
        let s = spec("0 * * * *", "UTC");
        let cadence = s.validate().unwrap();
        let (schedule, _) = Schedule::create(
            ScheduleId::new(),
            TenantId::default(),
            s,
            &cadence,
            false,
            utc(2026, 1, 1, 0, 0, 0),
            0.0,
        );
        let Firing::Job(one) = schedule.firing(utc(2026, 1, 1, 1, 0, 0)).unwrap() else {
            panic!("a job template fires jobs");
        };
        let Firing::Job(two) = schedule.firing(utc(2026, 1, 1, 2, 0, 0)).unwrap() else {
            panic!("a job template fires jobs");
        };
        assert_ne!(one.idempotency_key, two.idempotency_key);
        assert_eq!(one.name, "backup");
    }
}
