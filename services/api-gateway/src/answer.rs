//! Answers that stay within what a gRPC client reads by default.
//!
//! A job keeps up to 100 attempts (and its lost ones), each with up
//! to 20 lines of 4 KiB of output, and a pipeline run up to 1,000 steps of such jobs: whole,
//! one of them can pass [`MAX_ANSWER_BYTES`], and its caller could not read the answer at
//! all. Such an item is cut, least useful part first, with what was left out marked on it:
//! the output tails of earlier attempts, then those of last attempts that succeeded, then the
//! others; then, if that is still not enough, the oldest attempts themselves (counted in
//! `attempts_omitted`). `GetJobHistory` still gives every attempt and its tail.

use hodei_proto::v1 as pb;
use prost::Message;

use crate::request::{MAX_ANSWER_BYTES, PAGE_TOKEN_ROOM};

/// Most bytes one job or run may take in an answer: all of it but the room a list keeps for
/// its page token.
const MAX_ITEM_BYTES: usize = MAX_ANSWER_BYTES - PAGE_TOKEN_ROOM;

/// `job` on the wire, cut to fit an answer.
pub fn job(job: &hodei_domain::Job) -> pb::Job {
    fit_job(job.into())
}

/// `job` cut to fit an answer (see the module's documentation); unchanged if it fits.
fn fit_job(mut job: pb::Job) -> pb::Job {
    let size = job.encoded_len();
    if size > MAX_ITEM_BYTES {
        fit_attempts(
            size,
            vec![Attempts {
                kept: &mut job.attempts,
                omitted: &mut job.attempts_omitted,
                reason: &mut job.reason,
            }],
        );
    }
    job
}

/// `run` cut to fit an answer (see the module's documentation); unchanged if it fits.
pub fn fit_run(mut run: pb::PipelineRun) -> pb::PipelineRun {
    let size = run.encoded_len();
    if size > MAX_ITEM_BYTES {
        let steps = run
            .steps
            .iter_mut()
            .map(|s| Attempts {
                kept: &mut s.attempts,
                omitted: &mut s.attempts_omitted,
                reason: &mut s.reason,
            })
            .collect();
        fit_attempts(size, steps);
    }
    run
}

/// One job's attempts in an answer, oldest first, the count of those left out, and the
/// reason its job or step gives for its state.
struct Attempts<'a> {
    kept: &'a mut Vec<pb::Attempt>,
    omitted: &'a mut u32,
    reason: &'a mut String,
}

/// Longest reason (a step's, a job's, an attempt's outcome's) an item keeps when cutting its
/// tails and earlier attempts was not enough: a reason may take 4 KiB, and a run of 1,000
/// steps repeats each one in its step and its last attempt.
const CUT_REASON_BYTES: usize = 256;

/// What ends a reason that was cut.
const CUT_MARK: &str = "… (cut to fit the answer)";

/// Bytes an attempt takes in its list, tag and length included.
fn attempt_len(a: &pb::Attempt) -> usize {
    prost::encoding::message::encoded_len(1, a)
}

