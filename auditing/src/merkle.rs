//! Tamper-evident audit trail for medpipe: an RFC 6962 (Certificate Transparency) style
//! Merkle tree with inclusion and consistency proofs, plus Ed25519-signed tree heads.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Errors from proof generation, proof verification and tree-head verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MerkleError {
    #[error("leaf index {index} is out of range for tree size {tree_size}")]
    IndexOutOfRange { index: u64, tree_size: u64 },
    #[error("consistency proofs from an empty (size 0) tree are not defined")]
    OldSizeZero,
    #[error("old tree size {old_size} exceeds new tree size {new_size}")]
    OldSizeExceedsNewSize { old_size: u64, new_size: u64 },
    #[error("proof has more elements than the tree shape allows")]
    ProofTooLong,
    #[error("proof has fewer elements than the tree shape requires")]
    ProofTooShort,
    #[error("consistency proof between different tree sizes must not be empty")]
    EmptyConsistencyProof,
    #[error("consistency proof between equal tree sizes must be empty")]
    NonEmptyProofForEqualSizes,
    #[error("computed root does not match the expected root")]
    RootMismatch,
    #[error("computed old root does not match the expected old root")]
    OldRootMismatch,
    #[error("computed new root does not match the expected new root")]
    NewRootMismatch,
    #[error("root_hex is not 64 lowercase hex characters")]
    InvalidRootHex,
    #[error("signature_hex is not 128 lowercase hex characters")]
    InvalidSignatureHex,
    #[error("tree head signature does not verify")]
    BadSignature,
    #[error("internal invariant violated: {0}")]
    Internal(&'static str),
}

/// RFC 6962 leaf hash: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// One level up: hash adjacent pairs; an unpaired last node is promoted unchanged.
/// Bottom-up reduction this way yields exactly the RFC 6962 split-at-power-of-two tree.
fn next_level(level: &[Hash]) -> Vec<Hash> {
    let (pairs, rest) = level.as_chunks::<2>();
    pairs
        .iter()
        .map(|[l, r]| node_hash(l, r))
        .chain(rest.iter().copied())
        .collect()
}

/// Largest power of two strictly less than `n` (0 for n <= 1).
fn split_point(n: usize) -> usize {
    match n.saturating_sub(1).checked_ilog2() {
        Some(e) => 1usize << e,
        None => 0,
    }
}

/// Merkle Tree Hash of leaf hashes per RFC 6962 section 2.1 (split at the largest power of
/// two < n). Empty tree = SHA-256("").
pub fn root(leaves: &[Hash]) -> Hash {
    if leaves.len() == 1 {
        return leaves.first().copied().unwrap_or_else(empty_root);
    }
    let mut level = next_level(leaves);
    while level.len() > 1 {
        level = next_level(&level);
    }
    level.first().copied().unwrap_or_else(empty_root)
}

/// The Merkle tree hash of a growing log, kept as the roots of its perfect subtrees (one
/// per set bit of the size, largest first). Appending is O(log n) and memory is O(log n),
/// so a verifier can check a signed head at any size while streaming millions of leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactTree {
    size: u64,
    /// (height, root) of each perfect subtree, left to right; heights strictly decrease.
    peaks: Vec<(u32, Hash)>,
}

impl CompactTree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one leaf hash (already `leaf_hash`ed).
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.peaks.last() {
            if h != node.0 {
                break;
            }
            self.peaks.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The RFC 6962 root of the leaves pushed so far: the peaks folded right to left,
    /// which is the split-at-the-largest-power-of-two tree.
    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// Audit path for leaf `index` in a tree of `leaves` (RFC 6962 2.1.1), ordered from the
/// leaf's sibling up to the root. Err if index out of range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Result<Vec<Hash>, MerkleError> {
    if index >= leaves.len() {
        return Err(MerkleError::IndexOutOfRange {
            index: index as u64,
            tree_size: leaves.len() as u64,
        });
    }
    let mut proof = Vec::new();
    let mut level = leaves.to_vec();
    let mut i = index;
    while level.len() > 1 {
        // A missing sibling means this node is the unpaired last one and is promoted.
        if let Some(sibling) = level.get(i ^ 1) {
            proof.push(*sibling);
        }
        level = next_level(&level);
        i >>= 1;
    }
    Ok(proof)
}

