//! A pipeline step's artifacts on the agent: before the process starts, the artifacts of the
//! steps it consumes are written into its workspace; after it exits 0, the files its globs
//! match are kept in the object store under `<run>/<step>/<path>`. Symbolic links are never
//! followed (a link could point outside the workspace), and a step keeps at most a configured
//! number of bytes. Downloads are checked against the SHA-256 digest the store recorded.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use async_nats::jetstream::object_store::ObjectStore;
use hodei_domain::ArtifactPlan;
use hodei_messaging::artifacts;
use tracing::info;

/// What was moved: files and bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    pub files: usize,
    pub bytes: u64,
}

/// Writes the artifacts of every step `plan` consumes into `workspace`.
pub(crate) async fn fetch(
    reader: &artifacts::DirectReader,
    plan: &ArtifactPlan,
    workspace: &Path,
) -> Result<Moved, String> {
    let mut moved = Moved::default();
    if plan.consume.is_empty() {
        return Ok(moved);
    }
    let prefixes: Vec<(String, &str)> = plan
        .consume
        .iter()
        .map(|step| (artifacts::step_prefix(&plan.run_id, step), step.as_str()))
        .collect();
    let wanted: Vec<String> = prefixes.iter().map(|(p, _)| p.clone()).collect();
    for info in reader.list(&wanted).await? {
        let Some((_, step, path)) = artifacts::parse_object_name(&info.name) else {
            continue;
        };
        let target = workspace.join(path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("failed to create {}: {e}", parent.display()))?;
        }
        let mut file = tokio::fs::File::create(&target)
            .await
            .map_err(|e| format!("failed to create {}: {e}", target.display()))?;
        // The reader fails if the bytes do not match the stored digest.
        let bytes = reader
            .read(&info, &mut file)
            .await
            .map_err(|e| format!("failed to download artifact {path} of {step}: {e}"))?;
        moved.files += 1;
        moved.bytes += bytes;
    }
    let missing: Vec<&str> = prefixes.iter().map(|(_, s)| *s).collect();
    if moved.files == 0 {
        return Err(format!("no artifacts found of {}", missing.join(", ")));
    }
    info!(run_id = %plan.run_id, step = %plan.step, files = moved.files, bytes = moved.bytes, "artifacts fetched");
    Ok(moved)
}

/// Keeps every file under `workspace` that `plan.produce` matches (a matched folder keeps
/// everything under it), at most `max_bytes` in all.
pub(crate) async fn keep(
    store: &ObjectStore,
    plan: &ArtifactPlan,
    workspace: &Path,
    max_bytes: u64,
) -> Result<Moved, String> {
    let mut moved = Moved::default();
    if plan.produce.is_empty() {
        return Ok(moved);
    }
    let files = matching_files(workspace, &plan.produce)?;
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    if total > max_bytes {
        return Err(format!(
            "artifacts of {} take {total} bytes, more than the {max_bytes} allowed",
            plan.step
        ));
    }
    let root = rustix::fs::open(
        workspace,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("failed to open {}: {e}", workspace.display()))?;
    for (path, _) in &files {
        let relative = relative_name(workspace, path)?;
        let name = artifacts::object_name(&plan.run_id, &plan.step, &relative);
        let mut file = open_beneath(&root, &relative)
            .map_err(|e| format!("failed to open {}: {e}", path.display()))?;
        // A requeued attempt that produces the same bytes finds them kept already. (Replacing
        // an object purges its old chunks, which an agent's credential may not do.)
        if let Ok(kept) = store.info(name.as_str()).await
            && !kept.deleted
        {
            let digest = artifacts::file_digest(&mut file, path).await?;
            if kept.digest.as_deref() == Some(digest.as_str()) {
                moved.files += 1;
                moved.bytes += u64::try_from(kept.size).unwrap_or(u64::MAX);
                continue;
            }
            tokio::io::AsyncSeekExt::rewind(&mut file)
                .await
                .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
        }
        let info = store
            .put(name.as_str(), &mut file)
            .await
            .map_err(|e| format!("failed to store artifact {relative}: {e}"))?;
        moved.files += 1;
        moved.bytes += u64::try_from(info.size).unwrap_or(u64::MAX);
    }
    if moved.files == 0 {
        return Err(format!(
            "no file matches {} in the workspace",
            plan.produce.join(", ")
        ));
    }
    info!(run_id = %plan.run_id, step = %plan.step, files = moved.files, bytes = moved.bytes, "artifacts kept");
    Ok(moved)
}

/// The regular files (not links) `globs` match under `workspace`, with their sizes; a matched
/// folder contributes every regular file below it (so `dist` and `dist/**` keep the same).
fn matching_files(workspace: &Path, globs: &[String]) -> Result<Vec<(PathBuf, u64)>, String> {
    let mut found = BTreeSet::new();
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    // `dir/**` means everything below `dir`, as in most CI tools; the glob crate's `**` alone
    // matches only the folders below it, so `dir` itself is matched too.
    let patterns = globs.iter().flat_map(|g| {
        let base = g.strip_suffix("/**").filter(|b| !b.is_empty());
        std::iter::once(g.as_str()).chain(base)
    });
    for pattern in patterns {
        let full = workspace.join(pattern);
        let full = full
            .to_str()
            .ok_or_else(|| format!("artifact glob {pattern} is not valid UTF-8"))?;
        let paths = glob::glob_with(full, options)
            .map_err(|e| format!("invalid artifact glob {pattern}: {e}"))?;
        for entry in paths {
            let path = entry.map_err(|e| format!("failed to read {}: {e}", e.path().display()))?;
            // The glob crate follows links to folders: what it found through one is not the
            // workspace's.
            if through_link(workspace, &path)? {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| format!("failed to read {}: {e}", path.display()))?;
            if meta.is_file() {
                found.insert(path);
            } else if meta.is_dir() {
                for entry in walkdir::WalkDir::new(&path).follow_links(false) {
                    let entry =
                        entry.map_err(|e| format!("failed to walk {}: {e}", path.display()))?;
                    if entry.file_type().is_file() {
                        found.insert(entry.into_path());
                    }
                }
            }
        }
    }
    found
        .into_iter()
        .map(|path| {
            let size = std::fs::symlink_metadata(&path)
                .map_err(|e| format!("failed to read {}: {e}", path.display()))?
                .len();
            Ok((path, size))
        })
        .collect()
}

