//! Client certificates as credentials. Behind a gateway that requires client certificates
//! (`HODEI_TLS_CLIENT_CA`), a call without a bearer token is made by the principal its
//! verified certificate names: the organization (O) is the tenant, the organizational unit
//! (OU) the role, and the common name (CN) who it is (`hodei-admin tls client` issues them).

use hodei_domain::{Principal, Role, TenantId};

use crate::AuthError;

/// The principal a client certificate (DER) names.
pub fn principal(der: &[u8]) -> Result<Principal, AuthError> {
    let invalid = |what: &str| AuthError::Invalid(format!("client certificate refused: {what}"));
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| invalid(&e.to_string()))?;
    let subject = cert.subject();
    let first = |attrs: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>, name: &str| {
        attrs
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| invalid(&format!("its subject names no {name}")))
    };
    let name = first(subject.iter_common_name().next(), "common name (CN)")?;
    let tenant: TenantId = first(subject.iter_organization().next(), "tenant (O)")?
        .parse()
        .map_err(|e: hodei_domain::IdError| invalid(&e.to_string()))?;
    let role: Role = first(subject.iter_organizational_unit().next(), "role (OU)")?
        .parse()
        .map_err(|e: hodei_domain::IdError| invalid(&e.to_string()))?;
    Ok(Principal {
        subject: format!("cert:{name}"),
        tenant,
        role,
    })
}
