//! OIDC/JWT access tokens, verified offline against the issuer's JWKS: the signature by the
//! key the token names (`kid`), the issuer, the audience when one is configured, and the
//! expiry. The tenant and role come from two claims (by default `hodei_tenant` and
//! `hodei_role`); the principal's subject is `sub` prefixed with the issuer.

use hodei_domain::{Principal, Role, TenantId};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::AuthError;

/// What a verifier checks, besides the keys.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must name, if any.
    pub audience: Option<String>,
    /// The claim holding the tenant.
    pub tenant_claim: String,
    /// The claim holding the role.
    pub role_claim: String,
}

/// Verifies JWTs against one JWKS.
pub struct JwtVerifier {
    settings: JwtSettings,
    keys: JwkSet,
}

impl JwtVerifier {
    /// A verifier of tokens signed by the keys of `jwks` (a JWKS document, JSON).
    pub fn new(settings: JwtSettings, jwks: &str) -> Result<Self, AuthError> {
        let keys: JwkSet =
            serde_json::from_str(jwks).map_err(|e| AuthError::Jwks(e.to_string()))?;
        if keys.keys.is_empty() {
            return Err(AuthError::Jwks("it holds no keys".into()));
        }
        Ok(Self { settings, keys })
    }

    /// Whether the JWKS holds a key with id `kid`: a token naming another key may have been
    /// signed by a key the issuer rotated in since the JWKS was read.
    pub fn knows_key(&self, kid: &str) -> bool {
        self.keys.find(kid).is_some()
    }

    /// The key id a token names, if it parses as a JWT at all.
    pub fn key_id(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid)
    }

    /// The principal a token stands for, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let invalid = |what: &str| AuthError::Invalid(format!("jwt refused: {what}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e.to_string()))?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(invalid("symmetric algorithms are not accepted"));
        }
        let jwk = match header.kid.as_deref() {
            Some(kid) => self.keys.find(kid),
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| invalid("no key in the jwks matches its kid"))?;
        if let Some(alg) = jwk.common.key_algorithm
            && alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(invalid("its algorithm is not its key's"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(&e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        match &self.settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|e| invalid(&e.to_string()))?;
        let claim = |name: &str| {
            data.claims
                .get(name)
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| invalid(&format!("claim {name} is missing or not a string")))
        };
        let subject = claim("sub")?;
        let tenant: TenantId = claim(&self.settings.tenant_claim)?
            .parse()
            .map_err(|e: hodei_domain::IdError| invalid(&e.to_string()))?;
        let role: Role = claim(&self.settings.role_claim)?
            .parse()
            .map_err(|e: hodei_domain::IdError| invalid(&e.to_string()))?;
        Ok(Principal {
            subject: format!("{}#{subject}", self.settings.issuer),
            tenant,
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    use super::*;

    struct Issuer {
        pkcs8: Vec<u8>,
        jwks: String,
    }

    fn issuer(kid: &str) -> Issuer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}]});
        Issuer {
            pkcs8,
            jwks: jwks.to_string(),
        }
    }

    fn sign(issuer: &Issuer, kid: &str, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&issuer.pkcs8)).unwrap()
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            issuer: "https://id.example".into(),
            audience: Some("hodei".into()),
            tenant_claim: "hodei_tenant".into(),
            role_claim: "hodei_role".into(),
        }
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        serde_json::json!({
            "iss": "https://id.example", "aud": "hodei", "sub": "alice",
            "exp": chrono::Utc::now().timestamp() + exp_in,
            "hodei_tenant": "acme", "hodei_role": "submitter",
        })
    }

    #[test]
    fn a_token_signed_by_a_jwks_key_is_its_principal() {
        let issuer = issuer("k1");
        let verifier = JwtVerifier::new(settings(), &issuer.jwks).unwrap();
        let principal = verifier.verify(&sign(&issuer, "k1", claims(60))).unwrap();
        assert_eq!(principal.subject, "https://id.example#alice");
        assert_eq!(principal.tenant.as_str(), "acme");
        assert_eq!(principal.role, Role::Submitter);
        assert!(verifier.knows_key("k1") && !verifier.knows_key("k2"));
    }

    #[test]
    fn expired_foreign_misaddressed_or_roleless_tokens_are_refused() {
        let issuer1 = issuer("k1");
        let verifier = JwtVerifier::new(settings(), &issuer1.jwks).unwrap();
        let refused = |token: String| verifier.verify(&token).unwrap_err().to_string();
        assert!(refused(sign(&issuer1, "k1", claims(-3600))).contains("Expired"));
        let other = issuer("k1");
        assert!(refused(sign(&other, "k1", claims(60))).contains("Signature"));
        assert!(refused(sign(&issuer1, "k2", claims(60))).contains("kid"));
        let mut wrong_aud = claims(60);
        wrong_aud["aud"] = "other".into();
        assert!(refused(sign(&issuer1, "k1", wrong_aud)).contains("Audience"));
        let mut no_role = claims(60);
        no_role.as_object_mut().unwrap().remove("hodei_role");
        assert!(refused(sign(&issuer1, "k1", no_role)).contains("hodei_role"));
        let mut bad_role = claims(60);
        bad_role["hodei_role"] = "root".into();
        assert!(refused(sign(&issuer1, "k1", bad_role)).contains("role"));
        assert!(refused("not.a.jwt".into()).contains("jwt refused"));
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(60),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(refused(hs).contains("symmetric"));
    }
}
