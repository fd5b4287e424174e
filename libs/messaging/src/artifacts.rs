//! Pipeline artifacts in the JetStream object store: the one bucket, how objects are named
//! (`<run_id>/<step>/<path relative to the step's workspace>`), and getting the bucket.
//! The object store keeps each object's SHA-256 digest and the client checks it as the
//! object is read, so a corrupted download fails instead of handing on wrong bytes.

use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use hodei_domain::PipelineRunId;

use crate::MessagingError;

/// The bucket every artifact is kept in.
pub const BUCKET: &str = "HODEI_ARTIFACTS";
/// How long artifacts are kept.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most bytes the bucket holds; past it JetStream refuses new artifacts.
pub const BUCKET_MAX_BYTES: i64 = 10 * 1024 * 1024 * 1024;

/// The object name of `path` (relative, `/`-separated) produced by `step` of `run`.
pub fn object_name(run: &PipelineRunId, step: &str, path: &str) -> String {
    format!("{run}/{step}/{path}")
}

/// The prefix of every object `step` of `run` produced.
pub fn step_prefix(run: &PipelineRunId, step: &str) -> String {
    format!("{run}/{step}/")
}

/// The prefix of every object of `run`.
pub fn run_prefix(run: &PipelineRunId) -> String {
    format!("{run}/")
}

/// Splits an object name into run, step and path; `None` for names not made by
/// [`object_name`] or whose path could leave a workspace (absolute, `..`).
pub fn parse_object_name(name: &str) -> Option<(PipelineRunId, &str, &str)> {
    let (run, rest) = name.split_once('/')?;
    let (step, path) = rest.split_once('/')?;
    let run = run.parse().ok()?;
    let safe = !path.is_empty()
        && !path.starts_with('/')
        && !path.split('/').any(|part| part == ".." || part.is_empty());
    (safe && !step.is_empty()).then_some((run, step, path))
}

/// The stream that holds the artifact bucket.
pub fn stream_name() -> String {
    format!("OBJ_{BUCKET}")
}

/// Gets the artifact bucket, which must exist (for processes that may not create it).
pub async fn existing_bucket(
    js: &jetstream::Context,
) -> Result<object_store::ObjectStore, MessagingError> {
    js.get_object_store(BUCKET)
        .await
        .map_err(|e| MessagingError::Setup {
            what: format!("object store {BUCKET}"),
            reason: e.to_string(),
        })
}

/// Gets the artifact bucket, creating it if it does not exist.
pub async fn bucket(js: &jetstream::Context) -> Result<object_store::ObjectStore, MessagingError> {
    if let Ok(store) = js.get_object_store(BUCKET).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: BUCKET.to_owned(),
        description: Some("pipeline artifacts, by run and step".to_owned()),
        max_age: RETENTION,
        max_bytes: BUCKET_MAX_BYTES,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| MessagingError::Setup {
        what: format!("object store {BUCKET}"),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unsafe_paths_are_refused() {
        let run = PipelineRunId::new();
        let name = object_name(&run, "build", "dist/app.bin");
        assert_eq!(
            parse_object_name(&name),
            Some((run, "build", "dist/app.bin"))
        );
        assert!(name.starts_with(&step_prefix(&run, "build")));
        assert!(name.starts_with(&run_prefix(&run)));
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", ""] {
            assert_eq!(
                parse_object_name(&format!("{run}/build/{bad}")),
                None,
                "{bad}"
            );
        }
        assert_eq!(parse_object_name("not-a-run/build/x"), None);
    }
}
