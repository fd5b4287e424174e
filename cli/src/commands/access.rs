//! The access commands: whoami, token create/list/revoke, and audit.

use std::process::ExitCode;

use hodei_proto::v1 as pb;
use serde_json::{Value, json};

use super::{print_answer, print_page};
use crate::cli::{OutputFormat, TokenCommand};
use crate::client::Clients;
use crate::table::Table;
use crate::wire::{rfc3339, rfc3339_secs};

pub async fn whoami(clients: &mut Clients, format: OutputFormat) -> anyhow::Result<ExitCode> {
    let me = clients
        .access
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    let mut t = Table::new();
    t.row(["subject:", me.subject.as_str()]);
    t.row(["tenant:", me.tenant.as_str()]);
    t.row(["role:", me.role.as_str()]);
    print_answer(
        format,
        t.render().trim_end(),
        || json!({"subject": me.subject, "tenant": me.tenant, "role": me.role}),
    )
}

pub async fn token(
    clients: &mut Clients,
    command: TokenCommand,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Create {
            name,
            tenant,
            role,
            expires_in,
        } => {
            let created = clients
                .access
                .create_token(pb::CreateTokenRequest {
                    name,
                    tenant,
                    role,
                    expires_in_seconds: expires_in.map_or(0, |d| d.as_secs().max(1)),
                })
                .await?
                .into_inner();
            let token = created.token.unwrap_or_default();
            eprintln!(
                "token {} ({} of {}): the secret below is shown only now",
                token.id, token.role, token.tenant
            );
            print_answer(format, &created.secret, || {
                let mut value = token_json(&token);
                value["secret"] = Value::from(created.secret.clone());
                value
            })
        }
        TokenCommand::List { tenant } => {
            let tokens = clients
                .access
                .list_tokens(pb::ListTokensRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tokens;
            print_page(
                format,
                "tokens",
                || tokens_table(&tokens),
                || tokens.iter().map(token_json).collect(),
                "",
            )
        }
        TokenCommand::Revoke { id } => {
            let revoked = clients
                .access
                .revoke_token(pb::RevokeTokenRequest { token_id: id })
                .await?
                .into_inner()
                .token
                .unwrap_or_default();
            print_answer(format, &format!("token {} revoked", revoked.id), || {
                token_json(&revoked)
            })
        }
    }
}

pub async fn audit(
    clients: &mut Clients,
    tenant: Option<String>,
    limit: Option<u32>,
    page_token: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let page = clients
        .access
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: tenant.unwrap_or_default(),
            page_size: limit.unwrap_or(0),
            page_token: page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_page(
        format,
        "events",
        || {
            let mut t = Table::with_header(&[
                "AT", "SUBJECT", "TENANT", "ROLE", "ACTION", "TARGET", "OUTCOME",
            ]);
            for e in &page.events {
                t.row([
                    rfc3339_secs(e.at.as_ref()),
                    e.subject.clone(),
                    e.tenant.clone(),
                    e.role.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    if e.detail.is_empty() {
                        e.outcome.clone()
                    } else {
                        format!("{}: {}", e.outcome, e.detail)
                    },
                ]);
            }
            t.render()
        },
        || {
            page.events
                .iter()
                .map(|e| {
                    json!({
                        "id": e.id, "at": rfc3339(e.at.as_ref()), "subject": e.subject,
                        "tenant": e.tenant, "role": e.role, "action": e.action,
                        "target": e.target, "outcome": e.outcome, "detail": e.detail,
                    })
                })
                .collect()
        },
        &page.next_page_token,
    )
}

fn tokens_table(tokens: &[pb::ApiToken]) -> String {
    let mut t = Table::with_header(&[
        "ID", "NAME", "TENANT", "ROLE", "CREATED", "EXPIRES", "REVOKED",
    ]);
    for token in tokens {
        t.row([
            token.id.clone(),
            token.name.clone(),
            token.tenant.clone(),
            token.role.clone(),
            rfc3339_secs(token.created_at.as_ref()),
            rfc3339_secs(token.expires_at.as_ref()),
            rfc3339_secs(token.revoked_at.as_ref()),
        ]);
    }
    t.render()
}

fn token_json(token: &pb::ApiToken) -> Value {
    json!({
        "id": token.id, "name": token.name, "tenant": token.tenant, "role": token.role,
        "created_by": token.created_by, "created_at": rfc3339(token.created_at.as_ref()),
        "expires_at": rfc3339(token.expires_at.as_ref()),
        "revoked_at": rfc3339(token.revoked_at.as_ref()),
    })
}