/// Verifies an inclusion proof (RFC 9162 2.1.3.2 algorithm), returns Ok(()) or a precise error.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if index >= tree_size {
        return Err(MerkleError::IndexOutOfRange { index, tree_size });
    }
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(MerkleError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::ProofTooShort);
    }
    if r != *root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Consistency proof between an old tree size and the current one (RFC 6962 2.1.2).
/// `old_size == leaves.len()` gives an empty proof; `old_size == 0` is rejected.
pub fn consistency_proof(leaves: &[Hash], old_size: usize) -> Result<Vec<Hash>, MerkleError> {
    if old_size == 0 {
        return Err(MerkleError::OldSizeZero);
    }
    if old_size > leaves.len() {
        return Err(MerkleError::OldSizeExceedsNewSize {
            old_size: old_size as u64,
            new_size: leaves.len() as u64,
        });
    }
    // Iterative SUBPROOF(m, D[n], b); nodes are collected leaf-side last, then reversed.
    let mut proof = Vec::new();
    let (mut sub, mut m, mut whole_old_tree) = (leaves, old_size, true);
    while m < sub.len() {
        let k = split_point(sub.len());
        let (left, right) = sub
            .split_at_checked(k)
            .ok_or(MerkleError::Internal("split point beyond subtree"))?;
        if m <= k {
            proof.push(root(right));
            sub = left;
        } else {
            proof.push(root(left));
            sub = right;
            m -= k;
            whole_old_tree = false;
        }
    }
    if !whole_old_tree {
        proof.push(root(sub));
    }
    proof.reverse();
    Ok(proof)
}

/// Verifies a consistency proof (RFC 9162 2.1.4.2). Equal sizes require an empty proof and
/// equal roots; `old_size == 0` is rejected.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size == 0 {
        return Err(MerkleError::OldSizeZero);
    }
    if old_size > new_size {
        return Err(MerkleError::OldSizeExceedsNewSize { old_size, new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(MerkleError::NonEmptyProofForEqualSizes);
        }
        if old_root != new_root {
            return Err(MerkleError::RootMismatch);
        }
        return Ok(());
    }
    let (first, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        proof
            .split_first()
            .ok_or(MerkleError::EmptyConsistencyProof)?
    };
    if proof.is_empty() {
        return Err(MerkleError::EmptyConsistencyProof);
    }
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return Err(MerkleError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::ProofTooShort);
    }
    if fr != *old_root {
        return Err(MerkleError::OldRootMismatch);
    }
    if sr != *new_root {
        return Err(MerkleError::NewRootMismatch);
    }
    Ok(())
}

/// A signed tree head (checkpoint).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TreeHead {
    pub tree_size: u64,
    pub root_hex: String,
    pub timestamp_micros: i64,
    pub key_id: String,
    pub signature_hex: String,
}

fn tree_head_message(
    tree_size: u64,
    root_hex: &str,
    timestamp_micros: i64,
    key_id: &str,
) -> String {
    format!("medpipe-audit-tree-head-v1\n{tree_size}\n{root_hex}\n{timestamp_micros}\n{key_id}")
}

/// Decodes exactly `N` bytes from lowercase hex, rejecting any non-canonical spelling.
fn decode_canonical<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    (hex::encode(out) == s).then_some(out)
}

impl TreeHead {
    /// Signs the canonical byte string
    /// "medpipe-audit-tree-head-v1\n{tree_size}\n{root_hex}\n{timestamp_micros}\n{key_id}"
    /// with Ed25519 (root_hex is lowercase).
    pub fn sign(
        tree_size: u64,
        root: &Hash,
        timestamp_micros: i64,
        key_id: &str,
        key: &SigningKey,
    ) -> TreeHead {
        let root_hex = hex::encode(root);
        let msg = tree_head_message(tree_size, &root_hex, timestamp_micros, key_id);
        let signature = key.sign(msg.as_bytes());
        TreeHead {
            tree_size,
            root_hex,
            timestamp_micros,
            key_id: key_id.to_owned(),
            signature_hex: hex::encode(signature.to_bytes()),
        }
    }

