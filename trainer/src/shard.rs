//! Which rank owns which variable under a sharded optimizer (ZeRO stage 1): the variables,
//! sorted by name, cut into `N` contiguous runs of about equal size. The one definition of the
//! assignment: the data-parallel optimizer shards by it and `difinfo-train plan` sizes a rank's
//! optimizer state by it.

/// The rank that owns each variable: variable `i` goes to the rank in whose slice of the
/// parameters its midpoint falls.
///
/// # Formula
/// ```text
/// o_i = Σ_{j<i} s_j,   P = Σ_j s_j
/// owner_i = min(N − 1, ⌊N · (o_i + s_i / 2) / P⌋)      (P = 0: owner_i = 0)
/// ```
/// where `s_i` is the size (elements) of variable `i` in name order and `N = world`;
/// computed exactly as `⌊N · (2 o_i + s_i) / (2 P)⌋` in `u128`, so no size overflows. The
/// owners are non-decreasing in `i` (each rank's variables are contiguous in name order), and a
/// variable larger than `P / N` still goes whole to one rank. `world = 0` is read as 1.
///
/// # Examples
/// ```
/// use difinfo_trainer::shard::owners;
/// assert_eq!(owners(&[10, 10, 10, 10], 2), vec![0, 0, 1, 1]);
/// assert_eq!(owners(&[100, 1, 1], 2), vec![0, 1, 1]);
/// assert_eq!(owners(&[0, 0], 3), vec![0, 0]);
/// ```
pub fn owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let n = world.max(1) as u128;
    let total: u128 = sizes.iter().map(|&s| s as u128).sum();
    let mut offset = 0u128;
    sizes
        .iter()
        .map(|&s| {
            let s = s as u128;
            let rank = if total == 0 {
                0
            } else {
                (n * (2 * offset + s) / (2 * total)).min(n - 1)
            };
            offset += s;
            rank as usize
        })
        .collect()
}

/// The elements each rank owns under [`owners`]: `load_r = Σ_{i : owner_i = r} s_i`, one entry
/// per rank `r = 0 .. N` (`world = 0` read as 1).
///
/// # Formula
/// `load_r = Σ_i s_i · [owners(sizes, N)_i = r]`.
pub fn loads(sizes: &[usize], world: usize) -> Vec<u128> {
    let mut out = vec![0u128; world.max(1)];
    for (&s, r) in sizes.iter().zip(owners(sizes, world)) {
        out[r] += s as u128;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sizes_split_evenly_and_contiguously() {
        assert_eq!(owners(&[1; 8], 4), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(owners(&[1; 3], 1), vec![0, 0, 0]);
        assert_eq!(loads(&[1; 8], 4), vec![2, 2, 2, 2]);
    }

    #[test]
    fn world_zero_and_empty_inputs_do_not_panic() {
        assert_eq!(owners(&[5, 6], 0), vec![0, 0]);
        assert!(owners(&[], 4).is_empty());
        assert_eq!(loads(&[], 3), vec![0, 0, 0]);
        assert_eq!(owners(&[0, 0, 0], 2), vec![0, 0, 0]);
    }

    #[test]
    fn owners_are_non_decreasing_and_in_range() {
        // A deterministic spread of sizes, zeros and one huge variable included.
        let sizes: Vec<usize> = (0..97usize).map(|i| (i * 7919) % 1013).collect();
        let mut with_big = sizes.clone();
        with_big[40] = 1_000_000;
        for s in [&sizes, &with_big] {
            for world in 1..=9 {
                let o = owners(s, world);
                assert_eq!(o.len(), s.len());
                assert!(o.windows(2).all(|w| w[0] <= w[1]), "{world}: {o:?}");
                assert!(o.iter().all(|&r| r < world));
                let l = loads(s, world);
                assert_eq!(l.iter().sum::<u128>(), s.iter().map(|&x| x as u128).sum());
            }
        }
    }

    #[test]
    fn a_share_exceeds_the_even_share_by_less_than_one_variable() {
        let sizes: Vec<usize> = (1..=60usize).map(|i| (i * 37) % 101 + 1).collect();
        let total: u128 = sizes.iter().map(|&s| s as u128).sum();
        let largest = *sizes.iter().max().unwrap() as u128;
        for world in 1..=8u128 {
            for l in loads(&sizes, world as usize) {
                assert!(l <= total / world + largest, "{world}: {l}");
            }
        }
    }

    #[test]
    fn sizes_near_usize_max_do_not_overflow() {
        let big = usize::MAX / 2;
        assert_eq!(owners(&[big, big, big, big], 2), vec![0, 0, 1, 1]);
        assert_eq!(owners(&[usize::MAX, usize::MAX], 2), vec![0, 1]);
    }

    #[test]
    fn the_midpoint_rule_by_hand() {
        // P = 10, N = 3: midpoints 1, 3.5, 6, 9 → ⌊3·m/10⌋ = 0, 1, 1, 2.
        assert_eq!(owners(&[2, 3, 2, 3], 3), vec![0, 1, 1, 2]);
        // One variable holding almost everything sits on the rank of its midpoint.
        assert_eq!(owners(&[1, 98, 1], 4), vec![0, 2, 3]);
    }
}
