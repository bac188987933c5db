//! Shared generators for the executable proofs.
