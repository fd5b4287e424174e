//! Who may do what: the roles a credential carries and the tenant it acts for. Every request
//! is made by a [`Principal`]; the gateway asks it whether an [`Action`] is allowed and which
//! tenant a request acts for, and hides every other tenant's objects behind NOT_FOUND.

use crate::ids::{TenantId, named_enum};

named_enum! {
    /// What a credential may do, from least to most. Each role includes the ones before it.
    #[derive(PartialOrd, Ord)]
    pub enum Role ("role") {
        /// Reads, watches and streams logs and artifacts of its tenant's jobs and runs, and
        /// reads the fleet's workers.
        Viewer = "viewer",
        /// Plus submits and cancels its tenant's jobs and pipeline runs.
        Submitter = "submitter",
        /// Plus drains workers.
        Operator = "operator",
        /// Everything, for every tenant: tokens and the audit log too.
        Admin = "admin",
    }
}

named_enum! {
    /// What a request does, as far as permissions go.
    pub enum Action ("action") {
        /// Get, list, watch, logs, history, artifacts.
        Read = "read",
        /// Submit jobs and pipelines.
        Submit = "submit",
        /// Cancel jobs and pipeline runs.
        Cancel = "cancel",
        /// Drain workers.
        Drain = "drain",
        /// Create, list and revoke tokens; read the audit log.
        Administer = "administer",
    }
}

impl Role {
    /// The least role that may perform `action`.
    pub fn least_for(action: Action) -> Role {
        match action {
            Action::Read => Role::Viewer,
            Action::Submit | Action::Cancel => Role::Submitter,
            Action::Drain => Role::Operator,
            Action::Administer => Role::Admin,
        }
    }

    /// Whether this role may perform `action`.
    pub fn allows(self, action: Action) -> bool {
        self >= Role::least_for(action)
    }
}

/// Why a principal may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("role {role} may not {action}; it needs {needs}")]
    Denied {
        role: Role,
        action: Action,
        needs: Role,
    },
    #[error("role {role} of tenant {own} may not act for tenant {requested}; it needs admin")]
    OtherTenant {
        role: Role,
        own: TenantId,
        requested: TenantId,
    },
}

/// An authenticated caller: who it is (a token's id or a JWT's subject), the tenant its
/// credential belongs to and its role there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub tenant: TenantId,
    pub role: Role,
}

impl Principal {
    /// Refuses `action` unless the principal's role allows it.
    pub fn authorize(&self, action: Action) -> Result<(), AccessError> {
        if self.role.allows(action) {
            Ok(())
        } else {
            Err(AccessError::Denied {
                role: self.role,
                action,
                needs: Role::least_for(action),
            })
        }
    }

    /// Whether objects of `tenant` are visible to this principal: its own tenant's, or every
    /// tenant's for an admin.
    pub fn sees(&self, tenant: &TenantId) -> bool {
        self.role == Role::Admin || &self.tenant == tenant
    }

    /// The tenant a request acts for: the credential's own when the request names none, or
    /// the one it names when that is its own or the principal is an admin.
    pub fn acting_for(&self, requested: Option<TenantId>) -> Result<TenantId, AccessError> {
        match requested {
            None => Ok(self.tenant.clone()),
            Some(tenant) if self.sees(&tenant) => Ok(tenant),
            Some(requested) => Err(AccessError::OtherTenant {
                role: self.role,
                own: self.tenant.clone(),
                requested,
            }),
        }
    }

    /// The tenant a listing is limited to: the principal's own, or for an admin the one it
    /// names (none: every tenant).
    pub fn listing_scope(
        &self,
        requested: Option<TenantId>,
    ) -> Result<Option<TenantId>, AccessError> {
        match (self.role, requested) {
            (Role::Admin, requested) => Ok(requested),
            (_, requested) => self.acting_for(requested).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(tenant: &str, role: Role) -> Principal {
        Principal {
            subject: "t".into(),
            tenant: tenant.parse().unwrap(),
            role,
        }
    }

    #[test]
    fn each_role_includes_the_ones_before_it() {
        let allowed = |role: Role| {
            Action::ALL
                .into_iter()
                .filter(|a| role.allows(*a))
                .collect::<Vec<_>>()
        };
        assert_eq!(allowed(Role::Viewer), [Action::Read]);
        assert_eq!(
            allowed(Role::Submitter),
            [Action::Read, Action::Submit, Action::Cancel]
        );
        assert_eq!(
            allowed(Role::Operator),
            [Action::Read, Action::Submit, Action::Cancel, Action::Drain]
        );
        assert_eq!(allowed(Role::Admin), Action::ALL);
        let denied = principal("a", Role::Viewer)
            .authorize(Action::Cancel)
            .unwrap_err();
        assert_eq!(
            denied.to_string(),
            "role viewer may not cancel; it needs submitter"
        );
    }

    #[test]
    fn only_an_admin_acts_for_or_lists_another_tenant() {
        let a: TenantId = "a".parse().unwrap();
        let b: TenantId = "b".parse().unwrap();
        let operator = principal("a", Role::Operator);
        assert_eq!(operator.acting_for(None).unwrap(), a);
        assert_eq!(operator.acting_for(Some(a.clone())).unwrap(), a);
        let refused = operator.acting_for(Some(b.clone())).unwrap_err();
        assert!(refused.to_string().contains("may not act for tenant b"));
        assert!(!operator.sees(&b));
        assert_eq!(operator.listing_scope(None).unwrap(), Some(a.clone()));
        let admin = principal("a", Role::Admin);
        assert!(admin.sees(&b));
        assert_eq!(admin.acting_for(Some(b.clone())).unwrap(), b);
        assert_eq!(admin.listing_scope(None).unwrap(), None);
        assert_eq!(admin.listing_scope(Some(b.clone())).unwrap(), Some(b));
    }
}
