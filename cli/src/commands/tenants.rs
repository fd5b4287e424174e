//! The tenant commands: list, get, set and reset.

use std::process::ExitCode;

use anyhow::Context;
use hodei_proto::v1 as pb;
use serde_json::json;

use super::{print_json, print_text};
use crate::cli::{OutputFormat, TenantCommand};
use crate::client::Clients;
use crate::{human, json};

pub async fn execute(
    clients: &mut Clients,
    command: TenantCommand,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let tenants = match command {
        TenantCommand::List => {
            clients
                .tenants
                .list_tenants(pb::ListTenantsRequest {})
                .await?
                .into_inner()
                .tenants
        }
        TenantCommand::Get { tenant } => vec![
            clients
                .tenants
                .get_tenant(pb::GetTenantRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .tenant
                .context("the server answered without the tenant")?,
        ],
        TenantCommand::Set {
            tenant,
            weight,
            max_queued_jobs,
            max_running_jobs,
            max_cpu_millis,
            max_memory_mb,
            max_priority,
        } => vec![
            clients
                .tenants
                .set_tenant_policy(pb::SetTenantPolicyRequest {
                    tenant,
                    policy: Some(pb::TenantPolicy {
                        weight,
                        max_queued_jobs,
                        max_running_jobs,
                        max_cpu_millis,
                        max_memory_mb,
                        max_priority,
                    }),
                })
                .await?
                .into_inner()
                .tenant
                .context("the server answered without the tenant")?,
        ],
        TenantCommand::Reset { tenant } => {
            clients
                .tenants
                .delete_tenant_policy(pb::DeleteTenantPolicyRequest {
                    tenant: tenant.clone(),
                })
                .await?;
            match format {
                OutputFormat::Human => print_text(&format!("tenant {tenant} policy removed\n"))?,
                OutputFormat::Json => print_json(&json!({ "tenant": tenant, "reset": true }))?,
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    match format {
        OutputFormat::Human => print_text(&human::tenants_table(&tenants))?,
        OutputFormat::Json => print_json(&json!({
            "tenants": tenants.iter().map(json::tenant).collect::<Vec<_>>(),
        }))?,
    }
    Ok(ExitCode::SUCCESS)
}
