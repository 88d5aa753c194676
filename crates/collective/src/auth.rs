//! The proof of the epoch secret in the rendezvous handshake (pure, no I/O).
//!
//! Every accepted connection runs four legs, each frame bounded by the hello deadline:
//!
//! ```text
//! listener -> dialer   Challenge  nonce_L (fresh, 32 random bytes)
//! dialer   -> listener Hello      group id, dialer rank, world, nonce_D, MAC(Dial)
//! listener -> dialer   Hello      group id, listener rank, world, nonce_L, MAC(Answer)
//! dialer   -> listener Confirm    group id, dialer rank, world, nonce_D, MAC(Confirm)
//! ```
//!
//! Each MAC is HMAC-SHA256 under the plan epoch's secret over a [`Transcript`]: the leg,
//! the group id, the world size, both ranks, both nonces and, on a TLS link, a value
//! exported from the TLS session (so a proof is bound to the one connection it was made
//! on). A hello replayed from another connection carries a MAC over another listener
//! nonce and is refused; so is one made without the secret. The listener's answer proves
//! the secret too, over the dialer's fresh nonce, so a dialer never takes a link to an
//! impostor. A group without a secret (tests, loopback benchmarks) uses
//! [`open_key`], derived from the public group id: the same protocol, authenticating
//! nothing.
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Size of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Size of a handshake MAC (HMAC-SHA256).
pub const MAC_BYTES: usize = 32;
/// Size of the TLS channel binding mixed into the MACs (zeros on plain TCP).
pub const BINDING_BYTES: usize = 32;
/// The TLS exporter label of the channel binding.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-phalanx-ring-hello";

/// A MAC key: a plan epoch's secret, or [`open_key`].
pub type Key = [u8; 32];

/// Which leg of the handshake a MAC authenticates (so one leg's MAC never passes for
/// another's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Leg {
    /// The dialer's hello.
    Dial = 1,
    /// The listener's answer.
    Answer = 2,
    /// The dialer's confirmation.
    Confirm = 3,
}

/// Everything a handshake MAC covers besides its leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    pub group_id: u64,
    pub world: u32,
    /// The rank that dials (the listener's left neighbour).
    pub dialer_rank: u32,
    /// The rank that listens.
    pub listener_rank: u32,
    pub listener_nonce: [u8; NONCE_BYTES],
    pub dialer_nonce: [u8; NONCE_BYTES],
    /// A TLS exporter value of the connection ([`BINDING_LABEL`]); zeros on plain TCP.
    pub binding: [u8; BINDING_BYTES],
}

/// The key of a group that has no epoch secret: public, derived from the group id. The
/// handshake then still refuses another group's hellos, but proves nothing.
pub fn open_key(group_id: u64) -> Key {
    let mut h = Sha256::new();
    h.update(b"phalanx open ring v1\0");
    h.update(group_id.to_le_bytes());
    h.finalize().into()
}

fn hmac_of(key: &Key, leg: Leg, t: &Transcript) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key size");
    m.update(b"phalanx ring hello v1\0");
    m.update(&[leg as u8]);
    m.update(&t.group_id.to_le_bytes());
    m.update(&t.world.to_le_bytes());
    m.update(&t.dialer_rank.to_le_bytes());
    m.update(&t.listener_rank.to_le_bytes());
    m.update(&t.listener_nonce);
    m.update(&t.dialer_nonce);
    m.update(&t.binding);
    m
}

/// The MAC of `leg` over `t` under `key`.
pub fn mac(key: &Key, leg: Leg, t: &Transcript) -> [u8; MAC_BYTES] {
    hmac_of(key, leg, t).finalize().into_bytes().into()
}

/// Whether `got` is the MAC of `leg` over `t` under `key` (compared in constant time).
pub fn verify(key: &Key, leg: Leg, t: &Transcript, got: &[u8; MAC_BYTES]) -> bool {
    hmac_of(key, leg, t).verify_slice(got).is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Transcript {
        Transcript {
            group_id: 7,
            world: 3,
            dialer_rank: 2,
            listener_rank: 0,
            listener_nonce: [1; 32],
            dialer_nonce: [2; 32],
            binding: [0; 32],
        }
    }

    #[test]
    fn a_mac_verifies_only_with_its_key_leg_and_transcript() {
        let key = [9u8; 32];
        let m = mac(&key, Leg::Dial, &t());
        assert!(verify(&key, Leg::Dial, &t(), &m));
        assert!(!verify(&[8u8; 32], Leg::Dial, &t(), &m), "another key");
        assert!(!verify(&key, Leg::Confirm, &t(), &m), "another leg");
        let fields: [fn(&mut Transcript); 7] = [
            |t| t.group_id += 1,
            |t| t.world += 1,
            |t| t.dialer_rank = 1,
            |t| t.listener_rank = 1,
            |t| t.listener_nonce[31] ^= 1,
            |t| t.dialer_nonce[0] ^= 1,
            |t| t.binding[5] ^= 1,
        ];
        for (i, change) in fields.iter().enumerate() {
            let mut other = t();
            change(&mut other);
            assert!(!verify(&key, Leg::Dial, &other, &m), "field {i} changed");
        }
    }

    #[test]
    fn open_keys_differ_by_group_and_nonces_are_fresh() {
        assert_ne!(open_key(1), open_key(2));
        assert_ne!(nonce(), nonce());
    }
}
