//! Weighted random choice among a rule's backends. Randomness is injected: the filter seeds one
//! generator from the host when the VM starts; tests pass fixed seeds.

/// A source of uniformly distributed `u64`s.
pub trait RandomSource {
    fn next_u64(&mut self) -> u64;
}

/// SplitMix64: tiny, fast, statistically sound for load balancing (not for secrets).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }
}

impl RandomSource for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }
}

/// The same sequence as `SplitMix64`, drawn through a shared reference: one generator for the
/// requests of every thread that shares it (SplitMix64's step is an addition, so an atomic
/// add draws one value without a lock).
#[derive(Debug, Default)]
pub struct SharedSplitMix64 {
    state: std::sync::atomic::AtomicU64,
}

impl SharedSplitMix64 {
    pub fn new(seed: u64) -> SharedSplitMix64 {
        SharedSplitMix64 {
            state: std::sync::atomic::AtomicU64::new(seed),
        }
    }

    /// Starts the sequence again from `seed`.
    pub fn reseed(&self, seed: u64) {
        self.state.store(seed, std::sync::atomic::Ordering::Relaxed);
    }
}

impl RandomSource for &SharedSplitMix64 {
    fn next_u64(&mut self) -> u64 {
        let state = self
            .state
            .fetch_add(GOLDEN_GAMMA, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        mix(state)
    }
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Cumulative weights of a rule's backends; built once, at configure time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedChoice {
    /// `cumulative[i]` = sum of weights `0..=i`; the last entry is the total (> 0).
    cumulative: Vec<u64>,
}

impl WeightedChoice {
    /// `None` when there is nothing to choose (no weights, or all zero).
    pub fn new(weights: &[u64]) -> Option<WeightedChoice> {
        let mut total: u64 = 0;
        let mut cumulative = Vec::with_capacity(weights.len());
        for &w in weights {
            total = total.checked_add(w)?;
            cumulative.push(total);
        }
        (total > 0).then_some(WeightedChoice { cumulative })
    }

    /// Index of the chosen backend; a zero-weight backend is never chosen.
    pub fn choose(&self, rng: &mut impl RandomSource) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if self.cumulative.len() <= 1 || total == 0 {
            return 0;
        }
        // Lemire's multiply-shift maps a 64-bit draw onto 0..total without a division.
        let point = ((u128::from(rng.next_u64()) * u128::from(total)) >> 64) as u64;
        self.cumulative.partition_point(|&c| c <= point)
    }

    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_shared_generator_draws_the_same_sequence() {
        let mut plain = SplitMix64::new(42);
        let shared = SharedSplitMix64::new(42);
        for _ in 0..100 {
            assert_eq!((&shared).next_u64(), plain.next_u64());
        }
        shared.reseed(7);
        assert_eq!((&shared).next_u64(), SplitMix64::new(7).next_u64());
    }

    #[test]
    fn refuses_nothing_to_choose() {
        assert_eq!(WeightedChoice::new(&[]), None);
        assert_eq!(WeightedChoice::new(&[0, 0]), None);
        assert_eq!(WeightedChoice::new(&[u64::MAX, 1]), None);
    }

    #[test]
    fn single_backend_needs_no_randomness() {
        let choice = WeightedChoice::new(&[7]).unwrap();
        let mut rng = SplitMix64::new(1);
        assert!((0..100).all(|_| choice.choose(&mut rng) == 0));
    }

    #[test]
    fn zero_weight_never_chosen() {
        let choice = WeightedChoice::new(&[0, 5, 0]).unwrap();
        let mut rng = SplitMix64::new(42);
        assert!((0..10_000).all(|_| choice.choose(&mut rng) == 1));
    }

    #[test]
    fn follows_weights() {
        let choice = WeightedChoice::new(&[50, 50]).unwrap();
        let mut rng = SplitMix64::new(7);
        let n = 100_000;
        let first = (0..n).filter(|_| choice.choose(&mut rng) == 0).count();
        // 5 sigma of a binomial(100000, 0.5) is ~790.
        assert!((first as i64 - n / 2).abs() < 800, "{first}");

        let choice = WeightedChoice::new(&[1, 3]).unwrap();
        let first = (0..n).filter(|_| choice.choose(&mut rng) == 0).count();
        // p = 0.25: sigma ~137.
        assert!((first as i64 - n / 4).abs() < 700, "{first}");
    }

    #[test]
    fn extreme_draws_stay_in_range() {
        struct Fixed(u64);
        impl RandomSource for Fixed {
            fn next_u64(&mut self) -> u64 {
                self.0
            }
        }
        let choice = WeightedChoice::new(&[1, 2, 3]).unwrap();
        assert_eq!(choice.choose(&mut Fixed(0)), 0);
        assert_eq!(choice.choose(&mut Fixed(u64::MAX)), 2);
    }
}
