//! How a failed command is reported: one line on stderr (one per invalid field of a job or
//! pipeline file) and exit code 2.

use std::error::Error as _;
use std::io;
use std::process::ExitCode;

use tonic::{Code, ConnectError, Status};

use crate::spec::InvalidSpec;

/// Exit code of every failure of the CLI itself (as opposed to a job's own exit code).
pub const FAILURE: u8 = 2;

/// Prints `err` as one line on stderr and picks the exit code.
pub fn report(err: &anyhow::Error, server: &str) -> ExitCode {
    // `hodei logs ID | head` closes stdout early; that is not worth an error.
    if err
        .downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    {
        return ExitCode::SUCCESS;
    }
    for line in messages(err, server) {
        eprintln!("{line}");
    }
    ExitCode::from(FAILURE)
}

/// The lines to print for `err`: one per invalid field of a job or pipeline file, else one.
pub fn messages(err: &anyhow::Error, server: &str) -> Vec<String> {
    match err.downcast_ref::<InvalidSpec>() {
        Some(invalid) => invalid
            .lines()
            .iter()
            .map(|line| format!("error: {}", one_line(line)))
            .collect(),
        None => vec![message(err, server)],
    }
}

/// The line to print for `err`, starting with "error: ".
pub fn message(err: &anyhow::Error, server: &str) -> String {
    let line = match err.downcast_ref::<Status>() {
        Some(status) => match connect_failure(status) {
            Some(reason) => format!("cannot reach hodei at {server}: {reason}"),
            None if status.code() == Code::Unauthenticated => format!(
                "{}: {} (pass a token with --token or HODEI_TOKEN)",
                code_name(status.code()),
                status.message()
            ),
            None => format!("{}: {}", code_name(status.code()), status.message()),
        },
        None => format!("{err:#}"),
    };
    format!("error: {}", one_line(&line))
}

/// Why the channel could not connect, when that is what `status` is about: the chain of
/// causes under tonic's `ConnectError`, such as "tcp connect error: Connection refused".
fn connect_failure(status: &Status) -> Option<String> {
    let mut source = status.source();
    while let Some(err) = source {
        if let Some(connect) = err.downcast_ref::<ConnectError>() {
            let mut reasons: Vec<String> = Vec::new();
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(connect);
            while let Some(c) = cause {
                let text = c.to_string();
                // ConnectError displays its inner error, so neighbours often repeat.
                if reasons.last() != Some(&text) && !text.is_empty() {
                    reasons.push(text);
                }
                cause = c.source();
            }
            return Some(reasons.join(": "));
        }
        source = err.source();
    }
    None
}

/// The gRPC name of a code, lowercase: "not_found", "invalid_argument".
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Multi-line server messages joined with "; " so the report stays on one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "http://127.0.0.1:50051";

    #[test]
    fn statuses_print_code_and_message() {
        let err = anyhow::Error::from(Status::not_found("job j1 not found"));
        assert_eq!(message(&err, SERVER), "error: not_found: job j1 not found");
        let err = anyhow::Error::from(Status::invalid_argument(
            "spec.name: must not be empty\nspec.priority: out of range",
        ));
        assert_eq!(
            message(&err, SERVER),
            "error: invalid_argument: spec.name: must not be empty; spec.priority: out of range"
        );
    }

    #[test]
    fn other_errors_print_their_chain() {
        let err = anyhow::anyhow!("boom").context("failed to read");
        assert_eq!(message(&err, SERVER), "error: failed to read: boom");
    }

    #[tokio::test]
    async fn an_unreachable_server_says_so() {
        // Port 1 on localhost: nothing listens there, the connection is refused at once.
        let server = "http://127.0.0.1:1";
        let mut clients = crate::client::Clients::connect_lazy(&crate::client::Connection {
            server,
            ..Default::default()
        })
        .unwrap();
        let status = clients
            .jobs
            .get_job(hodei_proto::v1::GetJobRequest {
                job_id: "j1".into(),
                as_of: None,
            })
            .await
            .unwrap_err();
        let line = message(&anyhow::Error::from(status), server);
        assert!(
            line.starts_with("error: cannot reach hodei at http://127.0.0.1:1: "),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn an_invalid_job_file_prints_a_line_per_field() {
        let err = anyhow::Error::from(InvalidSpec {
            source: "job.yaml".into(),
            errors: vec![
                hodei_domain::FieldError::new("name", "must not be empty"),
                hodei_domain::FieldError::new("priority", "must be between -1000 and 1000"),
            ],
        });
        assert_eq!(
            messages(&err, SERVER),
            [
                "error: job.yaml: name: must not be empty",
                "error: job.yaml: priority: must be between -1000 and 1000",
            ]
        );
        let err = anyhow::anyhow!("boom");
        assert_eq!(messages(&err, SERVER), ["error: boom"]);
    }

    #[test]
    fn broken_pipes_are_not_errors() {
        let err = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(report(&err, SERVER), ExitCode::SUCCESS);
    }
}
