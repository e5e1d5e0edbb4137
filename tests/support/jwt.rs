//! ES256 JWTs signed with the demo key whose public half is the inline JWKS of
//! `envoy/jwt.yaml` (`tests/data/jwt/demo-es256-key.pem`; demo only).

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use std::time::{SystemTime, UNIX_EPOCH};

pub const ISSUER: &str = "https://issuer.llm-filter.example";
pub const AUDIENCE: &str = "llm-gateway";
pub const KEY_ID: &str = "llm-filter-demo";

/// Unpadded base64url (RFC 7515 §2).
pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Claims the demo issuer would put in a token for `sub`, valid for an hour.
pub fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER,
        "sub": sub,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// A compact JWS (ES256) over `claims`, signed with the demo key.
pub fn sign(claims: &serde_json::Value) -> String {
    let path = super::repo().join("tests/data/jwt/demo-es256-key.pem");
    let der = PrivatePkcs8KeyDer::from_pem_file(&path)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": KEY_ID});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key
        .sign(&rng, signing_input.as_bytes())
        .expect("ES256 signing");
    format!("{signing_input}.{}", b64url(sig.as_ref()))
}
