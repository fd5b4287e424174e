//! Request parsing: the fields every service's requests share (ids, tenant, paging, state
//! filters, required messages, reasons), each refused with an error naming its field.

use std::str::FromStr;

use hodei_domain::{IdError, TenantId};

use crate::errors::ApiError;

/// Largest page a list call returns.
pub const MAX_PAGE: u32 = 1000;

/// Page size when a list request gives none.
pub const DEFAULT_PAGE: u32 = 100;

/// An id (job, pipeline run, worker) in request field `field`.
pub fn id<T>(field: &str, value: &str) -> Result<T, ApiError>
where
    T: FromStr<Err = IdError>,
{
    value.parse().map_err(|e| ApiError::field(field, e))
}

/// The tenant of a request: empty means the default tenant.
pub fn tenant(value: &str) -> Result<TenantId, ApiError> {
    if value.is_empty() {
        Ok(TenantId::default())
    } else {
        id("tenant", value)
    }
}

/// A tenant a request may name: none when empty (the caller's own, or for a listing by an
/// admin, every tenant).
pub fn optional_tenant(value: &str) -> Result<Option<TenantId>, ApiError> {
    (!value.is_empty()).then(|| id("tenant", value)).transpose()
}

/// A message field the request must carry.
pub fn required<T>(field: &str, value: Option<T>) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::field(field, "is required"))
}

/// A text field the request must carry, not empty.
/// Refuses a client's idempotency key that takes the form reserved for scheduled jobs and runs
/// (`schedule-…`), naming `spec.idempotency_key`; `what` says what those keys belong to.
pub fn client_idempotency_key(key: Option<&str>, what: &str) -> Result<(), ApiError> {
    if key.is_none_or(hodei_domain::schedule::is_client_key) {
        Ok(())
    } else {
        Err(ApiError::field(
            "spec.idempotency_key",
            format!("must not start with `schedule-`: those are the keys of scheduled {what}"),
        ))
    }
}

pub fn required_text<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.is_empty() {
        Err(ApiError::field(field, "is required"))
    } else {
        Ok(value)
    }
}

/// Longest reason a request may give (a cancel's or a drain's), in bytes: it travels in the
/// job's event and in the agent's command.
pub const MAX_REASON_BYTES: usize = 1024;

/// The reason a request gives, or `default` when it gives none; refused when longer than
/// [`MAX_REASON_BYTES`] or holding a NUL character, which no event could carry.
pub fn reason_or(value: String, default: &str) -> Result<String, ApiError> {
    if value.is_empty() {
        Ok(default.to_owned())
    } else if value.len() > MAX_REASON_BYTES {
        Err(ApiError::field(
            "reason",
            format!("{} bytes, at most {MAX_REASON_BYTES}", value.len()),
        ))
    } else if value.contains('\0') {
        Err(ApiError::field("reason", "must not contain NUL"))
    } else {
        Ok(value)
    }
}

/// A requested page size: 0 means [`DEFAULT_PAGE`]; more than [`MAX_PAGE`] is refused.
pub fn page_size(requested: u32) -> Result<u32, ApiError> {
    match requested {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(ApiError::field(
            "page_size",
            format!("{n} is more than {MAX_PAGE}"),
        )),
    }
}

/// A list request's `page_token`: none when empty, else the id of the last item of the page
/// before.
pub fn page_token<T>(token: &str) -> Result<Option<T>, ApiError>
where
    T: FromStr<Err = IdError>,
{
    if token.is_empty() {
        Ok(None)
    } else {
        id("page_token", token).map(Some)
    }
}

/// A timestamp in request field `field`, from year 1 to 9999 (what the protobuf `Timestamp`
/// allows; PostgreSQL refuses times before 4713 BC, which `chrono` would take).
pub fn timestamp(
    field: &str,
    value: &prost_types::Timestamp,
) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    use chrono::Datelike;
    let at = u32::try_from(value.nanos)
        .ok()
        .and_then(|nanos| chrono::DateTime::from_timestamp(value.seconds, nanos))
        .ok_or_else(|| ApiError::field(field, "is not a valid time"))?;
    if storable_time(&at) {
        Ok(at)
    } else {
        Err(ApiError::field(
            field,
            format!("year {} is not from 1 to 9999", at.year()),
        ))
    }
}

/// Whether `at` falls in years 1 to 9999, which a request's times and tokens may name.
pub fn storable_time(at: &chrono::DateTime<chrono::Utc>) -> bool {
    (1..=9999).contains(&chrono::Datelike::year(at))
}

/// Longest text a filter may hold (a name prefix, a label's key or value), in bytes.
pub const MAX_FILTER_BYTES: usize = 1024;

/// A text filter of field `field`: refused when longer than `max_bytes` or holding a NUL
/// character, which PostgreSQL cannot compare with (it would fail the whole call as an
/// internal error).
pub fn filter_text<'a>(field: &str, value: &'a str, max_bytes: usize) -> Result<&'a str, ApiError> {
    if value.len() > max_bytes {
        Err(ApiError::field(
            field,
            format!("{} bytes, at most {max_bytes}", value.len()),
        ))
    } else if value.contains('\0') {
        Err(ApiError::field(field, "must not contain NUL"))
    } else {
        Ok(value)
    }
}

/// Label filters (`labels`): each key and value checked as [`filter_text`].
pub fn label_filters(
    labels: std::collections::HashMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    for (key, value) in &labels {
        filter_text("labels", key, MAX_FILTER_BYTES)?;
        filter_text(&format!("labels.{key}"), value, MAX_FILTER_BYTES)?;
    }
    Ok(labels.into_iter().collect())
}