/// Drops tails, then the oldest attempts, then cuts long reasons, until `size` (the item's
/// encoded size) is within [`MAX_ITEM_BYTES`]. Sizes are counted at the level of what is cut:
/// what its parents save on their own length prefixes only makes the item smaller than
/// counted.
fn fit_attempts(mut size: usize, mut jobs: Vec<Attempts<'_>>) {
    // Tails, least useful first: earlier attempts', then last attempts' that succeeded, then
    // the rest; within a rank, in order.
    let mut tails: Vec<(u8, usize, usize)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let last = job.kept.len().saturating_sub(1);
        for (i, a) in job.kept.iter().enumerate() {
            if a.output_tail.is_empty() {
                continue;
            }
            let succeeded = matches!(
                a.outcome.as_ref().and_then(|o| o.kind.as_ref()),
                Some(pb::attempt_outcome::Kind::Exited(0))
            );
            let rank = match (i == last, succeeded) {
                (false, _) => 0,
                (true, true) => 1,
                (true, false) => 2,
            };
            tails.push((rank, j, i));
        }
    }
    tails.sort_by_key(|&(rank, ..)| rank);
    for (_, j, i) in tails {
        if size <= MAX_ITEM_BYTES {
            return;
        }
        let attempt = &mut jobs[j].kept[i];
        let before = attempt_len(attempt);
        attempt.output_tail = Vec::new();
        attempt.output_tail_omitted = true;
        size -= before - attempt_len(attempt);
    }
    // Then the oldest attempts, all but each job's last, job by job.
    for job in &mut jobs {
        let earlier = job.kept.len().saturating_sub(1);
        let mut dropped = 0;
        while size > MAX_ITEM_BYTES && dropped < earlier {
            size -= attempt_len(&job.kept[dropped]);
            dropped += 1;
        }
        job.kept.drain(..dropped);
        *job.omitted += u32::try_from(dropped).unwrap_or(u32::MAX);
    }
    // Then long reasons: each job's or step's own, and its attempts' outcomes'.
    for job in &mut jobs {
        let outcomes =
            job.kept
                .iter_mut()
                .filter_map(|a| match a.outcome.as_mut()?.kind.as_mut()? {
                    pb::attempt_outcome::Kind::Lost(reason)
                    | pb::attempt_outcome::Kind::SpawnFailed(reason)
                    | pb::attempt_outcome::Kind::ArtifactsFailed(reason) => Some(reason),
                    _ => None,
                });
        for reason in std::iter::once(&mut *job.reason).chain(outcomes) {
            if size <= MAX_ITEM_BYTES {
                return;
            }
            size -= cut_reason(reason);
        }
    }
    if size > MAX_ITEM_BYTES {
        tracing::warn!(
            size,
            limit = MAX_ITEM_BYTES,
            "an item still passes what a client reads after every cut"
        );
    }
}