/// Whether a folder between `workspace` and `path` is a symbolic link.
fn through_link(workspace: &Path, path: &Path) -> Result<bool, String> {
    let mut folder = path.parent();
    while let Some(current) = folder
        && current != workspace
        && current.starts_with(workspace)
    {
        let meta = std::fs::symlink_metadata(current)
            .map_err(|e| format!("failed to read {}: {e}", current.display()))?;
        if meta.file_type().is_symlink() {
            return Ok(true);
        }
        folder = current.parent();
    }
    Ok(false)
}

/// Opens the regular file `relative` (`/`-separated) below the folder `root` for reading,
/// following no symbolic link on the way and never leaving `root`: a job may have replaced a
/// folder of its workspace with a link to anywhere the agent can read (the glob that matched
/// the file followed it), and a process it left may do so at any moment.
///
/// Each folder is opened below the one before it with `O_NOFOLLOW`, and `relative` holds only
/// plain names (see [`relative_name`]): no `..`, no absolute path, no link anywhere. (`openat2`
/// with `RESOLVE_NO_SYMLINKS` would do it in one call, but needs Linux 5.6.)
fn open_beneath(root: &rustix::fd::OwnedFd, relative: &str) -> std::io::Result<tokio::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let parts: Vec<&str> = relative.split('/').collect();
    if parts.iter().any(|name| matches!(*name, "" | "." | "..")) {
        return Err(std::io::Error::other("not a plain name"));
    }
    let (file_name, folders) = parts
        .split_last()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let mut folder: Option<rustix::fd::OwnedFd> = None;
    for name in folders {
        let at = folder.as_ref().unwrap_or(root);
        folder = Some(rustix::fs::openat(
            at,
            *name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
    }
    let fd = rustix::fs::openat(
        folder.as_ref().unwrap_or(root),
        *file_name,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(tokio::fs::File::from_std(file))
}

/// `path` relative to `workspace`, `/`-separated, refusing anything that would leave it.
fn relative_name(workspace: &Path, path: &Path) -> Result<String, String> {
    let relative = path
        .strip_prefix(workspace)
        .map_err(|_| format!("{} is outside the workspace", path.display()))?;
    let mut parts = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(part) => parts.push(
                part.to_str()
                    .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))?,
            ),
            _ => return Err(format!("{} is outside the workspace", path.display())),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_files_and_folders_but_not_links() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("dist/sub")).unwrap();
        std::fs::write(ws.join("dist/a.bin"), b"a").unwrap();
        std::fs::write(ws.join("dist/sub/b.txt"), b"bb").unwrap();
        std::fs::write(ws.join("report.xml"), b"ccc").unwrap();
        std::fs::write(ws.join("other.log"), b"d").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", ws.join("dist/link")).unwrap();
        let found = matching_files(ws, &["dist".to_owned(), "*.xml".to_owned()]).unwrap();
        let names: Vec<String> = found
            .iter()
            .map(|(p, _)| relative_name(ws, p).unwrap())
            .collect();
        assert_eq!(names, ["dist/a.bin", "dist/sub/b.txt", "report.xml"]);
        assert_eq!(found.iter().map(|(_, s)| s).sum::<u64>(), 6);
        let deep = matching_files(ws, &["dist/**".to_owned()]).unwrap();
        assert_eq!(deep.len(), 2, "{deep:?}");
        let files = matching_files(ws, &["dist/**/*.txt".to_owned()]).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
    }

    #[test]
    fn nothing_is_kept_through_a_linked_folder() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), b"not yours").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("dist")).unwrap();
        std::fs::write(ws.join("dist/own.txt"), b"mine").unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.join("linked")).unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.join("dist/inner")).unwrap();
        for glob in [
            "linked/*",
            "linked/**",
            "**/*.txt",
            "dist/**",
            "dist/inner/*",
        ] {
            let found = matching_files(ws, &[glob.to_owned()]).unwrap();
            let names: Vec<String> = found
                .iter()
                .map(|(p, _)| relative_name(ws, p).unwrap())
                .collect();
            assert!(
                names.iter().all(|n| n == "dist/own.txt"),
                "{glob}: {names:?}"
            );
        }
        // Opening refuses the link too, should one be put in place after the match.
        let root = rustix::fs::open(
            ws,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert!(open_beneath(&root, "dist/own.txt").is_ok());
        assert!(open_beneath(&root, "linked/secret.txt").is_err());
        assert!(open_beneath(&root, "dist").is_err(), "a folder is no file");
    }
}
