//! Signing and checking signatures over entry ids. A signature of an entry's id vouches, through
//! the `prev` links, for every earlier entry of the same author.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::error::VerifyError;
use crate::ids::{EntryId, NodeId, Signature};

/// A node's signing key.
#[derive(Clone)]
pub struct Keypair {
    key: SigningKey,
}

impl Keypair {
    /// The key pair whose secret is `secret`.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// The 32 secret bytes, for storing in the identity file.
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// This node's id: its public key.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// Signs an entry id.
    pub fn sign(&self, id: &EntryId) -> Signature {
        Signature(self.key.sign(id.as_bytes()).to_bytes())
    }

    /// The underlying ed25519 key, for deriving the TLS identity.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair({})", self.node_id().short())
    }
}

/// Checks that `sig` is `author`'s signature of `id`. `seq` only labels the error.
///
/// The check is ed25519's strict one: a small-order (weak) public key, for which a signature
/// can be made without any secret, and a non-canonical signature are refused, so nobody can
/// forge entries for the small-order author ids.
pub fn verify_signature(
    author: &NodeId,
    seq: u64,
    id: &EntryId,
    sig: &Signature,
) -> Result<(), VerifyError> {
    let key = VerifyingKey::from_bytes(author.as_bytes())
        .map_err(|_| VerifyError::BadAuthorKey { author: *author })?;
    if key.is_weak() {
        return Err(VerifyError::BadAuthorKey { author: *author });
    }
    key.verify_strict(id.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig.0))
        .map_err(|_| VerifyError::BadSignature {
            author: *author,
            seq,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let kp = Keypair::from_secret([9; 32]);
        let id = EntryId([3; 32]);
        let sig = kp.sign(&id);
        verify_signature(&kp.node_id(), 1, &id, &sig).unwrap();
        let other = EntryId([4; 32]);
        assert!(matches!(
            verify_signature(&kp.node_id(), 1, &other, &sig),
            Err(VerifyError::BadSignature { seq: 1, .. })
        ));
    }

    #[test]
    fn nothing_verifies_under_a_small_order_key() {
        // The identity point as a public key: with R the identity and s = 0, the plain ed25519
        // equation [s]B = R + [k]A holds for every message, so anyone could sign as it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let author = NodeId(identity);
        let mut forged = [0u8; Signature::LEN];
        forged[0] = 1;
        let key = VerifyingKey::from_bytes(&identity).expect("the identity point decodes");
        let id = EntryId([7; 32]);
        assert!(
            ed25519_dalek::Verifier::verify(
                &key,
                id.as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&forged)
            )
            .is_ok(),
            "the forgery passes the non-strict check"
        );
        assert!(matches!(
            verify_signature(&author, 1, &id, &Signature(forged)),
            Err(VerifyError::BadAuthorKey { .. })
        ));
    }
}
