//! A local certificate authority for TLS: `hodei-admin tls init` makes one for a deployment
//! without its own PKI, and tests make one per system. Keys are ECDSA P-256.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::AuthError;

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that signs server and client certificates.
pub struct LocalCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl LocalCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Self, AuthError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// A CA written out earlier: its certificate and its private key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, AuthError> {
        let key = KeyPair::from_pem(key_pem)?;
        // The same subject and key signed again: certificates it signs chain to the CA's
        // certificate as written.
        let cert = CertificateParams::from_ca_cert_pem(cert_pem)?.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA's certificate, PEM-encoded: what clients trust.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key, PEM-encoded: keep it where only operators read it.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A client certificate that is also a credential: `name` of `tenant` with `role`
    /// (see [`crate::cert`]).
    pub fn principal_client(
        &self,
        name: &str,
        tenant: &hodei_domain::TenantId,
        role: hodei_domain::Role,
    ) -> Result<Issued, AuthError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, tenant.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[String]) -> Result<Issued, AuthError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose common name is `name`.
    pub fn client(&self, name: &str) -> Result<Issued, AuthError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<Issued, AuthError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_that_name_their_principal() {
        let ca = LocalCa::new("test ca").unwrap();
        let again = LocalCa::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let tenant: hodei_domain::TenantId = "team-a".parse().unwrap();
        let issued = again
            .principal_client("ci-bot", &tenant, hodei_domain::Role::Submitter)
            .unwrap();
        let der = pem_der(&issued.cert_pem);
        let principal = crate::cert::principal(&der).unwrap();
        assert_eq!(principal.subject, "cert:ci-bot");
        assert_eq!(principal.tenant, tenant);
        assert_eq!(principal.role, hodei_domain::Role::Submitter);
        let plain = ca.client("no principal").unwrap();
        let refused = crate::cert::principal(&pem_der(&plain.cert_pem))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("tenant (O)"), "{refused}");
    }

    /// The DER inside one PEM certificate.
    fn pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