/// Most bytes an answer may take: what a gRPC client decodes by default (tonic's, grpc-go's
/// and grpcurl's limit), so that no answer is given that its caller could not read.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Room left in a list's answer for its page token.
pub const PAGE_TOKEN_ROOM: usize = 1024;

/// A page of at most `limit` items and their wire messages (`wire`, in the same order), cut
/// where the answer would pass [`MAX_ANSWER_BYTES`] (the first item is always kept), with the
/// token of the page after it: the last kept item's id when cut, else as
/// [`page_token_after`]. Items may each be large (a job's spec and its attempts' output), so
/// a full page could exceed what the caller reads.
pub fn fit_page<T, W: prost::Message>(
    page: &[T],
    mut wire: Vec<W>,
    limit: u32,
    id: impl Fn(&T) -> String,
) -> (Vec<W>, String) {
    let mut size = 0;
    let cut = wire.iter().enumerate().position(|(i, w)| {
        size += prost::encoding::message::encoded_len(1, w);
        i > 0 && size > MAX_ANSWER_BYTES - PAGE_TOKEN_ROOM
    });
    match cut {
        Some(kept) => {
            wire.truncate(kept);
            let token = page.get(kept - 1).map(&id).unwrap_or_default();
            (wire, token)
        }
        None => (wire, page_token_after(page, limit, id)),
    }
}

/// The token of the page after `page` (of at most `limit` items): the last item's id, or
/// empty when the page was not full (it was the last).
pub fn page_token_after<T>(page: &[T], limit: u32, id: impl Fn(&T) -> String) -> String {
    if page.len() == limit as usize {
        page.last().map(id).unwrap_or_default()
    } else {
        String::new()
    }
}

/// The wire enum values of list filter `field` as domain values; an unknown value is refused,
/// naming the field and what the value should have been (`job state`, `worker status`).
pub fn enum_values<S>(
    field: &str,
    what: &str,
    values: &[i32],
    from_wire: impl Fn(i32) -> Option<S>,
) -> Result<Vec<S>, ApiError> {
    values
        .iter()
        .map(|v| from_wire(*v).ok_or_else(|| ApiError::field(field, format!("unknown {what} {v}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hodei_domain::JobId;

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_size(MAX_PAGE).unwrap(), MAX_PAGE);
        let err = page_size(MAX_PAGE + 1).unwrap_err().to_string();
        assert_eq!(err, "page_size: 1001 is more than 1000");
    }

    #[test]
    fn ids_tokens_and_required_fields_name_their_field() {
        let err = id::<JobId>("job_id", "nope").unwrap_err().to_string();
        assert!(err.starts_with("job_id: "), "{err}");
        assert_eq!(page_token::<JobId>("").unwrap(), None);
        let job = JobId::new();
        assert_eq!(page_token::<JobId>(&job.to_string()).unwrap(), Some(job));
        assert!(
            page_token::<JobId>("x")
                .unwrap_err()
                .to_string()
                .starts_with("page_token: ")
        );
        assert_eq!(
            required::<u8>("spec", None).unwrap_err().to_string(),
            "spec: is required"
        );
        assert_eq!(
            required_text("step", "").unwrap_err().to_string(),
            "step: is required"
        );
        assert_eq!(tenant("").unwrap(), TenantId::default());
        assert!(
            tenant("Bad Tenant!")
                .unwrap_err()
                .to_string()
                .starts_with("tenant: ")
        );
        assert_eq!(
            reason_or(String::new(), "by request").unwrap(),
            "by request"
        );
        assert_eq!(reason_or("mine".into(), "by request").unwrap(), "mine");
        let long = reason_or("x".repeat(MAX_REASON_BYTES + 1), "by request").unwrap_err();
        assert!(long.to_string().starts_with("reason: "), "{long}");
        let nul = reason_or("a\0b".into(), "by request").unwrap_err();
        assert!(nul.to_string().starts_with("reason: "), "{nul}");
    }

    #[test]
    fn unknown_enum_values_are_refused_with_the_field() {
        let states = enum_values("states", "job state", &[1, 2], |v| (v < 5).then_some(v));
        assert_eq!(states.unwrap(), vec![1, 2]);
        let err = enum_values("statuses", "worker status", &[9], |v| (v < 5).then_some(v))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "statuses: unknown worker status 9");
    }

    #[test]
    fn the_next_page_token_is_the_last_id_of_a_full_page() {
        assert_eq!(page_token_after(&[1, 2], 2, ToString::to_string), "2");
        // Three items of 1.5 MiB: two fit in an answer, the token names the second.
        let big = vec!["x".repeat(3 << 19); 3];
        let (kept, token) = fit_page(&[1, 2, 3], big.clone(), 3, ToString::to_string);
        assert_eq!((kept.len(), token.as_str()), (2, "2"));
        // One item larger than an answer is still given (alone).
        let huge = vec!["x".repeat(5 << 20), String::new()];
        let (kept, token) = fit_page(&[1, 2], huge, 2, ToString::to_string);
        assert_eq!((kept.len(), token.as_str()), (1, "1"));
        let (kept, token) = fit_page(&[1, 2], vec![String::new(); 2], 3, ToString::to_string);
        assert_eq!((kept.len(), token.as_str()), (2, ""));
        assert_eq!(page_token_after(&[1], 2, ToString::to_string), "");
    }
}