/// Cuts `reason` to [`CUT_REASON_BYTES`] (at a character), marked; returns the bytes it saved
/// (none for a reason short enough).
fn cut_reason(reason: &mut String) -> usize {
    if reason.len() <= CUT_REASON_BYTES + CUT_MARK.len() {
        return 0;
    }
    let before = reason.len();
    reason.truncate(reason.floor_char_boundary(CUT_REASON_BYTES));
    reason.push_str(CUT_MARK);
    before - reason.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::attempt_outcome::Kind;

    /// An attempt ending with `kind`, with 20 lines of 4 KiB of output.
    fn attempt(n: u32, kind: Kind) -> pb::Attempt {
        pb::Attempt {
            attempt: n,
            worker_id: "w-1".to_owned(),
            outcome: Some(pb::AttemptOutcome { kind: Some(kind) }),
            output_tail: vec!["x".repeat(4096); 20],
            ..Default::default()
        }
    }

    fn job(attempts: Vec<pb::Attempt>) -> pb::Job {
        pb::Job {
            id: "j".to_owned(),
            attempts,
            ..Default::default()
        }
    }

    /// A run of `steps`, fitted, checked to fit.
    fn fitted_run(steps: Vec<pb::StepRun>) -> pb::PipelineRun {
        let fitted = fit_run(pb::PipelineRun {
            steps,
            ..Default::default()
        });
        assert!(fitted.encoded_len() <= MAX_ITEM_BYTES);
        fitted
    }

    fn lost(n: u32) -> pb::Attempt {
        attempt(n, Kind::Lost("the worker was lost".to_owned()))
    }

    #[test]
    fn a_job_that_fits_is_unchanged() {
        let small = job(vec![lost(1), attempt(2, Kind::Exited(0))]);
        assert_eq!(fit_job(small.clone()), small);
    }

    #[test]
    fn earlier_attempts_tails_go_first_and_the_last_one_stays() {
        // 100 attempts of 80 KiB of output: 8 MiB.
        let mut attempts: Vec<_> = (1..100).map(lost).collect();
        attempts.push(attempt(100, Kind::Exited(3)));
        let fitted = fit_job(job(attempts));
        assert!(fitted.encoded_len() <= MAX_ITEM_BYTES);
        assert_eq!(fitted.attempts.len(), 100);
        assert_eq!(fitted.attempts_omitted, 0);
        let omitted: Vec<u32> = fitted
            .attempts
            .iter()
            .filter(|a| a.output_tail_omitted)
            .map(|a| a.attempt)
            .collect();
        // The oldest ones, as few as it takes.
        assert_eq!(omitted, (1..=omitted.len() as u32).collect::<Vec<_>>());
        assert!(omitted.len() < 99, "{}", omitted.len());
        let last = fitted.attempts.last().unwrap();
        assert_eq!(
            (last.output_tail.len(), last.output_tail_omitted),
            (20, false)
        );
        assert!(
            fitted
                .attempts
                .iter()
                .all(|a| a.output_tail_omitted == a.output_tail.is_empty())
        );
    }

    #[test]
    fn in_a_run_a_failed_steps_tail_outlasts_the_succeeded_ones() {
        let step = |name: &str, kind: Kind| pb::StepRun {
            name: name.to_owned(),
            attempts: vec![attempt(1, kind)],
            ..Default::default()
        };
        let mut steps: Vec<_> = (0..60)
            .map(|i| step(&format!("ok-{i}"), Kind::Exited(0)))
            .collect();
        steps.insert(30, step("broken", Kind::Exited(1)));
        let fitted = fitted_run(steps);
        let broken = fitted.steps.iter().find(|s| s.name == "broken").unwrap();
        assert_eq!(broken.attempts[0].output_tail.len(), 20);
        assert!(
            fitted
                .steps
                .iter()
                .any(|s| s.attempts[0].output_tail_omitted)
        );
    }

    #[test]
    fn when_tails_are_not_enough_the_oldest_attempts_go_and_are_counted() {
        // Reasons of 4 KiB on 1,000 steps of 2 attempts, no tails: 8 MiB.
        let reasoned = |n| pb::Attempt {
            attempt: n,
            outcome: Some(pb::AttemptOutcome {
                kind: Some(Kind::Lost("r".repeat(4096))),
            }),
            ..Default::default()
        };
        let steps: Vec<_> = (0..1000)
            .map(|i| pb::StepRun {
                name: format!("s-{i}"),
                attempts: vec![reasoned(1), reasoned(2)],
                ..Default::default()
            })
            .collect();
        let fitted = fitted_run(steps);
        for s in &fitted.steps {
            assert_eq!(
                s.attempts.last().unwrap().attempt,
                2,
                "the last attempt stays"
            );
            assert_eq!(s.attempts.len() as u32 + s.attempts_omitted, 2);
        }
        assert!(fitted.steps.iter().any(|s| s.attempts_omitted == 1));
    }

    #[test]
    fn when_nothing_else_is_left_long_reasons_are_cut_and_marked() {
        // 1,000 steps whose one attempt was lost with a reason of 4 KiB, repeated as the
        // step's reason: 8 MiB with no tail and no earlier attempt to leave out.
        let long = "é".repeat(2048);
        let steps: Vec<_> = (0..1000)
            .map(|i| pb::StepRun {
                name: format!("s-{i}"),
                job_id: "01J0Z3N1W8Q4K5T6Y7V8X9ABCD".to_owned(),
                reason: long.clone(),
                attempts: vec![pb::Attempt {
                    attempt: 1,
                    worker_id: "w-1".to_owned(),
                    assigned_at: Some(prost_types::Timestamp::default()),
                    outcome: Some(pb::AttemptOutcome {
                        kind: Some(Kind::Lost(long.clone())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        let fitted = fitted_run(steps);
        assert!(fitted.steps.iter().all(|s| s.attempts.len() == 1));
        let cut = fitted
            .steps
            .iter()
            .filter(|s| s.reason.ends_with(CUT_MARK))
            .count();
        assert!(cut > 0 && cut < 1000, "as few as it takes: {cut}");
        assert!(fitted.steps.iter().all(|s| s.reason.len() <= long.len()));
        // The last steps kept theirs whole.
        assert_eq!(fitted.steps[999].reason, long);
    }
}
