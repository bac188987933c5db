//! Every tolerance of the float arithmetic, in one place, with the reason it is honest.
//! The exact arithmetic has none.

/// Largest `|Σ p − 1|` accepted by [`crate::Policy::from_probs`] and
/// `|log Σ exp(l)|` accepted by [`crate::Policy::from_log_probs`].
///
/// Why: summing `N` doubles each within half an ulp of the truth accumulates at most about
/// `N · 2^-53`; at `N = 10^7` that is `1.1e-9`. `1e-8` leaves an order of magnitude for inputs
/// that were themselves produced by a normalization.
pub const MASS_TOLERANCE: f64 = 1e-8;

/// A float log-margin difference `Δ` with `|Δ| ≤ MARGIN_TIE_ULPS · ε · max(1, |log p|)` over the
/// log-probabilities it combines counts as an exact tie in
/// [`crate::power_law::log_margin_ordering`]'s sign comparison.
///
/// Why: `Δ` is a sum of four log-probabilities, each within an ulp or two of the truth after
/// normalization; 16 ulp of the largest magnitude bounds that rounding with room to spare, while
/// any real margin between distinct rationals of the proofs' generators is far larger.
pub const MARGIN_TIE_ULPS: f64 = 16.0;
