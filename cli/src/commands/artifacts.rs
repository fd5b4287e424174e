//! The artifact commands: ls and get.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use hodei_proto::v1 as pb;
use serde_json::json;
use tonic::Streaming;

use super::{print_json, print_text};
use crate::cli::OutputFormat;
use crate::client::Clients;
use crate::{human, json};

/// What `-o` takes to write to stdout.
const STDOUT: &str = "-";

pub async fn ls(
    clients: &mut Clients,
    run_id: String,
    step: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let artifacts = clients
        .pipelines
        .list_artifacts(pb::ListArtifactsRequest {
            run_id,
            step: step.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .artifacts;
    match format {
        OutputFormat::Human => print_text(&human::artifacts_table(&artifacts))?,
        OutputFormat::Json => print_json(&json!({
            "artifacts": artifacts.iter().map(json::artifact).collect::<Vec<_>>(),
        }))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a download goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-o FILE`, `-o -`, or the artifact's file name in the current directory.
    fn of(output: Option<&str>, artifact_path: &str) -> anyhow::Result<Target> {
        match output {
            Some(STDOUT) => Ok(Target::Stdout),
            Some(file) => Ok(Target::File(PathBuf::from(file))),
            None => match Path::new(artifact_path).file_name() {
                Some(name) => Ok(Target::File(PathBuf::from(name))),
                None => bail!("{artifact_path:?} has no file name to save it as; give one with -o"),
            },
        }
    }
}

pub async fn get(
    clients: &mut Clients,
    run_id: String,
    step: String,
    path: String,
    output: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let target = Target::of(output.as_deref(), &path)?;
    let mut chunks = clients
        .pipelines
        .download_artifact(pb::DownloadArtifactRequest {
            run_id: run_id.clone(),
            step: step.clone(),
            path: path.clone(),
        })
        .await?
        .into_inner();
    match target {
        Target::Stdout => {
            copy(&mut chunks, &mut io::stdout()).await?;
        }
        Target::File(file) => {
            let size = download_to(&mut chunks, &file).await?;
            match format {
                OutputFormat::Human => {
                    if io::stderr().is_terminal() {
                        eprintln!("saved {} ({size} bytes)", file.display());
                    }
                }
                OutputFormat::Json => print_json(&json!({
                    "run_id": run_id,
                    "step": step,
                    "path": path,
                    "file": file.display().to_string(),
                    "size": size,
                }))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes every chunk to `out` as it arrives; the number of bytes written.
async fn copy(
    chunks: &mut Streaming<pb::ArtifactChunk>,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let mut size = 0u64;
    while let Some(chunk) = chunks.message().await? {
        out.write_all(&chunk.data)?;
        size += chunk.data.len() as u64;
    }
    out.flush()?;
    Ok(size)
}

/// Downloads into a `.part` file beside `file`, renamed to `file` once the stream ended
/// well, so a failed download never leaves a truncated file under the real name.
async fn download_to(
    chunks: &mut Streaming<pb::ArtifactChunk>,
    file: &Path,
) -> anyhow::Result<u64> {
    let part = part_path(file);
    let mut out =
        File::create(&part).with_context(|| format!("failed to create {}", part.display()))?;
    let copied = copy(chunks, &mut out).await.and_then(|size| {
        out.sync_all()
            .with_context(|| format!("failed to write {}", part.display()))?;
        Ok(size)
    });
    drop(out);
    let written = copied.and_then(|size| {
        std::fs::rename(&part, file)
            .with_context(|| format!("failed to write {}", file.display()))?;
        Ok(size)
    });
    if written.is_err() {
        // The error says what went wrong; the partial file is only in the way.
        let _ = std::fs::remove_file(&part);
    }
    written
}

/// `dir/.name.part` for `dir/name`.
fn part_path(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map_or_else(|| "download".into(), |n| n.to_string_lossy().into_owned());
    file.with_file_name(format!(".{name}.part"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_defaults_to_the_file_name_here() {
        assert_eq!(
            Target::of(None, "dist/app.txt").unwrap(),
            Target::File("app.txt".into())
        );
        assert_eq!(
            Target::of(Some("-"), "dist/app.txt").unwrap(),
            Target::Stdout
        );
        assert_eq!(
            Target::of(Some("out/x.bin"), "dist/app.txt").unwrap(),
            Target::File("out/x.bin".into())
        );
        let err = Target::of(None, "..").unwrap_err();
        assert!(err.to_string().contains("-o"), "{err}");
    }

    #[test]
    fn partial_downloads_are_hidden_beside_the_file() {
        assert_eq!(
            part_path(Path::new("out/app.txt")),
            Path::new("out/.app.txt.part")
        );
        assert_eq!(part_path(Path::new("app.txt")), Path::new(".app.txt.part"));
    }
}