    /// Verifies the signature (strict Ed25519) and returns the signed root.
    /// Hex fields must be canonical lowercase so a head has exactly one valid encoding.
    pub fn verify(&self, key: &VerifyingKey) -> Result<Hash, MerkleError> {
        let root: Hash = decode_canonical(&self.root_hex).ok_or(MerkleError::InvalidRootHex)?;
        let sig: [u8; 64] =
            decode_canonical(&self.signature_hex).ok_or(MerkleError::InvalidSignatureHex)?;
        let msg = tree_head_message(
            self.tree_size,
            &self.root_hex,
            self.timestamp_micros,
            &self.key_id,
        );
        key.verify_strict(msg.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| MerkleError::BadSignature)?;
        Ok(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_compact_tree_agrees_with_the_full_root_at_every_size() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut t = CompactTree::new();
        assert_eq!(t.root(), root(&[]));
        for (i, l) in leaves.iter().enumerate() {
            t.push(*l);
            assert_eq!(t.size(), i as u64 + 1);
            assert_eq!(t.root(), root(&leaves[..=i]), "size {}", i + 1);
        }
    }

    /// Independent, deliberately naive RFC 6962 MTH: recursive split on raw leaf data.
    fn naive_mth(data: &[Vec<u8>]) -> Hash {
        let n = data.len();
        if n == 0 {
            return Sha256::digest(b"").into();
        }
        if n == 1 {
            let mut v = vec![0u8];
            v.extend_from_slice(&data[0]);
            return Sha256::digest(&v).into();
        }
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        let mut v = vec![1u8];
        v.extend_from_slice(&naive_mth(&data[..k]));
        v.extend_from_slice(&naive_mth(&data[k..]));
        Sha256::digest(&v).into()
    }

    fn naive_split(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    /// RFC 6962 PATH shape, leaf upwards: true = sibling subtree on the right.
    fn incl_shape(m: usize, n: usize) -> Vec<bool> {
        if n <= 1 {
            return vec![];
        }
        let k = naive_split(n);
        let mut v = if m < k {
            incl_shape(m, k)
        } else {
            incl_shape(m - k, n - k)
        };
        v.push(m < k);
        v
    }

    /// RFC 6962 SUBPROOF shape: 'N' = whole-subtree node, 'R'/'L' = sibling side.
    fn cons_shape(m: usize, n: usize, b: bool) -> String {
        if m == n {
            return if b { String::new() } else { "N".into() };
        }
        let k = naive_split(n);
        if m <= k {
            cons_shape(m, k, b) + "R"
        } else {
            cons_shape(m - k, n - k, false) + "L"
        }
    }

    fn data(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("audit-event-{i}").into_bytes())
            .collect()
    }

    fn hashes(n: usize) -> Vec<Hash> {
        data(n).iter().map(|d| leaf_hash(d)).collect()
    }

    fn flip(h: &Hash) -> Hash {
        let mut x = *h;
        x[7] ^= 0x20;
        x
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// The eight-leaf example tree used by the Certificate Transparency reference tests.
    fn ct_leaves() -> Vec<Vec<u8>> {
        vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            (0x50..=0x57).collect(),
            (0x60..=0x6f).collect(),
        ]
    }

    #[test]
    fn known_answers() {
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(root(&[leaf_hash(b"")])),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let d = ct_leaves();
        for n in 1..=8 {
            let hs: Vec<Hash> = d[..n].iter().map(|x| leaf_hash(x)).collect();
            assert_eq!(root(&hs), naive_mth(&d[..n]), "size {n}");
            assert_eq!(hex::encode(root(&hs)), expected[n - 1], "size {n}");
        }
    }

    #[test]
    fn root_matches_naive_up_to_70() {
        for n in 0..=70 {
            assert_eq!(root(&hashes(n)), naive_mth(&data(n)), "size {n}");
        }
    }

    #[test]
    fn inclusion_all_indices_and_tampering() {
        for n in 1..=33usize {
            let hs = hashes(n);
            let r = root(&hs);
            let nn = n as u64;
            for i in 0..n {
                let p = inclusion_proof(&hs, i).unwrap();
                let ii = i as u64;
                assert_eq!(verify_inclusion(&hs[i], ii, nn, &p, &r), Ok(()), "{i}/{n}");
                for j in 0..p.len() {
                    let mut t = p.clone();
                    t[j] = flip(&t[j]);
                    assert!(verify_inclusion(&hs[i], ii, nn, &t, &r).is_err());
                }
                for wrong in 0..n as u64 {
                    if wrong != ii {
                        assert!(verify_inclusion(&hs[i], wrong, nn, &p, &r).is_err());
                    }
                }
                // tree_size is not hashed into the path: a wrong size can only be accepted
                // when it yields the very same hashing shape (e.g. index 0 of 3 vs of 4).
                for wrong_size in [nn - 1, nn + 1, nn * 2] {
                    let ok = verify_inclusion(&hs[i], ii, wrong_size, &p, &r).is_ok();
                    let same =
                        wrong_size > ii && incl_shape(i, wrong_size as usize) == incl_shape(i, n);
                    assert_eq!(ok, same, "index {i} size {n} as {wrong_size}");
                }
                assert_eq!(
                    verify_inclusion(&hs[i], ii, nn, &p, &flip(&r)),
                    Err(MerkleError::RootMismatch)
                );
                assert_eq!(
                    verify_inclusion(&flip(&hs[i]), ii, nn, &p, &r),
                    Err(MerkleError::RootMismatch)
                );
                let mut longer = p.clone();
                longer.push(r);
                assert_eq!(
                    verify_inclusion(&hs[i], ii, nn, &longer, &r),
                    Err(MerkleError::ProofTooLong)
                );
                if !p.is_empty() {
                    assert_eq!(
                        verify_inclusion(&hs[i], ii, nn, &p[..p.len() - 1], &r),
                        Err(MerkleError::ProofTooShort)
                    );
                }
            }
            assert_eq!(
                inclusion_proof(&hs, n),
                Err(MerkleError::IndexOutOfRange {
                    index: nn,
                    tree_size: nn
                })
            );
            assert_eq!(
                verify_inclusion(&hs[0], nn, nn, &[], &r),
                Err(MerkleError::IndexOutOfRange {
                    index: nn,
                    tree_size: nn
                })
            );
        }
        assert!(inclusion_proof(&[], 0).is_err());
    }

    #[test]
    fn consistency_all_pairs_and_tampering() {
        let all = hashes(33);
        for new in 1..=33usize {
            let new_root = root(&all[..new]);
            for old in 1..=new {
                let old_root = root(&all[..old]);
                let p = consistency_proof(&all[..new], old).unwrap();
                let (o, n) = (old as u64, new as u64);
                assert_eq!(
                    verify_consistency(o, n, &old_root, &new_root, &p),
                    Ok(()),
                    "{old}->{new}"
                );
                for j in 0..p.len() {
                    let mut t = p.clone();
                    t[j] = flip(&t[j]);
                    assert!(verify_consistency(o, n, &old_root, &new_root, &t).is_err());
                }
                assert!(verify_consistency(o, n, &flip(&old_root), &new_root, &p).is_err());
                assert!(verify_consistency(o, n, &old_root, &flip(&new_root), &p).is_err());
                for (wo, wn) in [(o + 1, n), (o - 1, n), (o, n + 1), (o, n - 1)] {
                    if (wo, wn) != (o, n) && wo <= wn {
                        // As for inclusion, sizes are only confusable when the shape is equal.
                        let ok = verify_consistency(wo, wn, &old_root, &new_root, &p).is_ok();
                        let same = wo > 0
                            && cons_shape(wo as usize, wn as usize, true)
                                == cons_shape(old, new, true);
                        assert!(!ok || same, "{old}->{new} as {wo}->{wn}");
                    } else if (wo, wn) != (o, n) {
                        assert!(verify_consistency(wo, wn, &old_root, &new_root, &p).is_err());
                    }
                }
                let mut longer = p.clone();
                longer.push(new_root);
                assert!(verify_consistency(o, n, &old_root, &new_root, &longer).is_err());
                if !p.is_empty() {
                    assert!(
                        verify_consistency(o, n, &old_root, &new_root, &p[..p.len() - 1]).is_err()
                    );
                }
            }
            assert_eq!(
                consistency_proof(&all[..new], 0),
                Err(MerkleError::OldSizeZero)
            );
            assert!(consistency_proof(&all[..new], new + 1).is_err());
        }
        let r = root(&all[..5]);
        assert_eq!(
            verify_consistency(0, 5, &r, &r, &[]),
            Err(MerkleError::OldSizeZero)
        );
        assert_eq!(
            verify_consistency(6, 5, &r, &r, &[]),
            Err(MerkleError::OldSizeExceedsNewSize {
                old_size: 6,
                new_size: 5
            })
        );
        assert_eq!(
            verify_consistency(3, 5, &r, &r, &[]),
            Err(MerkleError::EmptyConsistencyProof)
        );
        assert_eq!(
            verify_consistency(4, 5, &r, &r, &[]),
            Err(MerkleError::EmptyConsistencyProof)
        );
        assert_eq!(
            verify_consistency(5, 5, &r, &r, &[r]),
            Err(MerkleError::NonEmptyProofForEqualSizes)
        );
        assert_eq!(
            verify_consistency(5, 5, &r, &flip(&r), &[]),
            Err(MerkleError::RootMismatch)
        );
    }

    #[test]
    fn single_byte_change_changes_root() {
        for n in 1..=17 {
            let d = data(n);
            let base = root(&hashes(n));
            for i in 0..n {
                for b in 0..d[i].len() {
                    let mut m = d.clone();
                    m[i][b] ^= 0x01;
                    let hs: Vec<Hash> = m.iter().map(|x| leaf_hash(x)).collect();
                    assert_ne!(root(&hs), base, "leaf {i} byte {b} of {n}");
                }
            }
        }
    }

    #[test]
    fn domain_separation() {
        let a = leaf_hash(b"x");
        let b = leaf_hash(b"y");
        let mut concat = a.to_vec();
        concat.extend_from_slice(&b);
        assert_ne!(leaf_hash(&concat), node_hash(&a, &b));
        assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
    }

    #[test]
    fn tree_head_roundtrip_and_forgery() {
        let sk = key(7);
        let vk = sk.verifying_key();
        let r = root(&hashes(10));
        let th = TreeHead::sign(10, &r, 1_700_000_000_000_000, "audit-key-1", &sk);
        assert_eq!(th.verify(&vk), Ok(r));
        let json = serde_json::to_string(&th).unwrap();
        let back: TreeHead = serde_json::from_str(&json).unwrap();
        assert_eq!(back, th);
        assert_eq!(back.verify(&vk), Ok(r));

        assert_eq!(
            th.verify(&key(8).verifying_key()),
            Err(MerkleError::BadSignature)
        );
        let other_root = hex::encode(flip(&r));
        let mut bad_sig = th.signature_hex.clone().into_bytes();
        bad_sig[10] = if bad_sig[10] == b'0' { b'1' } else { b'0' };
        let mutations: Vec<(TreeHead, MerkleError)> = vec![
            (
                TreeHead {
                    tree_size: 11,
                    ..th.clone()
                },
                MerkleError::BadSignature,
            ),
            (
                TreeHead {
                    root_hex: other_root,
                    ..th.clone()
                },
                MerkleError::BadSignature,
            ),
            (
                TreeHead {
                    timestamp_micros: th.timestamp_micros + 1,
                    ..th.clone()
                },
                MerkleError::BadSignature,
            ),
            (
                TreeHead {
                    key_id: "audit-key-2".into(),
                    ..th.clone()
                },
                MerkleError::BadSignature,
            ),
            (
                TreeHead {
                    signature_hex: String::from_utf8(bad_sig).unwrap(),
                    ..th.clone()
                },
                MerkleError::BadSignature,
            ),
            (
                TreeHead {
                    root_hex: th.root_hex.to_uppercase(),
                    ..th.clone()
                },
                MerkleError::InvalidRootHex,
            ),
            (
                TreeHead {
                    root_hex: th.root_hex[..62].to_string(),
                    ..th.clone()
                },
                MerkleError::InvalidRootHex,
            ),
            (
                TreeHead {
                    signature_hex: th.signature_hex.to_uppercase(),
                    ..th.clone()
                },
                MerkleError::InvalidSignatureHex,
            ),
            (
                TreeHead {
                    signature_hex: format!("{}00", th.signature_hex),
                    ..th.clone()
                },
                MerkleError::InvalidSignatureHex,
            ),
            (
                TreeHead {
                    signature_hex: "zz".repeat(64),
                    ..th.clone()
                },
                MerkleError::InvalidSignatureHex,
            ),
        ];
        for (m, err) in mutations {
            assert_eq!(m.verify(&vk), Err(err), "{m:?}");
        }
    }

    #[test]
    fn tree_head_message_is_canonical() {
        let r = [0xab; 32];
        let th = TreeHead::sign(3, &r, -5, "k", &key(1));
        let msg = format!("medpipe-audit-tree-head-v1\n3\n{}\n-5\nk", "ab".repeat(32));
        let sig =
            Signature::from_bytes(&hex::decode(&th.signature_hex).unwrap().try_into().unwrap());
        assert!(key(1)
            .verifying_key()
            .verify_strict(msg.as_bytes(), &sig)
            .is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_inclusion(n in 1usize..3000, seed in any::<u64>()) {
            let hs = hashes(n);
            let r = root(&hs);
            let i = (seed % n as u64) as usize;
            let p = inclusion_proof(&hs, i).unwrap();
            prop_assert_eq!(verify_inclusion(&hs[i], i as u64, n as u64, &p, &r), Ok(()));
            let other = ((seed / 7) % n as u64) as usize;
            if other != i {
                prop_assert!(verify_inclusion(&hs[other], i as u64, n as u64, &p, &r).is_err());
                prop_assert!(verify_inclusion(&hs[i], other as u64, n as u64, &p, &r).is_err());
            }
        }

        #[test]
        fn prop_consistency(new in 1usize..3000, seed in any::<u64>()) {
            let hs = hashes(new);
            let old = 1 + (seed % new as u64) as usize;
            let p = consistency_proof(&hs, old).unwrap();
            let (or, nr) = (root(&hs[..old]), root(&hs));
            prop_assert_eq!(verify_consistency(old as u64, new as u64, &or, &nr, &p), Ok(()));
            if !p.is_empty() {
                let j = (seed as usize / 3) % p.len();
                let mut t = p.clone();
                t[j] = flip(&t[j]);
                prop_assert!(verify_consistency(old as u64, new as u64, &or, &nr, &t).is_err());
            }
        }

        #[test]
        fn prop_byte_change(d in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 1..40), 1..50), pick in any::<u64>()) {
            let hs: Vec<Hash> = d.iter().map(|x| leaf_hash(x)).collect();
            let base = root(&hs);
            prop_assert_eq!(base, naive_mth(&d));
            let i = (pick % d.len() as u64) as usize;
            let b = ((pick >> 20) % d[i].len() as u64) as usize;
            let mut m = d.clone();
            m[i][b] = m[i][b].wrapping_add(1 + (pick >> 40) as u8 % 255);
            let mh: Vec<Hash> = m.iter().map(|x| leaf_hash(x)).collect();
            prop_assert_ne!(root(&mh), base);
        }
    }
}
