//! Which rank owns which variable under ZeRO stage 1: the variables, sorted by name, cut into
//! `N` contiguous runs of about equal size (the rule PyTorch's `ZeroRedundancyOptimizer` and
//! DeepSpeed apply to a flat parameter list, at the granularity of whole variables).

/// The owner of each variable: variable `i` of size `s_i` (in name order, total `P`, offset
/// `o_i = Σ_{j<i} s_j`) belongs to rank `min(N − 1, ⌊N·(o_i + s_i/2) / P⌋)`, the rank whose
/// `P/N` slice holds the variable's midpoint (rank 0 for all when `P = 0`). Owners never
/// decrease with `i`, and a rank's share exceeds `P/N` by less than its largest variable.
pub fn owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let total: u128 = sizes.iter().map(|&s| s as u128).sum();
    let mut offset: u128 = 0;
    sizes
        .iter()
        .map(|&s| {
            let s = s as u128;
            let owner = if total == 0 {
                0
            } else {
                // 2·N·(o + s/2) / (2·P), in integers.
                ((world as u128 * (2 * offset + s)) / (2 * total)) as usize
            };
            offset += s;
            owner.min(world - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::owners;

    #[test]
    fn contiguous_and_balanced() {
        let sizes = [10, 10, 10, 10, 10, 10];
        assert_eq!(owners(&sizes, 2), [0, 0, 0, 1, 1, 1]);
        assert_eq!(owners(&sizes, 3), [0, 0, 1, 1, 2, 2]);
        assert_eq!(owners(&sizes, 1), [0; 6]);
        // One large variable: its midpoint decides.
        assert_eq!(owners(&[100, 1, 1], 2), [0, 1, 1]);
        assert_eq!(owners(&[0, 0], 4), [0, 0]);
        // More ranks than variables: some ranks own nothing.
        assert_eq!(owners(&[5, 5], 4), [1, 3]);
    }

    #[test]
    fn shares_exceed_the_even_split_by_less_than_a_variable() {
        let sizes: Vec<usize> = (1..40).map(|i| (i * 7919) % 97 + 1).collect();
        for n in 1..6 {
            let o = owners(&sizes, n);
            assert!(o.windows(2).all(|w| w[0] <= w[1]));
            let total: usize = sizes.iter().sum();
            let largest = *sizes.iter().max().unwrap();
            for r in 0..n {
                let share: usize = sizes
                    .iter()
                    .zip(&o)
                    .filter(|(_, &x)| x == r)
                    .map(|(s, _)| s)
                    .sum();
                assert!(share * n < total + n * largest, "rank {r} of {n}: {share}");
            }
        }
    }
}
