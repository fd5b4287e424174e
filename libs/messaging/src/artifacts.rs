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

/// Reads the artifact bucket with direct gets alone, creating no consumer: for credentials
/// that may not create consumers (agents), since a consumer's creator picks the subject the
/// server delivers to, which would let it publish stored bytes under any subject.
#[derive(Clone)]
pub struct DirectReader {
    stream: jetstream::stream::Stream,
}

impl DirectReader {
    /// A reader of the bucket's stream.
    pub async fn open(js: &jetstream::Context) -> Result<DirectReader, MessagingError> {
        let stream = js
            .get_stream(stream_name())
            .await
            .map_err(|e| MessagingError::Setup {
                what: format!("object store {BUCKET}"),
                reason: e.to_string(),
            })?;
        Ok(DirectReader { stream })
    }

    /// Every live object whose name starts with one of `prefixes`.
    pub async fn list(&self, prefixes: &[String]) -> Result<Vec<object_store::ObjectInfo>, String> {
        let subject = format!("$O.{BUCKET}.M.>");
        let mut found = Vec::new();
        let mut next = 1;
        loop {
            let message = match self
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(format!("failed to list artifacts: {e}")),
            };
            next = message.sequence + 1;
            let info: object_store::ObjectInfo = serde_json::from_slice(&message.payload)
                .map_err(|e| format!("malformed artifact record at {}: {e}", message.sequence))?;
            if !info.deleted && prefixes.iter().any(|p| info.name.starts_with(p.as_str())) {
                found.push(info);
            }
        }
        Ok(found)
    }

    /// Writes the bytes of `info` to `out`, checking them against its SHA-256 digest; returns
    /// how many there were.
    pub async fn read(
        &self,
        info: &object_store::ObjectInfo,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<u64, String> {
        use tokio::io::AsyncWriteExt as _;
        let subject = format!("$O.{BUCKET}.C.{}", info.nuid);
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut next = 1;
        let mut bytes = 0u64;
        for chunk in 0..info.chunks {
            let message = self
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
                .map_err(|e| format!("chunk {chunk} of {}: {e}", info.name))?;
            next = message.sequence + 1;
            digest.update(&message.payload);
            out.write_all(&message.payload)
                .await
                .map_err(|e| format!("failed to write {}: {e}", info.name))?;
            bytes += message.payload.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| format!("failed to write {}: {e}", info.name))?;
        let got = encode_digest(digest);
        if info.digest.as_deref() != Some(got.as_str()) || bytes != info.size as u64 {
            return Err(format!(
                "{} does not match its stored digest or size ({bytes} bytes read)",
                info.name
            ));
        }
        Ok(bytes)
    }
}

/// The digest the object store records for the bytes `file` reads from where it stands to its
/// end; `path` names it in errors.
pub async fn file_digest(
    file: &mut tokio::fs::File,
    path: &std::path::Path,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt as _;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .await
            .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
        if read == 0 {
            break;
        }
        digest.update(buffer.get(..read).unwrap_or_default());
    }
    Ok(encode_digest(digest))
}

/// A SHA-256 as the object store writes it: `SHA-256=<base64url>`.
fn encode_digest(digest: ring::digest::Context) -> String {
    use base64::Engine as _;
    format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(digest.finish())
    )
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
